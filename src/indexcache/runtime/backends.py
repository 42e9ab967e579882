"""How F layers select and how attention consumes the indices: stock transformers, or the Triton kernels."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .. import defaults
from ..errors import IndexCacheError
from ..models import DsaArchitecture
from .absorbed import absorbed_attention
from .chunked import mlp_in_chunks
from .patch import IndexerFn, SharingState, index_sharing, reference_indexer, reference_selection
from .pooled import kpool_kernel, kpool_projections, qsa_kernel, qsa_projections

CHOICES = ("auto", "triton", "reference")


def select_backend(
    arch: DsaArchitecture, device: torch.device, choice: str = "auto", seq_len: int | None = None, ratio: int = 1
) -> tuple[str, IndexerFn, str | None]:
    """Returns (name, indexer_fn, attn_implementation) for `index_sharing`; `ratio`: tokens per selectable entry
    (`DsaArchitecture.tokens_per_entry`).

    `auto` takes the Triton kernels on CUDA for windows of at least `defaults.TRITON_MIN_SEQ_LEN` tokens (or
    when `seq_len` is unknown), stock transformers with sdpa ("sdpa") for shorter windows on CUDA, where it was
    measured faster, and the stock path with the model's own attention (the reference) elsewhere — and for
    families whose indexer the kernel does not compute (`arch.indexer_kernel` False). Families whose attention we
    leave alone (`arch.sparse_attention_kernel` False, e.g. hy_v4's sinks, which its sdpa path lacks) keep it for
    short windows too, and take `arch.kernel_attention` under the kernels. Pooled indexers (`arch.selection`) have
    their own reference and kernel functions (`pooled.py`).
    """
    if choice not in CHOICES:
        raise IndexCacheError(f"--kernels {choice} is not one of {', '.join(CHOICES)}")
    reference = reference_selection(arch)
    if choice == "reference" or (choice == "auto" and (device.type != "cuda" or not arch.indexer_kernel)):
        return "reference", reference, None
    if not arch.indexer_kernel:
        raise IndexCacheError(f"--kernels triton: {arch.family}'s indexer has no kernel here; use --kernels reference")
    if choice == "auto" and seq_len is not None and seq_len < defaults.TRITON_MIN_SEQ_LEN:
        if not arch.sparse_attention_kernel:
            return "reference", reference, None
        return "sdpa", reference_indexer, "sdpa"
    if device.type != "cuda":
        raise IndexCacheError("--kernels triton needs a CUDA GPU; use --kernels reference on CPU")
    from ..kernels import wiring

    attn = wiring.register_sparse_attention() if arch.sparse_attention_kernel else arch.kernel_attention
    kernels = {"tokens": kernel_indexer(arch, ratio), "kpool": kpool_kernel, "qsa_blocks": qsa_kernel}
    return "triton", kernels[arch.selection], attn


def indexer_inputs(arch: DsaArchitecture, indexer: nn.Module, *args, **kwargs) -> tuple:
    """(q, k, weights, score scale) of one indexer call, as `wiring.indexer_projections` returns them, from the
    arguments the family's attention passed its indexer (bound to the indexer's own argument names)."""
    from ..kernels import wiring

    if arch.indexer_scorer is not None:
        return wiring.scorer_projections(indexer, arch.indexer_scorer, *args, **kwargs)
    call = inspect.signature(indexer.forward).bind(*args, **kwargs).arguments
    return wiring.indexer_projections(
        indexer,
        arch.indexer_rope,
        call["hidden_states"],
        None if arch.indexer_query == "hidden" else call["q_resid"],
        call["position_embeddings"],
        rope_at_end=arch.indexer_rope_at_end,
        scale_in_weights=arch.indexer_scale_in_weights,
        position_ids=call.get("position_ids"),
    )


def scoring_inputs(arch: DsaArchitecture, indexer: nn.Module, *args, **kwargs) -> tuple:
    """(q, keys, weights, score scale, tokens per key) of one indexer call: `indexer_inputs` with one token per key
    (or per compressed entry, whose ratio the caller knows), or a pooled indexer's pool keys (`pooled.py`)."""
    if arch.selection == "kpool":
        return kpool_projections(indexer, *args, **kwargs)
    if arch.selection == "qsa_blocks":
        return qsa_projections(indexer, *args, **kwargs)
    return (*indexer_inputs(arch, indexer, *args, **kwargs), 1)


def kernel_indexer(arch: DsaArchitecture, ratio: int = 1) -> IndexerFn:
    """An F layer's top-k through the indexer kernel, for `index_sharing` (`ratio` tokens per selectable entry)."""
    from ..kernels.indexer import lightning_indexer_topk

    @torch.no_grad()
    def triton_indexer(indexer, *args, **kwargs):
        q, k, weights, scale = indexer_inputs(arch, indexer, *args, **kwargs)
        indices = lightning_indexer_topk(q, k, weights, indexer.index_topk, scale, ratio=ratio)
        if ratio > 1:
            # Compressed entries (deepseek_v4): the stock layout, int64 [B, S, min(top-k, T)] with -1 for entries a
            # query cannot see yet, which the family's own compressor reads. Each row's picks come first.
            return indices[..., : k.shape[1]].long()
        if arch.sparse_attention_kernel:
            return indices
        # The family's own attention scatters the indices into a mask, which cannot take the kernel's -1. Only a
        # query that sees fewer than top-k keys gets -1s, and it selects all of them, its own position included:
        # that position stands in for the -1s without changing the selection (windows are whole prefills).
        own = torch.arange(indices.shape[1], device=indices.device, dtype=indices.dtype)[None, :, None]
        return torch.where(indices < 0, own, indices)

    return triton_indexer


@contextmanager
def kernels_installed(
    model: nn.Module,
    arch: DsaArchitecture,
    device: torch.device,
    choice: str = "auto",
    seq_len: int | None = None,
    pattern: str | None = None,
    wrap_indexer: Callable[[IndexerFn], IndexerFn] | None = None,
) -> Iterator[tuple[SharingState, str]]:
    """The F/S patch with the chosen kernels on `model`; on "triton" every attention layer of a family that
    `absorbed` knows runs the absorbed latent kernel, and every layer's MLP takes a long window in token chunks
    (`chunked.py`: what lets a 200K-token MoE prefill fit). Yields (sharing state, backend name); restores all on
    exit.

    `wrap_indexer` (e.g. `analyze`'s recorder) receives the chosen indexer function and returns the one F layers call.
    """
    ratio = arch.tokens_per_entry(arch.base_model(model).config)
    name, indexer_fn, attn = select_backend(arch, device, choice, seq_len, ratio)
    if wrap_indexer is not None:
        indexer_fn = wrap_indexer(indexer_fn)
    with (
        index_sharing(model, arch, pattern, indexer_fn, attn) as state,
        absorbed_attention(model, arch, enabled=name == "triton"),
        mlp_in_chunks(arch.layers(model)),
    ):
        yield state, name
