"""The quick start's cost as a user meets it: `indexcache search` with no options (the embedded tiny model and
calibration sample), timed as a whole process, against a baseline command timed in the same run.

    python scripts/time_quickstart.py [--baseline "/other/venv/bin/indexcache"] [--threads ,1] \
        [--out scripts/results/time_quickstart_cpu_DATE.json]

A command is split like a shell line, so a baseline can be another source tree of the package:
`--baseline "env PYTHONPATH=/tmp/main-pkg python -m indexcache"`.

Each command runs in a fresh folder, once per intra-op thread count in `--threads` (OMP_NUM_THREADS; the default
of a plain run is every core). Recorded per run: wall seconds of the process, CPU seconds (user + sys of the
process and its children), the search's own seconds and layer-forwards from the pattern file, and the load
average around it (the project's CPU machine is shared: wall times move with the load, CPU times much less).
With `--baseline` (e.g. an install of main before a change) every run's pattern file must give the baseline's
pattern, trajectory and losses exactly; the table says `same` or `DIFFERENT`, and the speedups are ratios to the
baseline at the same thread count. `--reference` names a pattern file (e.g. of an earlier run) that every run
must reproduce exactly, likewise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from indexcache.atomic import write_json
from indexcache.patterns.file import library_versions

RESULT_KEYS = ("index_topk_pattern", "loss_all_full", "loss_final", "trajectory")


def timed_search(command: str, threads: str) -> dict:
    """Run `command search` in a fresh folder with OMP_NUM_THREADS=`threads` ("" leaves it unset)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    with tempfile.TemporaryDirectory() as folder:
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run([*shlex.split(command), "search"], cwd=folder, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"{command} search failed:\n{done.stdout}\n{done.stderr}")
        pattern = json.loads((Path(folder) / "pattern.json").read_text())
    return {
        "command": command,
        "omp_num_threads": threads or None,
        "wall_s": round(wall, 2),
        "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 2),
        "search_s": pattern["search"]["seconds"],
        "layer_forwards": pattern["search"]["layer_forwards"],
        "window_threads": pattern["search"].get("threads"),
        "load_average": round((load + os.getloadavg()[0]) / 2, 2),
        "result": {key: pattern[key] for key in RESULT_KEYS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--command", default=shutil.which("indexcache"), help="the indexcache command to time")
    parser.add_argument("--baseline", help="another indexcache command to time in the same run (e.g. main's)")
    parser.add_argument("--threads", default="", help="comma-separated OMP_NUM_THREADS values ('' = unset)")
    parser.add_argument("--reference", type=Path, help="a pattern file every run must reproduce exactly")
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()

    rows = []
    for threads in options.threads.split(","):
        for role, command in (("baseline", options.baseline), ("this", options.command)):
            if command:
                rows.append({"role": role, **timed_search(command, threads)})
                print({k: v for k, v in rows[-1].items() if k != "result"}, flush=True)
    baselines = {r["omp_num_threads"]: r for r in rows if r["role"] == "baseline"}
    if options.reference is not None:
        reference = json.loads(options.reference.read_text())
        for row in rows:
            row["same_result_as_reference"] = row["result"] == {key: reference[key] for key in RESULT_KEYS}
    for row in rows:
        base = baselines.get(row["omp_num_threads"])
        if base is not None and row is not base:
            row["same_result_as_baseline"] = row["result"] == base["result"]
            for key in ("wall_s", "cpu_s", "search_s"):
                row[f"{key}_speedup"] = round(base[key] / row[key], 3)

    verdict = {True: "same", False: "DIFFERENT", None: "-"}
    print(f"{'role':9} {'OMP':>4} {'wall s':>7} {'CPU s':>7} {'search s':>8} {'forwards':>8}  vs baseline, reference")
    for r in rows:
        print(
            f"{r['role']:9} {r['omp_num_threads'] or '-':>4} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} "
            f"{r['search_s']:8.1f} {r['layer_forwards']:8}  {verdict[r.get('same_result_as_baseline')]}, "
            f"{verdict[r.get('same_result_as_reference')]}"
        )
    if options.out is not None:
        write_json(
            options.out,
            {
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                "date": datetime.date.today().isoformat(),
                "versions": library_versions(),
                "reference": str(options.reference) if options.reference else None,
                "rows": rows,
            },
        )


if __name__ == "__main__":
    main()
