"""The F/S patch against transformers' own meaning of `index_topk_pattern` (glm_moe_dsa), and DeepSeek-V3.2."""

from __future__ import annotations

import random

import pytest
from transformers import GlmMoeDsaForCausalLM

from indexcache.models import architecture_for
from indexcache.patterns.layout import random_pattern, uniform
from indexcache.runtime.patch import index_sharing

from tiny_models import deepseek_model, glm_config, glm_model, patched_loss, random_ids, stock_loss

NUM_LAYERS = 7
SEQ = 40  # index_topk 8 ≪ 40, so selection matters in every layer


def _patterns(seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [
        ("all-F", "F" * NUM_LAYERS),
        ("uniform", uniform(NUM_LAYERS, 3)),
        ("random", random_pattern(NUM_LAYERS, 3, rng)),
        ("random2", random_pattern(NUM_LAYERS, 2, rng)),
        ("long-S-run", "F" + "S" * (NUM_LAYERS - 1)),
        ("late-F", "F" + "S" * (NUM_LAYERS - 3) + "FS"),
    ]


CASES = [
    pytest.param(seed, name, pattern, id=f"seed{seed}-{name}-{pattern}")
    for seed in (0, 1, 2)
    for name, pattern in _patterns(seed)
]


@pytest.mark.parametrize("seed,name,pattern", CASES)
def test_patched_glm_matches_stock_pattern(seed, name, pattern):
    model = glm_model(seed=seed, num_layers=NUM_LAYERS)
    assert any(type(layer.mlp).__name__.endswith("MoE") for layer in model.model.layers), "needs MoE layers"
    ids = random_ids(2, SEQ, seed=seed)
    config = glm_config(num_layers=NUM_LAYERS, index_topk_pattern=pattern)
    config._attn_implementation = "eager"
    stock = GlmMoeDsaForCausalLM(config).eval()
    missing, _ = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert [a.self_attn.indexer is None for a in stock.model.layers] == [c == "S" for c in pattern]

    ours, calls = patched_loss(model, architecture_for("glm_moe_dsa"), pattern, ids)
    assert ours == pytest.approx(stock_loss(stock, ids), rel=1e-4)
    assert sorted(calls) == [i for i, c in enumerate(pattern) if c == "F"]


def test_patterns_change_the_loss():
    """Guard against an oracle that passes because sharing never matters on these tiny models."""
    model = glm_model(seed=0, num_layers=NUM_LAYERS)
    ids = random_ids(2, SEQ)
    arch = architecture_for("glm_moe_dsa")
    losses = {p: patched_loss(model, arch, p, ids)[0] for _, p in _patterns(0)}
    assert len({round(v, 6) for v in losses.values()}) >= 4


def test_patch_restores_model():
    model = glm_model(seed=0, num_layers=NUM_LAYERS)
    arch = architecture_for("glm_moe_dsa")
    ids = random_ids(2, SEQ)
    before = stock_loss(model, ids)
    originals = [layer.self_attn.indexer for layer in model.model.layers]
    with index_sharing(model, arch, "F" + "S" * (NUM_LAYERS - 1)):
        assert stock_loss(model, ids) != pytest.approx(before, rel=1e-6)  # the patch took effect
    assert [layer.self_attn.indexer for layer in model.model.layers] == originals
    assert stock_loss(model, ids) == before


def test_layers_without_indexer_weights_cannot_be_full():
    config = glm_config(num_layers=NUM_LAYERS, index_topk_pattern="FFSSFSS")
    model = GlmMoeDsaForCausalLM(config).eval()
    arch = architecture_for("glm_moe_dsa")
    with index_sharing(model, arch) as state:
        assert state.pattern == "FFSSFSS"  # default: F exactly where an indexer exists
        with pytest.raises(Exception, match=r"\[2\].*cannot be F"):
            state.pattern = "FFFSFSS"


def test_deepseek_all_full_matches_stock_and_shared_layers_skip_indexer():
    model = deepseek_model(seed=0, num_layers=5)
    arch = architecture_for("deepseek_v32")
    ids = random_ids(2, SEQ)
    loss, calls = patched_loss(model, arch, "FFFFF", ids)
    assert loss == pytest.approx(stock_loss(model, ids), rel=1e-4)
    assert calls == {i: 1 for i in range(5)}

    shared_loss, calls = patched_loss(model, arch, "FSSFS", ids)
    assert calls == {0: 1, 3: 1}
    assert shared_loss != pytest.approx(loss, rel=1e-6)
