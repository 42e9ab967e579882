"""Absorbed MLA attention inside the patched model: tiny GLM-MoE-DSA and DeepSeek-V3.2 (fp32) reproduce the stock
losses for several F/S patterns, on the reference kernels and on the Triton kernels (compiled on a GPU, the
interpreter on the CPU); an FP8
block-quantised kv_b_proj is dequantised exactly; `--kernels auto` picks by window length; everything is restored."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM, GlmMoeDsaConfig, GlmMoeDsaForCausalLM
from transformers.integrations.finegrained_fp8 import FP8Linear

from indexcache.kernels.testing import kernel_device

DEVICE = kernel_device()  # before the kernel modules load: they pick compiler or interpreter then

from indexcache import defaults  # noqa: E402
from indexcache.kernels import wiring  # noqa: E402
from indexcache.kernels.backend import forced  # noqa: E402
from indexcache.models import architecture_for  # noqa: E402
from indexcache.runtime import absorbed  # noqa: E402
from indexcache.runtime.absorbed import AbsorbedWeights, absorbed_attention, dense_weight  # noqa: E402
from indexcache.runtime.backends import kernel_indexer, kernels_installed, select_backend  # noqa: E402
from indexcache.runtime.forward import LayerwiseModel  # noqa: E402
from indexcache.runtime.patch import index_sharing  # noqa: E402

ARCHS = {
    "glm_moe_dsa": (GlmMoeDsaConfig, GlmMoeDsaForCausalLM),
    "deepseek_v32": (DeepseekV32Config, DeepseekV32ForCausalLM),
}
NUM_LAYERS = 4
PATTERNS = ["FFFF", "FSFS", "FSSS"]
# fp32 on the CPU. Absorption reassociates (q · W_uk) · c instead of q · (W_uk · c), and the kernel path gathers
# instead of masking: each moves a 4-layer loss by ~1e-7 relative (fp32 rounding, measured ≤ 1.5e-7 here). A pattern
# or selection that differs moves it by ≥ 2.7e-3 (test_tolerance_sees_the_pattern), so 1e-5 separates the two.
LOSS_RTOL = 1e-5


def _model(arch: str, seed: int = 0, **overrides):
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=NUM_LAYERS,
        first_k_dense_replace=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=24,
        index_n_heads=8,
        index_head_dim=32,
        index_topk=16,
        max_position_embeddings=256,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    return model_cls(config).eval().to(DEVICE)


IDS = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _layerwise_loss(model, arch) -> float:
    lw = LayerwiseModel(model, arch)
    with torch.no_grad():
        hidden, inputs = lw.embed(IDS)
        hidden = lw.run_layers(hidden, inputs, 0, lw.num_layers)
        return lw.nll_sum(hidden, IDS).sum().item() / (IDS.shape[0] * (IDS.shape[1] - 1))


def _reference_loss(model, arch, pattern: str) -> float:
    """Stock transformers' meaning of the pattern: its own `index_topk_pattern` (glm_moe_dsa), or the oracle-tested
    reference patch (stock indexer, eager masked attention) for deepseek_v32."""
    if arch.model_type == "glm_moe_dsa":
        config = model.config.to_dict() | {"index_topk_pattern": pattern}
        config.pop("indexer_types", None)
        stock = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**config)).eval().to(DEVICE)
        stock.config._attn_implementation = "eager"
        missing, _ = stock.load_state_dict(model.state_dict(), strict=False)
        assert not missing
        with torch.no_grad():
            return stock(IDS, labels=IDS).loss.item()
    with index_sharing(model, arch, pattern):
        return _layerwise_loss(model, arch)


def _absorbed_loss(model, arch, pattern: str, backend: str) -> float:
    with (
        forced(backend),
        index_sharing(model, arch, pattern, kernel_indexer(arch), wiring.register_sparse_attention()) as state,
        absorbed_attention(model, arch) as installed,
    ):
        assert installed
        loss = _layerwise_loss(model, arch)
        assert sorted(state.indexer_calls) == [i for i, c in enumerate(pattern) if c == "F"]
    return loss


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("model_type", list(ARCHS))
def test_absorbed_reproduces_stock_losses(model_type, backend):
    model = _model(model_type)
    arch = architecture_for(model_type)
    for pattern in PATTERNS if backend == "reference" else PATTERNS[1:]:
        expected = _reference_loss(model, arch, pattern)
        assert _absorbed_loss(model, arch, pattern, backend) == pytest.approx(expected, rel=LOSS_RTOL), pattern


@pytest.mark.parametrize("rows", [7, 40], ids=["pieces-of-a-sequence", "one-sequence-each"])
def test_query_blocks_reproduce_the_one_block_loss(monkeypatch, rows):
    """Latent query blocks of at most `rows` (b, s) rows (batch 2 × 40 tokens: one block by default) give the same
    loss: no block attends to another sequence's keys or writes another's output rows."""
    model, arch = _model("glm_moe_dsa"), architecture_for("glm_moe_dsa")
    one_block = _absorbed_loss(model, arch, "FSFS", "reference")
    monkeypatch.setattr(absorbed, "_QUERY_CHUNK_ELEMENTS", rows * 4 * 32)  # rows × heads × kv_lora_rank
    assert _absorbed_loss(model, arch, "FSFS", "reference") == pytest.approx(one_block, rel=1e-6)


def test_tolerance_sees_the_pattern():
    """Guard for LOSS_RTOL: the patterns above give losses that differ far beyond it."""
    model = _model("glm_moe_dsa")
    arch = architecture_for("glm_moe_dsa")
    losses = [_absorbed_loss(model, arch, p, "reference") for p in PATTERNS]
    gaps = [abs(a - b) / a for i, a in enumerate(losses) for b in losses[i + 1 :]]
    assert min(gaps) > 1e2 * LOSS_RTOL


def test_leaving_restores_the_stock_forward():
    model = _model("deepseek_v32")
    arch = architecture_for("deepseek_v32")
    with torch.no_grad():
        stock = model(IDS, labels=IDS).loss.item()
    with absorbed_attention(model, arch):
        assert all("forward" in layer.self_attn.__dict__ for layer in model.model.layers)
    assert not any("forward" in layer.self_attn.__dict__ for layer in model.model.layers)
    with torch.no_grad():
        assert model(IDS, labels=IDS).loss.item() == stock


def _fp8_quantised(weight: torch.Tensor, block: tuple[int, int]) -> FP8Linear:
    """A transformers FP8Linear holding `weight` block-quantised by hand: per block, scale = amax / 448."""
    out_features, in_features = weight.shape
    fp8 = FP8Linear(in_features, out_features, block_size=block)
    rows, cols = -(-out_features // block[0]), -(-in_features // block[1])
    scale = torch.empty(rows, cols)
    q = torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            tile = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            scale[i, j] = tile.abs().amax() / 448.0
            q[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (tile / scale[i, j]).to(q.dtype)
    fp8.weight.data.copy_(q)
    fp8.weight_scale_inv.data.copy_(scale)
    return fp8


def test_fp8_dequantisation_matches_the_block_scales():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, generator=gen) * torch.logspace(-2, 1, 40)[:, None]  # scales differ per block
    fp8 = _fp8_quantised(weight, (16, 8))  # ragged: 40 rows = 2.5 blocks
    got = dense_weight(fp8)
    expected = torch.stack(
        [
            torch.stack([fp8.weight[r, c].float() * fp8.weight_scale_inv[r // 16, c // 8] for c in range(24)])
            for r in range(40)
        ]
    )
    assert torch.equal(got, expected)
    assert torch.allclose(got, weight, rtol=0.07, atol=0)  # e4m3: 3 mantissa bits, relative step ≤ 1/8


def test_fp8_kv_b_proj_is_absorbed_as_its_dequantised_weight():
    """The absorbed model with an FP8 kv_b_proj gives the loss of the stock model holding its dequantised weight."""
    arch = architecture_for("glm_moe_dsa")
    model = _model("glm_moe_dsa")
    fp8_model = _model("glm_moe_dsa")
    for layer, fp8_layer in zip(model.model.layers, fp8_model.model.layers, strict=True):
        fp8 = _fp8_quantised(layer.self_attn.kv_b_proj.weight.detach().cpu(), (16, 16)).to(DEVICE)
        fp8_layer.self_attn.kv_b_proj = fp8
        layer.self_attn.kv_b_proj.weight.data.copy_(dense_weight(fp8))
        absorbed = AbsorbedWeights.of(fp8_layer.self_attn)
        assert absorbed.w_uk.dtype == torch.float32 and absorbed.w_uk.shape == (4, 16, 32)
    expected = _reference_loss(model, arch, "FSFS")
    assert _absorbed_loss(fp8_model, arch, "FSFS", "reference") == pytest.approx(expected, rel=LOSS_RTOL)


def test_auto_takes_stock_sdpa_below_the_measured_crossover():
    arch = architecture_for("glm_moe_dsa")
    cuda = torch.device("cuda")
    short, long = defaults.TRITON_MIN_SEQ_LEN - 1, defaults.TRITON_MIN_SEQ_LEN
    assert select_backend(arch, cuda, "auto", short)[::2] == ("sdpa", "sdpa")
    assert select_backend(arch, cuda, "auto", long)[0] == "triton"
    assert select_backend(arch, cuda, "triton", short)[0] == "triton"
    assert select_backend(arch, torch.device("cpu"), "auto", long)[0] == "reference"


def test_reference_backend_installs_no_absorbed_forward():
    model = _model("glm_moe_dsa")
    arch = architecture_for("glm_moe_dsa")
    with kernels_installed(model, arch, torch.device("cpu"), "auto", 40, "FSSS") as (state, name):
        assert name == "reference" and state.pattern == "FSSS"
        assert not any("forward" in layer.self_attn.__dict__ for layer in model.model.layers)


def test_stock_glm_shared_layers_take_the_previous_layers_indices():
    """Without the F/S patch, stock glm_moe_dsa "shared" layers have no indexer: the absorbed forward takes the
    indices the model passes down (`prev_topk_indices`) and reproduces the stock model with its pattern."""
    model = _model("glm_moe_dsa")
    config = model.config.to_dict() | {"index_topk_pattern": "FSFS"}
    config.pop("indexer_types", None)
    stock = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**config)).eval().to(DEVICE)
    stock.config._attn_implementation = "eager"
    stock.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        expected = stock(IDS, labels=IDS).loss.item()
        with forced("reference"), absorbed_attention(stock, architecture_for("glm_moe_dsa")):
            assert stock(IDS, labels=IDS, use_cache=False).loss.item() == pytest.approx(expected, rel=LOSS_RTOL)
