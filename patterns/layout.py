"""F/S sharing patterns: one letter per layer, `F` runs its indexer, `S` reuses the last F layer's top-k.

The string is exactly what transformers' `GlmMoeDsaConfig(index_topk_pattern=...)`, vLLM and SGLang read.
"""

from __future__ import annotations

import math
import random

from ..errors import IndexCacheError

FULL, SHARED = "F", "S"


def validate(pattern: str, num_layers: int | None = None) -> str:
    """Return `pattern` if it is a legal F/S string (layer 0 is F), else raise a clear error."""
    if not isinstance(pattern, str) or not pattern or set(pattern) - {FULL, SHARED}:
        raise IndexCacheError(f"pattern {pattern!r} is not an F/S string such as 'FSSF...'")
    if pattern[0] != FULL:
        raise IndexCacheError(f"pattern {pattern!r} starts with S: layer 0 has no earlier indexer to share")
    if num_layers is not None and len(pattern) != num_layers:
        raise IndexCacheError(f"pattern has {len(pattern)} letters but {num_layers} layers are expected")
    return pattern


def full_layers(pattern: str) -> list[int]:
    return [i for i, c in enumerate(pattern) if c == FULL]


def from_full_layers(full: set[int] | list[int], num_layers: int) -> str:
    return "".join(FULL if i in set(full) else SHARED for i in range(num_layers))


def indexer_types(pattern: str) -> list[str]:
    """The per-layer list that transformers' GlmMoeDsaConfig derives from `index_topk_pattern`."""
    return ["full" if c == FULL else "shared" for c in pattern]


def num_full_for_ratio(ratio: float, num_layers: int) -> int:
    """F = ceil(ratio × N), at least 1; `ratio` must lie in (0, 1]."""
    if not (0.0 < ratio <= 1.0):
        raise IndexCacheError(f"--ratio {ratio} is outside (0, 1]: give the fraction of indexers to keep, e.g. 0.25")
    # Round away float noise first so that 0.25 × 16 is 4, not 5.
    return max(1, math.ceil(round(ratio * num_layers, 9)))


def _nearest_allowed(target: int, allowed: list[int], taken: set[int]) -> int:
    free = [a for a in allowed if a not in taken]
    return min(free, key=lambda a: (abs(a - target), a))


def uniform(num_layers: int, num_full: int, allowed: list[int] | None = None) -> str:
    """Evenly spaced F layers starting at 0 (the paper's uniform interleave), moved to the nearest layer that
    has an indexer when `allowed` excludes some."""
    allowed = sorted(allowed if allowed is not None else range(num_layers))
    num_full = min(num_full, len(allowed))
    chosen: set[int] = set()
    for i in range(num_full):
        chosen.add(_nearest_allowed(math.floor(i * num_layers / num_full), allowed, chosen))
    return from_full_layers(chosen, num_layers)


def random_pattern(num_layers: int, num_full: int, rng: random.Random, allowed: list[int] | None = None) -> str:
    """Layer 0 plus `num_full - 1` F layers drawn uniformly from the other allowed layers."""
    allowed = sorted(allowed if allowed is not None else range(num_layers))
    rest = [a for a in allowed if a != 0]
    return from_full_layers({0, *rng.sample(rest, min(num_full - 1, len(rest)))}, num_layers)
