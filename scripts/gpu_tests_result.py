"""The result file of `scripts/gpu_tests.sh`: card, date, commit and counts from pytest's JUnit report.

    python scripts/gpu_tests_result.py junit.xml --commit SHA --args "..." --out DIR

Prints the counts and writes DIR/gpu_tests_<card>_<date>.json (commit it under scripts/results/).
"""

from __future__ import annotations

import argparse
import datetime
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from indexcache.atomic import write_json
from indexcache.patterns.file import library_versions


def counts(junit: Path) -> dict:
    """passed / failed / errors / skipped and seconds over every test suite of the report, and the failed ids."""
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
        "failed": total["failures"],
        "errors": total["errors"],
        "skipped": total["skipped"],
        "seconds": round(sum(float(s.get("time", 0)) for s in suites), 1),
        "failed_tests": failed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", type=Path)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--args", default="", help="the pytest arguments of the run (empty: the whole suite)")
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    date = datetime.date.today().isoformat()
    result = {
        "card": card,
        "date": date,
        "commit": options.commit,
        "pytest_args": options.args or "(whole suite)",
        "versions": {**library_versions(), "cuda": torch.version.cuda},
        **counts(options.junit),
    }
    name = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-")
    path = options.out / f"gpu_tests_{name}_{date}.json"
    write_json(path, result)
    print(
        f"{card}, {date}, commit {options.commit[:12]}: {result['passed']} passed, {result['failed']} failed, "
        f"{result['errors']} errors, {result['skipped']} skipped in {result['seconds']} s → {path}"
    )


if __name__ == "__main__":
    main()
