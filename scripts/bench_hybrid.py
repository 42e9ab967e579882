"""GLM-5.3-Flash (`glm5_next`) and Qwen4-Exp (`qwen4_exp`) on a GPU, at their released shapes, in one call:

1. the pooled Triton indexer path (`runtime/pooled.py`) against its references on fresh random inputs: glm5_next's
   stock indexer (token sets) and Qwen's vectorised QSA reference (token sets), plus the pool-level selection
   check of `kernels/testing.py` against the scores of `index_scores_reference` (ratio);
2. the F-layer selection time at each context: the kernel path, and the reference it replaces (glm5_next: the stock
   indexer, where it fits in memory; qwen4_exp: our vectorised reference; the stock QSA loop is not timed, it runs a
   Python loop per query);
3. `indexcache bench` (its command function `run_bench`, what the CLI calls) per family and context: all-F vs the
   uniform 1/4 pattern.

Shapes: `Glm5NextConfig()`; `Qwen4ExpConfig()` with the QSA fields, which its defaults leave unset, set to the
values in `QWEN_QSA` (our choice, recorded in the output). Usage, on the GPU machine:

    python scripts/bench_hybrid.py --out $OUT/bench_hybrid.json

`--budget-s` stops starting new measurements after that many seconds (the rest are recorded as skipped).
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import torch

from indexcache.atomic import write_json
from indexcache.kernels.indexer import index_scores_reference, lightning_indexer_topk
from indexcache.kernels.testing import selection_report
from indexcache.patterns import file as pattern_file
from indexcache.runtime.pooled import kpool_kernel, kpool_projections, qsa_kernel, qsa_projections, qsa_reference

# Qwen4ExpTextConfig leaves QSA unset; the indexer head must hold the default RoPE's 256 rotary dims.
QWEN_QSA = dict(
    indexer_n_heads=16, indexer_kv_heads=1, indexer_head_dim=256, indexer_budget=2048, indexer_compress_ratio=16
)


def configs():
    from transformers import Glm5NextConfig, Qwen4ExpConfig

    return {"glm5_next": Glm5NextConfig(), "qwen4_exp": Qwen4ExpConfig(text_config=QWEN_QSA)}


class Indexer:
    """One family's layer-3 indexer with random weights, its stock inputs at a context, and its two paths."""

    def __init__(self, family: str, config, device: torch.device):
        from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextIndexer
        from transformers.models.qwen4_exp.modeling_qwen4_exp import (
            Qwen4ExpTextQSAIndexer,
            Qwen4ExpTextRotaryEmbedding,
        )

        self.family, self.text, self.device = family, config.get_text_config(), device
        torch.manual_seed(0)
        with torch.device(device):
            if family == "glm5_next":
                self.module = Glm5NextTextIndexer(self.text, 3)
                with torch.no_grad():  # the stock init leaves the pooling at a plain mean
                    self.module.index_kpool_compress_ape.normal_(0, 1)
                    self.module.index_kpool_compress_gate.normal_(0, 0.02)
            else:
                self.module = Qwen4ExpTextQSAIndexer(self.text, 3)
                self.rotary = Qwen4ExpTextRotaryEmbedding(self.text)
        self.module.to(torch.bfloat16).eval()

    def inputs(self, seq_len: int, seed: int) -> dict:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        hidden = torch.randn(1, seq_len, self.text.hidden_size, generator=gen, device=self.device, dtype=torch.bfloat16)
        if self.family == "glm5_next":
            q_resid = torch.randn(1, seq_len, self.text.q_lora_rank, generator=gen, device=self.device)
            valid = torch.ones(1, seq_len, dtype=torch.bool, device=self.device)
            return dict(hidden_states=hidden, q_resid=q_resid.bfloat16(), attention_mask=valid, cache=None)
        positions = torch.arange(seq_len, device=self.device)[None, None].expand(3, 1, -1)
        return dict(hidden_states=hidden, position_embeddings=self.rotary(hidden, positions))

    def kernel(self, args: dict) -> torch.Tensor:
        return (kpool_kernel if self.family == "glm5_next" else qsa_kernel)(self.module, **args)

    def reference(self, args: dict) -> torch.Tensor:
        if self.family == "glm5_next":
            return self.module(**args)
        return qsa_reference(self.module, **args)

    def pool_check(self, args: dict) -> dict:
        """The kernel's pool picks against the exact top pools of the reference pool scores."""
        project = kpool_projections if self.family == "glm5_next" else qsa_projections
        q, keys, weights, scale, pool = project(self.module, **args)
        kept = self.text.index_topk // pool if self.family == "glm5_next" else self.module.block_topk
        picks = lightning_indexer_topk(q, keys, weights, kept, scale, q_offset=0, ratio=pool)
        scores = index_scores_reference(q, keys, weights, scale, q_offset=0, ratio=pool)
        return selection_report(picks, scores, kept)


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")


def same_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.sort(-1).values == b.sort(-1).values).all(-1).float().mean().item()


def cli_bench(config, context: int, layers: int, reps: int) -> dict:
    """`indexcache bench` (its command function, in this process) on a folder holding only the released config:
    all-F vs the uniform 1/4 pattern."""
    from indexcache.cli.bench import run_bench

    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        rows = Path(folder) / "rows.json"
        run_bench(None, folder, str(context), layers, 0.25, False, "auto", "auto", "auto", reps, rows)
        return json.loads(rows.read_text())


@torch.inference_mode()
def measure_indexer(indexer: Indexer, contexts, check_len: int, report: dict, within_budget, attempt) -> None:
    """The kernel path's selection against the references at `check_len`, then both timed at each context."""
    family = indexer.family
    check_args = indexer.inputs(check_len, seed=1)
    report["check"][family] = {
        "seq_len": check_len,
        "identical_token_rows": same_rows(indexer.kernel(check_args), indexer.reference(check_args)),
        "pools": indexer.pool_check(check_args),
    }
    times = report["indexer_ms"].setdefault(family, {})
    for seq_len in contexts:
        if not within_budget(f"{family} indexer at {seq_len}", times, seq_len):
            continue
        timed = indexer.inputs(seq_len, seed=seq_len)
        row = times.setdefault(seq_len, {})
        attempt(row, "kernel", lambda: median_ms(lambda: indexer.kernel(timed)))  # noqa: B023 - called at once
        if family == "glm5_next" and seq_len > 32768:  # its [S, H, pools] fp32 scores: 128 GiB at 128K
            row["reference"] = {"skipped": "the stock indexer's [S, H, S/16] fp32 scores exceed memory"}
        else:
            attempt(row, "reference", lambda: median_ms(lambda: indexer.reference(timed)))  # noqa: B023


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--check-len", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2, help="indexer layers built by indexcache bench (K)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=1e9)
    args = parser.parse_args()
    start = time.monotonic()
    device = torch.device("cuda")
    contexts = [int(c) for c in args.contexts.split(",")]
    report = {
        "script": "scripts/bench_hybrid.py",
        "device": torch.cuda.get_device_name(device),
        "date": datetime.date.today().isoformat(),
        "qwen4_exp_qsa": QWEN_QSA,
        "versions": pattern_file.library_versions(),
        "check": {},
        "indexer_ms": {},
        "bench": {},
    }

    def within_budget(what: str, into: dict, key) -> bool:
        if time.monotonic() - start < args.budget_s:
            return True
        into[key] = {"skipped": f"time budget of {args.budget_s:.0f} s spent before {what}"}
        return False

    def attempt(into: dict, key, fn) -> None:
        try:
            into[key] = fn()
        except Exception as exc:  # recorded, so that one failure keeps the other measurements
            into[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        torch.cuda.empty_cache()

    for family, config in configs().items():
        measure_indexer(Indexer(family, config, device), contexts, args.check_len, report, within_budget, attempt)
        torch.cuda.empty_cache()

    # Cheapest first, so a spent budget skips the largest: glm5_next's attention turns the indices into an S×S mask.
    largest_last = lambda cf: (cf[1] == "glm5_next" and cf[0] > min(contexts), cf[0], cf[1] == "glm5_next")  # noqa: E731
    for seq_len, family in sorted(((c, f) for f in configs() for c in contexts), key=largest_last):
        runs = report["bench"].setdefault(family, {})
        if within_budget(f"{family} bench at {seq_len}", runs, seq_len):
            attempt(runs, seq_len, lambda: cli_bench(configs()[family], seq_len, args.layers, args.reps))  # noqa: B023

    report["seconds"] = time.monotonic() - start
    write_json(args.out, report)
    print(f"{'family':10} {'check':28} " + " ".join(f"{c:>22}" for c in contexts))
    for family in report["check"]:
        check = report["check"][family]
        ok = f"rows {check['identical_token_rows']:.4f} gap {check['pools']['worst_pick_gap']:.1e}"
        cells = []
        for c in contexts:
            row = report["indexer_ms"][family].get(c, {})
            cells.append(
                "/".join(f"{v:.1f}" if isinstance(v, float) else "-" for v in (row.get("kernel"), row.get("reference")))
            )
        print(f"{family:10} {ok:28} " + " ".join(f"{cell:>22}" for cell in cells) + "   (indexer ms kernel/reference)")
    for family, runs in report["bench"].items():
        for c, run in runs.items():
            if "rows" not in run:
                print(f"bench {family} {c}: {run}")
                continue
            for r in run["rows"]:
                print(
                    f"bench {family} {c:>7} {r['name']:8} {r['num_full']:>2}/{r['num_layers']} {r['backend']:9} "
                    f"{r['ms_per_layer']:9.2f} ms/layer  {r['speedup_vs_all_f']:.2f}x  peak {r['peak_gib']:.1f} GiB"
                )
    print(f"total {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
