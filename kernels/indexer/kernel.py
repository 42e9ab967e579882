"""Lightning indexer top-k in Triton: score a chunk of queries, then radix-select each row's top k.

Two kernels per query chunk (NOTES.md has the measurements behind the choices):

1. `_index_scores_kernel` — one program per (BLOCK_M queries × BLOCK_N keys) tile below the causal diagonal. The
   key tile is loaded once; the loop over heads multiplies it with each head's query tile on the tensor cores
   (bf16 in, fp32 out), applies ReLU and the per-head weight and sums, so the [S, H, T] per-head scores of the
   stock code never exist. It writes fp32 scores into a [B, chunk, T] buffer (at most `buffer_bytes`), a key that
   is visible but padding as the NaN bit pattern 0xFFFFFFFF, which the selection reads as "no key".
2. `_radix_topk_kernel` — one program per query row: an exact select over the fp32 scores mapped to
   order-preserving 32-bit keys. A row of more than `bracket_min_keys` (default 2k) keys first brackets the k-th
   key from a 1/16 sample (radix histograms of the sample only), then reads the row once: keys above the bracket
   are picks, keys inside it go to a scratch row, whose exact top (k - picks) a radix select (8 bits per pass)
   finds. A row the bracket misses, and a shorter row, take the radix select on the row itself: two 8-bit passes
   leave a bucket of near-equal keys, which one more pass copies to the scratch row. Rows that see at most
   k keys take them all and pad with -1. Ties at the k-th key: the first ones in row order.

With RATIO r > 1 (DeepSeek-V4's compressed entries of r tokens) a query at token position p sees the keys (entries)
s < (p + 1) // r instead of s ≤ p: the one constant both kernels read; `reference.py` defines it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..triton_utils import descriptor_rows, interpreting
from .reference import default_q_offset

_NO_KEY = tl.constexpr(-1)  # int32 bit pattern 0xFFFFFFFF stored for padding keys; maps to order key 0


@triton.jit
def _index_scores_kernel(
    q_desc,
    k_desc,
    out_desc,
    W,
    KeyMask,
    S,
    T,
    chunk_start,
    q_offset,
    stride_wb,
    stride_wh,
    stride_mb,
    H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    RATIO: tl.constexpr = 1,
):
    """Tiles come in through tensor descriptors (TMA on Hopper) over q as [B·S, H·D] and k as [B·T, D], so no
    per-element pointer tensor stays live across the head loop. Rows past S (or keys past T) read the next
    sequence's rows: their weights load as 0 (rows) or their scores lie beyond every query's reach (keys)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2)

    t0 = chunk_start + pid_m * BLOCK_M  # first query of the tile
    n_start = pid_n * BLOCK_N
    if n_start >= (tl.minimum(t0 + BLOCK_M - 1, S - 1) + q_offset + 1) // RATIO:  # tile past every row's reach
        return

    kt = tl.trans(k_desc.load([b * T + n_start, 0]))
    t = t0 + tl.arange(0, BLOCK_M)
    w_ptrs = W + b.to(tl.int64) * stride_wb + t
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for h in range(H):
        q = q_desc.load([b * S + t0, h * BLOCK_D])
        w = tl.load(w_ptrs + h * stride_wh, mask=t < S, other=0.0)
        if UPCAST_DOT:  # the CPU interpreter multiplies bf16 bit patterns as integers
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        acc += tl.maximum(s, 0.0) * w[:, None]

    if HAS_KEY_MASK:
        cols = n_start + tl.arange(0, BLOCK_N)
        key_ok = tl.load(KeyMask + b.to(tl.int64) * stride_mb + cols, mask=cols < T, other=0) != 0
        no_key = tl.full([BLOCK_M, BLOCK_N], _NO_KEY, tl.int32).to(tl.float32, bitcast=True)
        acc = tl.where(key_ok[None, :], acc, no_key)
    # Whole tile: entries past a row's causal reach are written but never read by the selection.
    out_desc.store([b, pid_m * BLOCK_M, n_start], acc.reshape(1, BLOCK_M, BLOCK_N))


_SCORES = tl.constexpr(0)  # `_row_keys` sources: a score row, a (key, index) scratch row, the sample of a score row
_SCRATCH = tl.constexpr(1)
_SAMPLE = tl.constexpr(2)


@triton.jit
def _row_keys(src_key, src_idx, offs, n, SOURCE: tl.constexpr, SAMPLE_RUN: tl.constexpr = 1,
              SAMPLE_STRIDE: tl.constexpr = 1):  # fmt: skip
    """Order keys and key indices of elements `offs` of a row of `n`: fp32 scores (index = position), a (key,
    index) scratch row, or the sample of a score row (element i is key (i // RUN) · STRIDE + i % RUN). Order key:
    uint32 with the floats' order; the NaN pattern 0xFFFFFFFF (padding) and positions past `n` map to 0 = no key."""
    if SOURCE == _SCRATCH:
        key = tl.load(src_key + offs, mask=offs < n, other=0).to(tl.uint32, bitcast=True)
        idx = tl.load(src_idx + offs, mask=offs < n, other=-1)
    else:
        if SOURCE == _SAMPLE:
            offs = (offs // SAMPLE_RUN) * SAMPLE_STRIDE + offs % SAMPLE_RUN
        bits = tl.load(src_key + offs, mask=offs < n, other=0.0).to(tl.int32, bitcast=True)
        bits = tl.where(offs < n, bits, -1)
        key = (bits ^ tl.where(bits < 0, -1, -2147483648)).to(tl.uint32, bitcast=True)
        idx = offs
    return key, idx


@triton.jit
def _radix_passes(src_key, src_idx, n, prefix, bucket_mask, want, shift, last_shift, SOURCE: tl.constexpr,
                  BLOCK: tl.constexpr, SAMPLE_RUN: tl.constexpr = 1, SAMPLE_STRIDE: tl.constexpr = 1):  # fmt: skip
    """8-bit radix passes over a row of `n` (`SOURCE` as in `_row_keys`), from digit `shift` down to `last_shift`.

    The bucket is the keys with (key & bucket_mask) == prefix, `want` of which belong to the top k. Each pass
    histograms the bucket's next digit and narrows the bucket to the digit holding the k-th key. It stops
    (shift = -8) once the bucket is wanted whole, or at once if the first pass finds at most `want` keys at all
    (then every key is taken). Returns (prefix, bucket_mask, want, shift, keys in the bucket, keys in the row)."""
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    in_bucket = tl.cast(0, tl.int32)
    n_live = tl.cast(0, tl.int32)
    n_iter = n
    if SOURCE == _SAMPLE:
        n_iter = tl.cdiv(n, SAMPLE_STRIDE) * SAMPLE_RUN
    while shift >= last_shift:
        sh = shift.to(tl.uint32)
        hist = tl.zeros([256], dtype=tl.int32)
        for j in range(0, n_iter, BLOCK):
            key, _ = _row_keys(src_key, src_idx, j + offs, n, SOURCE, SAMPLE_RUN, SAMPLE_STRIDE)
            match = (key != 0) & ((key & bucket_mask) == prefix)
            hist += tl.histogram(((key >> sh) & 255).to(tl.int32), 256, mask=match)
        n_match = tl.sum(hist)
        first = bucket_mask == 0
        n_live = tl.where(first, n_match, n_live)
        take_all = first & (n_match <= want)
        at_or_above = n_match - tl.cumsum(hist, 0) + hist  # keys with digit >= d
        digit = tl.sum((at_or_above >= want).to(tl.int32)) - 1  # highest digit still holding the k-th key
        in_bucket = tl.sum(tl.where(bins == digit, hist, 0))
        new_want = want - tl.sum(tl.where(bins == digit, at_or_above - hist, 0))
        prefix = tl.where(take_all, prefix, prefix | (digit.to(tl.uint32) << sh))
        bucket_mask = tl.where(take_all, bucket_mask, bucket_mask | (tl.cast(255, tl.uint32) << sh))
        want = tl.where(take_all, want, new_want)
        shift = tl.where(take_all | (in_bucket == want), -8, shift - 8)
    return prefix, bucket_mask, want, shift, in_bucket, n_live


@triton.jit
def _collect(src_key, src_idx, n, prefix, bucket_mask, want, out, base_above, base_equal,
             SOURCE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Writes the indices of the keys above the bucket at out[base_above + rank] and of the first `want` keys of
    the bucket at out[base_equal + rank] (ranks in row order). Returns the number of keys in the row."""
    offs = tl.arange(0, BLOCK)
    n_above = tl.cast(0, tl.int32)
    n_equal = tl.cast(0, tl.int32)
    for j in range(0, n, BLOCK):
        key, idx = _row_keys(src_key, src_idx, j + offs, n, SOURCE)
        bucketed = key & bucket_mask
        above = (key != 0) & (bucketed > prefix)
        equal = (key != 0) & (bucketed == prefix)
        # One scan counts both: "above" in the high 16 bits, "equal" in the low 16 (BLOCK < 65536).
        ranks = tl.cumsum(above.to(tl.int32) * 65536 + equal.to(tl.int32), 0)
        rank_equal = n_equal + (ranks & 65535) - 1
        pos = tl.where(above, base_above + n_above + (ranks >> 16) - 1, base_equal + rank_equal)
        tl.store(out + pos, idx, mask=above | (equal & (rank_equal < want)))
        n_above += tl.sum(above.to(tl.int32))
        n_equal += tl.sum(equal.to(tl.int32))
    return n_above + n_equal


@triton.jit
def _split_bucket(row, n, prefix, bucket_mask, out, scratch_key, scratch_idx, BLOCK: tl.constexpr):
    """One read of the row: keys above the bucket are picks (out[rank]); the bucket's keys go to scratch."""
    offs = tl.arange(0, BLOCK)
    n_above = tl.cast(0, tl.int32)
    n_inside = tl.cast(0, tl.int32)
    for j in range(0, n, BLOCK):
        key, idx = _row_keys(row, row, j + offs, n, _SCORES)
        bucketed = key & bucket_mask
        above = (key != 0) & (bucketed > prefix)
        inside = (key != 0) & (bucketed == prefix)
        ranks = tl.cumsum(above.to(tl.int32) * 65536 + inside.to(tl.int32), 0)
        tl.store(out + n_above + (ranks >> 16) - 1, idx, mask=above)
        at = n_inside + (ranks & 65535) - 1
        tl.store(scratch_key + at, key.to(tl.int32, bitcast=True), mask=inside)
        tl.store(scratch_idx + at, idx, mask=inside)
        n_above += tl.sum(above.to(tl.int32))
        n_inside += tl.sum(inside.to(tl.int32))


@triton.jit
def _sample_histogram(row, n, prefix, bucket_mask, shift, SAMPLE_RUN: tl.constexpr, SAMPLE_STRIDE: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
    """int32 [256]: histogram of digit `shift` of the row's sample keys with (key & bucket_mask) == prefix."""
    offs = tl.arange(0, BLOCK)
    hist = tl.zeros([256], dtype=tl.int32)
    for j in range(0, tl.cdiv(n, SAMPLE_STRIDE) * SAMPLE_RUN, BLOCK):
        key, _ = _row_keys(row, row, j + offs, n, _SAMPLE, SAMPLE_RUN, SAMPLE_STRIDE)
        match = (key != 0) & ((key & bucket_mask) == prefix)
        hist += tl.histogram(((key >> shift.to(tl.uint32)) & 255).to(tl.int32), 256, mask=match)
    return hist


@triton.jit
def _digit_of_rank(hist, rank):
    """(digit, rank within it) of the rank-th largest key (rank >= 1) counted by a 256-bin histogram; digit -1 when
    the histogram holds fewer keys."""
    bins = tl.arange(0, 256)
    at_or_above = tl.sum(hist) - tl.cumsum(hist, 0) + hist  # keys with digit >= d
    digit = tl.sum((at_or_above >= rank).to(tl.int32)) - 1
    return digit, rank - tl.sum(tl.where(bins == digit, at_or_above - hist, 0))


@triton.jit
def _bracket(row, n, TOPK: tl.constexpr, SIGMAS: tl.constexpr, SAMPLE_RUN: tl.constexpr, SAMPLE_STRIDE: tl.constexpr,
             BLOCK: tl.constexpr):  # fmt: skip
    """Order keys (lo, hi) that likely bracket the k-th key of the row, from its sample: about k · m / n of the m
    sample keys lie above the k-th key, with a binomial spread sigma; lo is the bottom of the 16-bit bucket of the
    sample's (k m/n + SIGMAS sigma)-th key, hi the top of that of its (k m/n - SIGMAS sigma)-th key. Both ranks
    share the first histogram, and the second too when their first digits agree. Nothing is assumed: the caller
    checks the counts."""
    m = (n // SAMPLE_STRIDE) * SAMPLE_RUN + tl.minimum(n % SAMPLE_STRIDE, SAMPLE_RUN)  # sample keys in reach
    expect = TOPK * m.to(tl.float32) / n.to(tl.float32)
    spread = SIGMAS * (tl.sqrt(expect * (1.0 - TOPK / n.to(tl.float32))) + 1.0)
    rank_hi = tl.floor(expect - spread).to(tl.int32)
    rank_lo = tl.ceil(expect + spread).to(tl.int32)
    zero = tl.cast(0, tl.uint32)
    top_digit = tl.cast(0xFF000000, tl.uint32)
    hist = _sample_histogram(row, n, zero, zero, tl.cast(24, tl.int32), SAMPLE_RUN, SAMPLE_STRIDE, BLOCK)
    digit_hi, rest_hi = _digit_of_rank(hist, tl.maximum(rank_hi, 1))
    digit_lo, rest_lo = _digit_of_rank(hist, rank_lo)
    prefix_hi = digit_hi.to(tl.uint32) << 24
    prefix_lo = digit_lo.to(tl.uint32) << 24
    hist = _sample_histogram(row, n, prefix_hi, top_digit, tl.cast(16, tl.int32), SAMPLE_RUN, SAMPLE_STRIDE, BLOCK)
    second_hi, _ = _digit_of_rank(hist, rest_hi)
    if (digit_lo != digit_hi) & (digit_lo >= 0):
        hist = _sample_histogram(row, n, prefix_lo, top_digit, tl.cast(16, tl.int32), SAMPLE_RUN, SAMPLE_STRIDE,
                                 BLOCK)  # fmt: skip
    second_lo, _ = _digit_of_rank(hist, rest_lo)
    hi = tl.where(rank_hi >= 1, prefix_hi | (second_hi.to(tl.uint32) << 16) | 0xFFFF, 0xFFFFFFFF)  # else: none above
    lo = tl.where(digit_lo >= 0, prefix_lo | (second_lo.to(tl.uint32) << 16), 1)  # else: every key
    return tl.maximum(lo, 1).to(tl.uint32), hi.to(tl.uint32)


@triton.jit
def _bracket_split(row, n, lo, hi, out, scratch_key, scratch_idx, TOPK: tl.constexpr, CAP: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    """One read of the row: keys above `hi` are picks (out[rank] for rank < TOPK), keys in [lo, hi] go to scratch
    (rank < CAP), both in row order. Returns the two counts, uncapped."""
    offs = tl.arange(0, BLOCK)
    n_above = tl.cast(0, tl.int32)
    n_inside = tl.cast(0, tl.int32)
    for j in range(0, n, BLOCK):
        key, idx = _row_keys(row, row, j + offs, n, _SCORES)
        above = key > hi
        inside = (key != 0) & (key >= lo) & (key <= hi)
        packed = above.to(tl.int32) * 65536 + inside.to(tl.int32)  # one scan counts both (BLOCK < 65536)
        ranks = tl.cumsum(packed, 0)
        at = n_above + (ranks >> 16) - 1
        tl.store(out + at, idx, mask=above & (at < TOPK))
        at = n_inside + (ranks & 65535) - 1
        tl.store(scratch_key + at, key.to(tl.int32, bitcast=True), mask=inside & (at < CAP))
        tl.store(scratch_idx + at, idx, mask=inside & (at < CAP))
        total = tl.sum(packed)
        n_above += total >> 16
        n_inside += total & 65535
    return n_above, n_inside


@triton.jit
def _first_digit(lo, hi):
    """(prefix, bucket_mask, shift) for a radix select over keys in [lo, hi]: they share every digit above the
    highest one where lo and hi differ, so the passes start there."""
    diff = lo ^ hi
    shift = tl.cast(24, tl.int32)
    while (shift > 0) & (((diff >> shift.to(tl.uint32)) & 255) == 0):
        shift -= 8
    bucket_mask = ~((tl.cast(2, tl.uint32) << (shift + 7).to(tl.uint32)) - 1)  # bits above the digit
    return lo & bucket_mask, bucket_mask, shift


@triton.jit
def _radix_topk_kernel(
    Scores, Out, ScratchKey, ScratchIdx,
    S, T, row_stride, chunk_start, q_offset, chunk_rows,
    stride_ob, stride_os,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr,
    BRACKET: tl.constexpr, SIGMAS: tl.constexpr, SAMPLE_RUN: tl.constexpr, SAMPLE_STRIDE: tl.constexpr,
    MIN_KEYS: tl.constexpr, RATIO: tl.constexpr = 1,
):  # fmt: skip
    """Exact top-TOPK of one score row.

    Rows of more than MIN_KEYS keys (with BRACKET): bracket the k-th key from the sample, split the row once
    (picks above the bracket, the bracket's keys to scratch) and radix-select the rest of the top k in scratch.
    Otherwise, or when the bracket misses: two radix passes over the row resolve 16 bits (sign, exponent, 7
    mantissa bits) and leave a bucket of near-equal keys around the k-th. If it holds at most CAP keys, one more
    pass writes the keys above it and copies it to scratch, where the low 16 bits are resolved: three reads of the
    row in all. A larger bucket (many near-ties) is resolved on the row itself: up to five reads.
    """
    r = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first: no long row starts in the last wave
    b = tl.program_id(1).to(tl.int64)
    t = chunk_start + r
    n = tl.minimum((t + q_offset + 1) // RATIO, T)  # keys in causal reach; padding among them is order key 0
    row = Scores + (b * chunk_rows + r) * row_stride
    out = Out + b * stride_ob + t.to(tl.int64) * stride_os
    scratch_key = ScratchKey + (b * chunk_rows + r) * CAP
    scratch_idx = ScratchIdx + (b * chunk_rows + r) * CAP
    slots = tl.arange(0, TOPK)
    prefix = tl.cast(0, tl.uint32)
    bucket_mask = tl.cast(0, tl.uint32)
    want = tl.cast(TOPK, tl.int32)
    n_picked = tl.cast(TOPK, tl.int32)
    if n <= TOPK:  # every key in reach is taken
        n_picked = _collect(row, row, n, prefix, bucket_mask, want, out, 0, 0, _SCORES, BLOCK)
    else:
        resolved = tl.cast(0, tl.int32)
        if BRACKET:  # noqa: SIM102 - a compile-time switch: False compiles no bracket code
            if n > MIN_KEYS:
                lo, hi = _bracket(row, n, TOPK, SIGMAS, SAMPLE_RUN, SAMPLE_STRIDE, BLOCK)
                n_above, n_inside = _bracket_split(row, n, lo, hi, out, scratch_key, scratch_idx, TOPK, CAP, BLOCK)
                if (n_above < TOPK) & (n_above + n_inside >= TOPK) & (n_inside <= CAP):
                    prefix, bucket_mask, shift = _first_digit(lo, hi)
                    prefix, bucket_mask, want, shift, in_bucket, n_live = _radix_passes(
                        scratch_key, scratch_idx, n_inside, prefix, bucket_mask, TOPK - n_above, shift, 0,
                        _SCRATCH, BLOCK)  # fmt: skip
                    _collect(scratch_key, scratch_idx, n_inside, prefix, bucket_mask, want, out, n_above,
                             TOPK - want, _SCRATCH, BLOCK)  # fmt: skip
                    resolved = 1
        if resolved == 0:  # the radix select on the row (its writes cover every slot the bracket wrote)
            prefix, bucket_mask, want, shift, in_bucket, n_live = _radix_passes(
                row, row, n, prefix, bucket_mask, want, tl.cast(24, tl.int32), 16, _SCORES, BLOCK)  # fmt: skip
            n_picked = tl.minimum(n_live, TOPK)
            if (shift >= 0) & (in_bucket <= CAP):
                _split_bucket(row, n, prefix, bucket_mask, out, scratch_key, scratch_idx, BLOCK)
                base_above, n_scratch = TOPK - want, in_bucket
                prefix, bucket_mask, want, shift, in_bucket, n_live = _radix_passes(
                    scratch_key, scratch_idx, n_scratch, prefix, bucket_mask, want, shift, 0, _SCRATCH,
                    BLOCK)  # fmt: skip
                _collect(scratch_key, scratch_idx, n_scratch, prefix, bucket_mask, want, out, base_above,
                         TOPK - want, _SCRATCH, BLOCK)  # fmt: skip
            else:
                prefix, bucket_mask, want, shift, in_bucket, n_live = _radix_passes(
                    row, row, n, prefix, bucket_mask, want, shift, 0, _SCORES, BLOCK)  # fmt: skip
                _collect(row, row, n, prefix, bucket_mask, want, out, 0, TOPK - want, _SCORES, BLOCK)
    tl.store(out + slots, tl.full([TOPK], -1, tl.int32), mask=slots >= tl.minimum(n_picked, TOPK))


def lightning_indexer_topk_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    softmax_scale: float,
    key_mask: torch.Tensor | None = None,
    q_offset: int | None = None,
    *,
    block_m: int = 64,
    block_n: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
    select_block: int = 512,
    select_warps: int = 4,
    bucket_cap: int = 4096,
    bracket: bool = True,
    bracket_sigmas: float = 3.0,
    sample_run: int = 8,
    sample_stride: int = 128,
    bracket_min_keys: int | None = None,
    buffer_bytes: int = 1 << 30,
    ratio: int = 1,
) -> torch.Tensor:
    """int32 [B, S, topk]; same contract as `lightning_indexer_topk_reference` (`ratio`: tokens per key).

    The score buffer holds `buffer_bytes // (4 T B)` query rows (at least one block), so memory stays
    O(S · topk + buffer) for any S. Defaults: the fastest variants measured on an H100 (NOTES.md). `bracket`
    False selects every row by the radix passes alone (v3); with it, rows of more than `bracket_min_keys` keys
    (default 2 · topk) are bracketed from a sample, the first `sample_run` keys of every `sample_stride`.
    """
    batch, seq_len, n_heads, head_dim = q.shape
    num_keys = k.shape[1]
    q_offset = default_q_offset(seq_len, num_keys, ratio) if q_offset is None else q_offset
    # One descriptor box per head: zero-pad the head dim to a power of two if needed (dot products unchanged).
    block_d = max(16, triton.next_power_of_2(head_dim))
    q = descriptor_rows(q, block_d).view(batch * seq_len, n_heads * block_d)
    k = descriptor_rows(k, block_d)
    # ReLU(scale · x) = scale · ReLU(x) for scale > 0: fold the scale into the per-head weights, laid out [B, H, S]
    # so that a query tile's weights are one contiguous load.
    w = (weights.float() * softmax_scale).transpose(1, 2).contiguous()
    mask = key_mask.to(torch.uint8).contiguous() if key_mask is not None else w  # dummy pointer when absent
    out = torch.empty((batch, seq_len, topk), dtype=torch.int32, device=q.device)

    chunk = max(block_m, buffer_bytes // (4 * num_keys * batch) // block_m * block_m)
    chunk = min(chunk, triton.cdiv(seq_len, block_m) * block_m)
    row_stride = triton.cdiv(num_keys, 4) * 4  # 16-byte rows for the descriptor
    scores = torch.empty((batch, chunk, row_stride), dtype=torch.float32, device=q.device)
    scratch_key = torch.empty((batch, chunk, bucket_cap), dtype=torch.int32, device=q.device)
    scratch_idx = torch.empty_like(scratch_key)
    q_desc = TensorDescriptor.from_tensor(q, [block_m, block_d])
    k_desc = TensorDescriptor.from_tensor(k, [block_n, block_d])
    out_desc = TensorDescriptor(scores, [batch, chunk, num_keys], list(scores.stride()), [1, block_m, block_n])
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    for start in range(0, seq_len, chunk):
        rows = min(chunk, seq_len - start)
        reach = max(1, min(num_keys, (start + rows + q_offset) // ratio))  # keys the chunk's last row sees
        grid = (triton.cdiv(reach, block_n), triton.cdiv(rows, block_m), batch)
        _index_scores_kernel[grid](
            q_desc, k_desc, out_desc, w, mask,
            seq_len, num_keys, start, q_offset,
            w.stride(0), w.stride(1), mask.stride(0),
            H=n_heads, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_KEY_MASK=key_mask is not None, DOT_PRECISION=precision, UPCAST_DOT=interpreting(), RATIO=ratio,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
        _radix_topk_kernel[(rows, batch)](
            scores, out, scratch_key, scratch_idx,
            seq_len, num_keys, row_stride, start, q_offset, chunk,
            out.stride(0), out.stride(1),
            TOPK=topk, BLOCK=select_block, CAP=bucket_cap, BRACKET=bracket, SIGMAS=bracket_sigmas,
            SAMPLE_RUN=sample_run, SAMPLE_STRIDE=sample_stride, MIN_KEYS=max(topk, bracket_min_keys or 2 * topk),
            RATIO=ratio, num_warps=select_warps,
        )  # fmt: skip
    return out


def topk_of_scores_triton(
    scores: torch.Tensor,
    topk: int,
    q_offset: int | None = None,
    *,
    select_block: int = 512,
    select_warps: int = 4,
    bucket_cap: int = 4096,
    bracket: bool = True,
    bracket_sigmas: float = 3.0,
    sample_run: int = 8,
    sample_stride: int = 128,
    bracket_min_keys: int | None = None,
    ratio: int = 1,
) -> torch.Tensor:
    """The selection kernel alone, on given scores: int32 [B, S, topk], as `lightning_indexer_topk_triton` selects
    from the scores its score kernel writes (for tests on chosen scores, and for timing the select).

    scores: fp32 [B, S, T] as `index_scores_reference` returns them (-inf = not visible; query t sees keys
    s <= t + q_offset, default T - S; entries s < (t + q_offset + 1) // ratio with `ratio` > 1, default q_offset
    0). Ties at the k-th score: the lowest key indices win.
    """
    batch, seq_len, num_keys = scores.shape
    q_offset = default_q_offset(seq_len, num_keys, ratio) if q_offset is None else q_offset
    buffer = scores.float().contiguous().clone()
    buffer.view(torch.int32).masked_fill_(scores == float("-inf"), -1)  # padding: the NaN pattern 0xFFFFFFFF
    out = torch.empty((batch, seq_len, topk), dtype=torch.int32, device=scores.device)
    scratch_key = torch.empty((batch, seq_len, bucket_cap), dtype=torch.int32, device=scores.device)
    scratch_idx = torch.empty_like(scratch_key)
    _radix_topk_kernel[(seq_len, batch)](
        buffer, out, scratch_key, scratch_idx,
        seq_len, num_keys, num_keys, 0, q_offset, seq_len,
        out.stride(0), out.stride(1),
        TOPK=topk, BLOCK=select_block, CAP=bucket_cap, BRACKET=bracket, SIGMAS=bracket_sigmas,
        SAMPLE_RUN=sample_run, SAMPLE_STRIDE=sample_stride, MIN_KEYS=max(topk, bracket_min_keys or 2 * topk),
        RATIO=ratio, num_warps=select_warps,
    )  # fmt: skip
    return out
