"""GLM-5 family (`glm_moe_dsa`): interleaved indexer RoPE; transformers honours `index_topk_pattern`."""

from .registry import DsaArchitecture, register

ARCHITECTURE = register(
    DsaArchitecture(model_type="glm_moe_dsa", family="GLM-5", indexer_rope="interleave", honours_pattern=True)
)
