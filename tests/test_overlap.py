"""The overlap strategy's dynamic programme against brute force, and the set-overlap counting it rests on."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from indexcache.analyze import overlap_counts
from indexcache.errors import IndexCacheError
from indexcache.patterns.layout import from_full_layers
from indexcache.search.overlap import best_full_layers, best_pattern, retained_overlap


def brute_force(matrix, num_full, allowed, forced):
    """Best retained overlap over every legal F set, by enumeration."""
    must = sorted(set(forced) | {0})
    rest = [a for a in allowed if a not in must]
    best = None
    for extra in itertools.combinations(rest, num_full - len(must)):
        score = retained_overlap(from_full_layers([*must, *extra], len(matrix)), matrix, allowed)
        best = score if best is None else max(best, score)
    return best


def test_retained_overlap_by_hand():
    m = [[1.0, 0.5, 0.2, 0.1], [0.5, 1.0, 0.8, 0.3], [0.2, 0.8, 1.0, 0.4], [0.1, 0.3, 0.4, 1.0]]
    assert retained_overlap("FSSF", m, range(4)) == pytest.approx((1 + 0.5 + 0.2 + 1) / 4)
    assert retained_overlap("FFSS", m, range(4)) == pytest.approx((1 + 1 + 0.8 + 0.3) / 4)
    # A layer without an indexer adds nothing, whatever it would have reused.
    assert retained_overlap("FFSS", m, [0, 1, 2]) == pytest.approx((1 + 1 + 0.8) / 3)
    assert best_pattern(m, 2, range(4)) == "FFSS"  # keeps 3.1 of 4; FSFS keeps 2.9, FSSF 2.7


@pytest.mark.parametrize("seed", range(40))
def test_dp_matches_brute_force_on_random_matrices(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    values = [[rng.random() for _ in range(n)] for _ in range(n)]
    matrix = [[1.0 if i == j else (values[i][j] + values[j][i]) / 2 for j in range(n)] for i in range(n)]
    allowed = sorted({0} | {i for i in range(1, n) if rng.random() < 0.8})
    forced = [f for f in allowed if f and rng.random() < 0.2]
    must = set(forced) | {0}
    num_full = rng.randint(len(must), len(allowed))

    chosen = best_full_layers(matrix, num_full, allowed, forced)

    assert len(chosen) == num_full and chosen == sorted(chosen)
    assert must <= set(chosen) <= set(allowed)
    pattern = from_full_layers(chosen, n)
    assert retained_overlap(pattern, matrix, allowed) == pytest.approx(brute_force(matrix, num_full, allowed, forced))


def test_ties_go_to_the_earliest_layers():
    flat = [[0.5] * 5 for _ in range(5)]
    assert best_full_layers(flat, 3, range(5)) == [0, 1, 2]


def test_impossible_requests_are_one_clear_error():
    m = [[1.0] * 4 for _ in range(4)]
    with pytest.raises(IndexCacheError, match="at most 3"):
        best_full_layers(m, 4, [0, 1, 3])
    with pytest.raises(IndexCacheError, match="at least 3"):
        best_full_layers(m, 2, range(4), forced=[2, 3])
    with pytest.raises(IndexCacheError, match="no indexer weights"):
        best_full_layers(m, 2, [0, 1], forced=[2])


def test_overlap_counts_match_python_sets():
    gen = torch.Generator().manual_seed(0)
    a = torch.stack([torch.randperm(40, generator=gen)[:7] for _ in range(30)]).view(3, 10, 7)
    b = torch.stack([torch.randperm(40, generator=gen)[:7] for _ in range(30)]).view(3, 10, 7)
    counts = overlap_counts(a.sort(-1).values, b.sort(-1).values)
    rows_a, rows_b = a.view(-1, 7).tolist(), b.view(-1, 7).tolist()
    expected = [len(set(x) & set(y)) for x, y in zip(rows_a, rows_b, strict=True)]
    assert counts.view(-1).tolist() == expected
    assert counts.sum() > 0
