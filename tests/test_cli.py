"""The `indexcache` command line end to end on tiny CPU checkpoints.

A search → eval → apply round trip, pre-tokenised data, an interrupted search continued with --resume, and
every bad input: each must exit non-zero with one short `error:` line on stderr, no traceback, and nothing
left where the output would have gone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_tables import fits
from typer.testing import CliRunner

from indexcache import api
from indexcache.calib.data import fingerprint
from indexcache.cli.app import app
from indexcache.models import load_model
from indexcache.patterns.layout import full_layers, indexer_types
from indexcache.runtime.forward import LayerwiseModel
from indexcache.runtime.patch import index_sharing

from tiny_models import random_ids

NUM_LAYERS = 6  # the glm_checkpoint fixture
NUM_FULL = 3  # ceil(0.5 × 6)


def invoke(*args):
    """Run the CLI in-process; an exception that escapes the CLI fails the test instead of being swallowed."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def error_line(result, code: int = 2) -> str:
    """The one-line error message of a failed command, after checking that it failed cleanly."""
    assert "Traceback" not in result.output
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # Search may log a line or two before failing; the error itself is the last line and fits on it.
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert len(lines[-1]) < 300
    return lines[-1]


def listing(folder: Path) -> list[str]:
    """Every path under `folder`, hidden temp files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def search_args(checkpoint: Path, text_file: Path) -> list:
    sizes = "--num-samples 2 --seq-len 64 --ratio 0.5 --device cpu"
    return ["--model", checkpoint, "--dataset", text_file, *sizes.split()]


@dataclass
class Searched:
    path: Path
    data: dict
    stdout: str


@pytest.fixture(scope="module")
def searched(glm_checkpoint, text_file, tmp_path_factory) -> Searched:
    """One uninterrupted CLI search on the tiny GLM checkpoint: the reference for the tests below."""
    path = tmp_path_factory.mktemp("searched") / "pattern.json"
    result = invoke("search", *search_args(glm_checkpoint, text_file), "-o", path)
    assert result.exit_code == 0, result.output
    return Searched(path, json.loads(path.read_text()), result.stdout)


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_checkpoint_has_moe_layers(glm_checkpoint):
    """search, eval and apply below run on this checkpoint: its MoE layers go through all three."""
    loaded = load_model(str(glm_checkpoint), device="cpu")
    kinds = [type(layer.mlp).__name__ for layer in loaded.model.model.layers]
    assert kinds[:2] == ["GlmMoeDsaMLP"] * 2 and kinds[2:] == ["GlmMoeDsaMoE"] * (NUM_LAYERS - 2), kinds


def test_search_writes_a_complete_pattern_file(searched, glm_checkpoint, text_file):
    data = searched.data
    pattern = data["index_topk_pattern"]
    assert re.fullmatch(f"F[FS]{{{NUM_LAYERS - 1}}}", pattern)
    assert data["full_layers"] == full_layers(pattern) and len(data["full_layers"]) == NUM_FULL
    assert data["num_layers"] == NUM_LAYERS and data["ratio"] == 0.5 and data["seed"] == 0
    assert data["model"]["name"] == str(glm_checkpoint)
    assert data["model"]["model_type"] == "glm_moe_dsa"
    assert re.fullmatch(r"[0-9a-f]{64}", data["model"]["config_sha256"])
    assert data["calibration"]["dataset"] == str(text_file)
    assert data["calibration"]["num_samples"] == 2 and data["calibration"]["seq_len"] == 64
    assert re.fullmatch(r"[0-9a-f]{64}", data["calibration"]["fingerprint"])
    # no prefix tokens (the test tokenizer has no BOS): positions 0..62 predict; those from 8 on choose among > 8
    assert data["calibration"]["scored_positions"] == 2 * 63 and data["calibration"]["positions_over_topk"] == 2 * 55
    assert data["calibration"]["windows"] == "packed" and data["search"]["layers_on"] == {"cpu": list(range(6))}
    assert {"indexcache", "torch", "transformers"} <= data["versions"].keys()
    assert data["search"]["layer_forwards"] > 0

    # Every step records each candidate it tried (every F layer but layer 0) and commits the best one.
    steps = data["trajectory"]
    assert len(steps) == NUM_LAYERS - NUM_FULL
    previous = "F" * NUM_LAYERS
    for number, step in enumerate(steps, 1):
        assert step["step"] == number
        assert sorted(int(k) for k in step["candidates"]) == full_layers(previous)[1:]
        assert step["loss"] == min(step["candidates"].values()) == step["candidates"][str(step["flipped"])]
        assert step["pattern"] == previous[: step["flipped"]] + "S" + previous[step["flipped"] + 1 :]
        previous = step["pattern"]
    assert previous == pattern
    assert data["loss_final"] == steps[-1]["loss"]
    assert 0 < data["loss_all_full"] < 20

    assert pattern in searched.stdout and str(searched.path) in searched.stdout


def test_eval_compares_pattern_all_full_and_uniform(searched, tmp_path, monkeypatch):
    json_path = tmp_path / "eval.json"
    monkeypatch.setenv("COLUMNS", "80")  # what a pipe gets
    result = invoke("eval", searched.path, "--json", json_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert fits(result.stdout)

    rows = {row["name"]: row for row in json.loads(json_path.read_text())["results"]}
    assert rows.keys() == {"pattern", "all-F", "uniform"}
    assert rows["pattern"]["pattern"] == searched.data["index_topk_pattern"]
    assert rows["all-F"]["pattern"] == "F" * NUM_LAYERS
    assert rows["uniform"]["pattern"] == "FSFSFS"  # NUM_FULL evenly spaced layers
    for row in rows.values():
        assert 0 < row["loss"] < 20
        assert row["delta_vs_all_full"] == pytest.approx(row["loss"] - rows["all-F"]["loss"])
        assert row["name"] in result.stdout and row["pattern"] in result.stdout
    # The held-out windows follow the calibration windows, so their loss is not the calibration loss.
    assert rows["all-F"]["loss"] != pytest.approx(searched.data["loss_all_full"], abs=1e-9)


def test_eval_applies_num_samples_to_the_patterns_own_source(searched, tmp_path):
    json_path = tmp_path / "eval.json"
    result = invoke("eval", searched.path, "--num-samples", 3, "--seq-len", 64, "--json", json_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(json_path.read_text())["data"]
    assert data["num_samples"] == 3 and data["window_offset"] == 2 and data["seq_len"] == 64
    assert data["fingerprint"] != searched.data["calibration"]["fingerprint"]


def _patched_loss(checkpoint: Path, pattern: str, ids: torch.Tensor) -> float:
    """Mean next-token NLL of `ids` [B, S] under our F/S patch, on the layer-by-layer forward."""
    loaded = load_model(str(checkpoint), device="cpu")
    lw = LayerwiseModel(loaded.model, loaded.arch)
    with torch.inference_mode(), index_sharing(loaded.model, loaded.arch, pattern):
        hidden, inputs = lw.embed(ids)
        hidden = lw.run_layers(hidden, inputs, 0, lw.num_layers)
        return float(lw.nll_sum(hidden, ids).sum()) / ids[:, 1:].numel()


def test_applied_checkpoint_loads_in_stock_transformers(searched, glm_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    pattern = searched.data["index_topk_pattern"]
    applied = tmp_path / "applied"
    result = invoke("apply", searched.path, "--model", glm_checkpoint, "-o", applied)
    assert result.exit_code == 0, result.output
    assert json.loads((applied / "config.json").read_text())["index_topk_pattern"] == pattern
    assert listing(tmp_path) == sorted(["applied", *(f"applied/{p}" for p in listing(applied))])

    model = AutoModelForCausalLM.from_pretrained(applied, attn_implementation="eager").eval()
    assert model.config.indexer_types == indexer_types(pattern)
    for i, layer in enumerate(model.model.layers):
        assert (layer.self_attn.indexer is None) == (pattern[i] == "S"), i

    ids = random_ids(2, 64, seed=1)
    with torch.inference_mode():
        stock = float(model(input_ids=ids, labels=ids).loss)
    assert stock == pytest.approx(_patched_loss(glm_checkpoint, pattern, ids), rel=1e-5)
    # The pattern changes the loss, so the agreement above is not that of two all-F models.
    assert stock != pytest.approx(_patched_loss(glm_checkpoint, "F" * NUM_LAYERS, ids), rel=1e-5)


def test_apply_into_the_model_folder_links_only_model_files(searched, glm_checkpoint, tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text((glm_checkpoint / "config.json").read_text())
    (checkpoint / "model.safetensors").write_bytes((glm_checkpoint / "model.safetensors").read_bytes())
    result = invoke("apply", searched.path, "--model", checkpoint, "-o", checkpoint / "indexcache")
    assert result.exit_code == 0, result.output
    assert listing(checkpoint / "indexcache") == [
        "config.json",
        "indexcache_pattern.json",
        "model.safetensors",
    ]


def test_apply_onto_an_applied_folder_leaves_the_source_untouched(searched, glm_checkpoint, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert invoke("apply", searched.path, "--model", glm_checkpoint, "-o", first).exit_code == 0
    before = {name: (first / name).read_bytes() for name in ("config.json", "indexcache_pattern.json")}
    other = json.loads(searched.path.read_text())
    other["index_topk_pattern"] = "FFFFFS"
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))

    result = invoke("apply", other_path, "--model", first, "-o", second)
    assert result.exit_code == 0, result.output
    assert {name: (first / name).read_bytes() for name in before} == before  # not written through a link
    for name in before:
        assert not (second / name).is_symlink() and (second / name).stat().st_mode & 0o044 == 0o044, name
    assert json.loads((second / "indexcache_pattern.json").read_text())["index_topk_pattern"] == "FFFFFS"
    assert json.loads((second / "config.json").read_text())["index_topk_pattern"] == "FFFFFS"
    assert (second / "model.safetensors").resolve() == (glm_checkpoint / "model.safetensors").resolve()


def test_apply_refuses_F_layers_without_indexer_weights(searched, tmp_path):
    from transformers import GlmMoeDsaForCausalLM

    from tiny_models import glm_config

    shipped = tmp_path / "shipped"
    GlmMoeDsaForCausalLM(glm_config(index_topk_pattern="FFSSFS")).save_pretrained(shipped)  # S: no indexer
    edited = json.loads(searched.path.read_text())
    edited["index_topk_pattern"] = "FFFSFS"
    (tmp_path / "p.json").write_text(json.dumps(edited))
    message = error_line(invoke("apply", tmp_path / "p.json", "--model", shipped, "-o", tmp_path / "out"))
    assert "layers [2] F" in message and "no indexer weights" in message
    assert not (tmp_path / "out").exists()


def test_pretokenised_rows_are_used_as_is(glm_checkpoint, tmp_path):
    ids = random_ids(3, 48, seed=2)
    dataset = tmp_path / "ids.jsonl"
    dataset.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist()))
    output = tmp_path / "pattern.json"
    # --seq-len stays at its default: the rows' own length (48) is the window length.
    options = f"--num-samples 2 --num-full {NUM_LAYERS - 1} --device cpu"
    result = invoke("search", "--model", glm_checkpoint, "--dataset", dataset, *options.split(), "-o", output)
    assert result.exit_code == 0, result.output
    calibration = json.loads(output.read_text())["calibration"]
    assert calibration["fingerprint"] == fingerprint(ids[:2])
    assert calibration["seq_len"] == 48 and calibration["tokens_read"] == 2 * 48  # only the rows needed are read


# ---------------------------------------------------------------------------------------------- resume


def test_interrupted_search_resumes_to_the_same_pattern(searched, glm_checkpoint, text_file, tmp_path, monkeypatch):
    args = search_args(glm_checkpoint, text_file)
    output = tmp_path / "pattern.json"
    state = api.search_state_path(output)
    write_json = api.write_json

    def interrupt_after_saving_state(path, obj):
        write_json(path, obj)
        if Path(path) == state:
            raise KeyboardInterrupt

    monkeypatch.setattr(api, "write_json", interrupt_after_saving_state)
    message = error_line(invoke("search", *args, "-o", output), code=130)
    assert "--resume" in message
    assert not output.exists()
    assert len(json.loads(state.read_text())["state"]["trajectory"]) == 1
    monkeypatch.undo()

    changed = error_line(invoke("search", *args, "--seed", 1, "-o", output, "--resume"))
    assert "differs in data_fingerprint" in changed

    pruned = error_line(invoke("search", *args, "--prune-keep", 0.3, "-o", output, "--resume"))
    assert "differs in prune_keep" in pruned

    result = invoke("search", *args, "-o", output, "--resume")
    assert result.exit_code == 0, result.output
    resumed = json.loads(output.read_text())
    assert resumed["index_topk_pattern"] == searched.data["index_topk_pattern"]
    assert resumed["trajectory"] == searched.data["trajectory"]
    assert resumed["loss_all_full"] == searched.data["loss_all_full"]
    assert not state.exists()


# ---------------------------------------------------------------------------------------------- bad inputs


@dataclass
class Paths:
    """Inputs for the bad-input cases and the command lines that use them; `out` is where commands write."""

    glm: Path
    text: Path
    llama: Path
    pattern: Path
    tmp: Path
    out: Path

    def pattern_file(self, text: str) -> Path:
        path = self.tmp / "edited.json"
        path.write_text(text)
        return path

    def edited(self, **changes) -> Path:
        data = json.loads(self.pattern.read_text())
        for key, value in changes.items():
            if key.startswith("model_"):
                data["model"][key[len("model_") :]] = value
            else:
                data[key] = value
        return self.pattern_file(json.dumps(data))

    def minimal(self) -> Path:
        data = json.loads(self.pattern.read_text())
        keep = ("schema_version", "index_topk_pattern", "num_layers", "model")
        return self.pattern_file(json.dumps({k: data[k] for k in keep}))

    def little_text(self) -> Path:
        path = self.tmp / "little.jsonl"
        path.write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n")
        return path

    def in_out(self, name: str, text: str) -> Paths:
        """A file already in `out` before the command runs (it must be there, unchanged, after)."""
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return self

    def folder(self, name: str, config: str | None = None) -> Path:
        path = self.tmp / name
        path.mkdir()
        if config is not None:
            (path / "config.json").write_text(config)
        return path

    def broken_tokenizer(self) -> Path:
        """The test checkpoint with a corrupt tokenizer.json beside its config and weights."""
        path = self.folder("broken-tokenizer")
        for name in ("config.json", "model.safetensors"):
            (path / name).symlink_to(self.glm / name)
        (path / "tokenizer.json").write_text("{")
        return path

    def search(self, *extra) -> list:
        return ["search", *search_args(self.glm, self.text), "-o", self.out / "p.json", *extra]

    def eval(self, pattern: Path, *extra) -> list:
        options = ["--model", self.glm, "--device", "cpu", "--json", self.out / "e.json"]
        return ["eval", pattern, *options, *extra]

    def apply(self, pattern: Path, model: Path | None = None) -> list:
        return ["apply", pattern, "--model", model or self.glm, "-o", self.out / "applied"]


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def paths(searched, glm_checkpoint, text_file, llama_checkpoint, tmp_path) -> Paths:
    (tmp_path / "out").mkdir()
    return Paths(glm_checkpoint, text_file, llama_checkpoint, searched.path, tmp_path, tmp_path / "out")


SUPPORTED = ("glm_moe_dsa", "deepseek_v32", "mistral_large4", "hy_v4")
TOO_LITTLE = re.compile(r"has \d+ tokens but 128 are needed")

SEARCH_CASES = [
    pytest.param(lambda p: p.search("--model", p.tmp / "nope"), ["does not exist"], id="missing-model"),
    pytest.param(lambda p: p.search("--model", p.llama), ["llama", *SUPPORTED], id="non-dsa-model"),
    pytest.param(lambda p: p.search("--ratio", 0), ["--ratio", "(0, 1]"], id="ratio-0"),
    pytest.param(lambda p: p.search("--ratio", 1.5), ["--ratio 1.5", "(0, 1]"], id="ratio-1.5"),
    pytest.param(lambda p: p.search("--ratio", -0.1), ["--ratio -0.1", "(0, 1]"], id="ratio-negative"),
    pytest.param(lambda p: p.search("--dataset", p.little_text()), [TOO_LITTLE], id="too-little-text"),
    pytest.param(lambda p: p.search("--dataset", p.tmp / "nope.jsonl"), ["does not exist"], id="missing-dataset"),
    pytest.param(lambda p: p.search("--resume"), ["--resume", "no saved search"], id="resume-without-state"),
    pytest.param(
        lambda p: p.in_out("p.json.state.json", "{").search("--resume"),
        ["not a saved search"],
        id="resume-corrupt-state",
    ),
    pytest.param(lambda p: p.search("-o", p.out), ["is a folder"], id="output-is-a-folder"),
    pytest.param(lambda p: p.search("--num-samples", 0), ["--num-samples"], id="num-samples-0"),
    pytest.param(lambda p: p.search("--batch-size", 0), ["--batch-size"], id="batch-size-0"),
    pytest.param(lambda p: p.search("--blocks", 0), ["--blocks"], id="blocks-0"),
    pytest.param(lambda p: p.search("--strategy", "fast"), ["--strategy", "naive"], id="unknown-strategy"),
    pytest.param(lambda p: p.search("--cache", "big"), ["--cache", "every:K"], id="unknown-cache"),
    pytest.param(
        lambda p: p.search("--seq-len", 8),
        ["windows of 8 tokens are not longer than the model's index_topk (8)", "--seq-len 512"],
        id="window-not-longer-than-topk",
    ),
    pytest.param(lambda p: p.search("--windows", "chapter"), ["--windows chapter", "document"], id="unknown-windows"),
    pytest.param(
        lambda p: p.search("--model", p.broken_tokenizer()),
        ["could not load the tokenizer from", "broken-tokenizer"],
        id="broken-tokenizer",
    ),
    pytest.param(lambda p: p.search("--max-memory", "lots"), ["--max-memory", "0=20GiB"], id="bad-max-memory"),
]

# Broken pattern files, each refused by eval and by apply alike.
PATTERN_CASES = [
    pytest.param(lambda p: p.tmp / "nope.json", ["does not exist"], id="missing"),
    pytest.param(lambda p: p.pattern_file("{not json"), ["not valid JSON"], id="not-json"),
    pytest.param(lambda p: p.pattern_file("{}"), ["lacks", "index_topk_pattern"], id="no-fields"),
    pytest.param(lambda p: p.pattern_file("[1, 2]"), ["lacks"], id="not-an-object"),
    pytest.param(lambda p: p.edited(index_topk_pattern="FSXSFS"), ["'FSXSFS'", "F/S"], id="wrong-letters"),
    pytest.param(lambda p: p.edited(index_topk_pattern="SFFSFS"), ["starts with S"], id="starts-with-S"),
    pytest.param(lambda p: p.edited(num_layers="6"), ["num_layers"], id="num-layers-not-int"),
    pytest.param(lambda p: p.edited(model="glm"), ["'model'"], id="model-not-object"),
    pytest.param(lambda p: p.edited(index_topk_pattern="FSFS", num_layers=4), ["4 layers", "has 6"], id="fewer-layers"),
    pytest.param(
        lambda p: p.edited(model_model_type="deepseek_v32"),
        ["deepseek_v32", "glm_moe_dsa"],
        id="other-model-type",
    ),
]

EVAL_CASES = [
    pytest.param(lambda p: p.eval(p.pattern, "--model", p.llama), ["llama", *SUPPORTED], id="non-dsa-model"),
    pytest.param(lambda p: p.eval(p.pattern, "--model", p.tmp / "nope"), ["does not exist"], id="missing-model"),
    pytest.param(lambda p: p.eval(p.minimal()), ["no calibration data", "--dataset"], id="no-calibration-record"),
    pytest.param(
        lambda p: p.eval(p.pattern, "--dataset", p.little_text(), "--num-samples", 2, "--seq-len", 64),
        [TOO_LITTLE],
        id="too-little-text",
    ),
    pytest.param(
        lambda p: p.eval(p.pattern, "--dataset", p.tmp / "nope.jsonl"),
        ["does not exist"],
        id="missing-dataset",
    ),
    pytest.param(lambda p: p.eval(p.pattern, "--batch-size", 0), ["--batch-size"], id="batch-size-0"),
    pytest.param(
        lambda p: p.eval(p.pattern, "--seq-len", 32),
        ["--seq-len 32 differs from the calibration's 64", "--dataset"],
        id="held-out-other-seq-len",
    ),
    pytest.param(
        lambda p: p.eval(p.pattern, "--seed", 3),
        ["--seed 3 differs from the calibration's 0"],
        id="held-out-other-seed",
    ),
]

APPLY_CASES = [
    pytest.param(lambda p: p.apply(p.pattern, p.llama), ["llama", *SUPPORTED], id="non-dsa-model"),
    pytest.param(lambda p: p.apply(p.pattern, p.tmp / "nope"), ["no config.json"], id="missing-model"),
    pytest.param(lambda p: p.apply(p.pattern, p.folder("broken", "{")), ["not valid JSON"], id="corrupt-config"),
    pytest.param(lambda p: p.in_out("applied/weights", "").apply(p.pattern), ["already exists"], id="existing-output"),
]


def _check_refused(paths: Paths, build, fragments) -> None:
    argv = build(paths)
    before = listing(paths.out)
    message = error_line(invoke(*argv))
    for fragment in fragments:
        assert fragment.search(message) if isinstance(fragment, re.Pattern) else fragment in message, message
    assert listing(paths.out) == before


@pytest.mark.parametrize(("build", "fragments"), SEARCH_CASES)
def test_search_refuses(paths, build, fragments):
    _check_refused(paths, build, fragments)


@pytest.mark.parametrize(("build", "fragments"), EVAL_CASES)
def test_eval_refuses(paths, build, fragments):
    _check_refused(paths, build, fragments)


@pytest.mark.parametrize(("build", "fragments"), APPLY_CASES)
def test_apply_refuses(paths, build, fragments):
    _check_refused(paths, build, fragments)


@pytest.mark.parametrize("command", ["eval", "apply"])
@pytest.mark.parametrize(("build", "fragments"), PATTERN_CASES)
def test_broken_pattern_file_is_refused(paths, command, build, fragments):
    _check_refused(paths, lambda p: getattr(p, command)(build(p)), fragments)


@pytest.mark.parametrize("command", ["search", "eval"])
@pytest.mark.parametrize(
    ("exception", "code", "fragments"),
    [
        pytest.param(
            torch.cuda.OutOfMemoryError("CUDA out of memory"),
            2,
            ["CUDA out of memory", "--cache host", "--seq-len", "--batch-size"],
            id="cuda-oom",
        ),
        pytest.param(KeyboardInterrupt(), 130, ["interrupted"], id="ctrl-c"),
    ],
)
def test_failure_inside_the_run_is_one_line(paths, command, exception, code, fragments, monkeypatch):
    def fail(*args, **kwargs):
        raise exception

    # Inside the search or evaluation proper, after the model has loaded and before any step finished.
    monkeypatch.setattr(LayerwiseModel, "run_layers", fail)
    argv = paths.search() if command == "search" else paths.eval(paths.pattern)
    message = error_line(invoke(*argv), code)
    assert all(fragment in message for fragment in fragments), message
    assert "--resume" not in message  # no step was saved, so there is nothing to resume
    assert listing(paths.out) == []
