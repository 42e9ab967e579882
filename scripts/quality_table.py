"""Quality table: held-out loss of all-F, greedy, overlap (one-forward DP), uniform and random patterns at several
retention ratios, the greedy and uniform patterns after `indexcache distill`, and the top-k overlap between adjacent
layers (the statistic behind IndexCache).

    python scripts/quality_table.py            # the shipped tiny model and calibration sample, on CPU
    python scripts/quality_table.py ... --only-overlap   # add only the overlap rows to the committed table
    python scripts/quality_table.py ... --distill-only   # redo only the distillation rows of the committed table

The greedy and overlap patterns are searched on the calibration windows; every pattern is then scored on held-out
windows that follow them in the same seeded order (disjoint). Distillation trains on the tiny corpus's train split
(documents disjoint from the calibration split the other windows come from; see `train_split_file`) with the
multi-layer objective, and at one ratio each for greedy and uniform with the single-layer objective too.
Writes scripts/results/quality_table.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch

from indexcache import api
from indexcache.analyze import analyze_windows
from indexcache.calib import DataSpec, Windows, make_windows
from indexcache.distill.train import distill
from indexcache.models import load_model
from indexcache.patterns.file import library_versions
from indexcache.patterns.layout import num_full_for_ratio, random_pattern, uniform
from indexcache.runtime.forward import LayerwiseModel
from indexcache.runtime.patch import index_sharing, reference_indexer
from indexcache.search.overlap import best_pattern, retained_overlap
from indexcache.search.scoring import PatternScorer

RESULTS = Path(__file__).parent / "results"
MANIFEST = Path(__file__).parent / "data" / "tiny_corpus_manifest.json"
DEBIAN_STDLIB = Path("/usr/lib/python3.11")


@torch.no_grad()
def adjacent_overlap(lw: LayerwiseModel, arch, windows: torch.Tensor, topk: int) -> list[float]:
    """Mean |top-k(l) ∩ top-k(l+1)| / k over queries that have more than k earlier tokens, all layers F."""
    selected: dict[int, list[torch.Tensor]] = {}

    def recording(indexer, *args):
        out = reference_indexer(indexer, *args)
        selected.setdefault(indexer.layer_idx, []).append(out)
        return out

    with index_sharing(lw.model, arch, None, recording):
        for ids in windows.split(1):
            hidden, inputs = lw.embed(ids)
            lw.run_layers(hidden, inputs, 0, lw.num_layers)
    overlaps = []
    for layer in range(lw.num_layers - 1):
        a = torch.cat(selected[layer])[:, topk:]  # [W, S - k, k]: queries past the first k see a real choice
        b = torch.cat(selected[layer + 1])[:, topk:]
        hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean()
        overlaps.append(round(hits.item(), 4))
    return overlaps


def overlap_patterns(loaded, calib: Windows, ratios: list[float]) -> tuple[dict[float, str], list]:
    """The `overlap` strategy's pattern at each ratio, from one all-F forward over the calibration windows.

    The same DP over the same matrix as `search --strategy overlap` (which adds one forward per ratio to measure
    the pattern's calibration loss; the table needs only held-out losses). Returns patterns by ratio and the matrix.
    """
    analysis, _ = analyze_windows(loaded, calib, 1, "reference")
    n = loaded.num_layers
    patterns = {r: best_pattern(analysis.overlap, num_full_for_ratio(r, n), loaded.indexer_layers) for r in ratios}
    print(f"overlap patterns: {patterns}", flush=True)
    return patterns, analysis.overlap


def overlap_row(scorer: PatternScorer, ratio: float, pattern: str, matrix: list, indexer_layers: list[int]) -> dict:
    """Held-out loss of the overlap pattern, and the calibration top-k overlap it keeps (the DP's objective)."""
    return {
        "ratio": ratio,
        "kind": "overlap",
        "pattern": pattern,
        "loss": scorer.loss(pattern),
        "retained_overlap": retained_overlap(pattern, matrix, indexer_layers),
    }


def retained_overlap_lines(report: dict) -> list[str]:
    """Markdown: how much of the calibration top-k overlap each pattern kind keeps (what `overlap` maximises)."""
    matrix = report["calibration_overlap_matrix"]
    layers = [i for i, row in enumerate(matrix) if row[i] is not None]
    lines = ["", "Top-k overlap kept (mean over layers of the calibration windows' all-F overlap; F layers count 1):"]
    for ratio in sorted({r["ratio"] for r in report["rows"] if r["kind"] == "overlap"}, reverse=True):
        kept = [
            f"{r['kind']} {retained_overlap(r['pattern'], matrix, layers):.3f}"
            for r in report["rows"]
            if r["ratio"] == ratio and "pattern" in r and "steps" not in r  # distilled rows share their pattern
        ]
        lines.append(f"- 1/{round(1 / ratio)}: " + ", ".join(kept))
    return lines


def add_overlap_column(args) -> None:
    """--only-overlap: score the overlap patterns on the committed table's held-out windows and merge the rows in
    (after each ratio's greedy row), leaving every other row as measured."""
    report = json.loads((RESULTS / "quality_table.json").read_text())
    if report["calibration"] != {"num_samples": args.num_samples, "seq_len": args.seq_len}:
        raise SystemExit(f"the committed table used calibration {report['calibration']}; pass the same options")
    loaded = load_model(args.model, device="cpu")
    eos = loaded.model.config.eos_token_id
    calib = make_windows(
        DataSpec(args.dataset, num_samples=args.num_samples, seq_len=args.seq_len), loaded.tokenizer, eos
    )
    held_out = make_windows(
        DataSpec(dataset=args.dataset, num_samples=args.eval_samples, seq_len=args.seq_len),
        loaded.tokenizer,
        eos,
        offset=args.num_samples,
    )
    if held_out.fingerprint != report["held_out"]["fingerprint"]:
        raise SystemExit("the held-out windows differ from the committed table's; pass the same options")
    ratios = sorted({r["ratio"] for r in report["rows"] if r["kind"] == "greedy"}, reverse=True)
    patterns, matrix = overlap_patterns(loaded, calib, ratios)
    rows = [r for r in report["rows"] if r["kind"] != "overlap"]
    lw = LayerwiseModel(loaded.model, loaded.arch)
    with torch.inference_mode(), index_sharing(loaded.model, loaded.arch) as sharing:
        scorer = PatternScorer(lw, sharing, held_out.input_ids)
        for ratio in ratios:
            at = next(i for i, r in enumerate(rows) if r["ratio"] == ratio and r["kind"] == "greedy") + 1
            rows.insert(at, overlap_row(scorer, ratio, patterns[ratio], matrix, loaded.indexer_layers))
            print(f"ratio {ratio}: overlap scored", flush=True)
    report.update(
        rows=rows,
        calibration_overlap_matrix=matrix,
        overlap_column={"date": datetime.date.today().isoformat(), "versions": library_versions()},
    )
    write_report(report)


def train_split_file(dest: Path, stdlib: Path = DEBIAN_STDLIB) -> tuple[Path, int] | None:
    """The tiny corpus's train split, as far as this machine holds it: the stdlib modules of the train split
    whose text here hashes to the manifest's (Debian's python3.11 stdlib ships most of them byte-identical).

    Returns (jsonl path, documents) or None when none is found.
    """
    files = json.loads(MANIFEST.read_text())["splits"]["train"]["files"]
    rows = []
    for doc_id, (_, digest) in sorted(files.items()):
        path = stdlib / doc_id.removeprefix("stdlib/")
        if doc_id.startswith("stdlib/") and path.is_file():
            text = path.read_text("utf-8")
            if hashlib.sha256(text.encode()).hexdigest()[:16] == digest:
                rows.append({"id": doc_id, "text": text})
    if not rows:
        return None
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest, len(rows)


def distill_rows(args, loaded, held_out, patterns: dict[tuple[float, str], str], all_full: float) -> list[dict]:
    """Held-out loss of each (ratio, kind) pattern after `indexcache distill`; `args.single_objective` lists the
    (ratio, kind) pairs also trained with the single-layer objective."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = train_split_file(tmp / "train.jsonl")
        if train is not None:
            data = DataSpec(dataset=str(train[0]), num_samples=args.distill_windows, seq_len=args.distill_seq_len)
            source = f"train split: {train[1]} stdlib documents of {DEBIAN_STDLIB} matching the corpus manifest"
        else:  # the pattern record's default: calibration-source windows past the calibration and held-out ones
            data = None
            source = "calibration sample, windows past the calibration and held-out windows"
        runs = [(r, k, "multi") for (r, k) in patterns] + [
            (r, k, "single") for (r, k) in args.single_objective if (r, k) in patterns
        ]
        for ratio, kind, objective in runs:
            pattern = patterns[(ratio, kind)]
            pattern_path = tmp / f"{kind}-{ratio}.json"
            pattern_path.write_text(json.dumps(_pattern_record(loaded, pattern, held_out)))
            out = tmp / f"{kind}-{ratio}-{objective}"
            record = distill(
                pattern_path,
                out,
                args.distill_steps,
                args.model,
                data,
                num_samples=args.distill_windows if train else min(args.distill_windows, 32),
                lr=args.distill_lr,
                objective=objective,
                save_every=args.distill_steps,
                device="cpu",
                log=lambda m: None,
            )
            distilled = load_model(str(out), device="cpu")
            lw = LayerwiseModel(distilled.model, distilled.arch)
            with torch.inference_mode(), index_sharing(distilled.model, distilled.arch) as sharing:
                loss = PatternScorer(lw, sharing, held_out.input_ids).loss(pattern)
            first, last = (sum(s["kl"].values()) for s in (record["losses"][0], record["losses"][-1]))
            rows.append(
                {
                    "ratio": ratio,
                    "kind": f"{kind}+distill" + ("" if objective == "multi" else " (single-layer)"),
                    "pattern": pattern,
                    "objective": objective,
                    "loss": loss,
                    "steps": record["steps"],
                    "tokens": record["tokens"],
                    "lr": record["lr"],
                    "seconds": record["seconds"],
                    "kl_first_step": first,
                    "kl_last_step": last,
                    "data": {"source": source, "fingerprint": record["data"]["fingerprint"]},
                }
            )
            print(
                f"ratio {ratio}: {rows[-1]['kind']} {loss:.4f} ({loss - all_full:+.4f}), "
                f"{record['steps']} steps in {record['seconds']:.0f} s",
                flush=True,
            )
    return rows


def _pattern_record(loaded, pattern: str, held_out) -> dict:
    """A minimal pattern file for `distill`. Its calibration record is the held-out windows, so distill's
    default data (when the train split is missing) starts past them."""
    return {
        "schema_version": 1,
        "index_topk_pattern": pattern,
        "num_layers": loaded.num_layers,
        "model": {"name": loaded.name, "model_type": loaded.arch.model_type},
        "calibration": held_out.describe(),
    }


def distill_summary_lines(rows: list[dict], all_full: float) -> list[str]:
    """A compact table: each ratio's greedy and uniform loss before and after distillation (Δ vs all-F)."""
    by = {(r["ratio"], r["kind"]): r for r in rows}

    def cell(r: dict | None) -> str:
        return f"{r['loss']:.4f} ({r['loss'] - all_full:+.3f})" if r else ""

    ratios = sorted({r for r, k in by if k.endswith("+distill")}, reverse=True)
    if not ratios:
        return []
    runs = [r for r in rows if "steps" in r]
    lines = [
        "",
        f"After `indexcache distill` ({runs[0]['steps']} steps × {runs[0]['tokens'] // runs[0]['steps']:,} tokens, "
        f"lr {runs[0]['lr']}, data: {runs[0]['data']['source']}); Δ vs all-F (loss {all_full:.4f}):",
        "",
        "| kept | greedy | greedy+distill | uniform | uniform+distill | single-layer objective |",
        "|---|---|---|---|---|---|",
    ]
    for ratio in ratios:
        single = [r for r in rows if r["ratio"] == ratio and r.get("objective") == "single"]
        single_text = "; ".join(f"{r['kind'].split('+')[0]}: {cell(r)}" for r in single)
        lines.append(
            f"| 1/{round(1 / ratio)} | {cell(by.get((ratio, 'greedy')))} | {cell(by.get((ratio, 'greedy+distill')))} "
            f"| {cell(by.get((ratio, 'uniform')))} | {cell(by.get((ratio, 'uniform+distill')))} | {single_text} |"
        )
    return lines


def add_distill_column(args) -> None:
    """--distill-only: redo the distillation rows on the committed table's held-out windows (its greedy patterns),
    leaving every other row as measured."""
    report = json.loads((RESULTS / "quality_table.json").read_text())
    loaded = load_model(args.model, device="cpu")
    held_out = make_windows(
        DataSpec(dataset=args.dataset, num_samples=args.eval_samples, seq_len=args.seq_len),
        loaded.tokenizer,
        loaded.model.config.eos_token_id,
        offset=args.num_samples,
    )
    if held_out.fingerprint != report["held_out"]["fingerprint"]:
        raise SystemExit("the held-out windows differ from the committed table's; pass the same options")
    rows = [r for r in report["rows"] if "steps" not in r]
    all_full = next(r["loss"] for r in rows if r["kind"] == "all-F")
    patterns = {(r["ratio"], r["kind"]): r["pattern"] for r in rows if r["kind"] in ("greedy", "uniform")}
    rows += distill_rows(args, loaded, held_out, patterns, all_full)
    report.update(rows=rows, distill_column={"date": datetime.date.today().isoformat(), "versions": library_versions()})
    write_report(report)


def write_report(report: dict) -> None:
    """scripts/results/quality_table.json and the markdown table quality_table.md."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quality_table.json").write_text(json.dumps(report, indent=2) + "\n")
    rows, calib, held_out = report["rows"], report["calibration"], report["held_out"]
    all_full = next(r["loss"] for r in rows if r["kind"] == "all-F")
    lines = [
        f"Held-out loss (mean next-token NLL, {held_out['num_samples']} windows × {calib['seq_len']} tokens, disjoint "
        f"from the {calib['num_samples']} calibration windows) of `{report['model']}`, {report['num_layers']} layers, "
        f"top-k {report['index_topk']}; {report['date']}, `python scripts/quality_table.py`.",
        "",
        "| kept | pattern kind | F/S pattern | loss | Δ vs all-F |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        kept = "all" if r["kind"] == "all-F" else f"1/{round(1 / r['ratio'])}"
        if "steps" in r:
            text = f"`{r['pattern']}` ({r['steps']} steps, {r['tokens']:,} tokens)"
            lines.append(f"| {kept} | {r['kind']} | {text} | {r['loss']:.4f} | {r['loss'] - all_full:+.4f} |")
        elif r["kind"] == "random":
            text = f"median of {r['count']} (min {r['min']:.4f}, max {r['max']:.4f})"
            lines.append(f"| {kept} | random | {text} | {r['loss']:.4f} | {r['loss'] - all_full:+.4f} |")
        else:
            lines.append(f"| {kept} | {r['kind']} | `{r['pattern']}` | {r['loss']:.4f} | {r['loss'] - all_full:+.4f} |")
    lines += [
        "",
        "Top-k overlap between adjacent layers (all-F, queries with more than k earlier tokens): "
        + ", ".join(f"{o:.0%}" for o in report["adjacent_topk_overlap"]),
    ]
    if "overlap_column" in report:
        lines.append(
            f"The overlap rows were added on {report['overlap_column']['date']} "
            "(`python scripts/quality_table.py ... --only-overlap`), on the same windows."
        )
    if "calibration_overlap_matrix" in report:
        lines += retained_overlap_lines(report)
    lines += distill_summary_lines(rows, all_full)
    if "distill_column" in report:
        lines += [
            "",
            f"The distillation rows were added on {report['distill_column']['date']} "
            "(`python scripts/quality_table.py ... --distill-only`), on the same held-out windows.",
        ]
    (RESULTS / "quality_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--random-patterns", type=int, default=12)
    parser.add_argument("--ratios", default="0.5,0.25,0.125")
    parser.add_argument("--only-overlap", action="store_true", help="add only the overlap rows to the committed table")
    parser.add_argument("--distill-steps", type=int, default=40, help="0 skips the distillation rows")
    parser.add_argument("--distill-seq-len", type=int, default=512)
    parser.add_argument("--distill-windows", type=int, default=64)
    parser.add_argument("--distill-lr", type=float, default=3e-3)
    parser.add_argument("--distill-only", action="store_true", help="redo only the distillation rows of the table")
    args = parser.parse_args()
    args.single_objective = [(0.125, "greedy"), (0.25, "uniform")]
    if args.only_overlap:
        add_overlap_column(args)
        return
    if args.distill_only:
        add_distill_column(args)
        return

    calib = DataSpec(dataset=args.dataset, num_samples=args.num_samples, seq_len=args.seq_len)
    loaded = load_model(args.model, device="cpu")
    n = loaded.num_layers
    held_out = make_windows(
        DataSpec(dataset=args.dataset, num_samples=args.eval_samples, seq_len=args.seq_len),
        loaded.tokenizer,
        loaded.model.config.eos_token_id,
        offset=args.num_samples,
    )
    lw = LayerwiseModel(loaded.model, loaded.arch)
    topk = loaded.model.config.index_topk
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        greedy = {}
        for ratio in map(float, args.ratios.split(",")):
            result = api.search(
                args.model, ratio, None, calib, Path(tmp) / f"{ratio}.json", device="cpu", log=lambda m: None
            )
            greedy[ratio] = result["index_topk_pattern"]
            print(f"ratio {ratio}: greedy {greedy[ratio]} ({result['search']['seconds']:.0f} s)", flush=True)
    calib_windows = make_windows(calib, loaded.tokenizer, loaded.model.config.eos_token_id)
    by_overlap, matrix = overlap_patterns(loaded, calib_windows, list(greedy))
    with torch.inference_mode(), index_sharing(loaded.model, loaded.arch) as sharing:
        scorer = PatternScorer(lw, sharing, held_out.input_ids, first_label=held_out.first_label)
        all_full = scorer.loss("F" * n)
        rows.append({"ratio": 1.0, "kind": "all-F", "pattern": "F" * n, "loss": all_full})
        for ratio, pattern in greedy.items():
            k = num_full_for_ratio(ratio, n)
            rows.append({"ratio": ratio, "kind": "greedy", "pattern": pattern, "loss": scorer.loss(pattern)})
            rows.append(overlap_row(scorer, ratio, by_overlap[ratio], matrix, loaded.indexer_layers))
            uni = uniform(n, k)
            rows.append({"ratio": ratio, "kind": "uniform", "pattern": uni, "loss": scorer.loss(uni)})
            rng = random.Random(ratio)
            randoms = [random_pattern(n, k, rng) for _ in range(args.random_patterns)]
            losses = sorted(scorer.loss(p) for p in randoms)
            rows.append(
                {
                    "ratio": ratio,
                    "kind": "random",
                    "patterns": randoms,
                    "loss": statistics.median(losses),
                    "min": losses[0],
                    "max": losses[-1],
                    "count": len(losses),
                }
            )
            print(f"ratio {ratio}: scored", flush=True)
    if args.distill_steps > 0:
        patterns = {}
        for ratio, pattern in greedy.items():
            patterns[(ratio, "greedy")] = pattern
            patterns[(ratio, "uniform")] = uniform(n, num_full_for_ratio(ratio, n))
        rows += distill_rows(args, loaded, held_out, patterns, all_full)
    overlap = adjacent_overlap(lw, loaded.arch, held_out.input_ids[:2], topk)
    report = {
        "date": datetime.date.today().isoformat(),
        "model": loaded.name,
        "num_layers": n,
        "index_topk": topk,
        "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len},
        "held_out": held_out.describe(),
        "versions": library_versions(),
        "rows": rows,
        "adjacent_topk_overlap": overlap,
        "calibration_overlap_matrix": matrix,
    }
    write_report(report)


if __name__ == "__main__":
    main()
