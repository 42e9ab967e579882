"""Model adapters (one file per DSA family) and checkpoint loading."""

from . import (  # noqa: F401
    axk2,
    deepseek_v4,
    deepseek_v32,
    dots3_note,
    glm5_next,
    glm_moe_dsa,
    hy_v4,
    minimax_m3_vl,
    mistral_large4,
    qwen4_exp,
    refused,
)
from .loading import (
    Checkpoint,
    LoadedModel,
    embedded_model_path,
    load_model,
    load_tokenizer,
    load_weights,
    open_checkpoint,
    weight_names,
)
from .registry import DsaArchitecture, architecture_for, supported_families

__all__ = [
    "Checkpoint",
    "load_tokenizer",
    "load_weights",
    "open_checkpoint",
    "weight_names",
    "DsaArchitecture",
    "LoadedModel",
    "architecture_for",
    "embedded_model_path",
    "load_model",
    "supported_families",
]
