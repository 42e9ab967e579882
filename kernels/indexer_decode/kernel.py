"""Split-K decode indexer in Triton: one new query per sequence against its T cached keys, spread over the GPU.

The prefill kernel selects each query row in one program; a decode step has one row per sequence, which one program
streams from one multiprocessor (NOTES.md: 465 µs for 128K keys on an H200, 72 GB/s). Here each row's keys are split
over `n_split` programs and the top k is merged in three launches:

1. `_score_split_kernel` — program (split, b) scores its keys on the tensor cores ([BLOCK_N, D] × [D, H], ReLU, head
   weights, head sum), writes the fp32 scores and adds a histogram of their top HIST_BITS order-key bits (sign,
   exponent, first mantissa bits) into the sequence's global histogram (atomics, non-empty bins only).
2. `_collect_split_kernel` — every program reads that histogram, finds the bin holding the k-th key and re-reads its
   own scores (from L2): keys in higher bins are picks, written straight into the output row; keys in that bin are
   candidates, appended to the sequence's scratch row. Positions come from one atomic counter add per block.
3. `_merge_kernel` — one program per sequence radix-selects the missing picks among the candidates (a few thousand
   at 128K keys) with the prefill kernel's passes; when the bin overflowed the scratch row (many near-equal scores)
   it selects from the whole score row instead. Slots past the picks get -1.

Bytes: the keys once (T·D·2 per sequence), the fp32 scores written once and read once more from L2. The picks of a
row come in no fixed order, and exact ties at the k-th score are broken in no fixed order either.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..indexer.kernel import _SCORES, _SCRATCH, _collect, _radix_passes
from ..triton_utils import interpreting

_TARGET_PROGRAMS = 264  # two waves of an H200's 132 multiprocessors: split rows until a launch has this many


@triton.jit
def _order_keys(score):
    """uint32 keys with the fp32 scores' order (the prefill select's mapping)."""
    bits = score.to(tl.int32, bitcast=True)
    return (bits ^ tl.where(bits < 0, -1, -2147483648)).to(tl.uint32, bitcast=True)


@triton.jit
def _threshold_bin(Counters, b, stride_cb, TOPK: tl.constexpr, HIST_BITS: tl.constexpr):
    """The histogram bin holding the TOPK-th largest key of sequence b; -1 when the row has at most TOPK keys."""
    hist = tl.load(Counters + b * stride_cb + tl.arange(0, 1 << HIST_BITS))
    at_or_above = tl.sum(hist) - tl.cumsum(hist, 0) + hist  # keys in bins >= d
    return tl.sum((at_or_above >= TOPK).to(tl.int32)) - 1


@triton.jit
def _score_split_kernel(
    Q, K, W, Scores, Counters,
    T, split_len,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_wb, stride_sb, stride_cb,
    H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HIST_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=(heads < H)[:, None] & (dims < D)[None, :],
        other=0.0,
    )
    qt = tl.trans(q)  # [BLOCK_D, BLOCK_H]
    if UPCAST_DOT:  # the CPU interpreter multiplies bf16 bit patterns as integers
        qt = qt.to(tl.float32)
    w = tl.load(W + b * stride_wb + heads, mask=heads < H, other=0.0)  # fp32, softmax scale folded in
    hist = tl.zeros([1 << HIST_BITS], dtype=tl.int32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, T)
    for j in range(lo, hi, BLOCK_N):
        keys = j + tl.arange(0, BLOCK_N)
        ok = keys < hi
        k_ptrs = K + b * stride_kb + keys[:, None] * stride_kt + dims[None, :]
        k = tl.load(k_ptrs, mask=ok[:, None] & (dims < D)[None, :], other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        s = tl.dot(k, qt, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_H]
        score = tl.sum(tl.maximum(s, 0.0) * w[None, :], 1)
        tl.store(Scores + b * stride_sb + keys, score, mask=ok)
        bins = (_order_keys(score) >> (32 - HIST_BITS)).to(tl.int32)
        hist += tl.histogram(bins, 1 << HIST_BITS, mask=ok)
    tl.atomic_add(Counters + b * stride_cb + tl.arange(0, 1 << HIST_BITS), hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _collect_split_kernel(
    Scores, Counters, Out, ScratchKey, ScratchIdx,
    T, split_len,
    stride_sb, stride_cb, stride_ob,
    TOPK: tl.constexpr, CAP: tl.constexpr, HIST_BITS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    digit = _threshold_bin(Counters, b, stride_cb, TOPK, HIST_BITS)
    counts = Counters + b * stride_cb + (1 << HIST_BITS)  # [picks, candidates] so far
    lo = split * split_len
    hi = tl.minimum(lo + split_len, T)
    for j in range(lo, hi, BLOCK):
        keys = j + tl.arange(0, BLOCK)
        ok = keys < hi
        order = _order_keys(tl.load(Scores + b * stride_sb + keys, mask=ok, other=0.0))
        bins = (order >> (32 - HIST_BITS)).to(tl.int32)
        above = ok & (bins > digit)
        inside = ok & (bins == digit)
        ranks = tl.cumsum(above.to(tl.int32) * 65536 + inside.to(tl.int32), 0)  # both counts in one scan
        n_above = tl.sum(above.to(tl.int32))
        n_inside = tl.sum(inside.to(tl.int32))
        if n_above > 0:
            base = tl.atomic_add(counts, n_above, sem="relaxed")
            tl.store(Out + b * stride_ob + base + (ranks >> 16) - 1, keys, mask=above)
        if n_inside > 0:
            at = tl.atomic_add(counts + 1, n_inside, sem="relaxed") + (ranks & 65535) - 1
            tl.store(ScratchKey + b * CAP + at, order.to(tl.int32, bitcast=True), mask=inside & (at < CAP))
            tl.store(ScratchIdx + b * CAP + at, keys, mask=inside & (at < CAP))


@triton.jit
def _merge_kernel(
    Scores, Counters, Out, ScratchKey, ScratchIdx,
    T,
    stride_sb, stride_cb, stride_ob,
    TOPK: tl.constexpr, CAP: tl.constexpr, HIST_BITS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    digit = _threshold_bin(Counters, b, stride_cb, TOPK, HIST_BITS)
    n_above = tl.load(Counters + b * stride_cb + (1 << HIST_BITS))
    n_inside = tl.load(Counters + b * stride_cb + (1 << HIST_BITS) + 1)
    out = Out + b * stride_ob
    if digit >= 0:
        if n_inside <= CAP:
            scratch_key = ScratchKey + b * CAP
            scratch_idx = ScratchIdx + b * CAP
            prefix = digit.to(tl.uint32) << (32 - HIST_BITS)
            bucket_mask = tl.cast(((1 << HIST_BITS) - 1) << (32 - HIST_BITS), tl.uint32)
            # 8-bit passes from bit 24 - HIST_BITS down; a last pass at bit 0 resolves what they leave below bit 8.
            prefix, bucket_mask, want, shift, _, _ = _radix_passes(
                scratch_key, scratch_idx, n_inside, prefix, bucket_mask, TOPK - n_above,
                tl.cast(24 - HIST_BITS, tl.int32), 0, _SCRATCH, BLOCK)  # fmt: skip
            prefix, bucket_mask, want, shift, _, _ = _radix_passes(
                scratch_key, scratch_idx, n_inside, prefix, bucket_mask, want, tl.where(shift > -8, 0, shift), 0,
                _SCRATCH, BLOCK)  # fmt: skip
            _collect(scratch_key, scratch_idx, n_inside, prefix, bucket_mask, want, out, n_above, TOPK - want,
                     _SCRATCH, BLOCK)  # fmt: skip
        else:  # the bin did not fit the scratch row: select from the whole row (its writes cover every slot)
            row = Scores + b * stride_sb
            zero = tl.cast(0, tl.uint32)
            prefix, bucket_mask, want, shift, _, _ = _radix_passes(
                row, row, T, zero, zero, tl.cast(TOPK, tl.int32), tl.cast(24, tl.int32), 0, _SCORES, BLOCK)  # fmt: skip
            _collect(row, row, T, prefix, bucket_mask, want, out, 0, TOPK - want, _SCORES, BLOCK)
    slots = tl.arange(0, TOPK)
    tl.store(out + slots, tl.full([TOPK], -1, tl.int32), mask=slots >= T)


def decode_indexer_topk_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    softmax_scale: float,
    *,
    block_n: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
    hist_bits: int = 12,
    collect_block: int = 1024,
    merge_block: int = 512,
    merge_warps: int = 4,
    bucket_cap: int = 8192,
    n_split: int | None = None,
) -> torch.Tensor:
    """int32 [B, topk]; the contract of `decode_indexer_topk_reference` (q: [B, H, D], k: [B, T, D], weights: fp32
    [B, H]). Each row's keys are split over `n_split` programs (default: enough for two waves of the GPU, at least
    one key block each); `hist_bits` bits of each score key place it in the global histogram."""
    batch, n_heads, head_dim = q.shape
    num_keys = k.shape[1]
    if topk & (topk - 1):
        raise ValueError(f"the decode indexer needs a power-of-two top-k, not {topk}")
    q, k = q.contiguous(), k.contiguous()
    w = (weights.float() * softmax_scale).contiguous()  # ReLU(s · x) · w = ReLU(x) · (s · w) for s > 0
    if n_split is None:
        n_split = min(triton.cdiv(num_keys, block_n), max(1, triton.cdiv(_TARGET_PROGRAMS, batch)))
    split_len = triton.cdiv(triton.cdiv(num_keys, n_split), block_n) * block_n
    n_split = triton.cdiv(num_keys, split_len)
    bins = 1 << hist_bits
    # One zeroed buffer per sequence: the histogram, then the pick and candidate counters (a single memset).
    counters = torch.zeros((batch, bins + 2), dtype=torch.int32, device=q.device)
    scores = torch.empty((batch, num_keys), dtype=torch.float32, device=q.device)
    out = torch.empty((batch, topk), dtype=torch.int32, device=q.device)
    scratch_key = torch.empty((batch, bucket_cap), dtype=torch.int32, device=q.device)
    scratch_idx = torch.empty_like(scratch_key)
    _score_split_kernel[(n_split, batch)](
        q, k, w, scores, counters,
        num_keys, split_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), w.stride(0), scores.stride(0), counters.stride(0),
        H=n_heads, D=head_dim, BLOCK_H=max(16, triton.next_power_of_2(n_heads)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=block_n, HIST_BITS=hist_bits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST_DOT=interpreting(),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    common = dict(TOPK=topk, CAP=bucket_cap, HIST_BITS=hist_bits)
    _collect_split_kernel[(n_split, batch)](
        scores, counters, out, scratch_key, scratch_idx,
        num_keys, split_len,
        scores.stride(0), counters.stride(0), out.stride(0),
        BLOCK=collect_block, num_warps=num_warps, **common,
    )  # fmt: skip
    _merge_kernel[(batch,)](
        scores, counters, out, scratch_key, scratch_idx,
        num_keys,
        scores.stride(0), counters.stride(0), out.stride(0),
        BLOCK=merge_block, num_warps=merge_warps, **common,
    )  # fmt: skip
    return out
