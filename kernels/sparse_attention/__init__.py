"""Index-gathered sparse attention: `sparse_attention` (transformers' expanded per-head keys) and
`sparse_mla_attention` (the absorbed MLA latent) run Triton on CUDA, the references elsewhere."""

from __future__ import annotations

import torch

from ..backend import on_device_of, use_triton
from .reference import sparse_attention_reference, sparse_mla_attention_reference

__all__ = [
    "sparse_attention",
    "sparse_attention_reference",
    "sparse_mla_attention",
    "sparse_mla_attention_reference",
]


def sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, indices: torch.Tensor, scaling: float
) -> torch.Tensor:
    """query: [B, H, S, Dqk], key: [B, Hk, T, Dqk], value: [B, Hk, T, Dv], indices: int32 [B, S, k] (-1 = none)
    -> [B, S, H, Dv]. One query (S = 1) against a cache is decode."""
    if use_triton(query):
        from .kernel import sparse_attention_triton

        with on_device_of(query):
            return sparse_attention_triton(query, key, value, indices, scaling)
    return sparse_attention_reference(query, key, value, indices, scaling)


def sparse_mla_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """q_latent: [B, S, H, Dc], q_rope: [B, S, H, Dr], kv_latent: [B, T, Dc], k_rope: [B, T, Dr]
    -> [B, S, H, Dc] (latent space: multiply by W_uv for the heads' values)."""
    if use_triton(q_latent):
        from .kernel import sparse_mla_attention_triton

        with on_device_of(q_latent):
            return sparse_mla_attention_triton(q_latent, q_rope, kv_latent, k_rope, indices, scaling)
    return sparse_mla_attention_reference(q_latent, q_rope, kv_latent, k_rope, indices, scaling)
