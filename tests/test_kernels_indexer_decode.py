"""The split-K decode indexer against its PyTorch reference (CPU: Triton's interpreter; GPU: compiled): the top-k set
of one query per sequence, whichever path the merge takes (candidates in scratch, or the whole row)."""

from __future__ import annotations

import pytest
import torch

from indexcache.kernels.testing import assert_selection_ok, poisoned_empty, selection_report, use_triton_interpreter

if not torch.cuda.is_available():
    use_triton_interpreter()

from indexcache.kernels.indexer.reference import index_scores_reference  # noqa: E402
from indexcache.kernels.indexer_decode import decode_indexer_topk_reference  # noqa: E402
from indexcache.kernels.indexer_decode.kernel import decode_indexer_topk_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small blocks, so that the CPU cases cross split, block and radix-pass boundaries.
SMALL = dict(block_n=32, num_warps=1, num_stages=1, collect_block=64, merge_block=64)


def _inputs(batch, num_keys, n_heads, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_heads, head_dim, generator=gen).bfloat16().to(DEVICE)
    k = torch.randn(batch, num_keys, head_dim, generator=gen).bfloat16().to(DEVICE)
    w = (torch.randn(batch, n_heads, generator=gen) * n_heads**-0.5).to(DEVICE)
    return q, k, w


def check(q, k, w, topk, scale, **launch):
    with poisoned_empty():
        got = decode_indexer_topk_triton(q, k, w, topk, scale, **{**SMALL, **launch})
    assert got.shape == (q.shape[0], topk) and got.dtype == torch.int32
    scores = index_scores_reference(q[:, None], k, w[:, None], scale)
    assert_selection_ok(selection_report(got[:, None], scores, topk))
    return got


@pytest.mark.parametrize(
    "batch,num_keys,n_heads,head_dim,topk,launch",
    [
        pytest.param(2, 301, 4, 32, 16, {}, id="B2-T301-H4-D32-K16"),
        pytest.param(3, 300, 2, 16, 32, {"n_split": 4}, id="B3-T300-H2-D16-K32-4splits"),
        pytest.param(1, 513, 3, 24, 64, {"n_split": 1}, id="B1-T513-H3-D24-K64-1split"),
        pytest.param(2, 20, 4, 32, 32, {}, id="B2-T20-K32-fewer-keys-than-k"),
        pytest.param(1, 64, 4, 32, 64, {}, id="B1-T64-K64-exactly-k"),
        pytest.param(2, 200, 4, 32, 16, {"bucket_cap": 2}, id="B2-T200-K16-bin-overflows-scratch"),
    ],
)
def test_decode_indexer_matches_reference(batch, num_keys, n_heads, head_dim, topk, launch):
    q, k, w = _inputs(batch, num_keys, n_heads, head_dim, seed=num_keys * 7 + topk)
    got = check(q, k, w, topk, head_dim**-0.5, **launch)
    if num_keys < topk:
        assert (got[:, num_keys:] == -1).all()


@pytest.mark.parametrize(
    "launch",
    [
        pytest.param({"merge_block": 256}, id="in-registers"),
        pytest.param({}, id="scratch-passes"),
        pytest.param({"bucket_cap": 16}, id="whole-row"),
    ],
)
def test_decode_indexer_ties_are_resolved_to_exactly_k(launch):
    """Negative head weights: ReLU zeroes most scores, so the k-th best is a tie shared by most keys, in one bin of
    ~150 candidates: merged in registers, by passes over the scratch row (more than `merge_block`), or over the
    whole row (more than the scratch row holds); each must return exactly k distinct keys."""
    q, k, w = _inputs(2, 150, 1, 16, seed=3)
    check(q, k, -w.abs(), 8, 0.25, **launch)


def test_reference_is_the_last_prefill_position():
    """The decode step selects what the prefill indexer selects for a window's last query."""
    from indexcache.kernels.indexer.reference import lightning_indexer_topk_reference

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 40, 4, 16, generator=gen)
    k = torch.randn(2, 40, 16, generator=gen)
    w = torch.randn(2, 40, 4, generator=gen)
    prefill = lightning_indexer_topk_reference(q, k, w, 8, 0.25)[:, -1]
    decode = decode_indexer_topk_reference(q[:, -1], k, w[:, -1], 8, 0.25)
    assert torch.equal(prefill.sort(-1).values, decode.sort(-1).values)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "batch,num_keys,n_heads,topk",
    [pytest.param(2, 70_000, 32, 2048, id="B2-T70000-H32-K2048"), pytest.param(5, 3000, 64, 2048, id="B5-T3000-H64")],
)
def test_decode_indexer_gpu_default_launch(batch, num_keys, n_heads, topk):
    q, k, w = _inputs(batch, num_keys, n_heads, 128, seed=num_keys)
    with poisoned_empty():
        got = decode_indexer_topk_triton(q, k, w, topk, 128**-0.5)
    scores = index_scores_reference(q[:, None], k, w[:, None], 128**-0.5)
    assert_selection_ok(selection_report(got[:, None], scores, topk))
