"""Model types with a lightning indexer in transformers that indexcache refuses, each with its one-line reason.

Each reason names what stands in the way, so a user knows whether to wait for indexcache or for upstream.
"""

from .registry import DsaArchitecture, register

_REFUSALS = {
    ("dots3_note", "dots.3 note"): (
        "the vision-language checkpoint was not tried here (no tiny test model); text checkpoints "
        "(dots3_note_text) are supported"
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
        "upstream transformers passes top-k only to an S layer right after an F layer (linear-attention layers pass "
        "none), so an S layer after a linear-attention layer or a second S in a row raises"
    ),
}

for (model_type, family), reason in _REFUSALS.items():
    register(DsaArchitecture(model_type=model_type, family=family, refusal=reason))
