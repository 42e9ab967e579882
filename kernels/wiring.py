"""The seam between the kernels and transformers' DSA models (GLM-5, DeepSeek-V3.2, Hunyuan 4, Mistral Large 4, ...).

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
    q_resid: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    *,
    rope_at_end: bool = False,
    scale_in_weights: bool = False,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The stock indexer's q [B, S, H, D], k [B, S, D], fp32 head weights [B, S, H] and the score scale, before any
    scoring: the indexer scores Σ_h weights · ReLU(scale · q · k).

    indexer: a `GlmMoeDsaIndexer` / `DeepseekV32Indexer` / `HYV4Indexer` / `MistralLarge4TextIndexer` / ... (its wq_b,
    wk, k_norm, weights_proj, softmax_scale, n_heads, head_dim, qk_rope_head_dim); rope: "interleave" or "half",
    applied to the first qk_rope_head_dim dims of q and k (the last ones with `rope_at_end`, hy_v4), or to none where
    the indexer says `use_rope = 0` (mistral_large4's NoPE layers). hidden_states: [B, S, hidden], q_resid:
    [B, S, q_lora] — or None for an indexer without q-LoRA, whose query is wq_b(q_input_norm(hidden)) scaled per
    position by its `softmax_scaling` (needs position_ids [1, S]). k_norm runs in its own weights' dtype (hy_v4 keeps
    it fp32); `scale_in_weights` folds softmax_scale into the head weights as hy_v4 does (the scale is then 1).
    position_embeddings: (cos, sin). Causal, no padding, no cache (prefill of a whole window). Differentiable:
    `indexcache distill` trains the indexer through it.
    """
    if rope not in _ROPE:
        raise ValueError(f"rope must be one of {sorted(_ROPE)}, not {rope!r}")
    batch, seq_len, _ = hidden_states.shape
    n_heads, head_dim, rope_dim = indexer.n_heads, indexer.head_dim, indexer.qk_rope_head_dim
    cos, sin = position_embeddings
    if q_resid is None:
        q = indexer.wq_b(indexer.q_input_norm(hidden_states)).view(batch, seq_len, n_heads, head_dim)
        q = indexer.softmax_scaling(q, position_ids, head_dim_first=False)
    else:
        q = indexer.wq_b(q_resid).view(batch, seq_len, n_heads, head_dim)
    k_norm_dtype = indexer.k_norm.weight.dtype
    k = indexer.k_norm(indexer.wk(hidden_states).to(k_norm_dtype)).to(hidden_states.dtype).unsqueeze(2)  # [B,S,1,D]
    if getattr(indexer, "use_rope", True):
        split = [head_dim - rope_dim, rope_dim] if rope_at_end else [rope_dim, head_dim - rope_dim]
        rot = 1 if rope_at_end else 0
        q_parts, k_parts = list(torch.split(q, split, dim=-1)), list(torch.split(k, split, dim=-1))
        q_parts[rot], k_parts[rot] = _ROPE[rope](q_parts[rot], k_parts[rot], cos, sin, unsqueeze_dim=2)
        q, k = torch.cat(q_parts, dim=-1), torch.cat(k_parts, dim=-1)
    k = k.squeeze(2)
    weights = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)).float() * n_heads**-0.5
    if scale_in_weights:
        return q, k, weights * indexer.softmax_scale, 1.0
    return q, k, weights, indexer.softmax_scale


class _ScorerInputs(Exception):
    """Carries (q, keys, hidden_states) out of an indexer's forward at its scorer (see `scorer_projections`)."""


class _StopAtScorer(nn.Module):
    def forward(self, q, keys, hidden_states):
        raise _ScorerInputs(q, keys, hidden_states)


def scorer_projections(indexer: nn.Module, scorer_attr: str, *args, **kwargs):
    """q [B, S, H, D], keys [B, T, D], fp32 head weights [B, S, H] and the score scale of an indexer that hands its
    projections to a scorer module (`DeepseekV4Indexer.scorer`: Σ_h w · ReLU(q · k) · softmax_scale over the T
    compressed entries). The indexer's own forward (its arguments: `args`, `kwargs`) pools the compressed keys and
    rotates the queries; the scorer is swapped for one that stops the forward right there, so no [B, S, T] score
    tensor exists and transformers' arithmetic stays the only definition of the keys."""
    scorer = getattr(indexer, scorer_attr)
    setattr(indexer, scorer_attr, _StopAtScorer())
    try:
        indexer(*args, **kwargs)
        raise RuntimeError(f"{type(indexer).__name__} returned without calling its {scorer_attr}")
    except _ScorerInputs as stop:
        q, keys, hidden_states = stop.args
    finally:
        setattr(indexer, scorer_attr, scorer)
    weights = scorer.weights_proj(hidden_states).float() * scorer.weights_scaling
    return q, keys, weights, scorer.softmax_scale


@torch.no_grad()
def indexer_topk(
    indexer: nn.Module,
    rope: str,
    hidden_states: torch.Tensor,
    q_resid: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    topk: int,
    **layout,
) -> torch.Tensor:
    """The stock indexer's selection through the kernel: int32 [B, S, topk], -1 past the visible keys.

    Arguments as `indexer_projections` (`layout`: its keyword arguments), plus the number of keys to keep.
    """
    q, k, weights, scale = indexer_projections(indexer, rope, hidden_states, q_resid, position_embeddings, **layout)
    return lightning_indexer_topk(q, k, weights, topk, scale)


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
