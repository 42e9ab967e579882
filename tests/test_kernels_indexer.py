"""The lightning-indexer Triton kernel against its PyTorch reference (CPU: Triton's interpreter; GPU: compiled)."""

from __future__ import annotations

import pytest
import torch

from indexcache.kernels.testing import assert_selection_ok, kernel_device, poisoned_empty, selection_report

DEVICE = kernel_device()  # before the kernel modules load: they pick compiler or interpreter then

from indexcache.kernels.indexer import lightning_indexer_topk_reference  # noqa: E402
from indexcache.kernels.indexer.kernel import lightning_indexer_topk_triton  # noqa: E402
from indexcache.kernels.indexer.reference import index_scores_reference  # noqa: E402

# Small tiles so that the CPU cases cross many tile, chunk and pass boundaries. A bucket cap of 4 sends the
# selection's near-tie bucket back to the row instead of the scratch row (the path for heavily tied scores).
SMALL_TILES = dict(block_m=16, block_n=32, select_block=64, select_warps=1, num_warps=1, num_stages=1)


def _inputs(batch, seq_len, num_keys, n_heads, head_dim, seed, pad=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, n_heads, head_dim, generator=gen).bfloat16()
    k = torch.randn(batch, num_keys, head_dim, generator=gen).bfloat16()
    w = torch.randn(batch, seq_len, n_heads, generator=gen) * n_heads**-0.5
    key_mask = None
    if pad is not None:  # right padding of the last sequence, and one hole in the first
        key_mask = torch.ones(batch, num_keys, dtype=torch.bool)
        key_mask[-1, num_keys - pad :] = False
        key_mask[0, num_keys // 3] = False
    to = lambda t: None if t is None else t.to(DEVICE)
    return to(q), to(k), to(w), to(key_mask)


def check_selection(got: torch.Tensor, scores: torch.Tensor, topk: int) -> None:
    assert_selection_ok(selection_report(got, scores, topk))


CASES = [
    pytest.param(1, 257, 257, 4, 32, 16, None, {}, id="B1-S257-H4-D32-K16"),
    pytest.param(2, 100, 100, 2, 16, 64, 37, {}, id="B2-S100-H2-D16-K64-pad"),
    pytest.param(2, 100, 100, 2, 16, 8, 37, {"bucket_cap": 4}, id="B2-S100-H2-D16-K8-pad-no-scratch"),
    pytest.param(2, 77, 77, 3, 24, 8, 5, {"buffer_bytes": 2 * 77 * 4 * 20}, id="B2-S77-H3-D24-K8-pad-chunks"),
    pytest.param(1, 40, 100, 4, 32, 16, None, {}, id="B1-S40-T100-H4-D32-K16-offset"),
    pytest.param(3, 1, 300, 4, 32, 32, 50, {}, id="B3-S1-T300-H4-D32-K32-decode-pad"),
]


@pytest.mark.parametrize("batch,seq_len,num_keys,n_heads,head_dim,topk,pad,extra", CASES)
def test_indexer_matches_reference(batch, seq_len, num_keys, n_heads, head_dim, topk, pad, extra):
    q, k, w, key_mask = _inputs(batch, seq_len, num_keys, n_heads, head_dim, seed=seq_len * 31 + topk, pad=pad)
    scale = head_dim**-0.5
    with poisoned_empty():
        got = lightning_indexer_topk_triton(q, k, w, topk, scale, key_mask, **{**SMALL_TILES, **extra})
    assert got.shape == (batch, seq_len, topk) and got.dtype == torch.int32
    check_selection(got, index_scores_reference(q, k, w, scale, key_mask), topk)


@pytest.mark.parametrize(
    "seq_len,pool,topk",
    [pytest.param(75, 4, 8, id="S75-pool4-K8"), pytest.param(70, 16, 2, id="S70-pool16-K2")],
)
def test_pooled_keys_match_reference(seq_len, pool, topk):
    """Keys that stand for pools of `pool` tokens (ratio): query t ranks only the (t + 1) // pool pools it sees
    whole; rows that see none are all -1."""
    q, k, w, _ = _inputs(1, seq_len, seq_len // pool, 3, 32, seed=seq_len + pool)
    with poisoned_empty():
        got = lightning_indexer_topk_triton(q, k, w, topk, 0.2, q_offset=0, ratio=pool, **SMALL_TILES)
    scores = index_scores_reference(q, k, w, 0.2, q_offset=0, ratio=pool)
    assert torch.isfinite(scores[:, pool - 1, :1]).all() and not torch.isfinite(scores[:, pool - 2]).any()
    check_selection(got, scores, topk)


def test_indexer_ties_are_resolved_to_exactly_k():
    """One head with a negative weight: ReLU zeroes most scores, so the k-th best is a tie shared by many keys;
    the radix select must still return exactly k distinct keys from the tied bucket."""
    q, k, w, _ = _inputs(1, 70, 70, 1, 16, seed=7)
    w = -w.abs()
    with poisoned_empty():
        got = lightning_indexer_topk_triton(q, k, w, 8, 0.25, **SMALL_TILES)
    check_selection(got, index_scores_reference(q, k, w, 0.25), 8)


def test_reference_matches_stock_indexer_selection():
    """The reference reproduces transformers' indexer arithmetic, so its top-k sets are the stock ones."""
    q, k, w, _ = _inputs(2, 50, 50, 4, 32, seed=3)
    q, k, w = q.cpu().float(), k.cpu().float(), w.cpu()
    stock = torch.relu(torch.matmul(q, k.transpose(-1, -2).unsqueeze(1)) * 32**-0.5)
    stock = torch.matmul(w.unsqueeze(-2), stock).squeeze(-2)
    stock = stock.masked_fill(torch.ones(50, 50, dtype=torch.bool).triu(1), float("-inf"))
    stock_idx = stock.topk(10, dim=-1).indices
    stock_idx = torch.where(torch.isfinite(stock.gather(-1, stock_idx)), stock_idx, -1)
    ours = lightning_indexer_topk_reference(q, k, w, 10, 32**-0.5)
    assert torch.equal(ours.long().sort(-1).values, stock_idx.sort(-1).values)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "seq_len,n_heads,topk",
    [pytest.param(3000, 32, 2048, id="S3000-H32-K2048"), pytest.param(777, 64, 256, id="S777-H64-K256")],
)
def test_indexer_gpu_default_tiles(seq_len, n_heads, topk):
    q, k, w, key_mask = _inputs(2, seq_len, seq_len, n_heads, 128, seed=seq_len, pad=100)
    with poisoned_empty():
        got = lightning_indexer_topk_triton(q, k, w, topk, 128**-0.5, key_mask)
    check_selection(got, index_scores_reference(q, k, w, 128**-0.5, key_mask), topk)


ENTRY_CASES = [
    pytest.param(1, 97, 4, 2, 16, 8, {}, id="B1-S97-r4-H2-D16-K8"),
    pytest.param(2, 90, 4, 2, 16, 8, {"buffer_bytes": 2 * 22 * 4 * 40}, id="B2-S90-r4-H2-D16-K8-chunks"),
]


@pytest.mark.parametrize("batch,seq_len,ratio,n_heads,head_dim,topk,extra", ENTRY_CASES)
def test_indexer_over_compressed_entries_matches_reference(batch, seq_len, ratio, n_heads, head_dim, topk, extra):
    """DeepSeek-V4's keys are entries of `ratio` tokens: query t sees entries s < (t + 1) // ratio (none before
    t = ratio - 1), and the kernel selects what the reference selects over them."""
    num_entries = seq_len // ratio
    q, k, w, _ = _inputs(batch, seq_len, num_entries, n_heads, head_dim, seed=seq_len + ratio)
    scale = head_dim**-0.5
    with poisoned_empty():
        got = lightning_indexer_topk_triton(q, k, w, topk, scale, ratio=ratio, **{**SMALL_TILES, **extra})
    scores = index_scores_reference(q, k, w, scale, ratio=ratio)
    assert torch.isinf(scores[:, : ratio - 1]).all() and torch.isfinite(scores[:, -1]).all()
    assert (got[:, : ratio - 1] == -1).all()  # no entry is complete before position ratio - 1
    check_selection(got, scores, topk)
