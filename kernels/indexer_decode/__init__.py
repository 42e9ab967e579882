"""Decode indexer top-k: `decode_indexer_topk` runs the split-K Triton kernel on CUDA, the reference elsewhere."""

from __future__ import annotations

import torch

from ..backend import on_device_of, use_triton
from .reference import decode_indexer_topk_reference

__all__ = ["decode_indexer_topk", "decode_indexer_topk_reference"]


def decode_indexer_topk(
    q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, topk: int, softmax_scale: float
) -> torch.Tensor:
    """int32 [B, topk]: the top-k cached keys for each sequence's new query (contract of the reference).

    q: [B, H, D] bf16, k: [B, T, D] (the new token's key last), weights: fp32 [B, H]."""
    if use_triton(q):
        from .kernel import decode_indexer_topk_triton

        with on_device_of(q):
            return decode_indexer_topk_triton(q, k, weights, topk, softmax_scale)
    return decode_indexer_topk_reference(q, k, weights, topk, softmax_scale)
