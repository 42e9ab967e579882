"""Several processes over gloo give the one-process answer; a lost rank ends the run cleanly; resume on another
process count. Ranks are real processes forked as torchrun starts them (tests/ranks.py); torchrun itself runs in
tests/test_bench_distributed.py."""

from __future__ import annotations

import json
import runpy
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from indexcache.cli import app
from indexcache.distributed import World, balanced_shares
from indexcache.errors import IndexCacheError

from ranks import run_ranks

PROJECTION = Path(__file__).parents[1] / "scripts" / "project_node_time.py"
SIZES = "--num-samples 2 --seq-len 64 --ratio 0.5 --device cpu"


def search_args(checkpoint: Path, text_file: Path, *extra) -> list:
    return ["search", "--model", checkpoint, "--dataset", text_file, *SIZES.split(), *extra]


def one_process(*args) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def same_search(a: dict, b: dict) -> None:
    """The pattern and every recorded loss, bit for bit."""
    for key in ("index_topk_pattern", "loss_all_full", "loss_final", "trajectory"):
        assert a[key] == b[key], key


@pytest.fixture(scope="module")
def reference(glm_checkpoint, text_file, tmp_path_factory):
    """One-process searches (by strategy) and their eval and analysis: what every process count must give."""
    folder = tmp_path_factory.mktemp("one")
    found = {}
    for strategy in ("cached", "pruned"):
        one_process(*search_args(glm_checkpoint, text_file, "--strategy", strategy, "-o", folder / f"{strategy}.json"))
        found[strategy] = json.loads((folder / f"{strategy}.json").read_text())
    one_process("eval", folder / "cached.json", "--device", "cpu", "--json", folder / "eval.json")
    analyze = ["analyze", "--model", glm_checkpoint, "--dataset", text_file, *SIZES.split()[:4]]
    one_process(*analyze, "--device", "cpu", "-o", folder / "analysis")
    found["eval"] = json.loads((folder / "eval.json").read_text())["results"]
    found["analysis"] = json.loads((folder / "analysis" / "analysis.json").read_text())
    found["pattern_file"] = folder / "cached.json"
    found["analyze_args"] = analyze
    return found


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shares_cover_every_item_once_and_balance_the_cost(size):
    costs = [6, 5, 4, 3, 2, 1, 6]  # a cached step: later layers rerun fewer layers
    shares = balanced_shares(costs, size)
    assert sorted(i for share in shares for i in share) == list(range(len(costs)))
    loads = [sum(costs[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(costs)
    assert shares == balanced_shares(costs, size)


@pytest.mark.parametrize("strategy,size", [("cached", 3), ("pruned", 2)])
def test_several_processes_give_the_one_process_search(reference, glm_checkpoint, text_file, tmp_path, strategy, size):
    output = tmp_path / "pattern.json"
    ends = run_ranks(size, search_args(glm_checkpoint, text_file, "--strategy", strategy, "-o", output), tmp_path)
    assert [e.code for e in ends] == [0] * size, [e.stderr for e in ends]
    assert [bool(e.stdout) for e in ends] == [True] + [False] * (size - 1)  # only rank 0 speaks
    found = json.loads(output.read_text())
    same_search(found, reference[strategy])
    assert found["search"]["world_size"] == size
    assert found["search"]["layer_forwards"] > reference[strategy]["search"]["layer_forwards"]  # commits rerun
    if strategy == "cached":  # the count scripts/project_node_time.py projects node times from
        flipped = [step["flipped"] for step in found["trajectory"]]
        projected = runpy.run_path(str(PROJECTION))["cached_search_cost"](6, flipped, size)["forwards"]
        assert found["search"]["layer_forwards"] == projected * 2  # 2 windows


def test_three_processes_give_the_one_process_eval_and_analysis(reference, tmp_path):
    rows = tmp_path / "eval.json"
    ends = run_ranks(3, ["eval", reference["pattern_file"], "--device", "cpu", "--json", rows], tmp_path / "e")
    assert [e.code for e in ends] == [0, 0, 0], [e.stderr for e in ends]
    assert json.loads(rows.read_text())["results"] == reference["eval"]
    folder = tmp_path / "analysis"
    ends = run_ranks(3, [*reference["analyze_args"], "--device", "cpu", "-o", folder], tmp_path / "a")
    assert [e.code for e in ends] == [0, 0, 0], [e.stderr for e in ends]
    found = json.loads((folder / "analysis.json").read_text())
    for key in ("overlap", "entropy", "entropy_normalised", "positions", "loss_all_full", "layer_forwards"):
        assert found[key] == reference["analysis"][key], key
    assert found["world_size"] == 3


def lost_rank_ends_the_run_in_one_line(output: Path, args: list, logs: Path, signum: int, code: int) -> Path:
    """Rank 1 gets `signum` in step 2 and ends with `code`; rank 0 ends with one line, the state of step 1 kept."""
    main, stopped = run_ranks(2, args, logs, die=(1, 2, signum))
    assert stopped.code == code and "Traceback" not in stopped.stderr
    assert main.code == 2 and "Traceback" not in main.stderr
    assert main.lines()[-1].startswith("error: ") and "--resume" in main.lines()[-1]
    assert [line.startswith("error: ") for line in main.lines()].count(True) == 1
    state = output.with_name(output.name + ".state.json")
    assert sorted(p.name for p in output.parent.iterdir()) == [state.name]  # no pattern, no temp file
    assert len(json.loads(state.read_text())["state"]["trajectory"]) == 1
    return state


def test_a_killed_rank_ends_the_run_in_one_line_and_it_resumes_on_three(reference, glm_checkpoint, text_file, tmp_path):
    output = tmp_path / "out" / "pattern.json"
    args = search_args(glm_checkpoint, text_file, "-o", output)
    state = lost_rank_ends_the_run_in_one_line(output, args, tmp_path / "k", signal.SIGKILL, -signal.SIGKILL)
    ends = run_ranks(3, [*args, "--resume"], tmp_path / "r")
    assert [e.code for e in ends] == [0, 0, 0], [e.stderr for e in ends]
    same_search(json.loads(output.read_text()), reference["cached"])
    assert not state.exists()


def test_a_stopped_rank_exits_as_on_ctrl_c_and_rank_0_keeps_the_state(glm_checkpoint, text_file, tmp_path):
    """torchrun stops every rank with SIGTERM when one fails or on Ctrl-C: it acts as Ctrl-C (exit 130)."""
    output = tmp_path / "out" / "pattern.json"
    args = search_args(glm_checkpoint, text_file, "-o", output)
    lost_rank_ends_the_run_in_one_line(output, args, tmp_path / "t", signal.SIGTERM, 130)


def test_an_error_in_one_ranks_share_ends_every_rank_and_rank_0_names_it(glm_checkpoint, text_file, tmp_path):
    output = tmp_path / "pattern.json"
    ends = run_ranks(2, search_args(glm_checkpoint, text_file, "-o", output), tmp_path / "l", die=(1, 2, "bad batch"))
    assert [e.code for e in ends] == [2, 2]
    assert ends[0].lines()[-1] == "error: rank 1: bad batch"
    assert ends[1].lines() == [] and not output.exists()


def test_several_processes_on_one_node_refuse_one_shared_gpu_or_a_device_map():
    world = World(rank=1, size=2, local_rank=1, local_size=2)
    with pytest.raises(IndexCacheError, match="all 2 processes of this node on one GPU"):
        world.device("cuda:0")
    with pytest.raises(IndexCacheError, match="--nproc-per-node 1"):
        world.check_device_map("auto")
    assert world.device("cpu") == "cpu"
    World(rank=1, size=2, local_rank=0, local_size=1).check_device_map("auto")  # one process per node: a replica


@pytest.mark.parametrize("rank", [0, 1])
def test_distill_refuses_several_processes_in_one_line_from_rank_0(reference, tmp_path, monkeypatch, rank):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    args = ["distill", reference["pattern_file"], "--steps", 1, "-o", tmp_path / "d"]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 2 and not (tmp_path / "d").exists()
    expected = "error: distill trains in one process (one GPU, or several with --device-map auto); run it without "
    expected += "torchrun"
    assert [line for line in result.stderr.splitlines() if line.strip()] == ([expected] if rank == 0 else [])


PIPELINE = ("--pipeline-stages", "2")


@pytest.mark.parametrize("strategy,size", [("cached", 4), ("pruned", 2)], ids=["2x2-cached", "1x2-pruned"])
def test_pipelines_give_the_one_process_search_each_stage_holding_its_layers(
    reference, glm_checkpoint, text_file, tmp_path, strategy, size
):
    output = tmp_path / "pattern.json"
    args = search_args(glm_checkpoint, text_file, "--strategy", strategy, *PIPELINE, "-o", output)
    ends = run_ranks(size, args, tmp_path)
    assert [e.code for e in ends] == [0] * size, [e.stderr for e in ends]
    assert [bool(e.stdout) for e in ends] == [True] + [False] * (size - 1)  # only rank 0 speaks
    found = json.loads(output.read_text())
    same_search(found, reference[strategy])
    run = found["search"]
    assert (run["world_size"], run["decomposition"], run["stages"]) == (size, "pipeline", 2)
    # balanced by the search's work: later layers are rerun by more candidates, so the last stage gets fewer
    assert run["stage_bounds"] == [0, 4, 6]
    stages = [{"cpu": [0, 1, 2, 3]}, {"cpu": [4, 5]}]
    assert [(r["replica"], r["stage"], r["layers_on"]) for r in run["ranks"]] == [
        (rank // 2, rank % 2, stages[rank % 2]) for rank in range(size)
    ]


def test_a_two_stage_pipeline_gives_the_one_process_eval(reference, tmp_path):
    rows = tmp_path / "eval.json"
    args = ["eval", reference["pattern_file"], "--device", "cpu", *PIPELINE, "--json", rows]
    ends = run_ranks(2, args, tmp_path / "e")
    assert [e.code for e in ends] == [0, 0], [e.stderr for e in ends]
    assert json.loads(rows.read_text())["results"] == reference["eval"]


def test_a_killed_stage_ends_the_pipeline_in_one_line_and_it_resumes_in_one_process(
    reference, glm_checkpoint, text_file, tmp_path
):
    output = tmp_path / "out" / "pattern.json"
    args = search_args(glm_checkpoint, text_file, "-o", output)
    state = lost_rank_ends_the_run_in_one_line(
        output, [*args, *PIPELINE], tmp_path / "k", signal.SIGKILL, -signal.SIGKILL
    )
    one_process(*args, "--resume")
    same_search(json.loads(output.read_text()), reference["cached"])
    assert not state.exists()
