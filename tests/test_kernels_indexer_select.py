"""The indexer's selection kernel on chosen fp32 scores (CPU: Triton's interpreter; GPU: compiled): the exact top-k
set, ties to the lowest key indices, whichever path a row takes (bracket from the sample, or radix passes)."""

from __future__ import annotations

import pytest
import torch

from indexcache.kernels.testing import kernel_device, poisoned_empty

DEVICE = kernel_device()  # before the kernel modules load: they pick compiler or interpreter then

from indexcache.kernels.indexer.kernel import topk_of_scores_triton  # noqa: E402

# Small blocks so rows cross many blocks; a sample of 2 keys in 8 gives a bracket of a few dozen keys at k = 16.
SMALL = dict(select_block=64, select_warps=1, sample_run=2, sample_stride=8)


def exact_topk_sets(scores: torch.Tensor, topk: int, q_offset: int) -> torch.Tensor:
    """int64 [B, S, topk] sorted: the top-k keys by the kernel's order (the fp32 order, +0 above -0), ties to the
    lowest index, -1 past the visible keys. scores: fp32 [B, S, T], -inf = not visible."""
    batch, seq_len, num_keys = scores.shape
    bits = scores.contiguous().view(torch.int32).long()
    order_key = torch.where(bits < 0, -bits - 1, bits + 2**31)  # bits ^ (sign ? ~0 : 1 << 31), as uint32
    reach = torch.arange(num_keys)[None, :] <= torch.arange(seq_len)[:, None] + q_offset
    visible = (scores > float("-inf")) & reach.to(scores.device)
    order_key = order_key.masked_fill(~visible, -1)
    keys = torch.sort(order_key, dim=-1, descending=True, stable=True).indices[..., :topk]
    taken = order_key.gather(-1, keys) >= 0
    keys = torch.where(taken, keys, -1)
    if topk > num_keys:
        keys = torch.cat([keys, keys.new_full((batch, seq_len, topk - num_keys), -1)], -1)
    return keys.sort(-1).values


def check_exact(scores: torch.Tensor, topk: int, q_offset: int | None = None, **launch) -> None:
    scores = scores.to(DEVICE)
    q_offset = scores.shape[-1] - scores.shape[1] if q_offset is None else q_offset
    with poisoned_empty():
        got = topk_of_scores_triton(scores, topk, q_offset, **{**SMALL, **launch})
    assert got.shape == (*scores.shape[:2], topk) and got.dtype == torch.int32
    picked = got >= 0
    n_picked = picked.sum(-1, keepdim=True)
    assert torch.equal(picked, torch.arange(topk, device=got.device) < n_picked), "picks must come first, then -1"
    want = exact_topk_sets(scores.cpu(), topk, q_offset)
    assert torch.equal(got.cpu().long().sort(-1).values, want)


def causal(scores: torch.Tensor, q_offset: int) -> torch.Tensor:
    seq_len, num_keys = scores.shape[-2:]
    reach = torch.arange(num_keys)[None, :] <= torch.arange(seq_len)[:, None] + q_offset
    return scores.masked_fill(~reach, float("-inf"))


@pytest.mark.parametrize(
    "batch,seq_len,num_keys,topk,launch",
    [
        pytest.param(2, 6, 301, 16, {}, id="B2-S6-T301-K16"),
        pytest.param(1, 3, 257, 32, {"bracket": False}, id="radix-only"),
        pytest.param(1, 3, 257, 16, {"sample_run": 8, "sample_stride": 128}, id="default-sample"),
        pytest.param(2, 1, 515, 32, {"select_block": 128, "select_warps": 2}, id="decode-S1-T515"),
        pytest.param(1, 4, 40, 64, {}, id="k-over-keys"),
        pytest.param(1, 12, 44, 32, {"bracket_min_keys": 32}, id="bracket-from-k-keys"),
    ],
)
def test_select_random_scores(batch, seq_len, num_keys, topk, launch):
    gen = torch.Generator().manual_seed(num_keys * 7 + topk)
    scores = causal(torch.randn(batch, seq_len, num_keys, generator=gen), num_keys - seq_len)
    check_exact(scores, topk, **launch)


def test_select_padding_and_few_valid_keys():
    """Padding (-inf) inside the causal reach: rows with more keys in reach than 2k but fewer valid keys than k
    must take every valid key; a row with no valid key at all returns only -1."""
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 4, 260, generator=gen)
    scores[0, :, ::3] = float("-inf")  # a third padded
    scores[1, :, 10:] = float("-inf")  # 10 valid keys, k = 16
    scores[2, 0, :] = float("-inf")
    check_exact(causal(scores, 256), 16)


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def test_select_near_ties_sharing_high_halves():
    """Most scores share their high 16 bits (one 16-bit bucket of the radix passes and of the bracket) and differ
    only in the low half, with some exact ties among them and a few keys above and below the bucket."""
    gen = torch.Generator().manual_seed(11)
    num_keys = 400
    low = torch.randint(0, 40, (2, 3, num_keys), generator=gen)  # 40 distinct low halves: many exact ties
    bits = 0x3FC0_0000 + low
    bits[..., ::37] = 0x4000_0000  # above the bucket
    bits[..., 5::41] = 0x3F00_0000  # below it
    check_exact(_from_bits(bits), 16)
    check_exact(_from_bits(bits), 16, bucket_cap=8)  # the bucket does not fit the scratch row


def test_select_ties_across_the_16_bit_boundary():
    """Keys just below and just above a carry into bit 16 (0x3FC0FFFF / 0x3FC10000): adjacent floats whose high
    halves differ, so the k-th key sits at a bucket edge; and a run of exact ties straddling the k-th rank."""
    gen = torch.Generator().manual_seed(13)
    num_keys = 333
    choice = torch.randint(0, 4, (1, 4, num_keys), generator=gen)
    bits = torch.tensor([0x3FC0_FFFE, 0x3FC0_FFFF, 0x3FC1_0000, 0x3FC1_0001])[choice]
    check_exact(_from_bits(bits), 32)
    tied = torch.full((1, 2, num_keys), 0.25)
    tied[..., 300:] = 0.5  # 33 above, the k-th inside a tie of 300 (k a power of two, as the kernel needs)
    check_exact(tied, 64)
    check_exact(tied, 64, bracket=False)


def test_select_bracket_misses_fall_back():
    """The sample is deterministic (the first `sample_run` keys of every `sample_stride`). Rows whose sampled keys
    are the largest put every bracket too high; rows whose sampled keys are the smallest, too low; a mixed-sign
    row with zeros; either way the row must still get its exact top k."""
    gen = torch.Generator().manual_seed(17)
    num_keys = 320
    scores = torch.rand(1, 4, num_keys, generator=gen)
    sampled = (torch.arange(num_keys) % 8) < 2
    scores[0, 0, sampled] += 10.0
    scores[0, 1, sampled] -= 10.0
    scores[0, 2] = torch.randn(num_keys, generator=gen).clamp(min=0) - torch.rand(num_keys, generator=gen) * 0.1
    scores[0, 3, : num_keys // 2] = 0.0
    check_exact(scores, 16)
    check_exact(scores, 16, bracket_sigmas=0.0)  # a bracket of zero width around the sample's estimate
