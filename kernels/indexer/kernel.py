"""Lightning indexer top-k in Triton: score a chunk of queries, then radix-select each row's top k.

Two kernels per query chunk (NOTES.md has the measurements behind the choices):

1. `_index_scores_kernel` — one program per (BLOCK_M queries × BLOCK_N keys) tile below the causal diagonal. The
   key tile is loaded once; the loop over heads multiplies it with each head's query tile on the tensor cores
   (bf16 in, fp32 out), applies ReLU and the per-head weight and sums, so the [S, H, T] per-head scores of the
   stock code never exist. It writes fp32 scores into a [B, chunk, T] buffer (at most `buffer_bytes`), a key that
   is visible but padding as the NaN bit pattern 0xFFFFFFFF, which the selection reads as "no key".
2. `_radix_topk_kernel` — one program per query row: an exact radix select over the fp32 scores mapped to
   order-preserving 32-bit keys, 8 bits per pass (histogram, then pick the digit bucket holding the k-th largest),
   stopping as soon as the bucket at the threshold is taken whole, then one pass that writes the indices.
   Rows that see at most k keys take them all and pad with -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..triton_utils import descriptor_rows, interpreting

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
):
    """Tiles come in through tensor descriptors (TMA on Hopper) over q as [B·S, H·D] and k as [B·T, D], so no
    per-element pointer tensor stays live across the head loop. Rows past S (or keys past T) read the next
    sequence's rows: their weights load as 0 (rows) or their scores lie beyond every query's reach (keys)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2)

    t0 = chunk_start + pid_m * BLOCK_M  # first query of the tile
    n_start = pid_n * BLOCK_N
    if n_start > tl.minimum(t0 + BLOCK_M - 1, S - 1) + q_offset:  # tile entirely above the causal diagonal
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


@triton.jit
def _radix_topk_kernel(
    Scores,
    Out,
    S,
    T,
    row_stride,
    chunk_start,
    q_offset,
    chunk_rows,
    stride_ob,
    stride_os,
    TOPK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = chunk_start + r
    if t >= S:
        return
    n = tl.minimum(t + q_offset + 1, T)  # keys in causal reach; padding among them is order key 0
    row = Scores + (b * chunk_rows + r) * row_stride
    out = Out + b * stride_ob + t.to(tl.int64) * stride_os
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    for j in range(0, TOPK, BLOCK):
        tl.store(out + j + offs, tl.full([BLOCK], -1, tl.int32), mask=j + offs < TOPK)

    # fp32 scores are compared as order keys: int64 in [0, 2^32), same order as the floats, with the NaN
    # pattern 0xFFFFFFFF (padding) mapped to 0. (Computed inline in both loops: a nested jit call costs the
    # CPU interpreter more than the whole body.)
    # Keys of the current bucket satisfy (key & bucket_mask) == prefix; `want` of them still belong to the top k.
    prefix = tl.cast(0, tl.int64)
    bucket_mask = tl.cast(0, tl.int64)
    want = tl.cast(TOPK, tl.int32)
    shift = tl.cast(24, tl.int32)
    if n <= TOPK:
        shift = tl.full([], -8, tl.int32)  # every visible key is taken
    while shift >= 0:
        hist = tl.zeros([256], dtype=tl.int32)
        n_match = tl.cast(0, tl.int32)
        for j in range(0, n, BLOCK):
            cols = j + offs
            bits = tl.load(row + cols, mask=cols < n, other=0.0).to(tl.int32, bitcast=True)
            key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648
            match = (cols < n) & (key != 0) & ((key & bucket_mask) == prefix)
            hist += tl.histogram(tl.where(match, (key >> shift) & 255, 0).to(tl.int32), 256)
            n_match += tl.sum(match.to(tl.int32))
        # Unmatched lanes were counted in bin 0.
        hist -= tl.where(bins == 0, tl.cdiv(n, BLOCK) * BLOCK - n_match, 0)
        if n_match <= want:
            shift = tl.full([], -8, tl.int32)  # first pass, at most k keys that are not padding: take them all
        else:
            at_or_above = n_match - tl.cumsum(hist, 0) + hist  # keys with digit >= d
            digit = tl.sum((at_or_above >= want).to(tl.int32)) - 1  # highest digit still holding the k-th key
            above = tl.sum(tl.where(bins == digit, at_or_above - hist, 0))
            in_bucket = tl.sum(tl.where(bins == digit, hist, 0))
            want -= above
            prefix = prefix | (digit.to(tl.int64) << shift)
            bucket_mask = bucket_mask | (tl.cast(255, tl.int64) << shift)
            if in_bucket == want:
                shift = tl.full([], -8, tl.int32)  # the whole bucket is in: no need to resolve lower bits
            else:
                shift -= 8

    # Keys above the bucket go first (exactly TOPK - want of them), then the first `want` of the bucket.
    n_above = tl.cast(0, tl.int32)
    n_equal = tl.cast(0, tl.int32)
    for j in range(0, n, BLOCK):
        cols = j + offs
        bits = tl.load(row + cols, mask=cols < n, other=0.0).to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648
        live = (cols < n) & (key != 0)
        above = live & ((key & bucket_mask) > prefix)
        equal = live & ((key & bucket_mask) == prefix)
        pos_above = n_above + tl.cumsum(above.to(tl.int32), 0) - 1
        rank_equal = n_equal + tl.cumsum(equal.to(tl.int32), 0) - 1
        pos = tl.where(above, pos_above, TOPK - want + rank_equal)
        tl.store(out + pos, cols, mask=above | (equal & (rank_equal < want)))
        n_above += tl.sum(above.to(tl.int32))
        n_equal += tl.sum(equal.to(tl.int32))


@triton.jit
def _segment_select_kernel(
    Scores,
    InKey,
    InIdx,
    OutKey,
    OutIdx,
    S,
    T,
    row_stride,
    chunk_start,
    q_offset,
    chunk_rows,
    n_in,
    prev_seg,
    stride_ob,
    stride_os,
    TOPK: tl.constexpr,
    SEG: tl.constexpr,
    FROM_SCORES: tl.constexpr,
    FINAL: tl.constexpr,
):
    """Exact top-TOPK of one SEG-long segment of one row, held in registers: every radix pass reads registers,
    the row is read from memory once.

    Level 0 (FROM_SCORES) reads fp32 scores (the position is the key index); later levels read the (order key,
    index) candidates an earlier level wrote, TOPK per segment. A FINAL level writes int32 indices, -1 past the
    picks; the others write TOPK candidates per segment, order key 0 (= none) past the picks.
    """
    seg = tl.program_id(0)
    r = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = chunk_start + r
    row = b * chunk_rows + r
    offs = seg * SEG + tl.arange(0, SEG)
    slots = tl.arange(0, TOPK)
    candidates = row * (tl.num_programs(0) * TOPK) + seg * TOPK  # this segment's slots at the next level
    reach = tl.minimum(t + q_offset + 1, T)  # keys in causal reach; padding among them is order key 0
    n = n_in
    if FROM_SCORES:
        n = reach
    elif prev_seg > 0:  # level 1: only the level-0 segments in reach left candidates
        n = tl.minimum(n_in, tl.cdiv(reach, prev_seg) * TOPK)
    if seg * SEG >= n:  # nothing in reach (never for FINAL: it has one segment)
        tl.store(OutKey + candidates + slots, tl.zeros([TOPK], tl.int32))
        return
    if FROM_SCORES:
        # Order key: uint32 with the floats' order; the NaN pattern 0xFFFFFFFF (padding) and out-of-range -> 0.
        bits = tl.load(Scores + row * row_stride + offs, mask=offs < n, other=0.0).to(tl.int32, bitcast=True)
        bits = tl.where(offs < n, bits, -1)
        key = (bits ^ tl.where(bits < 0, -1, -2147483648)).to(tl.uint32, bitcast=True)
        idx = offs
    else:
        key = tl.load(InKey + row * n_in + offs, mask=offs < n, other=0).to(tl.uint32, bitcast=True)
        idx = tl.load(InIdx + row * n_in + offs, mask=offs < n, other=-1)
    live = key != 0
    n_live = tl.sum(live.to(tl.int32))

    # Keys of the bucket being resolved satisfy (key & bucket_mask) == prefix; `want` of them belong to the top k.
    bins = tl.arange(0, 256)
    prefix = tl.cast(0, tl.uint32)
    bucket_mask = tl.cast(0, tl.uint32)
    want = tl.cast(TOPK, tl.int32)
    shift = tl.cast(24, tl.int32)
    if n_live <= TOPK:
        shift = tl.full([], -8, tl.int32)  # at most k live keys: take them all
    while shift >= 0:
        match = live & ((key & bucket_mask) == prefix)
        n_match = tl.sum(match.to(tl.int32))
        digits = tl.where(match, (key >> shift.to(tl.uint32)) & 255, 0).to(tl.int32)
        hist = tl.histogram(digits, 256)
        hist -= tl.where(bins == 0, SEG - n_match, 0)  # unmatched lanes were counted in bin 0
        at_or_above = n_match - tl.cumsum(hist, 0) + hist  # matched keys with digit >= d
        digit = tl.sum((at_or_above >= want).to(tl.int32)) - 1  # highest digit still holding the k-th key
        above = tl.sum(tl.where(bins == digit, at_or_above - hist, 0))
        in_bucket = tl.sum(tl.where(bins == digit, hist, 0))
        want -= above
        prefix = prefix | (digit.to(tl.uint32) << shift.to(tl.uint32))
        bucket_mask = bucket_mask | (tl.cast(255, tl.uint32) << shift.to(tl.uint32))
        if in_bucket == want:
            shift = tl.full([], -8, tl.int32)  # the whole bucket is in: lower bits need no resolving
        else:
            shift -= 8

    # Keys above the bucket first (TOPK - want of them), then the first `want` of the bucket. One scan counts
    # both: "above" in the high 16 bits, "equal" in the low 16 (SEG <= 32768).
    bucketed = key & bucket_mask
    above = live & (bucketed > prefix)
    equal = live & (bucketed == prefix)
    ranks = tl.cumsum(above.to(tl.int32) * 65536 + equal.to(tl.int32), 0)
    rank_equal = (ranks & 65535) - 1
    take = above | (equal & (rank_equal < want))
    pos = tl.where(above, (ranks >> 16) - 1, TOPK - want + rank_equal)
    n_take = tl.minimum(n_live, TOPK)
    if FINAL:
        out = OutIdx + b * stride_ob + t.to(tl.int64) * stride_os
        tl.store(out + pos, idx, mask=take)
        tl.store(out + slots, tl.full([TOPK], -1, tl.int32), mask=slots >= n_take)
    else:
        tl.store(OutKey + candidates + pos, key.to(tl.int32, bitcast=True), mask=take)
        tl.store(OutIdx + candidates + pos, idx, mask=take)
        tl.store(OutKey + candidates + slots, tl.zeros([TOPK], tl.int32), mask=slots >= n_take)


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
    select: str = "segments",
    select_block: int = 16384,
    select_warps: int = 8,
    buffer_bytes: int = 1 << 30,
) -> torch.Tensor:
    """int32 [B, S, topk]; same contract as `lightning_indexer_topk_reference`.

    The score buffer holds `buffer_bytes // (4 T B)` query rows (at least one block), so memory stays
    O(S · topk + buffer) for any S. `select`: "segments" (rows cut into `select_block`-long segments selected in
    registers, then the candidates) or "stream" (one program per row streaming it from memory once per pass).
    """
    batch, seq_len, n_heads, head_dim = q.shape
    num_keys = k.shape[1]
    q_offset = num_keys - seq_len if q_offset is None else q_offset
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
    q_desc = TensorDescriptor.from_tensor(q, [block_m, block_d])
    k_desc = TensorDescriptor.from_tensor(k, [block_n, block_d])
    out_desc = TensorDescriptor(scores, [batch, chunk, num_keys], list(scores.stride()), [1, block_m, block_n])
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    for start in range(0, seq_len, chunk):
        rows = min(chunk, seq_len - start)
        reach = min(num_keys, start + rows + q_offset)
        grid = (triton.cdiv(reach, block_n), triton.cdiv(rows, block_m), batch)
        _index_scores_kernel[grid](
            q_desc, k_desc, out_desc, w, mask,
            seq_len, num_keys, start, q_offset,
            w.stride(0), w.stride(1), mask.stride(0),
            H=n_heads, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_KEY_MASK=key_mask is not None, DOT_PRECISION=precision, UPCAST_DOT=interpreting(),
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
        if select == "stream":
            _radix_topk_kernel[(rows, batch)](
                scores, out, seq_len, num_keys, row_stride, start, q_offset, chunk,
                out.stride(0), out.stride(1), TOPK=topk, BLOCK=select_block, num_warps=select_warps,
            )  # fmt: skip
        else:
            _select_segments(scores, out, seq_len, num_keys, row_stride, start, q_offset, chunk, rows, reach,
                             topk, select_block, select_warps)  # fmt: skip
    return out


def _select_segments(scores, out, seq_len, num_keys, row_stride, start, q_offset, chunk, rows, reach, topk,
                     seg_len, max_warps):  # fmt: skip
    """Top-k of each score row in levels: rows cut into seg_len-long segments, each reduced to its top-k
    candidates, until one segment holds all of a row's candidates; that last level writes the indices."""
    batch = out.shape[0]
    seg_len = max(seg_len, 2 * triton.next_power_of_2(topk))  # each level must shrink the rows
    in_key = in_idx = scores  # dummies at level 0
    n_in, from_scores, prev_seg = reach, True, 0
    while True:
        final = n_in <= seg_len
        seg = triton.next_power_of_2(n_in) if final else seg_len
        n_seg = triton.cdiv(n_in, seg)
        if final:
            out_key, out_idx = scores, out
        else:
            out_key = torch.empty((batch * chunk, n_seg * topk), dtype=torch.int32, device=out.device)
            out_idx = torch.empty_like(out_key)
        _segment_select_kernel[(n_seg, rows, batch)](
            scores, in_key, in_idx, out_key, out_idx,
            seq_len, num_keys, row_stride, start, q_offset, chunk, n_in, prev_seg,
            out.stride(0), out.stride(1),
            TOPK=topk, SEG=seg, FROM_SCORES=from_scores, FINAL=final,
            num_warps=max(1, min(max_warps, seg // 2048)),
        )  # fmt: skip
        if final:
            return
        prev_seg = seg if from_scores else -1  # the level-1 extent rule needs level 0's segment length
        in_key, in_idx, n_in, from_scores = out_key, out_idx, n_seg * topk, False
