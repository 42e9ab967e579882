"""The pieces of the distillation loss, each over one F layer's selected keys only (memory O(S·k), never S×T).

For F layer f with selection `indices` [B, S, k], the target is the attention the layers it serves (f and the
S layers up to the next F) pay to those keys: each layer's softmax over the selected keys, summed over heads and
normalised (a mean over heads), then averaged over the layers. Normalising over the selected keys is what those
layers compute when they run: they attend to nothing else. The indexer's distribution is the softmax of its own
scores at the same keys; the loss is KL(target ‖ indexer), averaged over queries (DeepSeek-V3.2's sparse stage).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Gathered elements alive at once while scoring a chunk of queries.
_CHUNK_ELEMENTS = 1 << 24


def selected_valid(indices: torch.Tensor, num_keys: int) -> torch.Tensor:
    """bool [B, S, k]: the slots of `indices` [B, S, k] that name a key the query may see.

    -1 (the kernels' "no key") and, from the stock indexer, indices of future keys for the first k queries are
    not keys; queries sit at the end of the `num_keys` keys (prefill: the same positions).
    """
    query_pos = torch.arange(indices.shape[1], device=indices.device)[:, None] + (num_keys - indices.shape[1])
    return (indices >= 0) & (indices <= query_pos)


def attend_selected(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, indices: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's attention to its selected keys: the output, and the probabilities summed over heads and
    normalised (the layer's share of the target).

    query: [B, H, S, D], key: [B, Hk, T, D], value: [B, Hk, T, Dv] (H a multiple of Hk), indices: [B, S, k].
    Returns out [B, S, H, Dv] (query's dtype) and fp32 probs [B, S, k], each row summing to 1 over its valid
    slots. Queries go a chunk at a time through dense q·kᵀ (BLAS-fast on CPU; memory O(chunk · T), never S×T),
    of which only the selected scores are kept.
    """
    batch, n_heads, seq_len, _ = query.shape
    n_kv, num_keys = key.shape[1], key.shape[2]
    group = n_heads // n_kv
    valid = selected_valid(indices, num_keys)
    out = query.new_empty(batch, seq_len, n_heads, value.shape[-1])
    probs_mean = torch.zeros(indices.shape, dtype=torch.float32, device=query.device)
    key_t = key.float().repeat_interleave(group, dim=1).transpose(-1, -2)  # [B, H, D, T]
    value = value.float().repeat_interleave(group, dim=1)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * n_heads * num_keys))
    for start in range(0, seq_len, chunk):
        stop = min(seq_len, start + chunk)
        rows = indices[:, None, start:stop].long().clamp(min=0).expand(-1, n_heads, -1, -1)  # [B, H, c, k]
        scores = (query[:, :, start:stop].float() @ key_t).gather(-1, rows) * scaling
        probs = torch.softmax(scores.masked_fill(~valid[:, None, start:stop], float("-inf")), -1).nan_to_num(0.0)
        dense = torch.zeros(batch, n_heads, stop - start, num_keys, device=query.device).scatter_add_(-1, rows, probs)
        out[:, start:stop] = (dense @ value).transpose(1, 2).to(out.dtype)
        probs_mean[:, start:stop] = probs.mean(1)
    return out, probs_mean


def index_scores_at(
    q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, softmax_scale: float, indices: torch.Tensor
) -> torch.Tensor:
    """The indexer's scores at the selected keys, fp32 [B, S, k], differentiable in q, k and weights.

    q: [B, S, H, D], k: [B, T, D], weights: [B, S, H], indices: [B, S, k]. Score = Σ_h w_h · ReLU(scale · q_h·k).
    """
    batch, seq_len, n_heads, dim = q.shape
    topk = indices.shape[-1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, topk * (dim + n_heads)))
    b_idx = torch.arange(batch, device=q.device)[:, None, None]
    parts = []
    for start in range(0, seq_len, chunk):
        stop = min(seq_len, start + chunk)
        k_sel = k[b_idx, indices[:, start:stop].long().clamp(min=0)].float()  # [B, c, k, D]
        scores = F.relu(torch.einsum("bshd,bskd->bshk", q[:, start:stop].float(), k_sel) * softmax_scale)
        parts.append(torch.einsum("bsh,bshk->bsk", weights[:, start:stop], scores))
    return torch.cat(parts, dim=1)


def selected_kl(target: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(target ‖ softmax(scores)) over the valid slots. All [B, S, k]; target rows sum
    to 1 over their valid slots. A query with no valid slot contributes 0."""
    # A finite fill keeps the gradient finite on rows without valid slots (log_softmax of all -inf is NaN).
    log_q = torch.log_softmax(scores.masked_fill(~valid, -1e30), dim=-1).masked_fill(~valid, 0.0)
    target = target.masked_fill(~valid, 0.0)
    return (torch.xlogy(target, target) - target * log_q).sum(-1).mean()
