"""Hunyuan 4 (`hy_v4`): DSA with hyper-connections; transformers reads only `indexer_types`.

The layers carry `hc_mult` hyper-connection streams ([B, S, 4, H]) that `hc_head` collapses before the final norm.
The indexer's rotary dims sit at the *end* of its head with half-split RoPE, `k_norm` is an fp32 LayerNorm and
`softmax_scale` is folded into the head weights. Its attention has learned sinks, so on CUDA only the indexer runs
as a kernel. S layers have no indexer module and reuse `prev_topk_indices`.
The vision-language variant (`hy_v4_vl`) runs its language model text-only, the same way.
"""

from .registry import DsaArchitecture, register

_HY_V4 = dict(
    indexer_rope="half",
    indexer_rope_at_end=True,
    indexer_scale_in_weights=True,
    sparse_attention_kernel=False,  # learned attention sinks (s_aux): the stock attention consumes the indices
    hidden_streams="hc_mult",
    streams_head="hc_head",
    pattern_keys=("indexer_types",),
    honours_pattern=True,
)

ARCHITECTURE = register(DsaArchitecture(model_type="hy_v4", family="Hunyuan 4", **_HY_V4))

VISION_LANGUAGE = register(
    DsaArchitecture(
        model_type="hy_v4_vl",
        family="Hunyuan 4 VL",
        layers_path=("model", "language_model", "layers"),
        auto_class="AutoModelForImageTextToText",
        checkpoint_indexer_keys=("model.layers.{layer}.self_attn.indexer.",),  # saved without `language_model.`
        **_HY_V4,
    )
)

TEXT_ONLY = register(
    DsaArchitecture(
        model_type="hy_v4_vl_text",
        family="Hunyuan 4 VL (text config)",
        refusal=(
            "transformers has no causal-LM class for a bare hy_v4_vl_text config (no LM head); "
            "point --model at the hy_v4_vl checkpoint (HYV4VLForConditionalGeneration)"
        ),
    )
)
