"""AXK2 (`axk2`): DeepSeek-V3.2-style DSA, half-split indexer RoPE, an indexer in every layer.

Stock transformers calls every layer's indexer and reads no pattern key: serving engines and our patch apply it.
"""

from .registry import DsaArchitecture, register

ARCHITECTURE = register(DsaArchitecture(model_type="axk2", family="AXK2", indexer_rope="half"))
