"""Per-architecture adapters, registered by `config.model_type`.

Adding a DSA family means adding one small file beside this one that calls `register(...)`; nothing in the
search or the patch names a model family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import IndexCacheError


@dataclass(frozen=True)
class DsaArchitecture:
    """Where a DSA model keeps its layers, attention and indexer, and how it reads sharing patterns.

    Attributes:
        model_type: `config.model_type` this adapter serves.
        family: human-readable family name for messages.
        indexer_rope: RoPE layout of the indexer's rotary dims, "interleave" or "half" (for the fused kernel).
        layers_path / attention_attr / indexer_attr: attribute path from the CausalLM to its decoder layers,
            the attention inside a layer, and the indexer inside the attention.
    """

    model_type: str
    family: str
    indexer_rope: str
    layers_path: tuple[str, ...] = ("model", "layers")
    attention_attr: str = "self_attn"
    indexer_attr: str = "indexer"

    def base_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (`model.model`): embeddings, rotary embedding, layers and final norm."""
        module = model
        for name in self.layers_path[:-1]:
            module = getattr(module, name)
        return module

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.base_model(model), self.layers_path[-1])

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention_attr)

    def indexer_weight_prefix(self, layer_idx: int) -> str:
        """State-dict prefix of one layer's indexer weights, e.g. `model.layers.3.self_attn.indexer.`."""
        return ".".join((*self.layers_path, str(layer_idx), self.attention_attr, self.indexer_attr)) + "."


_ARCHITECTURES: dict[str, DsaArchitecture] = {}


def register(arch: DsaArchitecture) -> DsaArchitecture:
    _ARCHITECTURES[arch.model_type] = arch
    return arch


def supported_families() -> str:
    return ", ".join(f"{a.family} ({a.model_type})" for a in _ARCHITECTURES.values())


def architecture_for(model_type: str | None) -> DsaArchitecture:
    """The adapter for a `model_type`, or a clear error naming the supported families."""
    if model_type not in _ARCHITECTURES:
        raise IndexCacheError(
            f"model type '{model_type}' has no DSA lightning indexer that indexcache knows; "
            f"supported families: {supported_families()}"
        )
    return _ARCHITECTURES[model_type]
