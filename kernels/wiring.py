"""The seam between the kernels and transformers' DSA models (GLM-5 `glm_moe_dsa`, DeepSeek-V3.2 `deepseek_v32`).

`indexer_topk` replaces a stock indexer's forward: the same projections and RoPE, then the top-k kernel.
`register_sparse_attention` registers an attention function that consumes the indices the attention layer passes
as `indices=` (transformers passes them to every implementation other than "eager"/"sdpa", which instead fold them
into a dense S×T mask), and a mask function that builds no S×T mask.

With the registered implementation the stock indexer would see only that small mask, so no causality: the layers
that run an indexer must call `indexer_topk` instead (IndexCache's patch does; the tests do it by hand).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave

from .indexer import lightning_indexer_topk
from .sparse_attention import sparse_attention

ATTN_IMPLEMENTATION = "indexcache_sparse"
_ROPE = {"interleave": apply_rotary_pos_emb_interleave, "half": apply_rotary_pos_emb}


def indexer_projections(
    indexer: nn.Module,
    rope: str,
    hidden_states: torch.Tensor,
    q_resid: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stock indexer's q [B, S, H, D], k [B, S, D] and fp32 head weights [B, S, H], before any scoring.

    indexer: a `GlmMoeDsaIndexer` / `DeepseekV32Indexer` (its wq_b, wk, k_norm, weights_proj, n_heads, head_dim,
    qk_rope_head_dim); rope: "interleave" (glm_moe_dsa) or "half" (deepseek_v32), applied to the first
    qk_rope_head_dim dims of q and k as the stock code does. hidden_states: [B, S, hidden], q_resid: [B, S, q_lora],
    position_embeddings: (cos, sin). Causal, no padding, no cache (prefill of a whole window). Differentiable:
    `indexcache distill` trains the indexer through it.
    """
    if rope not in _ROPE:
        raise ValueError(f"rope must be one of {sorted(_ROPE)}, not {rope!r}")
    batch, seq_len, _ = hidden_states.shape
    n_heads, head_dim, rope_dim = indexer.n_heads, indexer.head_dim, indexer.qk_rope_head_dim
    cos, sin = position_embeddings
    q = indexer.wq_b(q_resid).view(batch, seq_len, n_heads, head_dim)
    q_rot, q_pass = torch.split(q, [rope_dim, head_dim - rope_dim], dim=-1)
    k = indexer.k_norm(indexer.wk(hidden_states)).unsqueeze(2)  # [B, S, 1, D]
    k_rot, k_pass = torch.split(k, [rope_dim, head_dim - rope_dim], dim=-1)
    q_rot, k_rot = _ROPE[rope](q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1)
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
    weights = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)).float() * n_heads**-0.5
    return q, k, weights


@torch.no_grad()
def indexer_topk(
    indexer: nn.Module,
    rope: str,
    hidden_states: torch.Tensor,
    q_resid: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    topk: int,
) -> torch.Tensor:
    """The stock indexer's selection through the kernel: int32 [B, S, topk], -1 past the visible keys.

    Arguments as `indexer_projections`, plus the number of keys to keep.
    """
    q, k, weights = indexer_projections(indexer, rope, hidden_states, q_resid, position_embeddings)
    return lightning_indexer_topk(q, k, weights, topk, indexer.softmax_scale)


def _sparse_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    indices: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, H, S, Dqk], key [B, H, T, Dqk], value [B, H, T, Dv]
    -> ([B, S, H, Dv], no weights). Inference only: dropout must be 0."""
    if indices is None:
        raise ValueError(f"{ATTN_IMPLEMENTATION} attends only to indexer-selected keys; the layer passed no indices")
    if dropout:
        raise ValueError(f"{ATTN_IMPLEMENTATION} has no attention dropout")
    return sparse_attention(query, key, value, indices, scaling), None


def _key_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> torch.Tensor:
    """bool [B, 1, 1, T] (True = a real key): the padding mask's last T columns, never an S×T mask.

    The attention layer still slices it as `mask[:, 0, :, :]` before calling the indexer; nothing else reads it.
    """
    if attention_mask is None:
        return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device).expand(batch_size, 1, 1, kv_length)
    return attention_mask[:, -kv_length:].to(device=device, dtype=torch.bool)[:, None, None, :]


def register_sparse_attention() -> str:
    """Registers the kernels with transformers and returns the name for `model.set_attn_implementation(name)`."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _sparse_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _key_mask)
    return ATTN_IMPLEMENTATION
