"""DeepSeek-V3.2 (`deepseek_v32`): half-split indexer RoPE; stock transformers runs every indexer.

vLLM and SGLang read `index_topk_pattern` for this family; transformers' DeepseekV32 classes ignore it, so
our patch is the only way to evaluate a pattern for it under transformers.
"""

from .registry import DsaArchitecture, register

ARCHITECTURE = register(DsaArchitecture(model_type="deepseek_v32", family="DeepSeek-V3.2", indexer_rope="half"))
