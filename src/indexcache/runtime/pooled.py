"""F-layer selections of the indexers that pick pools of tokens, computed from transformers' own indexer modules.

- glm5_next (`Glm5NextTextIndexer`, NoPE): q · k over the learned-softmax average of each kpool pool, Σ_h
  weights · ReLU; keeps `index_topk / index_kpool` pools. The stock module is the reference (it is vectorised);
  `kpool_kernel` runs its projections and pooling (`get_pooled_states`) and the Triton indexer over the pools.
- qwen4_exp (`Qwen4ExpTextQSAIndexer`): q · k over the mean of each block of `compress_ratio` keys (normed, RoPE
  at the block's first position), Σ_h ReLU / sqrt(D), no head weights; keeps `token_budget / compress_ratio`
  blocks. The stock module loops in Python over every (batch, query) and returns a [B, 1, S, T] mask;
  `qsa_reference` computes exactly its selection a chunk of queries at a time, `qsa_kernel` through the Triton
  indexer. Both return the selection (int32 [B, S, budget + c − 1]); `selection_mask` makes the stock output of it.

Causal prefill of an unpadded window, no cache: what the search feeds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IndexCacheError
from ..kernels.indexer.pools import expand_pools, pooled_topk

# Queries scored at once by the reference: chunk · H · blocks fp32 values alive at a time.
_CHUNK_ELEMENTS = 1 << 26


def _prefill_only(cache) -> None:
    if cache is not None:
        raise IndexCacheError("pooled indexers run prefill only here; call the model with use_cache=False")


def kpool_projections(
    indexer: nn.Module, hidden_states: torch.Tensor, q_resid: torch.Tensor, attention_mask: torch.Tensor, cache=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, int]:
    """glm5_next's scoring inputs: q [B, S, H, D], pool keys [B, S // kpool, D] (complete pools, the stock
    `get_pooled_states`), fp32 head weights [B, S, H], the score scale and the pool size.

    hidden_states: [B, S, hidden], q_resid: [B, S, q_lora], attention_mask: bool [B, S] (all True: no padding).
    """
    _prefill_only(cache)
    batch, seq_len, _ = hidden_states.shape
    q = indexer.wq_b(q_resid).view(batch, seq_len, indexer.n_heads, indexer.head_dim)
    k = indexer.k_norm(indexer.wk(hidden_states))
    gate_scores = F.linear(hidden_states, indexer.index_kpool_compress_gate)
    packed = torch.cat([k, gate_scores, attention_mask.to(k.dtype)[..., None]], dim=-1)
    pool_keys, _, _ = indexer.get_pooled_states(packed_states=packed)
    weights = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)).float() * indexer.n_heads**-0.5
    return q, pool_keys.contiguous(), weights, indexer.softmax_scale, indexer.index_kpool


@torch.no_grad()
def kpool_kernel(indexer: nn.Module, *args, **kwargs) -> torch.Tensor:
    """glm5_next's selection through the Triton indexer: int32 [B, S, index_topk + index_kpool − 1] (arguments as
    the stock indexer's)."""
    q, pool_keys, weights, scale, pool = kpool_projections(indexer, *args, **kwargs)
    return pooled_topk(q, pool_keys, weights, indexer.index_topk // pool, scale, pool)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Qwen4-Exp's partial rotary (the first cos.shape[-1] dims, half-split), x: [B, N, *, D], cos/sin: [B, N, r]."""
    from transformers.models.qwen4_exp.modeling_qwen4_exp import apply_rotary_pos_emb

    return apply_rotary_pos_emb(x, cos=cos, sin=sin, unsqueeze_dim=2)


def qsa_projections(
    indexer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    cache=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, int]:
    """The QSA indexer's scoring inputs, as the stock forward forms them: rotated queries q [B, S, H, D], block keys
    [B, S // c, D] (key means in fp32, cast back, normed, rotated at each block's first position), head weights
    (all 1, fp32 [B, S, H]), the score scale 1/sqrt(D) and the block size c."""
    _prefill_only(cache)
    batch, seq_len, _ = hidden_states.shape
    n_heads, head_dim, ratio = indexer.index_n_heads, indexer.index_head_dim, indexer.compress_ratio
    cos, sin = position_embeddings
    q, token_k = indexer.index_qk_proj(hidden_states).split([n_heads * head_dim, head_dim], dim=-1)
    q = _rope(indexer.q_layernorm(q.reshape(batch, seq_len, n_heads, head_dim)), cos, sin)
    blocks = seq_len // ratio
    means = token_k[:, : blocks * ratio].view(batch, blocks, ratio, head_dim).float().mean(dim=2).to(token_k.dtype)
    starts = torch.arange(blocks, device=q.device) * ratio
    block_keys = _rope(indexer.k_layernorm(means)[:, :, None], cos[:, starts], sin[:, starts]).squeeze(2)
    weights = torch.ones(q.shape[:3], dtype=torch.float32, device=q.device)
    return q, block_keys.contiguous(), weights, head_dim**-0.5, ratio


@torch.no_grad()
def qsa_reference(
    indexer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    cache=None,
) -> torch.Tensor:
    """Exactly the stock QSA selection, vectorised over queries: int32 [B, S, budget + c − 1].

    Same arithmetic as `Qwen4ExpTextQSAIndexer.forward` (fp32 q · k per head, ReLU, head sum, / sqrt(D)); a query
    t ranks the (t + 1) // c blocks it sees completely.
    """
    q, block_keys, _, _, ratio = qsa_projections(indexer, hidden_states, position_embeddings, cache=cache)
    batch, seq_len, n_heads, head_dim = q.shape
    blocks = block_keys.shape[1]
    take = min(indexer.block_topk, blocks)
    picks = torch.full((batch, seq_len, indexer.block_topk), -1, dtype=torch.int32, device=q.device)
    keys_t = block_keys.float().transpose(-1, -2).unsqueeze(1)  # [B, 1, D, P]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_heads * blocks))
    for start in range(0, seq_len, chunk):
        stop = min(seq_len, start + chunk)
        scores = torch.relu(torch.matmul(q[:, start:stop].float(), keys_t)).sum(dim=2) / math.sqrt(head_dim)
        seen = (torch.arange(start, stop, device=q.device)[:, None] + 1) // ratio  # blocks each query sees
        scores = scores.masked_fill(torch.arange(blocks, device=q.device) >= seen, float("-inf"))
        values, indices = scores.topk(take, dim=-1)
        picks[:, start:stop, :take] = torch.where(values > float("-inf"), indices, -1).to(torch.int32)
    return expand_pools(picks, ratio)


@torch.no_grad()
def qsa_kernel(indexer: nn.Module, *args, **kwargs) -> torch.Tensor:
    """The QSA selection through the Triton indexer (head weights 1, scale 1/sqrt(D)): as `qsa_reference`."""
    q, block_keys, weights, scale, ratio = qsa_projections(indexer, *args, **kwargs)
    return pooled_topk(q, block_keys, weights, indexer.block_topk, scale, ratio)


def selection_mask(selection: torch.Tensor) -> torch.Tensor:
    """The QSA indexer's output from its selection: bool [B, 1, S, S] (True = selected), prefill of S tokens.

    selection: int32 [B, S, n], -1 = none. The family's own attention combines this mask with its causal one.
    """
    batch, seq_len, _ = selection.shape
    mask = torch.zeros(batch, seq_len, seq_len + 1, dtype=torch.bool, device=selection.device)
    mask.scatter_(-1, torch.where(selection >= 0, selection, seq_len).long(), True)
    return mask[..., :seq_len].unsqueeze(1)
