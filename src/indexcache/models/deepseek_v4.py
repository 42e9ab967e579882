"""DeepSeek-V4 (`deepseek_v4`: V4-Flash, V4-Pro): the lightning indexer lives in the compressor of the compressed
sparse attention (CSA) layers only, and selects compressed KV entries (each pools 4 tokens), not tokens.

Sliding-window and heavily-compressed (HCA) layers have no indexer: always S, outside the pattern, whose first F
layer is the first CSA layer. An S CSA layer reuses the nearest preceding F CSA layer's entry selection (every CSA
layer has the same compress ratio, so the same entry ids). Layers carry 4 hyper-connection streams (`hc_head`
collapses them), take both rotary tables ("main", "compress") and the sliding-window mask, and the hash-routed MoE
layers route by input_ids. The selection is int64 [B, S, min(index_topk, S // 4)], -1 for entries a query cannot
see yet. Stock transformers runs every indexer and reads no pattern key; vLLM and SGLang read a pattern of one
letter per CSA layer (`apply` writes that). The attention (learned sinks, compressed entries appended to the
sliding-window keys) stays the model's own; on CUDA the indexer runs as the Triton kernel over the entries.
"""

from .registry import DsaArchitecture, register

ARCHITECTURE = register(
    DsaArchitecture(
        model_type="deepseek_v4",
        family="DeepSeek-V4",
        indexer_parent="compressor",
        dsa_layers=("layer_types", "compressed_sparse_attention"),
        hidden_streams="hc_mult",
        streams_head="hc_head",
        rotary_labels=("main", "compress"),
        layer_mask="sliding",
        token_id_inputs=("input_ids",),
        indexer_scorer="scorer",
        sparse_attention_kernel=False,
        # Released checkpoints name the indexer `layers.{i}.attn.indexer.*` (transformers renames it on load).
        checkpoint_indexer_keys=("layers.{layer}.attn.indexer.", "model.layers.{layer}.attn.indexer."),
        entry_tokens=("compress_rates", "compressed_sparse_attention"),
        index_bytes=8,
        pattern_keys=("index_topk_pattern", "index_topk_freq", "use_index_cache"),
        pattern_per_indexer_layer=True,
        distill_refusal=(
            "DeepSeek-V4's attention reads the selection as a mask over compressed entries joined to the "
            "sliding-window keys, with learned sinks; distill's target (attention over the selected keys) is not "
            "built for that layout"
        ),
    )
)
