"""The README quick start: `indexcache search` and `indexcache eval` on the embedded model and sample, no options."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from indexcache.cli.app import app


def test_default_search_and_eval_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    searched = runner.invoke(app, ["search"])
    assert searched.exit_code == 0, searched.output
    result = json.loads((tmp_path / "pattern.json").read_text())
    assert result["model"]["name"] == "embedded:glm-dsa-tiny"
    assert result["num_layers"] == 16 and result["num_full"] == 4  # ceil(0.25 × 16)
    assert result["index_topk_pattern"][0] == "F" and len(result["trajectory"]) == 12
    assert result["search"]["strategy"] == "cached"

    evaluated = runner.invoke(app, ["eval", "pattern.json", "--json", "eval.json"])
    assert evaluated.exit_code == 0, evaluated.output
    rows = {r["name"]: r for r in json.loads((tmp_path / "eval.json").read_text())["results"]}
    assert set(rows) == {"pattern", "all-F", "uniform"}
    assert rows["pattern"]["pattern"] == result["index_topk_pattern"]
    assert all(2.0 < r["loss"] < 6.0 for r in rows.values())  # a trained model, not a broken one
