"""How F layers select and how attention consumes the indices: stock transformers, or the Triton kernels."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import defaults
from .absorbed import absorbed_attention
from .errors import IndexCacheError
from .models import DsaArchitecture
from .patch import IndexerFn, SharingState, index_sharing, reference_indexer

CHOICES = ("auto", "triton", "reference")


def select_backend(
    arch: DsaArchitecture, device: torch.device, choice: str = "auto", seq_len: int | None = None
) -> tuple[str, IndexerFn, str | None]:
    """Returns (name, indexer_fn, attn_implementation) for `index_sharing`.

    `auto` takes the Triton kernels on CUDA for windows of at least `defaults.TRITON_MIN_SEQ_LEN` tokens (or
    when `seq_len` is unknown), stock transformers with sdpa ("sdpa") for shorter windows on CUDA, where it was
    measured faster, and the stock path with the model's own attention (the reference) elsewhere.
    """
    if choice not in CHOICES:
        raise IndexCacheError(f"--kernels {choice} is not one of {', '.join(CHOICES)}")
    if choice == "reference" or (choice == "auto" and device.type != "cuda"):
        return "reference", reference_indexer, None
    if choice == "auto" and seq_len is not None and seq_len < defaults.TRITON_MIN_SEQ_LEN:
        return "sdpa", reference_indexer, "sdpa"
    if device.type != "cuda":
        raise IndexCacheError("--kernels triton needs a CUDA GPU; use --kernels reference on CPU")
    from .kernels import wiring

    return "triton", kernel_indexer(arch), wiring.register_sparse_attention()


def kernel_indexer(arch: DsaArchitecture) -> IndexerFn:
    """An F layer's top-k through the indexer kernel (`wiring.indexer_topk`), for `index_sharing`."""
    from .kernels import wiring

    def triton_indexer(indexer, hidden_states, q_resid, position_embeddings, attention_mask, cache):
        return wiring.indexer_topk(
            indexer, arch.indexer_rope, hidden_states, q_resid, position_embeddings, indexer.index_topk
        )

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
    `absorbed` knows runs the absorbed latent kernel. Yields (sharing state, backend name); restores all on exit.

    `wrap_indexer` (e.g. `analyze`'s recorder) receives the chosen indexer function and returns the one F layers call.
    """
    name, indexer_fn, attn = select_backend(arch, device, choice, seq_len)
    if wrap_indexer is not None:
        indexer_fn = wrap_indexer(indexer_fn)
    with (
        index_sharing(model, arch, pattern, indexer_fn, attn) as state,
        absorbed_attention(model, arch, enabled=name == "triton"),
    ):
        yield state, name
