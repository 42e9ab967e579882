"""GLM-5.3-Flash (`glm5_next`): a DSA layer (`indexed_attention`) after every three KDA linear-attention layers.

Checkpoints load as `Glm5NextForConditionalGeneration`; the search runs text-only windows through its language
model (`model.language_model`). No positional encoding: layers take no rotary table, and the indexer and attention
take a bool [B, S] token mask. The indexer scores pools of `index_kpool` tokens, keeps `index_topk / index_kpool`
of them and appends the query's incomplete pool. Four hyper-connection streams ([B, S, 4, H]) are averaged by
`hc_head` before the final norm. Stock transformers reads `indexer_types` but passes a shared layer only the
top-k of the decoder layer right before it, which a linear-attention layer never passes on: `apply` says so.
Under the kernels the indexer runs as the Triton kernel over the pools; the attention stays the model's own
(sdpa: it turns the indices into a mask).
"""

from .registry import DsaArchitecture, register

ARCHITECTURE = register(
    DsaArchitecture(
        model_type="glm5_next",
        family="GLM-5.3-Flash",
        layers_path=("model", "language_model", "layers"),
        auto_class="AutoModelForImageTextToText",
        dsa_layers=("layer_types", "indexed_attention"),
        hidden_streams="hc_mult",
        streams_head="hc_head",
        rotary=False,
        layer_mask="token_valid",
        selection="kpool",
        pool_attr="index_kpool",
        sparse_attention_kernel=False,
        kernel_attention="sdpa",
        pattern_keys=("index_topk_pattern", "indexer_types"),
        honours_pattern=True,
        stock_reuses_previous_layer_only=True,
        distill_refusal=(
            "its indexer scores pools of tokens, which distillation does not train yet; search, eval and apply "
            "support it"
        ),
    )
)
