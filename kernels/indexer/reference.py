"""Lightning indexer top-k in plain PyTorch: the definition the Triton kernel is checked against.

    I[b, t, s] = Σ_h w[b, t, h] · ReLU(softmax_scale · q[b, t, h] · k[b, s])      (fp32, from bf16 q and k)

restricted to the keys a query may see: s ≤ t + q_offset (causality; q_offset = T - S puts the S queries at the
end of the T keys, so prefill has q_offset = 0 and one decode step against a cache of T keys has T - 1) and
key_mask[b, s] (padding). The top `topk` keys per query are returned; a query that sees fewer than `topk` keys gets
all of them, then the sentinel -1.

With `ratio` r > 1 the keys are compressed entries, each pooling r tokens (DeepSeek-V4's CSA: entry s covers
tokens r·s .. r·s + r - 1) and q_offset is the token position of query 0 (0 for a prefill): the query at position
p = t + q_offset sees the entries s < (p + 1) // r, those whose tokens all lie at or before p.

The arithmetic follows transformers' `GlmMoeDsaIndexer.forward` op for op (upcast, matmul, scale, ReLU, weighted
head sum as a matmul), so on the same inputs the reference selects exactly what the stock indexer selects.
"""

from __future__ import annotations

import torch

# Queries scored at once: chunk · H · T fp32 values are alive at a time, never S · H · T.
_CHUNK_ELEMENTS = 1 << 26


def default_q_offset(seq_len: int, num_keys: int, ratio: int) -> int:
    """Token keys: the queries are the last S of the T keys (T - S); entries: a prefill from position 0."""
    return num_keys - seq_len if ratio == 1 else 0


def visible_keys(
    batch: int,
    seq_len: int,
    num_keys: int,
    q_offset: int,
    key_mask: torch.Tensor | None,
    device: torch.device,
    ratio: int = 1,
) -> torch.Tensor:
    """bool [B, S, T]: which keys each query may select (causal, and not padding). Small sizes only (tests)."""
    reach = (torch.arange(seq_len, device=device)[:, None] + q_offset + 1) // ratio  # keys (entries) in sight
    visible = (torch.arange(num_keys, device=device)[None, :] < reach).expand(batch, seq_len, num_keys)
    if key_mask is not None:
        visible = visible & key_mask[:, None, :].bool()
    return visible


def index_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    softmax_scale: float,
    key_mask: torch.Tensor | None = None,
    q_offset: int | None = None,
    ratio: int = 1,
) -> torch.Tensor:
    """fp32 [B, S, T] index scores, -inf where a key is not visible.

    q: [B, S, H, D], k: [B, T, D] (T tokens, or entries of `ratio` tokens), weights: [B, S, H]."""
    batch, seq_len, _, _ = q.shape
    num_keys = k.shape[1]
    q_offset = default_q_offset(seq_len, num_keys, ratio) if q_offset is None else q_offset
    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * softmax_scale  # [B, S, H, T]
    scores = torch.relu(scores)
    index_scores = torch.matmul(weights.float().unsqueeze(-2), scores).squeeze(-2)  # [B, S, T]
    visible = visible_keys(batch, seq_len, num_keys, q_offset, key_mask, q.device, ratio)
    return index_scores.masked_fill(~visible, float("-inf"))


def lightning_indexer_topk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    softmax_scale: float,
    key_mask: torch.Tensor | None = None,
    q_offset: int | None = None,
    ratio: int = 1,
) -> torch.Tensor:
    """int32 [B, S, topk] key indices (unordered within a row; -1 = no key), scored in query chunks.

    q: [B, S, H, D], k: [B, T, D], weights: [B, S, H] fp32 (the stock code's weights_proj(h) · H^-0.5),
    key_mask: bool [B, T] or None, q_offset: position of query 0 among the keys (default T - S; for entries,
    `ratio` > 1, its token position, default 0).
    """
    batch, seq_len, n_heads, _ = q.shape
    num_keys = k.shape[1]
    q_offset = default_q_offset(seq_len, num_keys, ratio) if q_offset is None else q_offset
    out = torch.full((batch, seq_len, topk), -1, dtype=torch.int32, device=q.device)
    take = min(topk, num_keys)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_heads * num_keys))
    for start in range(0, seq_len, chunk):
        stop = min(seq_len, start + chunk)
        scores = index_scores_reference(
            q[:, start:stop], k, weights[:, start:stop], softmax_scale, key_mask, q_offset + start, ratio
        )
        values, indices = scores.topk(take, dim=-1)
        out[:, start:stop, :take] = torch.where(values > float("-inf"), indices, -1).to(torch.int32)
    return out
