"""Pipeline stages in one process: the stage loader, the balanced boundaries, and the one-line refusals. The
stages running together under torchrun are tested in tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from indexcache.cli import app
from indexcache.distributed.pipeline import balanced_bounds, layer_work, max_layers_per_stage
from indexcache.models import load_weights, open_checkpoint
from indexcache.models.loading import weight_bytes_by_layer

from tiny_models import glm_model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The tiny 6-layer GLM-DSA checkpoint saved in many safetensors shards, and its full load."""
    path = tmp_path_factory.mktemp("sharded")
    glm_model(seed=0).save_pretrained(path, max_shard_size="100KB")
    assert len(list(path.glob("*.safetensors"))) > 6
    checkpoint = open_checkpoint(str(path))
    return checkpoint, load_weights(checkpoint, device="cpu").model


def held_by(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters a stage really holds (the rest stay on meta)."""
    return {name: p for name, p in model.named_parameters() if not p.is_meta}


def test_each_stage_loads_only_its_layers_from_the_shards(sharded):
    checkpoint, full = sharded
    whole = dict(full.named_parameters())
    seen: dict[str, torch.Tensor] = {}
    for held, extra in ((range(0, 2), {"model.embed_tokens.weight"}), (range(2, 5), set()), (range(5, 6), None)):
        stage = load_weights(checkpoint, device="cpu", held=held)
        mine = held_by(stage.model)
        layers = {int(name.split(".")[2]) for name in mine if name.startswith("model.layers.")}
        assert layers == set(held)
        others = {name for name in mine if not name.startswith("model.layers.")}
        assert others == (extra if extra is not None else {"model.norm.weight", "lm_head.weight"})
        assert all(torch.equal(p, whole[name]) for name, p in mine.items())
        assert len(stage.model.model.layers) == 6 and stage.indexer_layers == list(range(6))
        assert not seen.keys() & mine.keys()
        seen.update(mine)
    assert seen.keys() == whole.keys()  # together the stages hold the model once
    assert sum(p.numel() for p in seen.values()) == sum(p.numel() for p in whole.values())


def test_boundaries_follow_the_work_a_cached_search_gives_each_layer():
    # 6 layers, layers 1-5 may flip, 3 flips: layer l reruns for every candidate at or below it
    work = layer_work(6, [1, 2, 3, 4, 5], 3)
    assert work == pytest.approx([1, 4, 7, 10, 13, 16])
    assert balanced_bounds(work, 2) == [0, 4, 6]  # an even split (3 + 3) would give the last stage 39 of 51
    assert balanced_bounds(work, 2, max_layers=3) == [0, 3, 6]  # what one device holds comes first
    assert balanced_bounds([1.0] * 7, 3) == [0, 2, 4, 7]  # ties: the earliest boundaries
    assert balanced_bounds(work, 6) == list(range(7))
    with pytest.raises(ValueError):
        balanced_bounds(work, 2, max_layers=2)


def test_a_stage_holds_no_more_layers_than_its_gpu_from_the_shards_headers(sharded):
    checkpoint, full = sharded
    layers, rest = weight_bytes_by_layer(checkpoint)
    stored = [sum(t.numel() * t.element_size() for t in layer.state_dict().values()) for layer in full.model.layers]
    assert layers == stored  # weights and stored buffers, layer by layer
    whole = sum(t.numel() * t.element_size() for t in full.state_dict().values())
    assert sum(layers) + rest == whole
    # a device of 10 MoE layers' bytes, 10% kept free, the embeddings and head on every stage
    device = 10 * max(layers)
    assert max_layers_per_stage(layers, rest, device, 0.1) == int((0.9 * device - rest) // max(layers))
    assert max_layers_per_stage(layers, rest, rest, 0.1) == 0


@pytest.mark.parametrize(
    "args,expected",
    [
        (["search", "--pipeline-stages", "2"], "--pipeline-stages 2 needs a multiple of 2 processes"),
        (["search", "--strategy", "overlap", "--pipeline-stages", "2"], "--strategy overlap compares every layer"),
    ],
    ids=["without-torchrun", "overlap"],
)
def test_pipeline_stages_that_cannot_run_are_refused_in_one_line(tmp_path, args, expected):
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "p.json")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], result.output
    assert not list(tmp_path.iterdir())


def test_bench_refuses_several_processes_in_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["bench"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2
    assert lines == ["error: bench times layers in one process on one GPU; run it without torchrun"]
