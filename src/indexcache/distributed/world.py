"""The processes of one run: the ranks torchrun started, on torch.distributed, or this process alone.

`torchrun --nproc-per-node G -m indexcache search …` starts G processes; `joined()` puts each into torchrun's
process group (gloo on the CPU; on GPUs `cpu:gloo,cuda:nccl`, whose CPU half carries what ranks exchange here:
losses and NLL sums, a few numbers per step). Work is split with `World.map`: every rank runs its share of the
items, the results are gathered in item order, so each rank then holds exactly what one process would have
computed, and every rank takes the same next decision. An error on any rank's share reaches every rank through the
same gather and is raised everywhere; a rank that disappears or stops answering (the collective timeout) ends the
others with `PeerLost`. Without torchrun (or with one process) `World()` runs everything here.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import torch

from ..errors import IndexCacheError

T = TypeVar("T")
R = TypeVar("R")


class PeerLost(IndexCacheError):
    """Another rank died, was stopped, or did not reach a collective within the timeout."""


def balanced_shares(costs: Sequence[float], size: int) -> list[list[int]]:
    """Item indices per rank: the costliest item first to the least loaded rank (ties: lowest index, lowest
    rank), so shares are as even as one item allows and every rank computes the same split."""
    shares: list[list[int]] = [[] for _ in range(size)]
    loads = [0.0] * size
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(size), key=lambda r: (loads[r], r))
        shares[rank].append(i)
        loads[rank] += costs[i]
    return [sorted(share) for share in shares]


@dataclass(frozen=True)
class World:
    """This run's processes. The default is one process doing all the work.

    The ranks form `replicas` groups of `stages` consecutive ranks: a replica is one pipeline (`pipeline.py`)
    whose stage ranks each hold some of the layers; with one stage (the default) every rank is a replica holding
    the whole model.

    Attributes:
        rank, size: this process's rank and the number of processes (torchrun's RANK, WORLD_SIZE).
        local_rank, local_size: the same on this node (LOCAL_RANK, LOCAL_WORLD_SIZE): which GPU is ours.
        stages: pipeline stages per replica; group: the process group of this rank's pipeline (None: one stage).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    stages: int = 1
    group: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0 draws progress and writes every file."""
        return self.rank == 0

    @property
    def replicas(self) -> int:
        return self.size // self.stages

    @property
    def replica(self) -> int:
        """Which replica (pipeline) this rank belongs to."""
        return self.rank // self.stages

    @property
    def stage(self) -> int:
        """This rank's stage in its pipeline (0 with one stage)."""
        return self.rank % self.stages

    @property
    def decomposition(self) -> str | None:
        """How the work is split: `pipeline` (stages, maybe replicated), `replicas`, or None for one process."""
        return "pipeline" if self.stages > 1 else "replicas" if self.size > 1 else None

    def pipelined(self, stages: int) -> World:
        """This world cut into pipelines of `stages` consecutive ranks (each a replica), with their groups."""
        if stages == self.stages:
            return self
        if stages < 1 or self.size % stages:
            running = f"the {self.size} processes torchrun started" if self.size > 1 else "one process"
            raise IndexCacheError(
                f"--pipeline-stages {stages} needs a multiple of {stages} processes (one per stage of each replica) "
                f"but runs as {running}; launch torchrun --nproc-per-node {stages} (or a multiple)"
            )
        groups = []
        with _collective("forming the pipelines"):
            for first in range(0, self.size, stages):
                groups.append(torch.distributed.new_group(list(range(first, first + stages))))
        return replace(self, stages=stages, group=groups[self.rank // stages])

    def device(self, requested: str) -> str:
        """The device this rank runs on: its own GPU (`cuda:LOCAL_RANK`) for `auto`/`cuda` under several processes."""
        if self.local_size > 1 and requested.startswith("cuda:"):
            raise IndexCacheError(
                f"--device {requested} would put all {self.local_size} processes of this node on one GPU; give "
                "--device cuda (or auto): each process takes the GPU of its LOCAL_RANK"
            )
        if self.size == 1 or requested not in ("auto", "cuda") or not torch.cuda.is_available():
            return requested
        if self.local_rank >= torch.cuda.device_count():
            raise IndexCacheError(
                f"{self.local_size} processes on this node but only {torch.cuda.device_count()} GPUs are visible; "
                "give torchrun --nproc-per-node at most the number of GPUs"
            )
        return f"cuda:{self.local_rank}"

    def check_device_map(self, device_map) -> None:
        """A device map spreads one process over this node's GPUs, so it takes one process per node."""
        if device_map is not None and self.local_size > 1:
            raise IndexCacheError(
                f"--device-map spreads one process over this node's GPUs, but torchrun started {self.local_size} "
                "processes here; launch one per node (--nproc-per-node 1) for replicas that each span a node"
            )

    def map(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        cost: Callable[[T], float] | None = None,
        on_result: Callable[[T, R], None] | None = None,
    ) -> dict[T, R]:
        """{item: fn(item)} in item order, each item computed by one replica (balanced by `cost`, default equal).

        `on_result` sees this replica's results as they come, then the other replicas' once gathered."""

        def one_by_one(mine: list[T]) -> dict[T, R]:
            local = {}
            for item in mine:
                local[item] = fn(item)
                if on_result:
                    on_result(item, local[item])
            return local

        return self.map_shares(one_by_one, items, cost, on_result, reported=True)

    def map_shares(
        self,
        fn: Callable[[list[T]], dict[T, R]],
        items: Sequence[T],
        cost: Callable[[T], float] | None = None,
        on_result: Callable[[T, R], None] | None = None,
        reported: bool = False,
    ) -> dict[T, R]:
        """{item: result} in item order, where `fn(share)` computes one replica's share at once (every stage rank
        of a pipeline runs it, so the share can be streamed through the stages, and returns the same results).

        `on_result` sees every result once gathered (the other replicas' only, when `fn` `reported` its own)."""
        items = list(items)
        costs = [cost(item) if cost else 1.0 for item in items]
        mine = [items[i] for i in balanced_shares(costs, self.replicas)[self.replica]]
        local: dict[T, R] = {}
        failure = None
        try:
            local = fn(mine)
        except (IndexCacheError, torch.cuda.OutOfMemoryError) as exc:
            # A stage that fails alone leaves its pipeline waiting on it: it ends, and the others lose their peer.
            if self.size == 1 or (self.stages > 1 and not getattr(exc, "pipeline_wide", False)):
                raise
            failure = exc
        results: dict[T, R] = {}
        for rank, (theirs, error) in enumerate(self.all_gather((local, failure))):
            if error is not None:
                raise _on_every_rank(error, rank)
            results.update(theirs)
        if on_result:
            for item in items:
                if not (reported and item in local):
                    on_result(item, results[item])
        return {item: results[item] for item in items}

    def from_main(self, fn: Callable[[], R]) -> R:
        """fn() run on rank 0 (which alone reads the files it wrote), its result or error given to every rank."""
        if self.size == 1:
            return fn()
        result = failure = None
        if self.is_main:
            try:
                result = fn()
            except IndexCacheError as exc:
                failure = exc
        result, failure = self._broadcast((result, failure))
        if failure is not None:
            raise _on_every_rank(failure, 0)
        return result

    def total(self, value: int) -> int:
        """The sum of `value` over the ranks (every rank gets it)."""
        return value if self.size == 1 else sum(self.all_gather(value))

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, by rank."""
        if self.size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.size
        with _collective("gathering results"):
            torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def _broadcast(self, obj: Any) -> Any:
        box = [obj]
        with _collective("receiving rank 0's state"):
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def describe(self, held: dict[str, list[int]]) -> list[dict]:
        """What every rank held (gathered): its rank, host and the layers on each of its devices; under pipeline
        stages also its replica and stage."""
        mine = {"rank": self.rank, "host": socket.gethostname(), "layers_on": held}
        if self.stages > 1:
            mine.update(replica=self.replica, stage=self.stage)
        return self.all_gather(mine)


def _on_every_rank(error: Exception, rank: int) -> Exception:
    """The error `rank` hit, to raise on every rank (marked `collective`: rank 0 reports it for all); a user
    error from another rank than 0 names it."""
    if isinstance(error, IndexCacheError) and rank != 0:
        error = type(error)(f"rank {rank}: {error}")
    error.collective = True
    return error


@contextmanager
def _collective(doing: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as exc:  # gloo and NCCL report a lost peer or a timeout as RuntimeError subclasses
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        reason = re.sub(r"\[[^\]]*:\d+\]\s*", "", lines[0]).split(". ")[0]  # gloo's source file and line off
        raise PeerLost(f"another rank stopped or did not answer while {doing} ({reason[:120]})") from exc


_joined: World | None = None


def launched_processes() -> int:
    """How many processes torchrun started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def current() -> World:
    """The world `joined()` set up, else this process alone."""
    return _joined or World()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def joined(timeout_s: float) -> Iterator[World]:
    """Join torchrun's process group when started with several processes (WORLD_SIZE > 1); leave it on exit.

    Collectives that wait longer than `timeout_s` fail (then `PeerLost`), so a hung rank never hangs the run.
    SIGTERM, which torchrun sends every rank when one fails or the launcher is interrupted, acts as Ctrl-C.
    """
    global _joined
    size = launched_processes()
    if size == 1:
        yield World()
        return
    import torch.distributed as dist

    world = World(
        int(os.environ["RANK"]),
        size,
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("LOCAL_WORLD_SIZE", str(size))),
    )
    if torch.cuda.is_available() and world.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(world.local_rank)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _collective("joining the process group"):
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        _joined = world
        yield world
    finally:
        _joined = None
        if dist.is_initialized():
            dist.destroy_process_group()
        signal.signal(signal.SIGTERM, previous)
