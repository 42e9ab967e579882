"""The README's pictures, on the shipped tiny model (CPU):

    python scripts/readme_figures.py [--skip-existing]

- `figures/overlap_tiny.png` (+ `analysis_tiny.json`): `indexcache analyze` on the quality table's calibration
  windows (4 × 1024 tokens): the cross-layer top-k overlap heatmap and the indexer score entropy;
- `figures/search_tiny.png` (+ `pattern_tiny.json`, `eval_tiny.json`): a greedy search (`cached`, ratio 1/4) on
  small windows (2 × 256 tokens by default, so it runs in minutes on a busy 2-core machine), evaluated on the
  next windows of the same order, drawn as `indexcache plot pattern_tiny.json --eval eval_tiny.json` would;
- `figures/overlap_search_tiny.png` (+ `pattern_overlap_tiny.json`): `search --strategy overlap` on the same
  windows and ratio, and what each layer keeps of its own top-k.

All under scripts/results/figures/; every picture is drawn from the JSON beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from indexcache import api
from indexcache.analyze import analyze
from indexcache.calib import DataSpec
from indexcache.plot import plot_pattern_file

FIGURES = Path(__file__).parent / "results" / "figures"


def overlap_heatmap(out: Path) -> None:
    result = analyze(out / "analyze", data=DataSpec(num_samples=4, seq_len=1024), device="cpu")
    (out / "analyze" / "analysis.json").replace(out / "analysis_tiny.json")
    (out / "analyze" / "overlap.png").replace(out / "overlap_tiny.png")
    (out / "analyze").rmdir()
    adjacent = [round(row[i + 1], 2) for i, row in enumerate(result["overlap"][:-1])]
    print(f"analyze: {result['seconds']:.0f} s, adjacent-layer overlap {adjacent}", flush=True)


def search_plots(out: Path, data: DataSpec) -> None:
    greedy = api.search(data=data, output=out / "pattern_tiny.json", device="cpu", log=lambda m: None)
    api.evaluate(out / "pattern_tiny.json", device="cpu", json_path=out / "eval_tiny.json", log=lambda m: None)
    plot_pattern_file(out / "pattern_tiny.json", out / "search_tiny.png", out / "eval_tiny.json")
    print(
        f"greedy: {greedy['index_topk_pattern']} loss {greedy['loss_final']:.4f} ({greedy['search']['seconds']:.0f} s)"
    )
    by_overlap = api.search(data=data, output=out / "pattern_overlap_tiny.json", strategy="overlap", device="cpu")
    plot_pattern_file(out / "pattern_overlap_tiny.json", out / "overlap_search_tiny.png")
    print(f"overlap: {by_overlap['index_topk_pattern']} loss {by_overlap['loss_final']:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--search-samples", type=int, default=2)
    parser.add_argument("--search-seq-len", type=int, default=256)
    parser.add_argument("--skip-existing", action="store_true", help="keep pictures already drawn")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.skip_existing and (args.out / "overlap_tiny.png").exists()):
        overlap_heatmap(args.out)
    if not (args.skip_existing and (args.out / "search_tiny.png").exists()):
        search_plots(args.out, DataSpec(num_samples=args.search_samples, seq_len=args.search_seq_len))
    for png in sorted(args.out.glob("*.png")):
        print(f"{png.name}: {png.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
