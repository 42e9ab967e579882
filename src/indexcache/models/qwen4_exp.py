"""Qwen4-Exp (`qwen4_exp`, text model `qwen4_exp_text`): GatedDeltaNet linear-attention layers (no `self_attn`)
with an `indexed_attention` layer after every three.

Its QSA indexer scores blocks of `indexer_compress_ratio` keys (their mean, normed, RoPE at the block start), keeps
`indexer_budget / indexer_compress_ratio` blocks plus the query's incomplete block and returns a [B, 1, S, T] mask;
the stock code loops over every query in Python, so the search computes the same selection vectorised (or with the
Triton indexer) and hands the attention the mask of it. Positions are mRoPE ids [3, B, S]; PLE layers take the
token ids (`ple_input_ids`); four hyper-connection streams lie flat ([B, S, 4H]) until `hyper_connection_mixer`,
with no final norm. No pattern reader exists: `apply` writes `indexer_types` and says so.
"""

from .registry import DsaArchitecture, register

_QWEN4_EXP = dict(
    dsa_layers=("layer_types", "indexed_attention"),
    rotary_position_axes=3,
    token_id_inputs=("ple_input_ids",),
    hidden_streams="hc_count",
    flat_streams=True,
    streams_head="hyper_connection_mixer",
    final_norm=None,
    selection="qsa_blocks",
    topk_attr="indexer_budget",
    pool_attr="indexer_compress_ratio",
    sparse_attention_kernel=False,
    kernel_attention="sdpa",
    pattern_keys=("indexer_types",),
    distill_refusal=(
        "its indexer scores blocks of tokens, which distillation does not train yet; search, eval and apply support it"
    ),
    reader_note=(
        "note: no reader of a qwen4_exp pattern exists (stock transformers runs every indexer and reads no pattern "
        "key); indexcache evaluates it with its own patch"
    ),
)

TEXT = register(DsaArchitecture(model_type="qwen4_exp_text", family="Qwen4-Exp (text)", **_QWEN4_EXP))

VISION_LANGUAGE = register(
    DsaArchitecture(
        model_type="qwen4_exp",
        family="Qwen4-Exp",
        layers_path=("model", "language_model", "layers"),
        auto_class="AutoModelForImageTextToText",
        **_QWEN4_EXP,
    )
)
