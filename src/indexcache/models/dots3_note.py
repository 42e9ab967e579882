"""dots.3 note (`dots3_note_text`): MLA with a GLM-5-style indexer (interleaved RoPE) on its `indexed_attention`
layers only; sliding-window layers have dense attention and stay out of the pattern.

Layers take their mask and rotary table by layer type (the indexed layers' table from fp32 embeddings). Stock
transformers runs every indexer and reads no pattern key. On CUDA the indexer runs as a kernel; the attention stays
the model's own, since the registered sparse attention would also replace the sliding-window layers' attention.
"""

from .registry import DsaArchitecture, register

ARCHITECTURE = register(
    DsaArchitecture(
        model_type="dots3_note_text",
        family="dots.3 note (text)",
        indexer_rope="interleave",
        dsa_layers=("layer_types", "indexed_attention"),
        inputs_by_layer_type=True,
        fp32_rotary_layer_types=("indexed_attention",),
        sparse_attention_kernel=False,
    )
)
