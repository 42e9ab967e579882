"""Patterns over the indexer layers: the first layer with an indexer is always F (not layer 0 where that layer has
none), ratios count indexer layers, the uniform interleave spaces their ordinals, `--blocks` forces each stage's
first indexer layer; end to end on a dots.3 model whose layer 0 is a sliding-window layer without an indexer."""

from __future__ import annotations

import json
import math
import random

import pytest
from typer.testing import CliRunner

from indexcache.cli.app import app
from indexcache.distill.train import served_layers
from indexcache.errors import IndexCacheError
from indexcache.models import architecture_for
from indexcache.patterns import file as pattern_file
from indexcache.patterns.layout import full_layers, random_pattern, uniform, validate
from indexcache.search.greedy import block_starts, initial_state
from indexcache.search.overlap import best_full_layers

from conftest import _tokenizer
from tiny_families import dots3_note_text_model
from tiny_models import patched_loss, random_ids, stock_loss

INDEXERS = [2, 3, 5, 7]  # of 8 layers; 0, 1, 4, 6 have none


@pytest.mark.parametrize(
    "pattern,error",
    [
        pytest.param("SSFSSFSS", None, id="first-indexer-F"),
        pytest.param("SSSFSFSS", "makes layer 2 S: layer 2 is the first layer with an indexer", id="first-indexer-S"),
        pytest.param("FSFSSSSS", r"makes layers \[0\] F but they have no indexer", id="F-without-indexer"),
    ],
)
def test_validate_puts_the_first_F_on_the_first_indexer_layer(pattern, error):
    if error is None:
        assert validate(pattern, 8, INDEXERS) == pattern
    else:
        with pytest.raises(IndexCacheError, match=error):
            validate(pattern, 8, INDEXERS)
    with pytest.raises(IndexCacheError, match="starts with S: layer 0"):  # every layer an indexer: layer 0 is F
        validate("SFFS", 4)


def test_uniform_and_random_patterns_space_indexer_ordinals():
    # F on ordinals ⌊i·4/2⌋ = 0, 2 of the indexer layers: layers 2 and 5 (decoder-layer spacing would give 0, 4).
    assert uniform(8, 2, INDEXERS) == "SSFSSFSS"
    assert uniform(8, 4, INDEXERS) == "SSFFSFSF"
    # With an indexer on every layer the ordinals are the layers: the paper's ⌊i·N/F⌋.
    for n, k in ((16, 4), (16, 5), (78, 20), (43, 11)):
        assert full_layers(uniform(n, k)) == [math.floor(i * n / k) for i in range(k)]
    rng = random.Random(0)
    for _ in range(20):
        full = full_layers(random_pattern(8, 3, rng, INDEXERS))
        assert full[0] == 2 and len(full) == 3 and set(full) <= set(INDEXERS)


def test_blocks_force_the_first_indexer_layer_of_each_stage():
    assert block_starts(8, 2, INDEXERS) == [2, 5]  # stages 0-3 and 4-7
    assert block_starts(8, 4, [2, 3, 7]) == [2, 7]  # stages 0-1 and 4-5 hold no indexer: nothing to force
    assert block_starts(10, 3) == [0, 4, 7]  # every layer an indexer: the stage starts, as before


def test_search_start_and_overlap_dp_keep_the_first_indexer_layer():
    state = initial_state(8, INDEXERS, 2, [])
    assert state.start_pattern == "SSFFSFSF"
    with pytest.raises(IndexCacheError, match="layer 2 \\(the first with an indexer\\) and the block starts"):
        initial_state(8, INDEXERS, 1, [5])
    # Layer 3 repeats layer 2's selection, layer 7 layer 5's: the best 2 F layers are 2 and 5.
    overlap = [[0.1] * 8 for _ in range(8)]
    overlap[2][3] = overlap[5][7] = 0.9
    assert best_full_layers(overlap, 2, INDEXERS) == [2, 5]
    assert served_layers("SSFSSFSS") == {2: [2, 3, 4], 5: [5, 6, 7]}


# ------------------------------------------------------------------ end to end: no indexer on layer 0

SLIDING_FIRST = ["sliding_attention", "indexed_attention", "indexed_attention", "sliding_attention"]
SLIDING_FIRST += ["indexed_attention", "indexed_attention"]  # indexer layers 1, 2, 4, 5


def sliding_first_model(seed: int = 0):
    return dots3_note_text_model(seed=seed, layer_types=SLIDING_FIRST)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_all_indexers_through_the_patch_match_stock_without_an_indexer_on_layer_0():
    model = sliding_first_model()
    arch = architecture_for("dots3_note_text")
    assert arch.dsa_layer_ids(model.config) == [1, 2, 4, 5]
    ids = random_ids(2, 40)
    loss, calls = patched_loss(model, arch, "SFFSFF", ids)
    assert loss == pytest.approx(stock_loss(model, ids), rel=1e-5) and sorted(calls) == [1, 2, 4, 5]
    with pytest.raises(IndexCacheError, match="makes layer 1 S"):
        patched_loss(model, arch, "SSFSFF", ids)


@pytest.fixture(scope="module")
def sliding_first_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dots3_sliding_first")
    sliding_first_model().save_pretrained(path)
    _tokenizer(path)
    return path


@pytest.mark.parametrize("strategy", ["cached", "overlap"])
def test_cli_search_counts_and_keeps_indexer_layers(strategy, sliding_first_checkpoint, text_file, tmp_path):
    """`--ratio 0.5` keeps 2 of the 4 indexer layers (not 3 of 6 layers), layer 1 is F, `--blocks 2` forces the
    first indexer layer of layers 3-5 (layer 4); the file records the indexer layers; eval's uniform row spaces
    their ordinals."""
    out = tmp_path / "p.json"
    sizes = "--num-samples 2 --seq-len 40 --ratio 0.5 --blocks 2 --device cpu"
    args = ("search", "--model", sliding_first_checkpoint, "--dataset", text_file, "--strategy", strategy)
    result = invoke(*args, *sizes.split(), "-o", out)
    assert result.exit_code == 0, result.output
    data = pattern_file.read(out)
    pattern = data["index_topk_pattern"]
    assert full_layers(pattern) == [1, 4] and data["num_full"] == 2
    assert data["model"]["dsa_layers"] == [1, 2, 4, 5] and data["search"]["forced_full"] == [1, 4]
    assert "2 of the 4 layers with an indexer" in data["description"]
    if strategy == "cached":
        tried = [sorted(map(int, s["candidates"])) for s in data["trajectory"]]
        assert tried[0] == [2, 5] and len(tried) == 2  # never layer 1 or the block start 4

    result = invoke("eval", out, "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads((tmp_path / "eval.json").read_text())["results"]}
    assert rows["all-F"]["pattern"] == "SFFSFF" and rows["uniform"]["pattern"] == "SFSSFS"
