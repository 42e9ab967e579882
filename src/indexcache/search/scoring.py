"""Calibration loss of F/S patterns, and the three ways the search scores its candidates.

- `naive`: every candidate is a full forward over all windows.
- `cached`: flipping layer l to S changes nothing below l, so each candidate restarts at l from the committed
  pattern's cached hidden states and index buffer (prefix reuse). The winning candidate's own activations
  become the new cache at commit, so committing costs no forward. Bit-identical losses to `naive`.
- `pruned`: `cached` plus successive halving over the windows: score all candidates on a few windows, keep
  the best half, add windows, until the survivors are scored on all of them.
Every scorer counts the decoder-layer forwards (layer × window) it ran. Under several processes (`World`) each
step's candidates (and a single pattern's windows) are shared among the replicas: a replica is one rank holding
the whole model and prefix cache, or a pipeline whose stage ranks each hold some layers and their part of the
cache (`StageLink`), through which a share's runs are streamed. The losses gathered are the ones one process
computes.
"""

from __future__ import annotations

import contextvars
import math
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

import torch

from ..distributed import World
from ..distributed.pipeline import StageLink
from ..errors import IndexCacheError
from ..patterns.layout import FULL, SHARED
from ..runtime.forward import LayerInputs, LayerState, LayerwiseModel
from ..runtime.patch import SharingState


def flip(pattern: str, layer: int) -> str:
    """The pattern with `layer` turned from F into S."""
    return pattern[:layer] + SHARED + pattern[layer + 1 :]


@dataclass
class CandidateScore:
    """Mean token NLL of one candidate over the first `windows` calibration windows (all, unless pruned)."""

    loss: float
    windows: int


@cache
def _window_pool(threads: int) -> ThreadPoolExecutor:
    """Threads that each run one batch's forward with one intra-op thread of their own."""
    return ThreadPoolExecutor(
        threads, thread_name_prefix="indexcache-window", initializer=torch.set_num_threads, initargs=(1,)
    )


def window_threads(device: torch.device, backend: str, processes: int = 1) -> int:
    """How many batches' forwards a scorer runs at once: in one process on the CPU's reference path, one per
    intra-op thread (the small ops of one layer keep two intra-op threads waiting on each other, separate windows
    do not; `scripts/profile_quickstart.py`); elsewhere one (a GPU is busy with one, the Triton interpreter stays
    on one thread, and torchrun's `processes` already share the cores)."""
    on_cpu_reference = device.type == "cpu" and backend == "reference" and processes == 1
    return torch.get_num_threads() if on_cpu_reference else 1


class PatternScorer:
    """Exact loss of any pattern over the calibration windows, by full forwards (the `naive` strategy).

    Args:
        windows: int64 [N, L] calibration token windows, run `batch_size` windows at a time.
        world: the processes that share the work (this one alone by default).
        link: this rank's pipeline stage (default: one stage holding every layer).
        threads: batches whose forwards run at once, one thread each (`window_threads`; one stage only); the
            losses are the same bits as one after the other.
    """

    strategy = "naive"

    def __init__(
        self,
        lw: LayerwiseModel,
        state: SharingState,
        windows: torch.Tensor,
        batch_size: int = 1,
        first_label: int = 1,
        world: World | None = None,
        link: StageLink | None = None,
        threads: int = 1,
    ):
        self.world = world or World()
        self.link = link or StageLink.alone(lw.num_layers)
        self.threads = threads
        self._lock = threading.Lock()  # the counters and the runs kept, when batches run on several threads
        self.lw = lw
        self.state = state
        self.batch_size = batch_size
        self.batches = list(windows.split(batch_size))
        self.num_windows = windows.shape[0]
        self.first_label = first_label  # tokens before it (a window's prefix) are fed but not scored
        self.tokens_per_window = windows.shape[1] - first_label
        self.layer_forwards = 0  # this process's own

    def _map_batches(self, fn: Callable[[int], torch.Tensor], batches: Iterable[int]) -> list[torch.Tensor]:
        """[fn(b) for b in batches], `self.threads` at a time, each in the caller's context (kernel choice, grad
        and inference mode)."""
        batches = list(batches)
        if self.threads == 1 or len(batches) < 2:
            return [fn(b) for b in batches]
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def in_context(b: int) -> torch.Tensor:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return fn(b)

        context = contextvars.copy_context()
        futures = [_window_pool(self.threads).submit(context.copy().run, in_context, b) for b in batches]
        return [f.result() for f in futures]

    def _count(self, layer_forwards: int) -> None:
        with self._lock:
            self.layer_forwards += layer_forwards

    def _mean(self, nll_sums: list[torch.Tensor]) -> float:
        windows = sum(s.numel() for s in nll_sums)
        return float(torch.cat(nll_sums).sum() / (windows * self.tokens_per_window))

    @torch.no_grad()
    def _stream(self, runs: list[tuple[str, int, int, _Activations | None]]) -> list[torch.Tensor]:
        """The summed NLL per window, fp64 [B], of each run (pattern, batch, first layer, activations to record
        into or None), on every stage.

        This stage runs its layers of every run that reaches them. When the previous stage has sent a run, it takes
        that one (so the stages after it are fed); otherwise it starts the next run that begins in its own layers
        from its cache, or waits for one to arrive. It sends the hidden states and the index buffer on without
        waiting, so all stages work at once. The last stage computes the losses and shares them once every run is
        done. With one stage this is each run in order."""
        link = self.link
        own = [i for i, (_, _, start, _) in enumerate(runs) if link.start <= start < link.stop]
        link.expect(sum(start < link.start for _, _, start, _ in runs), 2, self.lw.input_device)
        sums: dict[int, torch.Tensor] = {}
        while own or link.expecting:
            if link.expecting and (not own or link.arrived()):
                i, (hidden, buffer) = link.receive()
                pattern, b, _, into = runs[i]
                start, layer_state = link.start, None
                self.state.pattern, self.state.buffer = pattern, buffer
            else:
                i = own.pop(0)
                pattern, b, start, into = runs[i]
                self.state.pattern = pattern
                hidden, layer_state = self._enter(b, start)
            hidden = self._run(b, start, link.stop, hidden, layer_state, into)
            if link.last:
                sums[i] = self.lw.nll_sum(hidden, self.batches[b], self.first_label)
            else:
                link.send(i, [hidden, self.state.buffer])
        link.flush()
        sums = link.from_last(sums)
        ordered = [sums[i] for i in range(len(runs))]
        for (pattern, b, _, into), nll in zip(runs, ordered, strict=True):
            try:
                self._finite(nll, pattern, b)
            except IndexCacheError as exc:
                exc.pipeline_wide = True  # every stage raises it here, so the replicas' gather can carry it
                raise
            if into is not None:
                into.nll, into.pattern = nll, pattern
        return ordered

    def _enter(self, b: int, start: int) -> tuple[torch.Tensor, LayerState]:
        """Hidden states entering layer `start` (0: full forwards) of batch `b`, and the cross-layer state."""
        assert start == 0
        self.state.buffer = None
        return self.lw.embed(self.batches[b])[0], self.lw.new_layer_state()

    def _run(self, b: int, start: int, stop: int, hidden, layer_state, into) -> torch.Tensor:
        """hidden entering layer `start` → hidden entering `stop`, for batch `b`."""
        inputs = self.lw.layer_inputs(self.batches[b])
        self._count((stop - start) * self.batches[b].shape[0])
        return self.lw.run_layers(hidden, inputs, start, stop, layer_state)

    def _batch_nll(self, pattern: str, b: int) -> torch.Tensor:
        """Summed NLL per window of batch `b` under `pattern`, by a full forward. fp64 [batch]."""
        return self._stream([(pattern, b, 0, None)])[0]

    def _streamed(self, share: list, runs_of) -> dict:
        """{item: the summed NLLs of its runs (`runs_of(item)`)} for one replica's share, in one stream."""
        runs = {item: runs_of(item) for item in share}
        sums = iter(self._stream([run for item in share for run in runs[item]]))
        return {item: [next(sums) for _ in runs[item]] for item in share}

    def _pipelined_scores(self, candidates: list[int], runs_of, cost=None, on_candidate=None):
        """The score of each candidate layer from its runs (`runs_of(layer)`), the candidates shared among the
        pipelines, each streaming its whole share at once."""

        def scored(share: list[int]) -> dict[int, CandidateScore]:
            return {
                layer: CandidateScore(self._mean(sums), sum(t.numel() for t in sums))
                for layer, sums in self._streamed(share, runs_of).items()
            }

        return self.world.map_shares(scored, candidates, cost, on_candidate)

    def _finite(self, nll: torch.Tensor, pattern: str, b: int) -> torch.Tensor:
        """`nll` if every value is finite; else stop the run, naming the batch and the first layer that broke.

        A NaN loss would otherwise win a step (`min` keeps a leading NaN) or hide in the all-F baseline.
        """
        if bool(torch.isfinite(nll).all()):
            return nll
        first = b * self.batch_size
        windows = f"window {first}" if self.batches[b].shape[0] == 1 else f"windows {first}–{first + len(nll) - 1}"
        raise IndexCacheError(
            f"non-finite loss on batch {b} ({windows}) under pattern {pattern}: the hidden states first turn "
            f"non-finite in {self._first_non_finite(pattern, b)}; check the weights and --dtype"
        )

    @torch.no_grad()
    def _first_non_finite(self, pattern: str, b: int) -> str:
        """Rerun batch `b` one layer at a time and name where the activations stop being finite."""
        if self.link.world.stages > 1:
            return "a layer of the pipeline (rerun without --pipeline-stages to name it)"
        ids = self.batches[b]
        self.state.pattern = pattern
        hidden, inputs = self.lw.embed(ids)
        if not bool(torch.isfinite(hidden).all()):
            return "the embeddings"
        for layer in range(self.lw.num_layers):
            hidden = self.lw.run_layers(hidden, inputs, layer, layer + 1)
            if not bool(torch.isfinite(hidden).all()):
                return f"layer {layer}"
        return "the final norm / LM head"

    def loss(self, pattern: str) -> float:
        """Exact loss of `pattern`, its window batches shared among the replicas (one process: on its threads)."""
        batches = range(len(self.batches))
        if self.world.size == 1:
            return self._mean(self._map_batches(lambda b: self._batch_nll(pattern, b), batches))
        sums = self.world.map_shares(
            lambda share: {b: nll[0] for b, nll in self._streamed(share, lambda b: [(pattern, b, 0, None)]).items()},
            batches,
        )
        return self._mean(list(sums.values()))

    def commit(self, pattern: str) -> float | None:
        """Make `pattern` the committed one. Full forwards need no state, so there is no loss to return."""
        return None

    def score(self, pattern: str, candidates: list[int], on_candidate=None) -> dict[int, CandidateScore]:
        """Loss of each `flip(pattern, l)` for l in `candidates`, the candidates shared among the ranks."""

        batches = range(len(self.batches))
        if self.link.world.stages > 1:
            runs = lambda layer: [(flip(pattern, layer), b, 0, None) for b in batches]  # noqa: E731
            return self._pipelined_scores(candidates, runs, on_candidate=on_candidate)

        def full_forwards(layer: int) -> CandidateScore:
            sums = self._map_batches(lambda b: self._batch_nll(flip(pattern, layer), b), batches)
            return CandidateScore(self._mean(sums), self.num_windows)

        return self.world.map(full_forwards, candidates, on_result=on_candidate)


@dataclass
class _Activations:
    """One batch's activations under one pattern, from some layer on.

    Attributes:
        hidden: layer → hidden [B, S, D] entering that layer (kept layers only).
        entering_index: kept layer → top-k indices int32 [B, S, k] in the buffer when that layer starts (None
            before layer 0); layers that share one buffer share one stored tensor.
        entering_state: kept layer → the cross-layer state (e.g. shared KV) when that layer starts; None where
            the family has none.
        nll: summed NLL per window, fp64 [B], of the run that produced them.
        pattern: the pattern they were computed under (a candidate's run; None for the prefix cache).
    """

    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    entering_index: dict[int, torch.Tensor | None] = field(default_factory=dict)
    entering_state: dict[int, LayerState] = field(default_factory=dict)
    nll: torch.Tensor | None = None
    pattern: str | None = None

    def install(self, other: _Activations) -> None:
        """Take over `other`'s layers (a later start of the same pattern) and its loss."""
        self.hidden.update(other.hidden)
        self.entering_index.update(other.entering_index)
        self.entering_state.update(other.entering_state)
        self.nll = other.nll

    def keep_below(self, layer: int) -> None:
        """Forget the layers from `layer` on (they no longer hold for the pattern to come)."""
        for kept in [k for k in self.hidden if k >= layer]:
            del self.hidden[kept], self.entering_index[kept], self.entering_state[kept]

    def restart_layer(self, pattern: str) -> int | None:
        """The last kept layer whose entering activations also hold under `pattern` (those entering layer j
        depend on layers < j only, so every kept j up to the first layer where the patterns differ), or None."""
        if self.pattern is None:  # a run that never finished
            return None
        differs = next((i for i, (a, c) in enumerate(zip(self.pattern, pattern, strict=True)) if a != c), len(pattern))
        valid = [k for k in self.hidden if k <= differs]
        return max(valid) if valid else None


class _Suffixes:
    """Candidates' own runs from their restart layer on, by candidate layer and batch, kept across steps.

    Committing a flip of l* would rerun layers ≥ l* on every window; the winner already ran exactly that while
    being scored, so its recorded activations are installed instead. The other candidates' runs stay: after the
    flip of l*, candidate l < l* differs from its last run only from l* on, so it restarts at l* from its own run
    rather than at l from the prefix cache (the same activations, bit for bit). At most `budget` hidden-state
    tensors (one per kept layer and batch) are held; to fit a new run the other candidates' runs are dropped
    (the latest layers first: they restart latest anyway), never the step's best; a run that still does not fit
    is not recorded (the winner's is then recomputed at commit).
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.held: dict[int, dict[int, _Activations]] = {}
        self.best: int | None = None  # the step's best fully scored candidate: the likely winner

    @property
    def used(self) -> int:
        return sum(len(a.hidden) for runs in self.held.values() for a in runs.values())

    def get(self, layer: int, batch: int) -> _Activations | None:
        return self.held.get(layer, {}).get(batch)

    def make_room(self, tensors: int, scoring: int) -> bool:
        """Whether `tensors` more fit, after dropping other candidates' runs than `scoring`'s and the best's."""
        droppable = sorted(set(self.held) - {scoring, self.best}, reverse=True)
        while self.used + tensors > self.budget and droppable:
            del self.held[droppable.pop(0)]
        return self.used + tensors <= self.budget

    def add(self, layer: int, batch: int, acts: _Activations) -> None:
        self.held.setdefault(layer, {})[batch] = acts

    def discard(self, layer: int, batch: int) -> None:
        self.held.get(layer, {}).pop(batch, None)

    def keep_only(self, layers) -> None:
        for layer in set(self.held) - set(layers):
            del self.held[layer]

    def take(self, committed: str, winner: int | None, keep_others: bool) -> dict[int, _Activations]:
        """The winner's runs under `committed` (none for None), by batch. The other candidates' runs are kept,
        cut to what still holds for their flip of `committed`, when `keep_others`; else dropped."""
        taken = {b: a for b, a in self.held.pop(winner, {}).items() if a.pattern == committed}
        if not keep_others:
            self.held = {}
        for layer in list(self.held):
            if committed[layer] != FULL:
                del self.held[layer]
                continue
            for run in self.held[layer].values():
                restart = run.restart_layer(flip(committed, layer))
                run.keep_below(0 if restart is None else restart + 1)
            self.held[layer] = {b: run for b, run in self.held[layer].items() if run.hidden}
        self.best = None
        return taken


@dataclass(frozen=True)
class CachePlan:
    """Where the prefix cache lives and how sparsely it keeps layers.

    Attributes:
        location: "device" (the model's own device) or "host" (CPU memory, pinned when a GPU is used).
        every: keep the hidden states entering every `every`-th layer; candidates recompute from the nearest
            kept layer below them.
        spare: room for candidates' own activations, as a multiple of the cache: with 2 the best candidate so
            far and the one being scored both fit, so every commit installs the winner's run instead of
            recomputing it; with `reuse_room(num_layers)` every candidate's run fits, so each also restarts from
            its own run after a later layer's flip.
    """

    location: str = "device"
    every: int = 1
    spare: float = 2.0

    def describe(self) -> str:
        kept = "every layer" if self.every == 1 else f"every {self.every} layers (recomputing between)"
        if self.spare:
            reuse = f"candidates' activations reused at commit and after later flips (room {self.spare:.2g}× the cache)"
        else:
            reuse = "commits recompute the winner's layers"
        return f"prefix cache in {self.location} memory, {kept}; {reuse}"


def reuse_room(num_layers: int) -> float:
    """Room, as a multiple of the cache, for every candidate's run of the first step (candidate l keeps layers
    l … N−1: (N−1)/2 caches in all) and the one being scored."""
    return (num_layers + 1) / 2


def parse_cache_option(requested: str) -> tuple[str, int | None]:
    """`auto`, `device`, `host` → (that, None); `every:K` → ("every", K)."""
    if requested in ("auto", "device", "host"):
        return requested, None
    match = re.fullmatch(r"every:([1-9][0-9]*)", requested)
    if not match:
        raise IndexCacheError(f"--cache {requested} is not one of auto, device, host or every:K (K ≥ 1)")
    return "every", int(match[1])


def plan_cache(
    lw: LayerwiseModel, windows: torch.Tensor, requested: str = "auto", layers: int | None = None
) -> CachePlan:
    """Choose where the prefix cache of `layers` layers (default: all; a pipeline stage's own) fits: `device`,
    `host`, `every:K`, or `auto` (from free memory).

    The cache (hidden states and top-k index buffers of the kept layers, `cache_bytes_per_layer`) takes at most
    half the free memory of its location; `spare` (room for candidates' activations, at most `reuse_room`) comes
    out of what is left up to three quarters.
    """
    kind, every = parse_cache_option(requested)
    on_gpu = lw.input_device.type == "cuda"
    host = "host" if on_gpu else "device"
    need = cache_bytes_per_layer(lw, windows) * (lw.num_layers if layers is None else layers)
    host_free = _host_available_bytes()
    free = {"host": host_free, "device": device_free_bytes(lw.input_device) if on_gpu else host_free}

    def with_spare(location: str, every: int) -> CachePlan:
        kept = need / every
        room = (0.75 * free[location] - kept) / kept
        return CachePlan(location, every, max(0.0, min(reuse_room(lw.num_layers), room)))

    if kind == "every":
        return with_spare(host, every)
    if kind != "auto":
        return with_spare(kind, 1)
    if on_gpu and need <= 0.5 * free["device"]:
        return with_spare("device", 1)
    if need <= 0.5 * free["host"]:
        return with_spare(host, 1)
    return with_spare(host, math.ceil(need / (0.5 * free["host"])))


def cache_bytes_per_layer(lw: LayerwiseModel, windows: torch.Tensor) -> int:
    """Bytes one kept layer costs the cache over all windows: its input hidden states [N, L, D] and, at worst
    (every layer F, as at the start), its own top-k index buffer [N, L, k] (int32; deepseek_v4's int64 entry ids,
    at most L / 4 of them: `arch.index_bytes`, `arch.tokens_per_entry`)."""
    itemsize = lw.base.embed_tokens.weight.element_size()
    selectable = windows.shape[1] // lw.arch.tokens_per_entry(lw.base.config)
    topk = min(lw.arch.keys_kept(lw.base.config) or 0, selectable)
    # hidden values per token: × hyper-connection streams where the family has them
    return windows.numel() * (lw.hidden_values_per_token * itemsize + topk * lw.arch.index_bytes)


def device_free_bytes(device: torch.device) -> int:
    """What this process can still allocate on `device`: the driver's free memory plus what PyTorch's caching
    allocator holds unused. The driver alone counts a finished run's cached blocks as taken, so a second search in
    the same process (a benchmark, a notebook) would see too little and put the cache in slow host memory."""
    held_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + held_unused


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class CachedScorer(PatternScorer):
    """Scores a flip of layer l by restarting at l from the committed pattern's cached prefix (`cached`)."""

    strategy = "cached"

    def __init__(
        self,
        lw,
        state,
        windows,
        batch_size=1,
        plan: CachePlan | None = None,
        first_label: int = 1,
        world=None,
        link=None,
        threads: int = 1,
    ):
        super().__init__(lw, state, windows, batch_size, first_label, world, link, threads)
        self.plan = plan or CachePlan()
        self.committed: str | None = None
        self.inputs: list[LayerInputs] = []
        self.cache: list[_Activations] = []
        cache_tensors = len(range(0, lw.num_layers, self.plan.every)) * len(self.batches)
        self.suffixes = _Suffixes(int(self.plan.spare * cache_tensors))

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        if self.plan.location == "host" and t.is_cuda:
            return t.to("cpu").pin_memory()
        return t

    def _load(self, t: torch.Tensor | None, like: torch.device) -> torch.Tensor | None:
        return None if t is None else t.to(like, non_blocking=True)

    def _store_state(self, layer_state: LayerState, host_copies: dict[int, torch.Tensor]) -> LayerState:
        """A snapshot of the cross-layer state. Layers add or replace entries but never write into a tensor, so on
        the host each tensor is copied once per run (`host_copies`: id of a live device tensor → its host copy), not
        once per layer that sees it."""
        snapshot = self.lw.snapshot(layer_state)
        if snapshot is not None and self.plan.location == "host":
            for key, tensors in snapshot.items():
                for t in tensors:
                    if id(t) not in host_copies:
                        host_copies[id(t)] = self._store(t)
                snapshot[key] = tuple(host_copies[id(t)] for t in tensors)
        return snapshot

    def _load_state(self, snapshot: LayerState) -> LayerState:
        """A fresh, writable cross-layer state holding `snapshot`'s entries on the model's device."""
        layer_state = self.lw.snapshot(snapshot)
        if layer_state is not None:
            layer_state.to(self.lw.input_device, non_blocking=True)  # KVSharingDict.to works in place
        return layer_state

    def _enter(self, b: int, start: int, entering: _Activations | None = None) -> tuple[torch.Tensor, LayerState]:
        """The activations entering kept layer `start` — `entering`'s, by default the committed pattern's cache
        — on the model's device."""
        entry = self.cache[b] if entering is None else entering
        self.state.buffer = self._load(entry.entering_index[start], self.lw.input_device)
        return self._load(entry.hidden[start], self.lw.input_device), self._load_state(entry.entering_state[start])

    def _run(self, b: int, start: int, stop: int, hidden, layer_state, into) -> torch.Tensor:
        """hidden entering layer `start` → entering `stop`, recording each kept layer's inputs into `into`."""
        host_copies: dict[int, torch.Tensor] = {}
        source, stored = None, None  # the last index buffer stored, so S layers sharing it store it once
        for layer in range(start, stop):
            if into is not None and layer % self.plan.every == 0:
                if self.state.buffer is not source:
                    source = self.state.buffer
                    stored = None if source is None else self._store(source)
                into.entering_index[layer] = stored
                into.entering_state[layer] = self._store_state(layer_state, host_copies)
                into.hidden[layer] = self._store(hidden)
            hidden = self.lw.run_layers(hidden, self.inputs[b], layer, layer + 1, layer_state)
        self._count((stop - start) * self.batches[b].shape[0])
        return hidden

    def _run_from(
        self, pattern: str, b: int, start: int, into: _Activations | None, entering: _Activations | None = None
    ) -> torch.Tensor:
        """Run batch `b` from kept layer `start` to the end under `pattern` on one stage holding every layer,
        recording into `into` if given; `entering` holds the activations entering `start` (default: the prefix
        cache). Returns the summed NLL per window, fp64 [B]."""
        self.state.pattern = pattern
        hidden, layer_state = self._enter(b, start, entering)
        hidden = self._run(b, start, self.lw.num_layers, hidden, layer_state, into)
        nll = self._finite(self.lw.nll_sum(hidden, self.batches[b], self.first_label), pattern, b)
        if into is not None:
            into.nll, into.pattern = nll, pattern
        return nll

    def _first_kept(self, layer: int) -> int:
        return layer - layer % self.plan.every

    def _restart_cost(self, layer: int) -> int:
        """Layers a flip of `layer` reruns per window: what balances the ranks' shares of a step."""
        return self.lw.num_layers - self._first_kept(layer)

    @torch.no_grad()
    def commit(self, pattern: str) -> float | None:
        """Cache `pattern`'s activations and return its loss. After a flip of l only activations from l on
        change: the winner's recorded run supplies them, and batches it could not record are recomputed."""
        if self.committed is None:
            self.cache, self.inputs = [], []
            for ids in self.batches:  # stages after the first hold no embeddings, only the layer inputs
                hidden, inputs = self.lw.embed(ids) if self.link.first else (None, self.lw.layer_inputs(ids))
                entry = _Activations({}, {0: None}, {0: self.lw.new_layer_state()})
                if hidden is not None:
                    entry.hidden[0] = self._store(hidden)
                self.cache.append(entry)
                self.inputs.append(inputs)
            start, winner = 0, None
        else:
            start = next(i for i, (a, c) in enumerate(zip(self.committed, pattern, strict=True)) if a != c)
            winner = start if pattern == flip(self.committed, start) else None
        recorded = self.suffixes.take(pattern, winner, keep_others=self.world.size == 1)
        for b, run in recorded.items():
            self.cache[b].install(run)
        first = self._first_kept(start)
        rerun = [(pattern, b, first, entry) for b, entry in enumerate(self.cache) if b not in recorded]
        if self.link.world.stages > 1:
            self._stream(rerun)
        else:
            self._map_batches(lambda run: self._run_from(*run), rerun)
        self.committed = pattern
        return self._mean([entry.nll for entry in self.cache])

    def _flip_nll(self, layer: int, b: int) -> torch.Tensor:
        """Summed NLL of batch `b` with `layer` flipped, from the candidate's own last run where it still holds
        (a later layer flipped since), else from the prefix cache; the run is kept while there is room."""
        assert self.committed is not None and self.committed[layer] == FULL
        pattern = flip(self.committed, layer)
        with self._lock:
            own = self.suffixes.get(layer, b)
            restart = own.restart_layer(pattern) if own is not None else None
            if restart is None:
                self.suffixes.discard(layer, b)
                own, start, entering = _Activations(), self._first_kept(layer), None
            else:
                own.keep_below(restart + 1)  # the layers after it are rerun
                start, entering = restart, own
            new_layers = len(range(start, self.lw.num_layers, self.plan.every)) - (entering is not None)
            into = own if self.suffixes.make_room(new_layers, scoring=layer) else None
            if into is not None:
                self.suffixes.add(layer, b, into)  # held while it runs, so other threads count its room
        return self._run_from(pattern, b, start, into, entering)

    def _keep_best_suffix(self, scores: dict[int, CandidateScore]) -> None:
        """The best fully scored candidate so far (ties: lowest layer, as the search) is the one likely to win:
        its run is never dropped for room."""
        exact = [layer for layer, s in scores.items() if s.windows == self.num_windows]
        self.suffixes.best = min(exact, key=lambda layer: (scores[layer].loss, layer)) if exact else None

    def score(self, pattern, candidates, on_candidate=None):
        if pattern != self.committed:
            self.commit(pattern)
        if self.link.world.stages > 1:
            batches = range(len(self.batches))
            runs = lambda layer: [(flip(pattern, layer), b, self._first_kept(layer), None) for b in batches]  # noqa: E731
            return self._pipelined_scores(candidates, runs, self._restart_cost, on_candidate)
        scores = {}  # this rank's; a winner scored elsewhere is recomputed here at commit

        def restart(layer: int) -> CandidateScore:
            sums = self._map_batches(lambda b: self._flip_nll(layer, b), range(len(self.batches)))
            scores[layer] = CandidateScore(self._mean(sums), self.num_windows)
            self._keep_best_suffix(scores)
            return scores[layer]

        return self.world.map(restart, candidates, cost=self._restart_cost, on_result=on_candidate)


class PrunedScorer(CachedScorer):
    """`cached` plus successive halving over window batches: only promising candidates see every window.

    Stage s scores the surviving candidates on the first `stages[s]` batches (re-using earlier batches' sums),
    then keeps the best `keep` fraction (at least `min_survivors`). Only the final stage's losses are exact.
    Recorded runs of pruned candidates are dropped at once, leaving room for the survivors'.
    """

    strategy = "pruned"

    def __init__(
        self,
        lw,
        state,
        windows,
        batch_size=1,
        plan=None,
        keep: float = 0.5,
        min_survivors: int = 2,
        first_label=1,
        world=None,
        link=None,
        threads=1,
    ):
        super().__init__(lw, state, windows, batch_size, plan, first_label, world, link, threads)
        self.keep = keep
        self.min_survivors = min_survivors
        n = len(self.batches)
        stages, size = [], max(1, n // 8)
        while size < n:
            stages.append(size)
            size *= 2
        self.stages = [*stages, n]

    def describe(self) -> dict:
        return {"keep": self.keep, "min_survivors": self.min_survivors, "stage_batches": self.stages}

    def score(self, pattern, candidates, on_candidate=None):
        if pattern != self.committed:
            self.commit(pattern)
        sums: dict[int, list[torch.Tensor]] = {layer: [] for layer in candidates}
        alive = list(candidates)
        scores: dict[int, CandidateScore] = {}
        for s, upto in enumerate(self.stages):
            cost = lambda layer, upto=upto: self._restart_cost(layer) * (upto - len(sums[layer]))  # noqa: E731
            if self.link.world.stages > 1:
                runs = lambda layer, upto=upto: [  # noqa: E731
                    (flip(pattern, layer), b, self._first_kept(layer), None) for b in range(len(sums[layer]), upto)
                ]
                added = self.world.map_shares(lambda share, runs=runs: self._streamed(share, runs), alive, cost)
            else:
                added = self.world.map(
                    lambda layer, upto=upto: self._map_batches(
                        lambda b: self._flip_nll(layer, b), range(len(sums[layer]), upto)
                    ),
                    alive,
                    cost=cost,
                )
            for layer in alive:
                sums[layer] += added[layer]
                seen = sum(t.numel() for t in sums[layer])
                scores[layer] = CandidateScore(self._mean(sums[layer]), seen)
            if s + 1 < len(self.stages):
                survivors = max(self.min_survivors, math.ceil(self.keep * len(alive)))
                alive = sorted(alive, key=lambda layer: (scores[layer].loss, layer))[:survivors]
                self.suffixes.keep_only(alive)
        self._keep_best_suffix(scores)
        if on_candidate:
            for layer in candidates:
                on_candidate(layer, scores[layer])
        return scores
