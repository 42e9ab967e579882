"""Model types with a lightning indexer in transformers that indexcache refuses, each with its one-line reason.

Each reason names what stands in the way, so a user knows whether to wait for indexcache or for upstream.
"""

from .registry import DsaArchitecture, register

_REFUSALS = {
    ("deepseek_v4", "DeepSeek-V4"): (
        "its indexer sits inside the compressor of compressed-sparse-attention layers only (layer 0 is heavily-"
        "compressed, without one) and picks compressed KV blocks; indexcache patterns need an indexer on layer 0 "
        "and one mask and rotary table for all layers"
    ),
    ("dots3_note", "dots.3 note"): (
        "only its indexed_attention layers have an indexer; its sliding-window layers (no indexer, their own mask "
        "and rotary table) would be taken for S layers by the patch, and the layer loop builds one mask for all layers"
    ),
    ("qwen4_exp", "Qwen4-Exp"): (
        "its QSA indexer exists only on indexed_attention layers (layer 0 is linear attention) and returns a "
        "token mask, not top-k indices; indexcache patterns need an indexer on layer 0"
    ),
    ("step3p7", "Step-3.7"): (
        "transformers' step3p7 code builds no indexer module (the config's sparse-attention keys are not "
        "implemented there), so there is nothing to share"
    ),
    ("glm5_next", "GLM-5.3-Flash"): (
        "upstream transformers' Glm5Next layers pass top-k indices on only to a directly following S layer "
        "(`next_skip_topk`) and linear-attention layers pass none, so an S layer after a linear-attention layer "
        "or a second S layer in a row raises 'Shared DSA layers require top-k indices'; sharing is unusable there today"
    ),
}

for (model_type, family), reason in _REFUSALS.items():
    register(DsaArchitecture(model_type=model_type, family=family, refusal=reason))
