"""Tiny random-init models of the DSA families beyond GLM-5 / DeepSeek-V3.2, from the real transformers classes.

Each builder takes `indexer_types` (None = the config's default) so the oracle tests can build the stock model
with transformers' own sharing and the same weights.
"""

from __future__ import annotations

import torch
from transformers import (
    AXK2Config,
    AXK2ForCausalLM,
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
    Dots3NoteForCausalLM,
    Dots3NoteTextConfig,
    Glm5NextConfig,
    Glm5NextForConditionalGeneration,
    HYV4Config,
    HYV4ForCausalLM,
    HYV4VLConfig,
    HYV4VLForConditionalGeneration,
    MiniMaxM3SparseForConditionalGeneration,
    MiniMaxM3VLConfig,
    MiniMaxM3VLForCausalLM,
    MiniMaxM3VLTextConfig,
    MistralLarge4Config,
    MistralLarge4ForConditionalGeneration,
    Qwen4ExpConfig,
    Qwen4ExpForCausalLM,
    Qwen4ExpForConditionalGeneration,
    Qwen4ExpTextConfig,
)

from tiny_models import _TINY, VOCAB, _perturb

_MLA = {k: v for k, v in _TINY.items() if k != "q_lora_rank"}  # mistral_large4 has no q-LoRA

# NoPE at layers 2 and 3 (their indexers skip RoPE too); layers 1, 3, 5 reuse the latent KV of 0, 2, 4, one of
# them NoPE, so the shared-KV dict carries both its "rope" and "nope" entries across layers.
MISTRAL_NO_ROPE = [1, 1, 0, 0, 1, 1]
MISTRAL_KV_SOURCES = [0, 0, 2, 2, 4, 4]
_PIXTRAL = dict(
    model_type="pixtral",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    head_dim=8,
    patch_size=4,
    image_size=16,
)


def mistral_large4_config(indexer_types: list[str] | None = None, **overrides) -> MistralLarge4Config:
    """6 text layers (2 dense, 4 MoE) with NoPE layers and shared latent KV, behind a 1-layer Pixtral tower."""
    text = dict(
        _MLA,
        num_hidden_layers=6,
        index_topk=8,
        first_k_dense_replace=2,
        no_rope_layers=MISTRAL_NO_ROPE,
        kv_source_layers=MISTRAL_KV_SOURCES,
        indexer_types=indexer_types,
    )
    text.update(overrides)
    config = MistralLarge4Config(text_config=text, vision_config=_PIXTRAL)
    config._attn_implementation = "eager"
    return config


def mistral_large4_model(seed: int = 0, indexer_types: list[str] | None = None, **overrides):
    """A MistralLarge4ForConditionalGeneration (the class its checkpoints load as)."""
    torch.manual_seed(seed)
    model = MistralLarge4ForConditionalGeneration(mistral_large4_config(indexer_types, **overrides)).eval()
    _perturb(model, seed)
    return model


def hy_v4_config(indexer_types: list[str] | None = None, **overrides) -> HYV4Config:
    """6 layers (1 dense, 5 MoE), 4 hyper-connection streams, every indexer present unless `indexer_types` says."""
    kwargs = dict(_TINY, num_hidden_layers=6, index_topk=8, pad_token_id=None)
    kwargs.update(overrides)
    config = HYV4Config(**kwargs, indexer_types=indexer_types or ["full"] * 6)
    config._attn_implementation = "eager"
    return config


def hy_v4_model(seed: int = 0, indexer_types: list[str] | None = None, **overrides) -> HYV4ForCausalLM:
    torch.manual_seed(seed)
    model = HYV4ForCausalLM(hy_v4_config(indexer_types, **overrides)).eval()
    _perturb(model, seed)
    return model


def hy_v4_vl_model(seed: int = 0, indexer_types: list[str] | None = None) -> HYV4VLForConditionalGeneration:
    """The hy_v4 text model above (its 3-axis mRoPE sections shrunk to the tiny rotary dims) behind a 1-layer
    vision tower; text-only windows give every axis the same positions."""
    torch.manual_seed(seed)
    rope = dict(_TINY["rope_parameters"], mrope_section=[2, 1, 1])
    text = dict(_TINY, num_hidden_layers=6, index_topk=8, pad_token_id=None, rope_parameters=rope)
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, out_hidden_size=48,
        patch_size=4, max_image_size=16,
    )  # fmt: skip
    config = HYV4VLConfig(text_config=dict(text, indexer_types=indexer_types or ["full"] * 6), vision_config=vision)
    config._attn_implementation = "eager"
    model = HYV4VLForConditionalGeneration(config).eval()
    _perturb(model, seed)
    return model


def axk2_model(seed: int = 0, num_layers: int = 4, **overrides) -> AXK2ForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(_TINY, num_hidden_layers=num_layers, index_topk=8, first_k_dense_replace=1)
    kwargs.update(overrides)
    config = AXK2Config(**kwargs)
    config._attn_implementation = "eager"
    model = AXK2ForCausalLM(config).eval()
    _perturb(model, seed)
    return model


MINIMAX_LAYER_TYPES = ["minimax_m3_sparse", "full_attention", *["minimax_m3_sparse"] * 3]


def minimax_m3_text_model(seed: int = 0) -> MiniMaxM3VLForCausalLM:
    """5 layers, layer 1 dense (no indexer); the indexer keeps 2 blocks of 4 keys (plus the local one) per query."""
    torch.manual_seed(seed)
    config = MiniMaxM3VLTextConfig(
        **{k: _TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "rope_parameters")},
        dense_intermediate_size=64,
        shared_intermediate_size=24,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rotary_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        index_n_heads=2,
        index_head_dim=16,
        index_block_size=4,
        index_topk_blocks=2,
        index_local_blocks=1,
        layer_types=MINIMAX_LAYER_TYPES,
        max_position_embeddings=512,
        pad_token_id=None,
        eos_token_id=1,
        bos_token_id=0,
    )
    config._attn_implementation = "eager"
    model = MiniMaxM3VLForCausalLM(config).eval()
    _perturb(model, seed)
    return model


def minimax_m3_vl_model(seed: int = 0) -> MiniMaxM3SparseForConditionalGeneration:
    """The MiniMax-M3 text model above behind a 1-layer vision tower."""
    text = minimax_m3_text_model(seed).config.to_dict()
    torch.manual_seed(seed)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    config = MiniMaxM3VLConfig(
        text_config=text, vision_config=vision, projector_hidden_size=32, image_token_index=300, video_token_index=301
    )
    config._attn_implementation = "eager"
    model = MiniMaxM3SparseForConditionalGeneration(config).eval()
    _perturb(model, seed)
    return model


def dots3_note_text_model(seed: int = 0, **overrides) -> Dots3NoteForCausalLM:
    """6 layers: indexed (DSA) layers 0, 1 and 5, sliding-window layers 2-4 (window 16), each type with its own
    rotary table."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in _TINY.items() if k != "rope_parameters"}  # the config's own per-type tables
    kwargs.update(num_hidden_layers=6, index_topk=8, pad_token_id=None, sliding_window=16, head_dim=16)
    swa = dict(num_attention_heads=2, num_key_value_heads=2, q_lora_rank=24, kv_lora_rank=16, head_dim=16)
    kwargs.update({f"swa_{k}": v for k, v in swa.items()}, swa_qk_nope_head_dim=8, swa_v_head_dim=8)
    kwargs.update(overrides)
    config = Dots3NoteTextConfig(**kwargs)
    config._attn_implementation = "eager"
    model = Dots3NoteForCausalLM(config).eval()
    _perturb(model, seed)
    return model


# The hybrid families: linear-attention layers, a DSA layer after every three (layers 3, 7 and 11 of 12).
HYBRID_LAYERS = 12


def glm5_next_model(
    seed: int = 0, indexer_types: list[str] | None = None, **overrides
) -> Glm5NextForConditionalGeneration:
    """12 layers (3 dense MLPs, then MoE), KDA linear attention except 3, 7, 11; the indexer keeps 2 pools of 4
    tokens plus the tail (≤ 11 tokens) per query; 4 hyper-connection streams; behind a 1-layer vision tower."""
    torch.manual_seed(seed)
    text = dict(
        {k: _TINY[k] for k in ("vocab_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")},
        **{k: _TINY[k] for k in ("q_lora_rank", "kv_lora_rank", "index_n_heads", "index_head_dim")},
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=HYBRID_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        qk_nope_head_dim=8,
        v_head_dim=8,
        index_topk=8,
        index_kpool=4,
        linear_head_dim=8,
        linear_num_heads=2,
        hc_sinkhorn_iters=3,
        max_position_embeddings=512,
        pad_token_id=None,
        eos_token_id=1,
        bos_token_id=0,
        indexer_types=indexer_types,
    )
    text.update(overrides)
    vision = dict(
        depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32, projection_intermediate_size=32,
        patch_size=4, image_size=16,
    )  # fmt: skip
    config = Glm5NextConfig(text_config=text, vision_config=vision)
    config._attn_implementation = "eager"
    model = Glm5NextForConditionalGeneration(config).eval()
    _perturb(model, seed)
    return model


def qwen4_exp_text_model(seed: int = 0, **overrides) -> Qwen4ExpForCausalLM:
    """12 layers, GatedDeltaNet except 3, 7, 11, PLE on layer 2 (1-indexed: layer id 2); the QSA indexer keeps 2
    blocks of 4 tokens plus the tail (≤ 11 tokens) per query; mRoPE on half the head; 4 flat streams."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=_TINY["vocab_size"],
        hidden_size=32,
        num_hidden_layers=HYBRID_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        hc_lowrank=8,
        ple_layer_ids=[2],
        ngram_vocab_size_base=1000,
        heads_per_ngram=2,
        split_ngram_parts=1,
        indexer_n_heads=4,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=8,
        indexer_compress_ratio=4,
        max_position_embeddings=512,
        eos_token_id=1,
        bos_token_id=0,
        rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
    )  # fmt: skip
    kwargs.update(overrides)
    config = Qwen4ExpTextConfig(**kwargs)
    config._attn_implementation = "eager"
    model = Qwen4ExpForCausalLM(config).eval()
    _perturb(model, seed)
    return model


def qwen4_exp_model(seed: int = 0) -> Qwen4ExpForConditionalGeneration:
    """The qwen4_exp text model above behind a 1-layer vision tower (the class Qwen4-Exp checkpoints load as)."""
    text = qwen4_exp_text_model(seed).config.to_dict()
    torch.manual_seed(seed)
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
        num_position_embeddings=16,
    )  # fmt: skip
    config = Qwen4ExpConfig(text_config=text, vision_config=vision)
    config._attn_implementation = "eager"
    model = Qwen4ExpForConditionalGeneration(config).eval()
    _perturb(model, seed)
    return model


# compress ratios 0 (sliding), 4 (CSA: the indexer layers 2, 4, 6, 7) and 16 (HCA; 128 in the real models, shrunk
# so a 96-token window closes some of its entries).
V4_LAYER_TYPES = [
    {0: "sliding_attention", 4: "compressed_sparse_attention", 16: "heavily_compressed_attention"}[r]
    for r in (0, 0, 4, 16, 4, 16, 4, 4)
]
V4_CSA_LAYERS = [2, 4, 6, 7]
V4_SEQ = 96  # 24 entries of 4 tokens; top-4 entries: queries from position 19 on choose


def v4_config(**overrides) -> DeepseekV4Config:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=len(V4_LAYER_TYPES),
        num_attention_heads=4,
        head_dim=16,
        partial_rotary_factor=0.5,
        q_lora_rank=16,
        o_groups=2,
        o_lora_rank=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=4,
        sliding_window=8,
        hc_sinkhorn_iters=3,
        layer_types=V4_LAYER_TYPES,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        max_position_embeddings=512,
        eos_token_id=1,
        bos_token_id=0,
    )
    kwargs.update(overrides)
    config = DeepseekV4Config(**kwargs)
    config._attn_implementation = "eager"
    return config


def v4_model(seed: int = 0, **overrides) -> DeepseekV4ForCausalLM:
    """Random weights, jittered; the hash-routed layers get a random token → expert table (zeros by default)."""
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(v4_config(**overrides)).eval()
    _perturb(model, seed)
    gen = torch.Generator().manual_seed(2000 + seed)
    for name, buffer in model.named_buffers():
        if name.endswith("tid2eid"):
            buffer.copy_(torch.randint(0, model.config.n_routed_experts, buffer.shape, generator=gen))
    return model
