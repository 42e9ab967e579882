"""Families beyond GLM-5: the patch against transformers' own sharing (mistral_large4, hy_v4), S layers reusing
the previous F layer's indices where transformers has no sharing (axk2), the prefix cache with state that crosses
layers, and the one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

from indexcache.cli.app import app
from indexcache.errors import IndexCacheError
from indexcache.models import architecture_for
from indexcache.patterns.layout import indexer_types
from indexcache.runtime.forward import LayerwiseModel
from indexcache.runtime.patch import index_sharing
from indexcache.search.scoring import CachedScorer, CachePlan, PatternScorer

from conftest import _tokenizer
from tiny_families import (
    axk2_model,
    dots3_note_text_model,
    hy_v4_model,
    hy_v4_vl_model,
    minimax_m3_text_model,
    minimax_m3_vl_model,
    mistral_large4_model,
)
from tiny_models import deepseek_model, glm_model, patched_loss, random_ids, stock_loss

SEQ = 40  # index_topk 8 ≪ 40: selection matters in every layer
BUILDERS = {"mistral_large4": mistral_large4_model, "hy_v4": hy_v4_model, "hy_v4_vl": hy_v4_vl_model}
# Every layer F, alternating, one long S run, S right after F at the NoPE / shared-KV layers, late F.
PATTERNS = ["FFFFFF", "FSFSFS", "FSSSSS", "FFSSFS", "FSSFSF"]


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_patched_loss_matches_stock_sharing(family, pattern):
    """Our F/S patch on an all-F model == transformers' own model built with `indexer_types` (same weights)."""
    model = BUILDERS[family](seed=1)
    stock = BUILDERS[family](seed=2, indexer_types=indexer_types(pattern))
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert {key.split(".indexer.")[0] for key in unexpected} == {
        f"{architecture_for(family).indexer_weight_prefix(i)[:-9]}" for i, c in enumerate(pattern) if c == "S"
    }
    ids = random_ids(2, SEQ, seed=3)

    ours, calls = patched_loss(model, architecture_for(family), pattern, ids)
    assert ours == pytest.approx(stock_loss(stock, ids), rel=1e-5)
    assert sorted(calls) == [i for i, c in enumerate(pattern) if c == "F"]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_patterns_change_the_loss(family):
    """Guard against an oracle that passes because sharing never matters on these tiny models."""
    model = BUILDERS[family](seed=1)
    ids = random_ids(2, SEQ, seed=3)
    losses = {p: patched_loss(model, architecture_for(family), p, ids)[0] for p in PATTERNS}
    assert len({round(v, 6) for v in losses.values()}) == len(PATTERNS)


# Families whose stock transformers code runs every indexer: model, an all-F pattern and a pattern with S layers.
# minimax_m3_vl_text's layer 1 and dots3_note_text's sliding-window layers 2-4 have dense attention (no indexer):
# S in every pattern, and no switch.
EVERY_LAYER = {
    "axk2": (axk2_model, "FFFF", "FSSF"),
    "dots3_note_text": (dots3_note_text_model, "FFSSSF", "FSSSSF"),
    "minimax_m3_vl_text": (minimax_m3_text_model, "FSFFF", "FSSFS"),
}


@pytest.mark.parametrize("family", sorted(EVERY_LAYER))
def test_every_layer_indexer_family_all_full_matches_stock_and_s_layers_reuse_indices(family):
    """All-F through our patch == stock; an S layer skips its indexer and its attention receives exactly the
    selection the previous F layer made (axk2: top-k tokens; minimax: top-k key blocks per indexer head)."""
    build, all_full, shared = EVERY_LAYER[family]
    model = build(seed=0)
    arch = architecture_for(family)
    ids = random_ids(2, SEQ)
    loss, calls = patched_loss(model, arch, all_full, ids)
    assert loss == pytest.approx(stock_loss(model, ids), rel=1e-5)
    assert sorted(calls) == [i for i, c in enumerate(all_full) if c == "F"]

    seen = {}  # layer -> the selection its attention received from the indexer slot (our switch)
    lw = LayerwiseModel(model, arch)
    with torch.no_grad(), index_sharing(model, arch, shared) as state:
        switches = {i: arch.attention(layer).indexer for i, layer in enumerate(arch.layers(model))}
        for i, switch in switches.items():
            if switch is not None:
                switch.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out))
        hidden, inputs = lw.embed(ids)
        hidden = lw.run_layers(hidden, inputs, 0, lw.num_layers)
        shared_loss = lw.nll_sum(hidden, ids).sum().item() / (2 * (SEQ - 1))
        calls = dict(state.indexer_calls)
    assert sorted(calls) == [i for i, c in enumerate(shared) if c == "F"]
    assert sorted(seen) == [i for i in range(len(shared)) if arch.is_dsa_layer(model, i)]
    last_full = None
    for i in sorted(seen):
        if shared[i] == "F":
            last_full = i
        else:
            assert torch.equal(seen[i], seen[last_full]), f"layer {i} did not get layer {last_full}'s selection"
    assert any(not torch.equal(seen[i], seen[0]) for i in seen if shared[i] == "F" and i > 0)
    assert shared_loss != pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_prefix_cache_carries_cross_layer_state(family):
    """Restarting at layer l from the cache (hidden states, index buffer and, for mistral_large4, the shared KV
    the earlier layers left) gives exactly the full forward's loss; also with hidden states kept every 2 layers and
    with the cache in host memory."""
    model = BUILDERS[family](seed=1)
    arch = architecture_for(family)
    lw = LayerwiseModel(model, arch)
    windows = random_ids(2, SEQ, seed=4)
    with torch.no_grad(), index_sharing(model, arch) as sharing:
        naive = PatternScorer(lw, sharing, windows, batch_size=1)
        expected = {layer: naive.loss("FF" + "F" * (layer - 2) + "S" + "F" * (5 - layer)) for layer in (2, 3, 5)}
        for plan in (CachePlan("device", 1), CachePlan("device", 2), CachePlan("host", 1)):
            cached = CachedScorer(lw, sharing, windows, batch_size=1, plan=plan)
            scores = cached.score("FFFFFF", [2, 3, 5])
            assert {layer: s.loss for layer, s in scores.items()} == expected


@pytest.mark.parametrize(
    "model_type,reason",
    [
        ("dots3_note", "vision-language checkpoint was not tried"),
        ("step3p7", "builds no indexer module"),
        ("mistral_large4_text", "no causal-LM class"),
        ("hy_v4_vl_text", "no causal-LM class"),
    ],
)
def test_refused_families_say_why_in_one_line(model_type, reason):
    with pytest.raises(IndexCacheError, match=reason) as err:
        architecture_for(model_type)
    assert "\n" not in str(err.value) and "is not supported" in str(err.value) and len(str(err.value)) < 290


# ------------------------------------------------------------------------------ search → eval → apply, per family

CHECKPOINTS = {
    "mistral_large4": mistral_large4_model,
    "hy_v4": hy_v4_model,
    "hy_v4_vl": hy_v4_vl_model,
    "axk2": axk2_model,
    "dots3_note_text": dots3_note_text_model,
    "minimax_m3_vl_text": minimax_m3_text_model,
    "minimax_m3_vl": minimax_m3_vl_model,
    "glm_moe_dsa": glm_model,
    "deepseek_v32": deepseek_model,
}
# What apply must write, and where: a vision-language checkpoint keeps the DSA settings in its text_config.
APPLIED_KEYS = {
    "mistral_large4": ("text_config", {"index_topk_pattern", "indexer_types"}),
    "hy_v4": (None, {"indexer_types"}),
    "hy_v4_vl": ("text_config", {"indexer_types"}),
    "axk2": (None, {"index_topk_pattern", "indexer_types"}),
    "dots3_note_text": (None, {"index_topk_pattern", "indexer_types"}),
    "minimax_m3_vl_text": (None, {"index_topk_pattern", "indexer_types"}),
    "minimax_m3_vl": ("text_config", {"index_topk_pattern", "indexer_types"}),
    "glm_moe_dsa": (None, {"index_topk_pattern", "indexer_types", "use_index_cache"}),  # + vLLM's switch
    "deepseek_v32": (None, {"index_topk_pattern", "indexer_types", "use_index_cache"}),
}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("family", sorted(CHECKPOINTS))
def test_cli_round_trip(family, text_file, tmp_path):
    """A tiny random checkpoint of each family: search, eval and apply through the CLI; the applied folder loads
    in stock transformers with the pattern (where transformers honours it) and gives our patched loss."""
    arch = architecture_for(family)
    checkpoint = tmp_path / "ckpt"
    model = CHECKPOINTS[family](seed=0)
    model.save_pretrained(checkpoint)
    _tokenizer(checkpoint)
    pattern_path = tmp_path / "p.json"
    sizes = "--num-samples 2 --seq-len 40 --num-full 2 --device cpu"
    result = invoke("search", "--model", checkpoint, "--dataset", text_file, *sizes.split(), "-o", pattern_path)
    assert result.exit_code == 0, result.output
    data = json.loads(pattern_path.read_text())
    pattern = data["index_topk_pattern"]
    assert data["model"]["model_type"] == family and pattern.count("F") == 2 and pattern[0] == "F"
    steps = len(data["model"]["indexer_layers"]) - 2  # layers without an indexer start (and stay) S
    assert len(data["trajectory"]) == steps and data["trajectory"][-1]["pattern"] == pattern

    result = invoke("eval", pattern_path)
    assert result.exit_code == 0, result.output
    assert "all-F" in result.stdout and "uniform" in result.stdout

    applied = tmp_path / "applied"
    result = invoke("apply", pattern_path, "--model", checkpoint, "--output", applied)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "ignores the pattern" in line]
    assert len(notes) == (0 if arch.honours_pattern else 1)
    config = json.loads((applied / "config.json").read_text())
    section, keys = APPLIED_KEYS[family]
    written = config[section] if section else config
    pattern_keys = {"index_topk_pattern", "indexer_types", "use_index_cache"}
    assert keys <= written.keys() and not (pattern_keys - keys) & written.keys()
    assert written["indexer_types"] == indexer_types(pattern) and written.get("use_index_cache", True) is True

    stock = getattr(transformers, arch.auto_class).from_pretrained(applied, attn_implementation="eager").eval()
    built_shared = [getattr(arch.attention(layer), arch.indexer_attr) is None for layer in arch.layers(stock)]
    dense = [not arch.is_dsa_layer(stock, i) for i in range(len(pattern))]
    assert built_shared == ([c == "S" for c in pattern] if arch.honours_pattern else dense)
    if arch.honours_pattern:
        ids = random_ids(2, SEQ, seed=5)
        assert stock_loss(stock, ids) == pytest.approx(patched_loss(model, arch, pattern, ids)[0], rel=1e-5)


def test_refused_family_checkpoint_fails_the_cli_with_its_reason(tmp_path, text_file):
    """A real step3p7 config through `search`: exit 2, one `error:` line naming the upstream limitation."""
    transformers.AutoConfig.for_model("step3p7").save_pretrained(tmp_path / "step")
    result = invoke("search", "--model", tmp_path / "step", "--dataset", text_file, "-o", tmp_path / "p.json")
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "builds no indexer module" in lines[0]
    assert not (tmp_path / "p.json").exists()
