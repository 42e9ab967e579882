"""Index-gathered sparse attention in plain PyTorch: the definitions the Triton kernels are checked against.

Each query attends, with one softmax, to the keys named in its row of `indices` ([B, S, k] int32, shared by all
heads; -1 = no key). Nothing else decides visibility: causality and padding were applied when the indices were
selected. Two layouts of the same attention:

* `sparse_attention_reference` takes the tensors transformers' GLM-5 / DeepSeek-V3.2 attention hands to an
  attention function: per-head keys and values expanded from the MLA latent (query [B, H, S, Dqk]).
* `sparse_mla_attention_reference` takes the compressed latent instead (weight absorption, as FlashMLA does):
  one key per token shared by all heads, [latent | rope] = Dc + Dr dims (512 + 64), whose first Dc dims are also
  the value. The query's nope part has been multiplied into the latent space (q_nope · W_uk) and the output is
  in the latent space too (multiply by W_uv afterwards).

Both compute in fp32 (float64 for float64 inputs) and return the query's dtype, [B, S, H, Dv].
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 25  # gathered elements alive at once


def _softmax_gathered(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, ignoring invalid slots; a row with no valid slot gives zeros."""
    scores = scores.masked_fill(~valid, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def sparse_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, indices: torch.Tensor, scaling: float
) -> torch.Tensor:
    """query: [B, H, S, Dqk], key: [B, Hk, T, Dqk], value: [B, Hk, T, Dv] (H a multiple of Hk),
    indices: int32 [B, S, k]. Returns [B, S, H, Dv]."""
    batch, n_heads, seq_len, _ = query.shape
    n_kv_heads = key.shape[1]
    group = n_heads // n_kv_heads
    topk = indices.shape[-1]
    compute = torch.promote_types(query.dtype, torch.float32)
    out = query.new_empty(batch, seq_len, n_heads, value.shape[-1])
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_kv_heads * topk * (key.shape[-1] + value.shape[-1])))
    b_idx = torch.arange(batch, device=query.device)[:, None, None, None]
    h_idx = torch.arange(n_kv_heads, device=query.device)[None, :, None, None]
    for start in range(0, seq_len, chunk):
        stop = min(seq_len, start + chunk)
        idx = indices[:, start:stop].long()  # [B, c, k]
        valid = (idx >= 0)[:, None]  # [B, 1, c, k]
        rows = idx.clamp(min=0)[:, None]
        k_sel = key[b_idx, h_idx, rows].to(compute).repeat_interleave(group, dim=1)  # [B, H, c, k, Dqk]
        v_sel = value[b_idx, h_idx, rows].to(compute).repeat_interleave(group, dim=1)
        scores = torch.einsum("bhsd,bhskd->bhsk", query[:, :, start:stop].to(compute), k_sel) * scaling
        probs = _softmax_gathered(scores, valid)
        out[:, start:stop] = torch.einsum("bhsk,bhskd->bshd", probs, v_sel).to(out.dtype)
    return out


def sparse_mla_attention_reference(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """q_latent: [B, S, H, Dc], q_rope: [B, S, H, Dr], kv_latent: [B, T, Dc] (keys and values), k_rope: [B, T, Dr],
    indices: int32 [B, S, k]. Returns [B, S, H, Dc]."""
    batch, seq_len, n_heads, latent_dim = q_latent.shape
    topk = indices.shape[-1]
    compute = torch.promote_types(q_latent.dtype, torch.float32)
    out = q_latent.new_empty(batch, seq_len, n_heads, latent_dim)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, topk * (latent_dim + k_rope.shape[-1])))
    b_idx = torch.arange(batch, device=q_latent.device)[:, None, None]
    for start in range(0, seq_len, chunk):
        stop = min(seq_len, start + chunk)
        idx = indices[:, start:stop].long()  # [B, c, k]
        valid = (idx >= 0)[:, :, None]  # [B, c, 1, k]
        rows = idx.clamp(min=0)
        kv_sel = kv_latent[b_idx, rows].to(compute)  # [B, c, k, Dc]
        kr_sel = k_rope[b_idx, rows].to(compute)
        scores = torch.einsum("bshc,bskc->bshk", q_latent[:, start:stop].to(compute), kv_sel)
        scores = (scores + torch.einsum("bshr,bskr->bshk", q_rope[:, start:stop].to(compute), kr_sel)) * scaling
        probs = _softmax_gathered(scores, valid)
        out[:, start:stop] = torch.einsum("bshk,bskc->bshc", probs, kv_sel).to(out.dtype)
    return out
