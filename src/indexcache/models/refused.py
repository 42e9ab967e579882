"""Model types with a lightning indexer in transformers that indexcache refuses, each with its one-line reason.

Each reason names what stands in the way, so a user knows whether to wait for indexcache or for upstream.
"""

from .registry import DsaArchitecture, register

_REFUSALS = {
    ("dots3_note", "dots.3 note"): (
        "the vision-language checkpoint was not tried here (no tiny test model); text checkpoints "
        "(dots3_note_text) are supported"
    ),
    ("step3p7", "Step-3.7"): (
        "transformers' step3p7 code builds no indexer module (the config's sparse-attention keys are not "
        "implemented there), so there is nothing to share"
    ),
}

for (model_type, family), reason in _REFUSALS.items():
    register(DsaArchitecture(model_type=model_type, family=family, refusal=reason))
