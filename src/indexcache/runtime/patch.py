"""The F/S patch: make every DSA attention layer of a loaded model honour one mutable sharing pattern.

Inside `index_sharing(model, arch)`, each layer's indexer is replaced by an `_IndexerSwitch`. F layers run
their own indexer and leave its top-k indices in one shared buffer; S layers skip their indexer entirely and
return that buffer. Layers run in order, so the buffer always holds the indices of the nearest preceding F
layer: the meaning transformers' `glm_moe_dsa` gives to `index_topk_pattern`. The pattern can be changed
between forwards without reloading anything; leaving the context puts every original indexer back.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import IndexCacheError
from ..models import DsaArchitecture
from ..patterns.layout import FULL, first_indexer_layer, validate
from .pooled import qsa_reference, selection_mask

# (indexer module, *the arguments the attention passed to it) -> int32 [B, S, k] selections. Families call their indexer
# with different arguments (glm_moe_dsa: hidden_states, q_resid, ...; mistral_large4: hidden_states,
# position_embeddings, ...); the switch passes them through untouched.
IndexerFn = Callable[..., torch.Tensor]


class SharingState:
    """The pattern in force and the index buffer shared by all layers of one model.

    Attributes:
        pattern: F/S string, one letter per layer; assign to change it between forwards.
        buffer: int [B, S, k] top-k indices of the last F layer that ran, or None before the first one; one per
            thread, so threads can run forwards of separate windows at once (the search does on the CPU).
        indexer_calls: how often each layer's indexer really ran (tests use it to prove S layers skip).
    """

    def __init__(self, pattern: str, indexer_layers: list[int]):
        self.indexer_layers = set(indexer_layers)
        self._per_thread = threading.local()
        self._calls_lock = threading.Lock()
        self.indexer_calls: Counter[int] = Counter()
        self.pattern = pattern

    @property
    def buffer(self) -> torch.Tensor | None:
        return getattr(self._per_thread, "buffer", None)

    @buffer.setter
    def buffer(self, selection: torch.Tensor | None) -> None:
        self._per_thread.buffer = selection

    def count_indexer_call(self, layer: int) -> None:
        with self._calls_lock:
            self.indexer_calls[layer] += 1

    @property
    def pattern(self) -> str:
        return self._pattern

    @pattern.setter
    def pattern(self, pattern: str) -> None:
        """Only layers whose indexer has weights can be F (the caller checked the pattern's form)."""
        missing = [i for i, c in enumerate(pattern) if c == FULL and i not in self.indexer_layers]
        if missing:
            raise IndexCacheError(f"layers {missing} have no indexer weights in this checkpoint, so they cannot be F")
        self._pattern = pattern


class _IndexerSwitch(nn.Module):
    """Stands in for one layer's indexer: runs it on F layers, returns the shared buffer on S layers."""

    def __init__(
        self,
        layer_idx: int,
        indexer: nn.Module | None,
        state: SharingState,
        compute: IndexerFn,
        output: Callable[[torch.Tensor], torch.Tensor],
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.inner = indexer
        self.state = state
        self.compute = compute
        self.output = output  # what the attention expects from its indexer, made from the shared selection

    def __getattr__(self, name: str):
        """The attention may call the indexer's helpers besides its forward (minimax_m3_vl: `build_block_mask`)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or self._modules.get("inner") is None:
                raise
            return getattr(self._modules["inner"], name)

    def forward(self, hidden_states, *args, **kwargs):
        """Every family passes hidden_states [B, S, D] first; the rest is the family's own indexer call."""
        state = self.state
        if state.pattern[self.layer_idx] == FULL:
            state.count_indexer_call(self.layer_idx)
            state.buffer = self.compute(self.inner, hidden_states, *args, **kwargs)
            return self.output(state.buffer)
        if state.buffer is None:
            raise IndexCacheError(f"layer {self.layer_idx} is S but no earlier F layer ran in this forward")
        # Under accelerate's device_map the previous F layer may sit on another GPU.
        return self.output(state.buffer.to(hidden_states.device, non_blocking=True))


def _unchanged(selection: torch.Tensor) -> torch.Tensor:
    return selection


def reference_indexer(indexer, *args, **kwargs):
    """The stock transformers indexer: the definition of what an F layer selects."""
    return indexer(*args, **kwargs)


def reference_selection(arch: DsaArchitecture) -> IndexerFn:
    """How an F layer selects on the reference path: the stock indexer, or where that returns a mask instead of
    selections (qwen4_exp), the vectorised reference of exactly its selection."""
    return qsa_reference if arch.selection == "qsa_blocks" else reference_indexer


def indexer_layers(model: nn.Module, arch: DsaArchitecture) -> list[int]:
    """Layers whose attention carries an indexer module (and so can be F)."""
    return [i for i, layer in enumerate(arch.layers(model)) if arch.indexer(layer) is not None]


@contextmanager
def index_sharing(
    model: nn.Module,
    arch: DsaArchitecture,
    pattern: str | None = None,
    indexer_fn: IndexerFn | None = None,
    attn_implementation: str | None = None,
) -> Iterator[SharingState]:
    """Patch `model` in place so every DSA layer follows `state.pattern`; restore it on exit.

    Args:
        model: a loaded DSA CausalLM (`arch.model_type`).
        pattern: initial F/S string; defaults to F on every layer that has an indexer.
        indexer_fn: how an F layer computes its top-k (a fused kernel; default `reference_selection(arch)`).
        attn_implementation: an attention registered in transformers' `AttentionInterface` to use inside the
            context (the sparse kernel consumes the indices directly), or None to keep the model's own.
    Yields:
        the `SharingState`; assign `state.pattern` to flip layers between forwards.
    """
    layers = arch.layers(model)
    available = indexer_layers(model, arch)
    dsa_layers = arch.dsa_layer_ids(arch.base_model(model).config)
    first = first_indexer_layer(dsa_layers)
    if first not in available:
        raise IndexCacheError(
            f"layer {first} (the first layer with an indexer) has no indexer weights, so the layers after it "
            "cannot share its top-k indices"
        )
    if pattern is None:
        pattern = "".join(FULL if i in available else "S" for i in range(len(layers)))
    state = SharingState(validate(pattern, len(layers), dsa_layers), available)
    # The buffer always holds selections; qwen4_exp's attention takes its indexer's [B, 1, S, T] mask of them.
    output = selection_mask if arch.selection == "qsa_blocks" else _unchanged

    originals = []
    for i, layer in enumerate(layers):
        if not arch.is_dsa_layer(model, i):
            continue  # dense attention: no indexer to run or to stand in for
        owner = arch.indexer_owner(layer)  # the attention, or the module inside it that holds the indexer
        was_module = arch.indexer_attr in owner._modules
        inner = getattr(owner, arch.indexer_attr, None)
        originals.append((owner, inner, was_module))
        if not was_module:
            # glm_moe_dsa stores `indexer = None` on layers built as shared; make room for a submodule.
            del owner.__dict__[arch.indexer_attr]
        setattr(
            owner, arch.indexer_attr, _IndexerSwitch(i, inner, state, indexer_fn or reference_selection(arch), output)
        )
    previous_attn = model.config._attn_implementation
    try:
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        yield state
    finally:
        if attn_implementation is not None:
            model.set_attn_implementation(previous_attn)
        for owner, inner, was_module in originals:
            if was_module:
                setattr(owner, arch.indexer_attr, inner)
            else:
                del owner._modules[arch.indexer_attr]
                owner.__dict__[arch.indexer_attr] = inner
        state.buffer = None
