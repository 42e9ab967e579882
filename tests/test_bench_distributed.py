"""scripts/bench_distributed.py in CPU mode: `torchrun --nproc-per-node 2 -m indexcache search` on the CPU (gloo)
against today's plain single process, through the script that measures it on GPUs."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_distributed.py"


def test_two_torchrun_processes_give_the_one_process_search(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--processes", "2", "--layers", "4", "--windows", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    report = json.loads(out.read_text())
    assert report["same_pattern"] and report["same_trajectory"]
    assert report["max_rel_loss_diff"] == 0.0  # bit-identical on the CPU
    one, two = report["runs"]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["ranks"] is None
    assert [r["layers_on"] for r in two["ranks"]] == [{"cpu": [0, 1, 2, 3]}] * 2
    assert two["layer_forwards"] > one["layer_forwards"]  # the rank without the winner reruns each commit
    assert report["speedup_search"] == round(one["search_s"] / two["search_s"], 3)
    assert one["useful_layer_forwards_per_s"] == round(one["layer_forwards"] / one["search_s"], 1)
    assert report["processes"] == 2 and report["model"]["layers"] == 4 and report["date"]
