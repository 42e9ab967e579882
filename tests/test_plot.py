"""Plots: valid PNGs of the promised size whose plotted values are the JSON's (read back from the artists), and
the overlap strategy end to end (API and CLI)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from typer.testing import CliRunner

from indexcache import api
from indexcache.analyze import analyze, analyze_windows, matrix_sha256
from indexcache.calib import windows_from_tensor
from indexcache.cli.app import app
from indexcache.errors import IndexCacheError
from indexcache.models import load_model
from indexcache.plot import OVERLAP_SIZE, PATTERN_SIZE, PATTERN_WITH_EVAL_SIZE, overlap_figure, pattern_figure
from indexcache.runtime.forward import LayerwiseModel
from indexcache.runtime.patch import index_sharing
from indexcache.search.overlap import best_pattern
from indexcache.search.scoring import PatternScorer

from tiny_models import random_ids


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def pixels(size):
    return (round(size[0] * 100), round(size[1] * 100))


def greedy_file() -> dict:
    """A pattern file as `search --strategy pruned` writes it: step 1 scored candidate 3 on fewer windows."""
    steps = [
        {
            "step": 1,
            "flipped": 2,
            "pattern": "FFSF",
            "loss": 3.1,
            "candidates": {"1": 3.4, "2": 3.1, "3": 2.0},
            "candidate_windows": {"1": 8, "2": 8, "3": 2},
        },
        {
            "step": 2,
            "flipped": 3,
            "pattern": "FFSS",
            "loss": 3.3,
            "candidates": {"1": 3.9, "3": 3.3},
            "candidate_windows": {"1": 8, "3": 8},
        },
    ]
    return {
        "schema_version": 1,
        "index_topk_pattern": "FFSS",
        "num_layers": 4,
        "model": {"name": "m", "model_type": "glm_moe_dsa"},
        "search": {"strategy": "pruned"},
        "loss_all_full": 3.0,
        "loss_final": 3.3,
        "trajectory": steps,
    }


EVAL = {
    "results": [
        {"name": "pattern", "loss": 3.2, "delta_vs_all_full": 0.1},
        {"name": "all-F", "loss": 3.1, "delta_vs_all_full": 0.0},
        {"name": "uniform", "loss": 3.6, "delta_vs_all_full": 0.5},
    ]
}


def test_pattern_figure_plots_the_files_numbers():
    fig = pattern_figure(greedy_file(), EVAL)
    strip, trajectory, bars = fig.axes
    assert strip.images[0].get_array().tolist() == [[1.0, 1.0, 0.0, 0.0]]
    assert [t.get_text() for t in strip.texts] == list("FFSS")
    line = trajectory.lines[0]
    assert list(line.get_xdata()) == [1, 2] and list(line.get_ydata()) == [3.1, 3.3]
    assert trajectory.lines[1].get_ydata()[0] == 3.0  # the all-F line
    # Candidates scored on every window only: pruning's partial 2.0 would fake a better flip.
    candidates = sorted(tuple(p) for c in trajectory.collections[::2] for p in c.get_offsets().tolist())
    assert candidates == [(1, 3.1), (1, 3.4), (2, 3.3), (2, 3.9)]
    assert [p.get_height() for p in bars.patches] == [3.2, 3.1, 3.6]


def test_plot_command_writes_pngs_of_the_promised_size(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(greedy_file()))
    (tmp_path / "e.json").write_text(json.dumps(EVAL))
    runner = CliRunner()
    assert runner.invoke(app, ["plot", str(tmp_path / "p.json"), "-o", str(tmp_path / "a.png")]).exit_code == 0
    args = ["plot", str(tmp_path / "p.json"), "--eval", str(tmp_path / "e.json"), "-o", str(tmp_path / "b.png")]
    assert runner.invoke(app, args).exit_code == 0
    assert png_size(tmp_path / "a.png") == pixels(PATTERN_SIZE)
    assert png_size(tmp_path / "b.png") == pixels(PATTERN_WITH_EVAL_SIZE)

    result = runner.invoke(app, ["plot", str(tmp_path / "e.json"), "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.output
    assert not (tmp_path / "c.png").exists()


def test_overlap_strategy_picks_the_dp_pattern_and_measures_it(glm_checkpoint, tmp_path):
    windows = windows_from_tensor(random_ids(2, 32))
    result = api.search(
        str(glm_checkpoint), None, 3, windows, tmp_path / "p.json", strategy="overlap", blocks=2, device="cpu"
    )

    loaded = load_model(str(glm_checkpoint), device="cpu")
    analysis, _ = analyze_windows(loaded, windows, 1, "auto")
    pattern = result["index_topk_pattern"]
    assert result["search"]["overlap"]["matrix"] == analysis.overlap
    assert result["search"]["overlap"]["matrix_sha256"] == matrix_sha256(analysis.overlap)
    assert pattern == best_pattern(analysis.overlap, 3, range(6), forced=[0, 3])
    assert pattern.count("F") == 3 and pattern[3] == "F" and result["trajectory"] == []
    assert result["search"]["layer_forwards"] == 2 * 2 * 6  # the all-F forward and the pattern's
    with torch.inference_mode(), index_sharing(loaded.model, loaded.arch) as sharing:
        scorer = PatternScorer(LayerwiseModel(loaded.model, loaded.arch), sharing, windows.input_ids)
        assert result["loss_final"] == pytest.approx(scorer.loss(pattern), rel=1e-12)
        assert result["loss_all_full"] == pytest.approx(scorer.loss("F" * 6), rel=1e-12)
    with pytest.raises(IndexCacheError, match="--resume continues a greedy search"):
        api.search(str(glm_checkpoint), None, 3, windows, tmp_path / "p.json", strategy="overlap", resume=True)
    # Its picture: what each layer keeps of its own top-k, read from the file's matrix.
    kept = [p.get_height() for p in pattern_figure(result).axes[1].patches]
    full = [i for i, c in enumerate(pattern) if c == "F"]
    assert kept == [1.0 if i in full else analysis.overlap[max(f for f in full if f < i)][i] for i in range(6)]


def test_search_eval_and_analyze_draw_from_the_command_line(glm_checkpoint, text_file, tmp_path):
    runner = CliRunner()
    data = ["--model", str(glm_checkpoint), "--dataset", str(text_file), "--num-samples", "2", "--seq-len", "48"]
    search = ["search", *data, "--strategy", "overlap", "--ratio", "0.5", "-o", str(tmp_path / "p.json")]
    assert runner.invoke(app, [*search, "--plot", str(tmp_path / "s.png")]).exit_code == 0
    assert png_size(tmp_path / "s.png") == pixels(PATTERN_SIZE)
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["search"]["strategy"] == "overlap" and saved["num_full"] == 3

    evaluate = ["eval", str(tmp_path / "p.json"), *data, "--json", str(tmp_path / "e.json")]
    assert runner.invoke(app, [*evaluate, "--plot", str(tmp_path / "e.png")]).exit_code == 0
    assert png_size(tmp_path / "e.png") == pixels(PATTERN_WITH_EVAL_SIZE)

    assert runner.invoke(app, ["analyze", *data, "-o", str(tmp_path / "an")]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "an").iterdir()) == ["analysis.json", "overlap.png"]

    refused = runner.invoke(app, ["analyze", *data[:-1], "8", "-o", str(tmp_path / "short")])
    assert refused.exit_code == 2 and "top-k" in refused.stderr and "Traceback" not in refused.output
    assert not (tmp_path / "short").exists()


def test_analyze_writes_json_and_a_heatmap_of_its_numbers(glm_checkpoint, tmp_path):
    result = analyze(tmp_path / "out", str(glm_checkpoint), windows_from_tensor(random_ids(2, 32)), device="cpu")

    on_disk = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert on_disk["overlap"] == result["overlap"] and len(on_disk["overlap"]) == 6
    assert png_size(tmp_path / "out" / "overlap.png") == pixels(OVERLAP_SIZE)
    fig = overlap_figure(on_disk)
    heat, bars = fig.axes[0], fig.axes[1]
    assert heat.images[0].get_array().tolist() == on_disk["overlap"]
    assert [t.get_text() for t in heat.get_yticklabels()] == [str(i) for i in range(6)]
    assert [b.get_height() for b in bars.patches] == on_disk["entropy_normalised"]
