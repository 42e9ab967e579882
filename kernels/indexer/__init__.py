"""Lightning indexer top-k: `lightning_indexer_topk` runs the Triton kernel on CUDA, the reference elsewhere."""

from __future__ import annotations

import torch

from ..backend import on_device_of, use_triton
from .reference import index_scores_reference, lightning_indexer_topk_reference

__all__ = ["index_scores_reference", "lightning_indexer_topk", "lightning_indexer_topk_reference"]


def lightning_indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    softmax_scale: float,
    key_mask: torch.Tensor | None = None,
    q_offset: int | None = None,
    ratio: int = 1,
) -> torch.Tensor:
    """int32 [B, S, topk] indices of the top-k keys per query, -1 past the visible keys.

    q: [B, S, H, D] (bf16), k: [B, T, D], weights: fp32 [B, S, H] (weights_proj(h) · H^-0.5), key_mask: bool [B, T]
    (False = padding) or None, q_offset: index of query 0 among the keys (default T - S: prefill 0, decode T - 1).
    ratio: tokens per key where the keys are compressed entries (DeepSeek-V4: 4; see `reference.py`).
    """
    if use_triton(q):
        from .kernel import lightning_indexer_topk_triton

        with on_device_of(q):
            return lightning_indexer_topk_triton(q, k, weights, topk, softmax_scale, key_mask, q_offset, ratio=ratio)
    return lightning_indexer_topk_reference(q, k, weights, topk, softmax_scale, key_mask, q_offset, ratio)
