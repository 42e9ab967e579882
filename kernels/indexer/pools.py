"""Indexers that select pools of consecutive tokens (glm5_next's kpool pools, Qwen4-Exp's compressed blocks).

Such an indexer scores one key per pool of c tokens (pool p = tokens p·c … p·c + c − 1, visible once its last
token is), keeps the best pools and expands them back to tokens, then appends the query's own incomplete pool
(its "tail": the (t + 1) mod c newest tokens), which is always attended. The scoring is the lightning indexer's
with `ratio = c`; this module expands its pool picks. Prefill of an unpadded window only: pools start at
token 0, as both families' code builds them when nothing is padded.
"""

from __future__ import annotations

import torch

from . import lightning_indexer_topk


def expand_pools(pools: torch.Tensor, pool_size: int) -> torch.Tensor:
    """Token indices of picked pools plus each query's tail: int32 [B, S, P·c + c − 1], -1 = no token.

    pools: int [B, S, P] pool indices per query (-1 = none picked), query t at position t of the window.
    """
    batch, seq_len, _ = pools.shape
    offsets = torch.arange(pool_size, device=pools.device, dtype=torch.int32)
    tokens = pools[..., None].to(torch.int32) * pool_size + offsets  # [B, S, P, c]
    tokens = torch.where(pools[..., None] >= 0, tokens, -1).flatten(2)
    visible = torch.arange(1, seq_len + 1, device=pools.device, dtype=torch.int32)[:, None]  # tokens query t sees
    tail_start = visible - visible % pool_size
    tail = tail_start + offsets[: pool_size - 1]  # [S, c - 1]
    tail = torch.where(tail < visible, tail, -1).expand(batch, -1, -1)
    return torch.cat([tokens, tail], dim=-1)


def pooled_topk(
    q: torch.Tensor,
    pool_keys: torch.Tensor,
    weights: torch.Tensor,
    pools_kept: int,
    softmax_scale: float,
    pool_size: int,
) -> torch.Tensor:
    """The lightning indexer over pool keys, expanded to tokens: int32 [B, S, pools_kept · c + c − 1].

    q: [B, S, H, D], pool_keys: [B, P, D] (one per complete pool, P = S // c), weights: fp32 [B, S, H]; scores
    Σ_h weights · ReLU(softmax_scale · q · k) as `lightning_indexer_topk` (the Triton kernel on CUDA).
    """
    pools = lightning_indexer_topk(q, pool_keys, weights, pools_kept, softmax_scale, q_offset=0, ratio=pool_size)
    return expand_pools(pools, pool_size)
