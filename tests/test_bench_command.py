"""`indexcache bench` on the CPU: bad options are one line each, and a tiny reference-path smoke run writes rows
with the documented structure (timings on a CPU mean nothing; the rows' shape and arithmetic do)."""

from __future__ import annotations

import json

import pytest
import torch
from test_tables import fits
from typer.testing import CliRunner

from indexcache.cli.app import app
from indexcache.patterns.file import SCHEMA_VERSION
from indexcache.patterns.layout import full_layers, uniform


def invoke(*args):
    return CliRunner().invoke(app, ["bench", *[str(a) for a in args]], catch_exceptions=False)


def one_error_line(result) -> str:
    assert "Traceback" not in result.output
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--context", "32k"], "comma-separated"),
        (["--context", "1"], "at least 2 tokens"),
        (["--layers", "1"], "--layers 1"),
        (["--reps", "0"], "--reps 0"),
        (["--ratio", "0", "--device", "cpu"], "--ratio 0"),
        (["--model", "/no/such/ckpt"], "does not exist"),
        (["--kernels", "fast", "--device", "cpu", "--context", "16"], "--kernels fast"),
        (["--decode", "--batch", "0"], "--batch 0"),
        (["--decode", "--batch", "one"], "batch sizes"),
        (["--weights", "--dense-mlp"], "--dense-mlp"),
    ],
)
def test_bad_options_are_one_line(args, message, tmp_path):
    line = one_error_line(invoke(*args, "--json", tmp_path / "rows.json"))
    assert message in line
    assert not (tmp_path / "rows.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message")
def test_without_cuda_it_says_so():
    assert "no CUDA GPU" in one_error_line(invoke("--context", "16"))


def test_pattern_for_another_depth_is_refused(tmp_path, glm_checkpoint):
    pattern = tmp_path / "p.json"
    pattern.write_text(
        json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "index_topk_pattern": "FSF",
                "num_layers": 3,
                "model": {"model_type": "glm_moe_dsa", "name": "x"},
            }
        )
    )
    assert "3 layers" in one_error_line(invoke(pattern, "--model", glm_checkpoint, "--device", "cpu"))


def test_smoke_rows_on_the_reference_path(tmp_path, glm_checkpoint, monkeypatch):
    """6-layer checkpoint, 3 layers timed: F and S costs measured and combined per pattern; the table in a pipe."""
    out = tmp_path / "rows.json"
    monkeypatch.setenv("COLUMNS", "80")
    result = invoke(
        "--model", glm_checkpoint, "--device", "cpu", "--context", "24,32", "--layers", "3", "--reps", "1",
        "--ratio", "0.5", "--json", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["layers_timed"] == 3 and report["weights"] == "random, MoE" and report["device"] == "cpu"
    rows = report["rows"]
    assert [(r["context"], r["name"]) for r in rows] == [(c, n) for c in (24, 32) for n in ("all-F", "uniform")]
    for r in rows:
        assert r["backend"] == "reference" and r["num_layers"] == 6 and r["layers_timed"] == 3
        assert r["phase"] == "prefill" and r["mlp"] == "moe"
        assert r["num_full"] == len(full_layers(r["pattern"]))
        assert r["ms_per_layer"] > 0 and r["projected_prefill_s"] == pytest.approx(r["ms_per_layer"] * 6 / 1e3)
        assert r["tokens_per_s"] == pytest.approx(r["context"] / r["projected_prefill_s"])
        assert set(r["split_ms_per_layer"]) == {"indexer", "attention", "rest"}
        assert sum(r["split_ms_per_layer"].values()) == pytest.approx(r["ms_per_layer"])
    assert rows[1]["pattern"] == uniform(6, 3)
    assert fits(result.stdout)
    for r in rows:
        for cell in (
            f"{r['context']:,}",
            r["name"],
            f"{r['speedup_vs_all_f']:.2f}×",
            f"{r['projected_prefill_s']:.2f} s",
        ):
            assert cell in result.stdout
    assert rows[0]["speedup_vs_all_f"] == 1.0
    assert rows[1]["speedup_vs_all_f"] == pytest.approx(rows[0]["projected_prefill_s"] / rows[1]["projected_prefill_s"])


def test_decode_smoke_rows(tmp_path, glm_checkpoint):
    """--decode on the reference path: rows per (context, batch, pattern), projected per-token time from t_F and t_S,
    and the KV cache of S layers without indexer keys."""
    from transformers import AutoConfig

    out = tmp_path / "decode.json"
    result = invoke(
        "--model", glm_checkpoint, "--device", "cpu", "--decode", "--context", "40", "--batch", "1,2", "--layers",
        "2", "--reps", "1", "--ratio", "0.5", "--dense-mlp", "--json", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["phase"] == "decode" and report["weights"] == "random, dense MLP"
    rows = report["rows"]
    assert [(r["batch"], r["name"]) for r in rows] == [(b, n) for b in (1, 2) for n in ("all-F", "uniform")]
    config = AutoConfig.from_pretrained(glm_checkpoint)
    latent = (config.kv_lora_rank + config.qk_rope_head_dim) * 4  # fp32 on the CPU
    for r in rows:
        assert r["phase"] == "decode" and r["mlp"] == "dense" and r["backend"] == "reference" and r["context"] == 40
        n_full = r["num_full"]
        assert r["projected_ms_per_token"] == pytest.approx(n_full * r["f_layer_ms"] + (6 - n_full) * r["s_layer_ms"])
        assert r["ms_per_layer"] == pytest.approx(r["projected_ms_per_token"] / 6)
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / (r["projected_ms_per_token"] / 1e3))
        want_bytes = 40 * (6 * latent + n_full * config.index_head_dim * 4)
        assert r["kv_cache_bytes_per_sequence"] == want_bytes
    assert rows[1]["kv_cache_bytes_per_sequence"] < rows[0]["kv_cache_bytes_per_sequence"]
    assert "decode step per layer" in result.output
