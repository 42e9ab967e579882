"""Tiny random-init DSA models built from the real transformers classes, for CPU tests."""

from __future__ import annotations

import torch
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM, GlmMoeDsaConfig, GlmMoeDsaForCausalLM

VOCAB = 320


# Shapes shared by both families: MLA and the indexer at a few dozen dims, 4 experts (2 per token).
_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=64,
    moe_intermediate_size=24,
    num_attention_heads=2,
    num_key_value_heads=2,
    n_routed_experts=4,
    num_experts_per_tok=2,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    index_n_heads=2,
    index_head_dim=16,
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    eos_token_id=1,
    bos_token_id=0,
)


def glm_config(num_layers: int = 6, index_topk: int = 8, **overrides) -> GlmMoeDsaConfig:
    """A few dense layers then MoE layers; top-k far below the test sequence length so selection matters."""
    kwargs = dict(_TINY, num_hidden_layers=num_layers, index_topk=index_topk, first_k_dense_replace=2)
    kwargs.update(overrides)
    return GlmMoeDsaConfig(**kwargs)


def glm_model(seed: int = 0, **config_overrides) -> GlmMoeDsaForCausalLM:
    torch.manual_seed(seed)
    config = glm_config(**config_overrides)
    config._attn_implementation = "eager"
    model = GlmMoeDsaForCausalLM(config).eval()
    _perturb(model, seed)
    return model


def deepseek_model(
    seed: int = 0, num_layers: int = 4, index_topk: int = 8, **config_overrides
) -> DeepseekV32ForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(_TINY, num_hidden_layers=num_layers, index_topk=index_topk, first_k_dense_replace=1, n_group=1)
    kwargs.update(topk_group=1, **config_overrides)
    config = DeepseekV32Config(**kwargs)
    config._attn_implementation = "eager"
    model = DeepseekV32ForCausalLM(config).eval()
    _perturb(model, seed)
    return model


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random init leaves norms at 1 and routers' biases at 0; jitter every parameter so layers differ a lot."""
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def random_ids(num: int, length: int, seed: int = 0) -> torch.Tensor:
    """int64 [num, length] token windows."""
    return torch.randint(2, VOCAB, (num, length), generator=torch.Generator().manual_seed(seed))


def patched_loss(model, arch, pattern: str, ids: torch.Tensor) -> tuple[float, dict]:
    """Mean next-token NLL under our F/S patch with `pattern`, and how often each layer's indexer ran."""
    from indexcache.runtime.forward import LayerwiseModel
    from indexcache.runtime.patch import index_sharing

    lw = LayerwiseModel(model, arch)
    with torch.no_grad(), index_sharing(model, arch, pattern) as state:
        hidden, inputs = lw.embed(ids)
        hidden = lw.run_layers(hidden, inputs, 0, lw.num_layers)
        loss = lw.nll_sum(hidden, ids).sum().item() / (ids.shape[0] * (ids.shape[1] - 1))
    return loss, dict(state.indexer_calls)


def stock_loss(model, ids: torch.Tensor) -> float:
    """The stock model's own loss (its own `indexer_types`)."""
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()
