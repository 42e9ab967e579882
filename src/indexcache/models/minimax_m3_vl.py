"""MiniMax-M3 (`minimax_m3_vl`, text model `minimax_m3_vl_text`): a block-level lightning indexer on the layers
whose `layer_types` entry is "minimax_m3_sparse"; the other layers run dense attention and stay out of the pattern.

Each sparse layer's indexer picks, per query and indexer head, the top key *blocks*; an S layer reuses the previous
F layer's block selection, and the attention expands it with the indexer's `build_block_mask`. Stock transformers
runs every indexer and reads no pattern key. The Triton indexer selects tokens, not blocks: reference path only.
"""

from .registry import DsaArchitecture, register

_MINIMAX = dict(dsa_layers=("layer_types", "minimax_m3_sparse"), indexer_kernel=False)

TEXT = register(DsaArchitecture(model_type="minimax_m3_vl_text", family="MiniMax-M3 (text)", **_MINIMAX))

VISION_LANGUAGE = register(
    DsaArchitecture(
        model_type="minimax_m3_vl",
        family="MiniMax-M3-VL",
        layers_path=("model", "language_model", "layers"),
        auto_class="AutoModelForImageTextToText",
        checkpoint_indexer_keys=("language_model.model.layers.{layer}.self_attn.index_",),  # MiniMax's own names
        **_MINIMAX,
    )
)
