"""Tables in an 80-column pipe (what a log file gets): split into parts that repeat the row's key columns, long
cells folded, never a cell cut to "…"."""

from __future__ import annotations

import re

from rich.table import Table

from indexcache.cli import common

WIDTH = 80


def fits(output: str, width: int = WIDTH) -> bool:
    """Every line within `width` columns and no cell cut short."""
    return "…" not in output and all(len(line) <= width for line in output.splitlines())


def parts_of(output: str) -> list[list[list[str]]]:
    """Each table printed in `output`: its body lines as lists of stripped cells."""
    tables = [t for t in re.split(r"\n(?=┏)", output) if "┏" in t]
    return [
        [[c.strip() for c in line.strip("│").split("│")] for line in t.splitlines() if line.startswith("│")]
        for t in tables
    ]


def _print(capsys, monkeypatch, table: Table, keys: int = 1) -> str:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    common.print_table(table, keys)
    return capsys.readouterr().out


def test_wide_table_splits_and_repeats_the_key_columns(capsys, monkeypatch):
    headers = ["context", "", *(f"measure {i}" for i in range(10))]
    table = Table(title="wide")
    for h in headers:
        table.add_column(h)
    rows = [["131,072", name, *(f"{1000 * i + 0.25:,.2f}" for i in range(10))] for name in ("all-F", "uniform")]
    for row in rows:
        table.add_row(*row)
    output = _print(capsys, monkeypatch, table, keys=2)
    assert fits(output)
    parts = parts_of(output)
    assert len(parts) > 1 and output.count("wide") == 1  # split; the title once
    for part in parts:
        assert [r[:2] for r in part] == [r[:2] for r in rows]  # every part says which row it is
    assert [sum((r[2:] for r in rows_of), []) for rows_of in zip(*parts, strict=True)] == [r[2:] for r in rows]


def test_a_cell_longer_than_the_console_folds(capsys, monkeypatch):
    pattern = "FFSS" * 19 + "FS"  # 78 layers: GLM-5
    table = Table(title="held-out loss")
    for h in ("", "F/S pattern", "loss"):
        table.add_column(h)
    table.add_row("pattern", pattern, "3.12345")
    output = _print(capsys, monkeypatch, table)
    assert fits(output)
    first, *rest = parts_of(output)
    assert "".join(line[1] for line in first) == pattern  # folded, every letter kept
    assert [line[0] for line in first] == ["pattern"] + [""] * (len(first) - 1)
    assert rest == [[["pattern", "3.12345"]]]


def test_a_narrow_table_prints_as_one(capsys, monkeypatch):
    table = Table(title="small")
    table.add_column("a")
    table.add_column("b")
    table.add_row("1", "2")
    output = _print(capsys, monkeypatch, table)
    assert parts_of(output) == [[["1", "2"]]]
