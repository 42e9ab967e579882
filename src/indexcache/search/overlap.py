"""Choose F layers from a cross-layer top-k overlap matrix by dynamic programming (the `overlap` strategy).

An S layer reuses the selection of the nearest preceding F layer, so a pattern keeps, for each S layer s, the
fraction `overlap[f(s)][s]` of s's own top-k that its F layer f(s) also selects. The DP picks the F set of a given
size (the first indexer layer and forced layers included, only layers with an indexer) that maximises the sum of
that retained overlap over all S layers: Kascade's anchor-layer DP applied to index reuse. Layers without an
indexer have no selection of their own; they are always S and add nothing to the score, whatever precedes them.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import IndexCacheError
from ..patterns.layout import FULL, first_indexer_layer, from_full_layers

Matrix = Sequence[Sequence[float | None]]


def retained_overlap(pattern: str, overlap: Matrix, indexer_layers: Sequence[int]) -> float:
    """Mean over the indexer layers of the fraction of each one's top-k that the pattern keeps.

    F layers keep all of their own (1); an S layer s keeps `overlap[f][s]`, f its nearest preceding F layer.
    """
    have = set(indexer_layers)
    total, last_full = 0.0, None
    for layer, letter in enumerate(pattern):
        if letter == FULL:
            last_full = layer
            total += 1.0
        elif layer in have:
            total += overlap[last_full][layer]
    return total / len(have)


def best_full_layers(
    overlap: Matrix, num_full: int, indexer_layers: Sequence[int], forced: Sequence[int] = ()
) -> list[int]:
    """The `num_full` F layers (always the first of `indexer_layers` and `forced`, only `indexer_layers`) with the
    most retained overlap.

    overlap: N × N, `overlap[i][j]` = fraction of layer j's top-k that layer i also selects (rows/columns of
    layers without an indexer are ignored). Exact, O(num_full · N²). Ties go to the lexicographically smallest
    list of F layers.
    """
    n = len(overlap)
    allowed = set(indexer_layers)
    first = first_indexer_layer(sorted(allowed))
    must = sorted(set(forced) | {first})
    if any(m not in allowed for m in must):
        raise IndexCacheError(f"layers {[m for m in must if m not in allowed]} must be F but have no indexer weights")
    if not len(must) <= num_full <= len(allowed):
        raise IndexCacheError(
            f"cannot keep {num_full} F layers: at least {len(must)} (layer {first} and forced layers) and at most "
            f"{len(allowed)} (layers with an indexer)"
        )

    def segment(start: int, stop: int) -> float:
        """Retained overlap of layers start+1 .. stop-1, all S and reusing F layer `start`."""
        return sum(overlap[start][s] for s in range(start + 1, stop) if s in allowed)

    # best[c][a]: the best score of layers a .. N-1 when a is F and c F layers lie in a .. N-1; nxt: the next F.
    neg = float("-inf")
    best = [[neg] * n for _ in range(num_full + 1)]
    nxt = [[None] * n for _ in range(num_full + 1)]
    for a in range(n - 1, -1, -1):
        if a not in allowed:
            continue
        # The next F layer may not jump over a forced layer.
        limit = min([m for m in must if m > a], default=n)
        if limit == n:
            best[1][a] = segment(a, n)
        for c in range(2, num_full + 1):
            for b in range(a + 1, limit + 1 if limit < n else n):
                if b not in allowed or best[c - 1][b] == neg:
                    continue
                score = segment(a, b) + best[c - 1][b]
                if score > best[c][a]:  # strict: on ties the earliest next F layer wins
                    best[c][a], nxt[c][a] = score, b
    if best[num_full][first] == neg:
        raise IndexCacheError(f"no pattern with {num_full} F layers honours the forced layers {must}")
    chosen, at = [first], first
    for c in range(num_full, 1, -1):
        at = nxt[c][at]
        chosen.append(at)
    return chosen


def best_pattern(overlap: Matrix, num_full: int, indexer_layers: Sequence[int], forced: Sequence[int] = ()) -> str:
    return from_full_layers(best_full_layers(overlap, num_full, indexer_layers, forced), len(overlap))
