"""The decode indexer in plain PyTorch: the definition the split-K Triton kernel is checked against.

One decode step scores one new query per sequence against the T cached indexer keys (its own key included, so
the query sees every key) and keeps the top k: exactly what the prefill indexer selects for the last position of
a T-token window, so the definition is `lightning_indexer_topk_reference` at S = 1.
"""

from __future__ import annotations

import torch

from ..indexer.reference import lightning_indexer_topk_reference


def decode_indexer_topk_reference(
    q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, topk: int, softmax_scale: float
) -> torch.Tensor:
    """int32 [B, topk] key indices (unordered; -1 past T when T < topk).

    q: [B, H, D] (the new token's indexer queries), k: [B, T, D] (the indexer key cache, the new key last),
    weights: fp32 [B, H] (weights_proj(h) · H^-0.5)."""
    return lightning_indexer_topk_reference(q[:, None], k, weights[:, None], topk, softmax_scale)[:, 0]
