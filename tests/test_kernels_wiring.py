"""`kernels.wiring` inside real transformers models: tiny GLM-MoE-DSA and DeepSeek-V3.2 with the kernel indexer and
the registered sparse attention reproduce the stock eager model's loss."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM, GlmMoeDsaConfig, GlmMoeDsaForCausalLM
from transformers.masking_utils import create_causal_mask

from indexcache.kernels.testing import kernel_device, wired_model

DEVICE = kernel_device()  # before the kernel modules load: they pick compiler or interpreter then

from indexcache.kernels import wiring  # noqa: E402
from indexcache.kernels.backend import forced  # noqa: E402

ARCHS = {
    "glm_moe_dsa": (GlmMoeDsaConfig, GlmMoeDsaForCausalLM, "interleave"),
    "deepseek_v32": (DeepseekV32Config, DeepseekV32ForCausalLM, "half"),
}
# fp32 on the CPU: the wired model does the same arithmetic in another order (gathered instead of masked softmax,
# fused head sum), which moves a 2-layer model's loss by ~1e-7 relative; the selections agree because near-ties
# (scores within fp32 rounding) are rare with 8 indexer heads. A wrong selection moves it by ~8e-3 (below).
LOSS_RTOL = 1e-5


def _model(arch: str, seed: int = 0):
    config_cls, model_cls, _ = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        first_k_dense_replace=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        index_n_heads=8,
        index_head_dim=32,
        index_topk=16,
        max_position_embeddings=256,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    config._attn_implementation = "eager"
    return model_cls(config).eval().to(DEVICE)


def _loss(model, ids) -> float:
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_wired_model_reproduces_stock_loss(arch, backend):
    model = _model(arch)
    ids = torch.randint(0, 128, (2, 45), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    stock = _loss(model, ids)
    with wired_model(model, ARCHS[arch][2]), forced(backend):
        assert model.config._attn_implementation == wiring.ATTN_IMPLEMENTATION
        ours = _loss(model, ids)
    assert abs(ours - stock) <= LOSS_RTOL * stock
    assert _loss(model, ids) == stock  # unwired again


def _most_recent(indexer, rope, hidden_states, q_resid, position_embeddings, topk):
    """A valid but wrong selection: the `topk` most recent keys."""
    batch, seq_len, _ = hidden_states.shape
    device = hidden_states.device
    idx = torch.arange(seq_len, device=device)[:, None] - torch.arange(topk, device=device)[None, :]
    return torch.where(idx >= 0, idx, -1).to(torch.int32).expand(batch, -1, -1)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_loss_sees_the_selection(arch):
    """The loss comparison above can fail: another selection moves the loss far beyond its tolerance."""
    model = _model(arch)
    ids = torch.randint(0, 128, (2, 45), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    stock = _loss(model, ids)
    with wired_model(model, ARCHS[arch][2], select=_most_recent), forced("reference"):
        assert abs(_loss(model, ids) - stock) > 1e2 * LOSS_RTOL * stock


def test_mask_function_builds_no_s_by_t_mask():
    model = _model("glm_moe_dsa")
    config = model.config
    config._attn_implementation = wiring.register_sparse_attention()
    embeds = torch.zeros(2, 300, 8)
    mask = create_causal_mask(
        config=config, inputs_embeds=embeds, attention_mask=None, cache=None, allow_is_causal_skip=False
    )
    assert mask.shape == (2, 1, 1, 300) and mask.all()
    padding = torch.ones(2, 300, dtype=torch.long)
    padding[1, 250:] = 0
    mask = create_causal_mask(
        config=config, inputs_embeds=embeds, attention_mask=padding, cache=None, allow_is_causal_skip=False
    )
    assert mask.shape == (2, 1, 1, 300)
    assert torch.equal(mask[:, 0, 0], padding.bool())
    assert mask[:, 0, :, :].shape == (2, 1, 300)  # what the attention layer hands its indexer
