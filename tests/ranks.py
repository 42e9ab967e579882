"""Several CLI processes on one machine, as torchrun starts them (RANK, WORLD_SIZE, … and a gloo rendezvous), but
forked from one forkserver that has imported torch and indexcache once: a rank costs a fork, not an import."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")
# Everything a command imports on its first run (most of a tiny rank's CPU time otherwise).
_CONTEXT.set_forkserver_preload(
    [
        "ranks",
        "indexcache.cli.app",
        "indexcache.api",
        "indexcache.analyze",
        "indexcache.distill.train",
        "transformers.models.glm_moe_dsa.modeling_glm_moe_dsa",
        "transformers.models.auto.tokenization_auto",
        "transformers.tokenization_utils_tokenizers",
        "datasets",
        "pydantic",
    ]
)


@dataclass
class Finished:
    """One rank's end: its exit code (negative: killed by that signal) and what it printed."""

    code: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_in_step(step: int, fault: int | str) -> None:
    """When this process starts running layers for a candidate of greedy step `step` (as a replica or as one
    pipeline stage): send it signal `fault` (SIGKILL: a rank lost mid-step; SIGTERM: torchrun stopping it), or
    raise a user error with the text `fault`."""
    from indexcache.errors import IndexCacheError
    from indexcache.search import scoring

    original = scoring.CachedScorer._run

    def run(self, *args):
        if self.committed is not None and self.committed.count("S") == step - 1:
            if isinstance(fault, str):
                raise IndexCacheError(fault)
            os.kill(os.getpid(), fault)
        return original(self, *args)

    scoring.CachedScorer._run = run


def _rank_main(rank: int, size: int, port: int, argv: list[str], logs: Path, die: tuple[int, int] | None) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    sys.stdout = open(logs / f"{rank}.out", "w")  # noqa: SIM115 (closed by os._exit below)
    sys.stderr = open(logs / f"{rank}.err", "w")  # noqa: SIM115
    if die is not None:
        _die_in_step(*die)
    from indexcache.cli.app import app

    code = 0
    try:
        app([str(a) for a in argv], prog_name="indexcache")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(size: int, argv: list, logs: Path, die: tuple | None = None, timeout: float = 120) -> list:
    """Run `indexcache ARGV` as `size` ranks; `die=(rank, step, fault)` makes that rank fail in that greedy step.
    Returns each rank's `Finished`; a rank still running after `timeout` s fails the test (a hang)."""
    logs.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(size):
        fault = die[1:] if die and die[0] == rank else None
        proc = _CONTEXT.Process(target=_rank_main, args=(rank, size, port, list(argv), logs, fault))
        proc.start()
        procs.append(proc)
    for proc in procs:
        proc.join(timeout)
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for rank in hung:
        procs[rank].kill()
    assert not hung, f"ranks {hung} still running after {timeout} s"
    return [
        Finished(proc.exitcode, (logs / f"{r}.out").read_text(), (logs / f"{r}.err").read_text())
        for r, proc in enumerate(procs)
    ]
