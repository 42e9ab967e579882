"""Greedy 1/8 distilled for longer than the quality table's 40 steps: does the held-out gap keep closing?

    python scripts/distill_longer.py 160

Uses `quality_table.distill_rows` (same data, lr, windows) on the committed table's held-out windows (checked by
fingerprint). Writes scripts/results/quality_table_distill_greedy8_<steps>steps.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import quality_table  # noqa: E402

from indexcache.calib import DataSpec, make_windows  # noqa: E402
from indexcache.models import load_model  # noqa: E402
from indexcache.patterns.file import library_versions  # noqa: E402

PATTERN = "FFSSSSSSSSSSSSSS"  # the committed table's greedy 1/8 pattern


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", type=int)
    steps = parser.parse_args().steps
    args = argparse.Namespace(
        model=None, dataset=None, distill_steps=steps, distill_seq_len=512, distill_windows=64, distill_lr=3e-3,
        single_objective=[],
    )  # fmt: skip
    loaded = load_model(None, device="cpu")
    held_out = make_windows(DataSpec(num_samples=8, seq_len=1024), loaded.tokenizer, 0, offset=4)
    report = json.loads((quality_table.RESULTS / "quality_table.json").read_text())
    if held_out.fingerprint != report["held_out"]["fingerprint"]:
        raise SystemExit("the held-out windows differ from the committed table's")
    all_full = next(r["loss"] for r in report["rows"] if r["kind"] == "all-F")
    rows = quality_table.distill_rows(args, loaded, held_out, {(0.125, "greedy"): PATTERN}, all_full)
    result = {
        "date": datetime.date.today().isoformat(),
        "command": f"python scripts/distill_longer.py {steps}",
        "all_full": all_full,
        "versions": library_versions(),
        "rows": rows,
    }
    path = quality_table.RESULTS / f"quality_table_distill_greedy8_{steps}steps.json"
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
