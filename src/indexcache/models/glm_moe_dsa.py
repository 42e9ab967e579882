"""GLM-5 family (`glm_moe_dsa`): interleaved indexer RoPE; transformers honours `index_topk_pattern`."""

from .registry import DsaArchitecture, register

_ENGINE_KEYS = ("index_topk_pattern", "indexer_types", "use_index_cache")

ARCHITECTURE = register(
    DsaArchitecture(
        model_type="glm_moe_dsa",
        family="GLM-5",
        indexer_rope="interleave",
        pattern_keys=_ENGINE_KEYS,
        honours_pattern=True,
    )
)
