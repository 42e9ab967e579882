"""Index-gathered sparse attention in Triton, for the two layouts of `reference.py`.

Both kernels walk a query's index row in blocks of BLOCK_K, gather those keys (and values) straight from the
key tensor with per-row pointers, and keep an online softmax in fp32 (exp2 with the scale folded in). No S×T
mask or score matrix exists. Sentinels (-1) load nothing and get probability 0.

* `_sparse_attn_kernel` (expanded per-head keys, transformers' layout): one program per (query, head). Each head
  has its own gathered keys, so there is nothing for the tensor cores to share: the dot products run on the
  CUDA cores and the kernel is bound by the gather (Dqk + Dv) · 2 bytes per selected key per head.
* `_sparse_mla_kernel` (absorbed latent, FlashMLA's layout): one program per (query, block of heads). A gathered
  latent block serves every head of the block, so scores and outputs are tensor-core products
  [heads, Dc] × [Dc, BLOCK_K] and [heads, BLOCK_K] × [BLOCK_K, Dc].

For decode (few queries) the index row is split over `n_split` programs; each writes its normalised partial
output and log2-sum-exp, and `_combine_splits` merges them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..triton_utils import descriptor_rows, interpreting

_LOG2E = 1.4426950408889634
_TARGET_PROGRAMS = 264  # two waves of an H100's 132 multiprocessors: below this, split the index rows


@triton.jit
def _sparse_attn_kernel(
    Q,
    K,
    V,
    Idx,
    Out,
    Lse,
    split_len,
    topk,
    scale_log2,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ib,
    stride_is,
    stride_osplit,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lsplit,
    stride_lb,
    stride_ls,
    N_SPLIT: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64) // N_SPLIT
    split = tl.program_id(2) % N_SPLIT
    hk = h // GROUP

    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h * stride_qh + s * stride_qs + dims, mask=dims < D, other=0.0).to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    idx_base = Idx + b * stride_ib + s * stride_is

    m_i = tl.full([], -1.0e30, tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, topk)
    for j in range(lo, hi, BLOCK_K):
        slots = j + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_base + slots, mask=slots < hi, other=-1)
        valid = idx >= 0
        rows = idx.to(tl.int64)
        k = tl.load(
            k_base + rows[:, None] * stride_kt + dims[None, :], mask=valid[:, None] & (dims < D)[None, :], other=0.0
        )
        scores = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale_log2
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(
            v_base + rows[:, None] * stride_vt + vdims[None, :], mask=valid[:, None] & (vdims < DV)[None, :], other=0.0
        )
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)
    o_ptrs = Out + split * stride_osplit + b * stride_ob + s * stride_os + h * stride_oh + vdims
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=vdims < DV)
    if N_SPLIT > 1:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(Lse + split * stride_lsplit + b * stride_lb + s * stride_ls + h, lse)


@triton.jit
def _sparse_mla_kernel(
    qc_desc,
    qr_desc,
    KVC,
    KR,
    Idx,
    Out,
    Lse,
    n_heads,
    split_len,
    topk,
    scale_log2,
    stride_kcb,
    stride_kct,
    stride_krb,
    stride_krt,
    stride_ib,
    stride_is,
    stride_osplit,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lsplit,
    stride_lb,
    stride_ls,
    N_SPLIT: tl.constexpr,
    DC: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    DR: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The query heads come in through tensor descriptors over [B·S·H, D] (TMA into shared memory, where the
    tensor cores read them); the latent rows are gathered with per-row pointers."""
    # The head blocks of one query are neighbours in the grid, so the later ones find its latent rows in L2.
    head_blocks = tl.cdiv(n_heads, BLOCK_H)
    s = (tl.program_id(0) // head_blocks).to(tl.int64)
    h0 = (tl.program_id(0) % head_blocks) * BLOCK_H
    heads = h0 + tl.arange(0, BLOCK_H)
    b = tl.program_id(2).to(tl.int64) // N_SPLIT
    split = tl.program_id(2) % N_SPLIT
    h_ok = heads < n_heads
    n_queries = tl.num_programs(0) // head_blocks

    q_row = ((b * n_queries + s) * n_heads + h0).to(tl.int32)
    qc = qc_desc.load([q_row, 0])
    qr = qr_desc.load([q_row, 0])
    if UPCAST_DOT:  # the CPU interpreter multiplies bf16 bit patterns as integers
        qc = qc.to(tl.float32)
        qr = qr.to(tl.float32)
    cdims = tl.arange(0, BLOCK_DC)
    rdims = tl.arange(0, BLOCK_DR)
    kc_base = KVC + b * stride_kcb
    kr_base = KR + b * stride_krb
    idx_base = Idx + b * stride_ib + s * stride_is

    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DC], tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, topk)
    # The next block's indices are loaded one iteration ahead, so that the gathers' addresses are known a whole
    # iteration early and the software pipeliner can prefetch them.
    slots = lo + tl.arange(0, BLOCK_K)
    idx = tl.load(idx_base + slots, mask=slots < hi, other=-1)
    for j in range(lo, hi, BLOCK_K):
        slots = j + BLOCK_K + tl.arange(0, BLOCK_K)
        idx_next = tl.load(idx_base + slots, mask=slots < hi, other=-1)
        valid = idx >= 0
        rows = idx.to(tl.int64)
        kc = tl.load(
            kc_base + rows[:, None] * stride_kct + cdims[None, :],
            mask=valid[:, None] & (cdims < DC)[None, :],
            other=0.0,
        )
        kr = tl.load(
            kr_base + rows[:, None] * stride_krt + rdims[None, :],
            mask=valid[:, None] & (rdims < DR)[None, :],
            other=0.0,
        )
        if UPCAST_DOT:
            kc = kc.to(tl.float32)
            kr = kr.to(tl.float32)
        scores = tl.dot(qc, tl.trans(kc), input_precision=DOT_PRECISION) + tl.dot(
            qr, tl.trans(kr), input_precision=DOT_PRECISION
        )
        scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kc.dtype), kc, input_precision=DOT_PRECISION)
        m_i = m_new
        idx = idx_next

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + split * stride_osplit + b * stride_ob + s * stride_os + heads[:, None] * stride_oh + cdims[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=h_ok[:, None] & (cdims < DC)[None, :])
    if N_SPLIT > 1:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(Lse + split * stride_lsplit + b * stride_lb + s * stride_ls + heads, lse, mask=h_ok)


def _n_split(programs: int, topk: int, block_k: int, n_split: int | None) -> tuple[int, int]:
    """How many programs share one index row, and how many slots each takes (a multiple of block_k)."""
    blocks = triton.cdiv(topk, block_k)
    if n_split is None:
        n_split = min(blocks, max(1, triton.cdiv(_TARGET_PROGRAMS, programs)))
    split_len = triton.cdiv(blocks, n_split) * block_k
    return triton.cdiv(topk, split_len), split_len


def _combine_splits(partial: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """partial: fp32 [n_split, B, S, H, Dv] (each normalised), lse: [n_split, B, S, H] (log2) -> [B, S, H, Dv]."""
    top = lse.amax(0, keepdim=True)
    weights = torch.exp2(lse - torch.where(torch.isfinite(top), top, 0.0))
    weights = weights / weights.sum(0, keepdim=True).clamp(min=1e-30)
    return (partial * weights[..., None]).sum(0).to(dtype)


def _outputs(n_split: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """The kernel's output and log-sum-exp buffers: final output directly, or fp32 partials per split."""
    if n_split == 1:
        return torch.empty(shape, dtype=dtype, device=device), torch.empty((1, 1, 1), device=device)
    return (
        torch.empty((n_split, *shape), dtype=torch.float32, device=device),
        torch.empty((n_split, *shape[:-1]), dtype=torch.float32, device=device),
    )


def _split_strides(out: torch.Tensor, lse: torch.Tensor, n_split: int) -> tuple[int, ...]:
    o = out.stride() if n_split > 1 else (0, *out.stride())
    lse_strides = lse.stride()[:3] if n_split > 1 else (0, 0, 0)
    return (*o[:4], *lse_strides)


def sparse_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    *,
    block_k: int = 16,
    num_warps: int = 2,
    num_stages: int = 2,
    n_split: int | None = None,
) -> torch.Tensor:
    """Same contract as `sparse_attention_reference`:
    [B, H, S, Dqk], [B, Hk, T, Dqk], [B, Hk, T, Dv] -> [B, S, H, Dv]."""
    batch, n_heads, seq_len, head_dim = query.shape
    n_kv_heads, v_dim = key.shape[1], value.shape[-1]
    topk = indices.shape[-1]
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension")
    indices = indices.contiguous()
    n_split, split_len = _n_split(batch * seq_len * n_heads, topk, block_k, n_split)
    out, lse = _outputs(n_split, (batch, seq_len, n_heads, v_dim), query.dtype, query.device)
    _sparse_attn_kernel[(seq_len, n_heads, batch * n_split)](
        query,
        key,
        value,
        indices,
        out,
        lse,
        split_len,
        topk,
        scaling * _LOG2E,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        key.stride(0),
        key.stride(1),
        key.stride(2),
        value.stride(0),
        value.stride(1),
        value.stride(2),
        indices.stride(0),
        indices.stride(1),
        *_split_strides(out, lse, n_split),
        N_SPLIT=n_split,
        GROUP=n_heads // n_kv_heads,
        D=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        DV=v_dim,
        BLOCK_DV=triton.next_power_of_2(v_dim),
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out if n_split == 1 else _combine_splits(out, lse, query.dtype)


def sparse_mla_attention_triton(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    *,
    block_h: int = 64,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    n_split: int | None = None,
) -> torch.Tensor:
    """Same contract as `sparse_mla_attention_reference`: [B, S, H, Dc], [B, S, H, Dr], [B, T, Dc], [B, T, Dr]
    -> [B, S, H, Dc]."""
    batch, seq_len, n_heads, latent_dim = q_latent.shape
    rope_dim = q_rope.shape[-1]
    topk = indices.shape[-1]
    for name, t in (("kv_latent", kv_latent), ("k_rope", k_rope)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension")
    indices = indices.contiguous()
    block_h = max(16, min(block_h, triton.next_power_of_2(n_heads)))
    # Defaults measured on an H100 (NOTES.md): 16 heads take mma.sync and wider key blocks, 64 heads wgmma.
    small = block_h <= 16
    block_k = max(16, block_k or 64)  # tl.dot needs 16 on every side
    num_warps = num_warps or (4 if small else 8)
    num_stages = num_stages or 2
    block_dc = max(16, triton.next_power_of_2(latent_dim))
    block_dr = max(16, triton.next_power_of_2(rope_dim))
    qc_desc = TensorDescriptor.from_tensor(descriptor_rows(q_latent), [block_h, block_dc])
    qr_desc = TensorDescriptor.from_tensor(descriptor_rows(q_rope), [block_h, block_dr])
    head_blocks = triton.cdiv(n_heads, block_h)
    n_split, split_len = _n_split(batch * seq_len * head_blocks, topk, block_k, n_split)
    out, lse = _outputs(n_split, (batch, seq_len, n_heads, latent_dim), q_latent.dtype, q_latent.device)
    _sparse_mla_kernel[(seq_len * head_blocks, 1, batch * n_split)](
        qc_desc,
        qr_desc,
        kv_latent,
        k_rope,
        indices,
        out,
        lse,
        n_heads,
        split_len,
        topk,
        scaling * _LOG2E,
        kv_latent.stride(0),
        kv_latent.stride(1),
        k_rope.stride(0),
        k_rope.stride(1),
        indices.stride(0),
        indices.stride(1),
        *_split_strides(out, lse, n_split),
        N_SPLIT=n_split,
        DC=latent_dim,
        BLOCK_DC=block_dc,
        DR=rope_dim,
        BLOCK_DR=block_dr,
        BLOCK_H=block_h,
        BLOCK_K=block_k,
        UPCAST_DOT=interpreting(),
        # fp32 in, fp32 products, as in the indexer kernel: tf32 keeps 10 mantissa bits, too few for fp32 checks.
        DOT_PRECISION="ieee" if q_latent.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out if n_split == 1 else _combine_splits(out, lse, q_latent.dtype)
