"""Model adapters (one file per DSA family) and checkpoint loading."""

from . import axk2, deepseek_v32, dots3_note, glm_moe_dsa, hy_v4, minimax_m3_vl, mistral_large4, refused  # noqa: F401
from .loading import LoadedModel, embedded_model_path, load_model
from .registry import DsaArchitecture, architecture_for, supported_families

__all__ = [
    "DsaArchitecture",
    "LoadedModel",
    "architecture_for",
    "embedded_model_path",
    "load_model",
    "supported_families",
]
