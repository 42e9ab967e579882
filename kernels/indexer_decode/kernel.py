"""Split-K decode indexer in Triton: one new query per sequence against its T cached keys, spread over the GPU.

The prefill kernel selects each query row in one program; a decode step has one row per sequence, which one program
streams from one multiprocessor (NOTES.md: 465 µs for 128K keys on an H200, 72 GB/s). Here each row's keys are split
over `n_split` programs and the top k is found by radix digits of the scores' order keys, 8 bits at a time, the
first two levels by every program at once:

1. `_score_split_kernel` — program (split, b) scores its keys on the tensor cores ([BLOCK_N, D] × [D, H], ReLU, head
   weights, head sum), writes the fp32 scores and adds a 256-bin histogram of their top 8 bits (sign and exponent)
   into the sequence's first histogram (atomics, non-empty bins only).
2. `_refine_split_kernel` — every program finds the first digit d1 of the k-th key and adds the histogram of bits
   23–16 of its keys whose first digit is d1 (re-read from L2) into the sequence's second histogram.
3. `_collect_split_kernel` — with the 16-bit prefix of the k-th key known, every program writes its keys above it
   straight into the output row and appends its keys sharing it (a few dozen in a row) to the sequence's scratch
   row; positions come from one atomic counter add per block. The last of a sequence's programs to finish (a
   ticket counter) then merges (`_merge`): it finds the missing picks among those candidates from two histograms
   of its register tile (bits 15–8, 7–0) when they fit one (`merge_block`), else with the prefill kernel's radix
   passes over the scratch row, or over the whole score row when they overflowed the scratch row (many near-equal
   scores), and writes -1 past the picks. (A launch of its own for the merge cost about 1 µs more a step.)

Bytes: the keys once (T·D·2 per sequence), the fp32 scores written once and read twice more from L2. The picks of a
row come in no fixed order, and exact ties at the k-th score are broken in no fixed order either. (v1 resolved 12
bits with one 4,096-bin histogram per key block: 16-17x the key-read floor, bound by that histogram; NOTES.md.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..indexer.kernel import _SCORES, _SCRATCH, _collect, _digit_of_rank, _radix_passes
from ..triton_utils import dependent_launch, interpreting, triton_cuda

_WAVE = 132  # an H200's multiprocessors: rows are split until a launch fills them once
_KEYS_PER_PROGRAM = 1024  # and longer rows further: short programs keep the last wave's tail short


@triton.jit
def _order_keys(score):
    """uint32 keys with the fp32 scores' order (the prefill select's mapping)."""
    bits = score.to(tl.int32, bitcast=True)
    return (bits ^ tl.where(bits < 0, -1, -2147483648)).to(tl.uint32, bitcast=True)


# Module globals read inside @triton.jit must be tl.constexpr (the interpreter accepts plain ints, the compiler not).
_BINS = tl.constexpr(256)
_HIST = tl.constexpr(2 * 256)  # per sequence: the two histograms, then the pick, candidate and ticket counters


@triton.jit
def _after_previous_kernel(PDL: tl.constexpr, LAUNCH_NEXT: tl.constexpr):
    """Under programmatic dependent launch: wait until the previous kernel's writes are visible (before any memory
    access), then let the next kernel's programs launch, so that its launch overlaps this kernel's work."""
    if PDL:
        triton_cuda.gdc_wait()
        if LAUNCH_NEXT:
            triton_cuda.gdc_launch_dependents()


@triton.jit
def _prefix16(Counters, b, stride_cb, TOPK: tl.constexpr):
    """(first digit, 16-bit prefix, rank of the k-th key among the keys with that prefix) of sequence b's k-th key,
    from its two histograms; the first digit is -1 when the row has at most TOPK keys (then every key is a pick)."""
    counters = Counters + b * stride_cb
    d1, want = _digit_of_rank(tl.load(counters + tl.arange(0, _BINS)), TOPK)
    d2, want = _digit_of_rank(tl.load(counters + _BINS + tl.arange(0, _BINS)), want)
    return d1, (d1 << 8) | d2, want


@triton.jit
def _score_split_kernel(
    Q, K, W, Scores, Counters,
    T, split_len, scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_wb, stride_sb, stride_cb,
    H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    _after_previous_kernel(PDL, True)
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
    # ReLU(s · x) · w = ReLU(x) · (s · w) for s > 0: the softmax scale rides on the head weights.
    w = tl.load(W + b * stride_wb + heads, mask=heads < H, other=0.0).to(tl.float32) * scale
    hist = tl.zeros([_BINS], dtype=tl.int32)
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
        hist += tl.histogram((_order_keys(score) >> 24).to(tl.int32), _BINS, mask=ok)
    tl.atomic_add(Counters + b * stride_cb + tl.arange(0, _BINS), hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _refine_split_kernel(
    Scores, Counters,
    T, split_len,
    stride_sb, stride_cb,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    _after_previous_kernel(PDL, True)
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d1, _ = _digit_of_rank(tl.load(Counters + b * stride_cb + tl.arange(0, _BINS)), TOPK)
    hist = tl.zeros([_BINS], dtype=tl.int32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, T)
    for j in range(lo, hi, BLOCK):
        keys = j + tl.arange(0, BLOCK)
        order = _order_keys(tl.load(Scores + b * stride_sb + keys, mask=keys < hi, other=0.0))
        match = (keys < hi) & ((order >> 24).to(tl.int32) == d1)
        hist += tl.histogram(((order >> 16) & 255).to(tl.int32), _BINS, mask=match)
    tl.atomic_add(Counters + b * stride_cb + _BINS + tl.arange(0, _BINS), hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _collect_split_kernel(
    Scores, Counters, Out, ScratchKey, ScratchIdx,
    T, split_len,
    stride_sb, stride_cb, stride_ob,
    TOPK: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr, MERGE_BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    _after_previous_kernel(PDL, False)
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d1, prefix16, _ = _prefix16(Counters, b, stride_cb, TOPK)
    prefix = tl.where(d1 < 0, -1, prefix16)  # a row of at most TOPK keys: every key is above
    counts = Counters + b * stride_cb + _HIST  # [picks, candidates, programs done] so far
    lo = split * split_len
    hi = tl.minimum(lo + split_len, T)
    for j in range(lo, hi, BLOCK):
        keys = j + tl.arange(0, BLOCK)
        ok = keys < hi
        order = _order_keys(tl.load(Scores + b * stride_sb + keys, mask=ok, other=0.0))
        high = (order >> 16).to(tl.int32)
        above = ok & (high > prefix)
        inside = ok & (high == prefix)
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
    tl.debug_barrier()  # every thread's stores are issued before the ticket releases them
    if tl.atomic_add(counts + 2, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        _merge(Scores, Counters, Out, ScratchKey, ScratchIdx, b, T, d1, prefix16, stride_sb, stride_cb, stride_ob,
               TOPK, CAP, MERGE_BLOCK)  # fmt: skip


@triton.jit
def _merge(Scores, Counters, Out, ScratchKey, ScratchIdx, b, T, d1, prefix16, stride_sb, stride_cb, stride_ob,
           TOPK: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Sequence b's missing picks, once all its collect programs are done (see the module docstring); d1 and the
    int32 16-bit prefix as `_prefix16` gives them (the scratch passes below carry uint32 prefixes)."""
    n_above = tl.load(Counters + b * stride_cb + _HIST)
    n_inside = tl.load(Counters + b * stride_cb + _HIST + 1)
    out = Out + b * stride_ob
    if d1 >= 0:
        if n_inside <= BLOCK and n_inside <= CAP:
            _merge_in_registers(ScratchKey + b * CAP, ScratchIdx + b * CAP, out, n_above, n_inside, TOPK, BLOCK)
        elif n_inside <= CAP:
            scratch_key = ScratchKey + b * CAP
            scratch_idx = ScratchIdx + b * CAP
            bucket_mask = tl.cast(0xFFFF0000, tl.uint32)
            prefix, bucket_mask, want, shift, _, _ = _radix_passes(
                scratch_key, scratch_idx, n_inside, prefix16.to(tl.uint32) << 16, bucket_mask, TOPK - n_above,
                tl.cast(8, tl.int32), 0, _SCRATCH, BLOCK)  # fmt: skip
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


@triton.jit
def _merge_in_registers(scratch_key, scratch_idx, out, n_above, n_inside, TOPK: tl.constexpr, BLOCK: tl.constexpr):
    """The missing picks among n_inside <= BLOCK candidates, which all share the k-th key's 16-bit prefix: loaded
    once, the low two digits of the k-th key from two histograms of the tile, then one write of the picks (the
    scratch passes reload the candidates for every digit and the collect)."""
    slots = tl.arange(0, BLOCK)
    ok = slots < n_inside
    low = tl.load(scratch_key + slots, mask=ok, other=0) & 65535  # int32 bits of the uint32 order keys
    idx = tl.load(scratch_idx + slots, mask=ok, other=0)
    want = TOPK - n_above  # >= 1: the k-th key is a candidate
    d3, want_d3 = _digit_of_rank(tl.histogram(low >> 8, 256, mask=ok), want)
    d4, want_k = _digit_of_rank(tl.histogram(low & 255, 256, mask=ok & ((low >> 8) == d3)), want_d3)
    kth = (d3 << 8) | d4
    above = ok & (low > kth)
    equal = ok & (low == kth)
    ranks = tl.cumsum(above.to(tl.int32) * 65536 + equal.to(tl.int32), 0)  # both counts in one scan
    rank_equal = (ranks & 65535) - 1
    pos = tl.where(above, n_above + (ranks >> 16) - 1, n_above + want - want_k + rank_equal)
    tl.store(out + pos, idx, mask=above | (equal & (rank_equal < want_k)))


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
    collect_block: int = 1024,
    merge_block: int = 512,
    bucket_cap: int = 8192,
    n_split: int | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """int32 [B, topk]; the contract of `decode_indexer_topk_reference` (q: [B, H, D], k: [B, T, D], weights: fp32
    [B, H]). Each row's keys are split over `n_split` programs (default: enough to fill the GPU once, and at most
    `_KEYS_PER_PROGRAM` keys each unless that takes more than one wave, then at least two programs per multiprocessor
    (the score kernel's shared memory fits two), at least one key block each). `pdl`: launch the three kernels
    programmatically dependent, each overlapping the previous one's tail (default: where `dependent_launch()`)."""
    batch, n_heads, head_dim = q.shape
    num_keys = k.shape[1]
    if topk & (topk - 1):
        raise ValueError(f"the decode indexer needs a power-of-two top-k, not {topk}")
    q, k = q.contiguous(), k.contiguous()
    w = weights.contiguous()  # scaled inside the score kernel (a launch of its own took 0.9 µs: NOTES.md)
    if n_split is None:
        n_split = triton.cdiv(num_keys, _KEYS_PER_PROGRAM)
        if batch * n_split > _WAVE:  # more than one wave anyway: fill both of a multiprocessor's program slots
            n_split = max(n_split, triton.cdiv(2 * _WAVE, batch))
        n_split = min(triton.cdiv(num_keys, block_n), max(n_split, triton.cdiv(_WAVE, batch)))
    split_len = triton.cdiv(triton.cdiv(num_keys, n_split), block_n) * block_n
    n_split = triton.cdiv(num_keys, split_len)
    pdl = dependent_launch() if pdl is None else pdl
    # One zeroed buffer per sequence: both histograms, then the three counters (a single memset).
    counters = torch.zeros((batch, _HIST.value + 3), dtype=torch.int32, device=q.device)
    scores = torch.empty((batch, num_keys), dtype=torch.float32, device=q.device)
    out = torch.empty((batch, topk), dtype=torch.int32, device=q.device)
    scratch_key = torch.empty((batch, bucket_cap), dtype=torch.int32, device=q.device)
    scratch_idx = torch.empty_like(scratch_key)
    _score_split_kernel[(n_split, batch)](
        q, k, w, scores, counters,
        num_keys, split_len, softmax_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), w.stride(0), scores.stride(0), counters.stride(0),
        H=n_heads, D=head_dim, BLOCK_H=max(16, triton.next_power_of_2(n_heads)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST_DOT=interpreting(), PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )  # fmt: skip
    _refine_split_kernel[(n_split, batch)](
        scores, counters, num_keys, split_len, scores.stride(0), counters.stride(0),
        TOPK=topk, BLOCK=collect_block, PDL=pdl, num_warps=num_warps, launch_pdl=pdl,
    )  # fmt: skip
    _collect_split_kernel[(n_split, batch)](
        scores, counters, out, scratch_key, scratch_idx,
        num_keys, split_len,
        scores.stride(0), counters.stride(0), out.stride(0),
        TOPK=topk, CAP=bucket_cap, BLOCK=collect_block, MERGE_BLOCK=merge_block, PDL=pdl, num_warps=num_warps,
        launch_pdl=pdl,
    )  # fmt: skip
    return out
