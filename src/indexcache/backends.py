"""How F layers select and how attention consumes the indices: stock transformers, or the Triton kernels."""

from __future__ import annotations

import inspect

import torch

from .errors import IndexCacheError
from .models import DsaArchitecture
from .patch import IndexerFn, reference_indexer

CHOICES = ("auto", "triton", "reference")


def select_backend(
    arch: DsaArchitecture, device: torch.device, choice: str = "auto"
) -> tuple[str, IndexerFn, str | None]:
    """Returns (name, indexer_fn, attn_implementation) for `index_sharing`.

    `auto` takes the Triton kernels on CUDA and the stock transformers path (the reference) elsewhere, and for
    families whose indexer the kernel does not compute (`arch.indexer_kernel` False).
    """
    if choice not in CHOICES:
        raise IndexCacheError(f"--kernels {choice} is not one of {', '.join(CHOICES)}")
    if choice == "reference" or (choice == "auto" and (device.type != "cuda" or not arch.indexer_kernel)):
        return "reference", reference_indexer, None
    if not arch.indexer_kernel:
        raise IndexCacheError(f"--kernels triton: {arch.family}'s indexer has no kernel here; use --kernels reference")
    if device.type != "cuda":
        raise IndexCacheError("--kernels triton needs a CUDA GPU; use --kernels reference on CPU")
    from .kernels import wiring

    def triton_indexer(indexer, *args, **kwargs):
        call = inspect.signature(indexer.forward).bind(*args, **kwargs).arguments  # the family's own argument names
        indices = wiring.indexer_topk(
            indexer,
            arch.indexer_rope,
            call["hidden_states"],
            None if arch.indexer_query == "hidden" else call["q_resid"],
            call["position_embeddings"],
            indexer.index_topk,
            rope_at_end=arch.indexer_rope_at_end,
            scale_in_weights=arch.indexer_scale_in_weights,
            position_ids=call.get("position_ids"),
        )
        if arch.sparse_attention_kernel:
            return indices
        # The family's own attention scatters the indices into a mask, which cannot take the kernel's -1. Only a
        # query that sees fewer than top-k keys gets -1s, and it selects all of them, its own position included:
        # that position stands in for the -1s without changing the selection (windows are whole prefills).
        own = torch.arange(indices.shape[1], device=indices.device, dtype=indices.dtype)[None, :, None]
        return torch.where(indices < 0, own, indices)

    return "triton", triton_indexer, wiring.register_sparse_attention() if arch.sparse_attention_kernel else None
