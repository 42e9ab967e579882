"""Model types with a lightning indexer in transformers that indexcache refuses, each with its one-line reason.

Each reason names what stands in the way, so a user knows whether to wait for indexcache or for upstream.
"""

from .registry import DsaArchitecture, register

_REFUSALS = {
    ("glm5_next", "GLM-5.3-Flash"): (
        "upstream transformers' Glm5Next layers pass top-k indices on only to a directly following S layer "
        "(`next_skip_topk`) and linear-attention layers pass none, so an S layer after a linear-attention layer "
        "or a second S layer in a row raises 'Shared DSA layers require top-k indices'; sharing is unusable there today"
    ),
}

for (model_type, family), reason in _REFUSALS.items():
    register(DsaArchitecture(model_type=model_type, family=family, refusal=reason))
