"""DeepSeek-V3.2 (`deepseek_v32`): half-split indexer RoPE; stock transformers runs every indexer.

vLLM reads `index_topk_pattern` once `use_index_cache` is true (docs.vllm.ai, features/index_cache), SGLang reads
`index_topk_pattern` (sgl-project/sglang#21405, #23186); transformers' DeepseekV32 classes ignore it, so our patch
is the only way to evaluate a pattern for it under transformers.
"""

from .glm_moe_dsa import _ENGINE_KEYS
from .registry import DsaArchitecture, register

ARCHITECTURE = register(
    DsaArchitecture(model_type="deepseek_v32", family="DeepSeek-V3.2", indexer_rope="half", pattern_keys=_ENGINE_KEYS)
)
