"""Decode against a latent cache: new tokens through the model's own decoder layers, one step at a time.

Every layer keeps a `LatentCache`: the 576-dim MLA latent row of each token (512 latent + 64 RoPE dims, the keys and
values of every head) and, on F layers only, the indexer's key of each token. Inside `decoding(...)` each layer's
absorbed attention (`absorbed.py`) appends the new tokens' latent rows and attends over all cached rows; an F
layer's indexer appends its keys and selects the top k over every cached key (the split-K decode kernel on CUDA,
the stock indexer elsewhere); an S layer reuses that selection and stores no indexer keys, which is the KV memory
a pattern frees. The first call on empty caches is a prefill that fills them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import IndexCacheError
from ..kernels.backend import forced
from ..models import DsaArchitecture
from .absorbed import absorbed_attention, supports
from .backends import CHOICES, indexer_inputs
from .forward import LayerInputs, LayerwiseModel
from .patch import IndexerFn, SharingState, index_sharing, reference_indexer


@dataclass
class LatentCache:
    """One layer's cache for B sequences of up to `capacity` tokens, of which the first `length` are filled.

    kv_latent: [B, capacity, Dc], k_rope: [B, capacity, Dr], index_keys: [B, capacity, D], or None on an S layer.
    """

    kv_latent: torch.Tensor
    k_rope: torch.Tensor
    index_keys: torch.Tensor | None
    length: int = 0

    @classmethod
    def allocate(
        cls, attn: nn.Module, batch: int, capacity: int, with_indexer: bool, dtype: torch.dtype, device, fill=None
    ) -> LatentCache:
        """Room for `capacity` tokens of `attn`'s layer; `fill` (e.g. `torch.Tensor.normal_`) initialises it."""
        make = torch.empty if fill is None else lambda *shape, **kw: fill(torch.empty(*shape, **kw))
        kw = dict(dtype=dtype, device=device)
        index_dim = attn.indexer.head_dim if with_indexer else None
        return cls(
            make(batch, capacity, attn.kv_lora_rank, **kw),
            make(batch, capacity, attn.qk_rope_head_dim, **kw),
            None if index_dim is None else make(batch, capacity, index_dim, **kw),
        )

    def append(self, kv_latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the new tokens' latent rows ([B, S, Dc], [B, S, Dr]); returns every cached row ([B, T, ...])."""
        stop = self.length + kv_latent.shape[1]
        if stop > self.kv_latent.shape[1]:
            raise IndexCacheError(f"the latent cache holds {self.kv_latent.shape[1]} tokens; {stop} were asked for")
        self.kv_latent[:, self.length : stop] = kv_latent
        self.k_rope[:, self.length : stop] = k_rope
        self.length = stop
        return self.kv_latent[:, :stop], self.k_rope[:, :stop]

    def update_indexer(self, keys: torch.Tensor, layer_idx: int | None = None) -> torch.Tensor:
        """The stock indexer's cache call: stores the new tokens' indexer keys [B, S, D] (after `append` stored
        their latent rows) and returns every cached key [B, T, D]."""
        if self.index_keys is None:
            raise IndexCacheError(f"layer {layer_idx} runs its indexer, but its cache keeps no indexer keys (S)")
        self.index_keys[:, self.length - keys.shape[1] : self.length] = keys
        return self.index_keys[:, : self.length]

    def bytes_per_token(self) -> int:
        """Bytes one cached token of one sequence takes in this layer."""
        tensors = [t for t in (self.kv_latent, self.k_rope, self.index_keys) if t is not None]
        return sum(t.shape[-1] * t.element_size() for t in tensors)


def cached_kernel_indexer(arch: DsaArchitecture) -> IndexerFn:
    """An F layer's top-k through the kernels over every key of its `LatentCache`: the split-K decode kernel for
    one new token per sequence, the prefill kernel (queries at the end of the keys) for several."""
    from ..kernels.indexer import lightning_indexer_topk
    from ..kernels.indexer_decode import decode_indexer_topk

    @torch.no_grad()
    def cached_indexer(indexer, *args, **kwargs):
        cache = inspect.signature(indexer.forward).bind(*args, **kwargs).arguments["cache"]
        q, k, weights, scale = indexer_inputs(arch, indexer, *args, **kwargs)
        keys = cache.update_indexer(k, indexer.layer_idx)
        if q.shape[1] == 1:
            return decode_indexer_topk(q[:, 0], keys, weights[:, 0], indexer.index_topk, scale)[:, None]
        return lightning_indexer_topk(q, keys, weights, indexer.index_topk, scale)

    return cached_indexer


@contextmanager
def decoding(
    model: nn.Module,
    arch: DsaArchitecture,
    caches: list[LatentCache],
    device: torch.device,
    choice: str = "auto",
    pattern: str | None = None,
) -> Iterator[tuple[SharingState, str]]:
    """The F/S patch and the absorbed attention over `caches` (one per layer) on `model`; yields (sharing state,
    backend name). `choice`: "auto" (the kernels on CUDA, the references elsewhere), "triton" or "reference"."""
    if choice not in CHOICES:
        raise IndexCacheError(f"--kernels {choice} is not one of {', '.join(CHOICES)}")
    if not supports(arch):
        raise IndexCacheError(f"decode runs absorbed MLA attention, which {arch.model_type} layers have not here")
    if choice == "triton" and device.type != "cuda":
        raise IndexCacheError("--kernels triton needs a CUDA GPU; use --kernels reference on CPU")
    triton = device.type == "cuda" and choice != "reference"
    indexer_fn = cached_kernel_indexer(arch) if triton else reference_indexer
    with (
        index_sharing(model, arch, pattern, indexer_fn) as state,
        absorbed_attention(model, arch, True, caches),
        forced("reference") if device.type == "cuda" and not triton else nullcontext(),
    ):
        yield state, "triton" if triton else "reference"


def step_inputs(lw: LayerwiseModel, input_ids: torch.Tensor, position: int) -> tuple[torch.Tensor, LayerInputs]:
    """Hidden states [B, 1, D] and layer inputs of one new token per sequence, at `position` (the tokens before it
    are cached): its rotary table, and a mask letting it see all position + 1 keys (the stock indexer's)."""
    hidden = lw.base.embed_tokens(input_ids.to(lw.input_device))
    position_ids = torch.full((1, 1), position, device=hidden.device)
    mask = hidden.new_zeros(hidden.shape[0], 1, 1, position + 1)
    return hidden, LayerInputs(lw.base.rotary_emb(hidden, position_ids=position_ids), position_ids, mask)
