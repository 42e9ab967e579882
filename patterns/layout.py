"""F/S sharing patterns: one letter per decoder layer, `F` runs its indexer, `S` reuses the last F layer's top-k.

The string is exactly what transformers' `GlmMoeDsaConfig(index_topk_pattern=...)`, vLLM and SGLang read.
Patterns are made over the *indexer layers* (the layers that have an indexer in the architecture: every layer of
GLM-5, only the compressed-sparse-attention layers of DeepSeek-V4): the first of them is always F, ratios count
them and the uniform interleave spaces their ordinals (as `index_topk_freq` does). Layers without an indexer are
always S. Functions that take `indexer_layers` (or `allowed`) treat None as "every layer has one".
"""

from __future__ import annotations

import math
import random

from ..errors import IndexCacheError

FULL, SHARED = "F", "S"


def validate(pattern: str, num_layers: int | None = None, indexer_layers: list[int] | None = None) -> str:
    """Return `pattern` if it is a legal F/S string, else raise a clear error.

    Legal: F only on indexer layers, and F on the first of them (it has no earlier indexer to share).
    `indexer_layers` None: every layer has an indexer, so layer 0 is F.
    """
    if not isinstance(pattern, str) or not pattern or set(pattern) - {FULL, SHARED}:
        raise IndexCacheError(f"pattern {pattern!r} is not an F/S string such as 'FSSF...'")
    if num_layers is not None and len(pattern) != num_layers:
        raise IndexCacheError(f"pattern has {len(pattern)} letters but {num_layers} layers are expected")
    first = first_indexer_layer(indexer_layers)
    if first >= len(pattern) or pattern[first] != FULL:
        where = "starts with S" if first == 0 else f"makes layer {first} S"
        raise IndexCacheError(
            f"pattern {pattern!r} {where}: layer {first} is the first layer with an indexer, so it has no earlier "
            "indexer to share"
        )
    if indexer_layers is not None:
        stray = [i for i in full_layers(pattern) if i not in set(indexer_layers)]
        if stray:
            raise IndexCacheError(f"pattern {pattern!r} makes layers {stray} F but they have no indexer")
    return pattern


def first_indexer_layer(indexer_layers: list[int] | None) -> int:
    """The layer that is always F: the first indexer layer (layer 0 when every layer has one)."""
    if indexer_layers is None:
        return 0
    if not indexer_layers:
        raise IndexCacheError("the model has no layer with an indexer, so there is no pattern to make")
    return min(indexer_layers)


def full_layers(pattern: str) -> list[int]:
    return [i for i, c in enumerate(pattern) if c == FULL]


def from_full_layers(full: set[int] | list[int], num_layers: int) -> str:
    return "".join(FULL if i in set(full) else SHARED for i in range(num_layers))


def indexer_types(pattern: str) -> list[str]:
    """The per-layer list that transformers' GlmMoeDsaConfig derives from `index_topk_pattern`."""
    return ["full" if c == FULL else "shared" for c in pattern]


def index_topk_freq(letters: str) -> int | None:
    """f when F sits exactly on every f-th letter from the first (the schedule `index_topk_freq` = f describes:
    vLLM and SGLang count it over the indexer layers), else None."""
    full = full_layers(letters)
    freq = full[1] if len(full) > 1 else len(letters)
    return freq if full == list(range(0, len(letters), freq)) else None


def num_full_for_ratio(ratio: float, num_indexers: int) -> int:
    """F = ceil(ratio × M), at least 1, for M indexer layers; `ratio` must lie in (0, 1]."""
    if not (0.0 < ratio <= 1.0):
        raise IndexCacheError(f"--ratio {ratio} is outside (0, 1]: give the fraction of indexers to keep, e.g. 0.25")
    # Round away float noise first so that 0.25 × 16 is 4, not 5.
    return max(1, math.ceil(round(ratio * num_indexers, 9)))


def uniform(num_layers: int, num_full: int, allowed: list[int] | None = None) -> str:
    """The paper's uniform interleave over the `allowed` layers (those that can be F; default every layer):
    F on the ordinals ⌊i·M/F⌋ of the M allowed layers, so the first allowed layer is F."""
    allowed = sorted(allowed if allowed is not None else range(num_layers))
    num_full = min(num_full, len(allowed))
    return from_full_layers({allowed[math.floor(i * len(allowed) / num_full)] for i in range(num_full)}, num_layers)


def random_pattern(num_layers: int, num_full: int, rng: random.Random, allowed: list[int] | None = None) -> str:
    """The first allowed layer plus `num_full - 1` F layers drawn uniformly from the other allowed layers."""
    first, *rest = sorted(allowed if allowed is not None else range(num_layers))
    return from_full_layers({first, *rng.sample(rest, min(num_full - 1, len(rest)))}, num_layers)
