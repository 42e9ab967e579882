"""Pipeline stages: each rank of a replica holds a contiguous run of decoder layers, and runs flow through them.

A run (one batch of windows under one pattern, from some layer on) starts on the stage that holds its first
layer, which sends the hidden states and the index buffer (the top-k of the nearest preceding F layer, which an
S layer in the next stage reuses) to the next stage when its layers are done; the last stage computes the loss.
Sends do not wait for the receiver (`isend`, at most `IN_FLIGHT` runs outstanding), and a stage takes a run the
previous stage has sent when one has arrived, else starts the next run that begins in its own layers, so all
stages compute at once. The boundaries are balanced by the work each layer receives in the search
(`layer_work`), within what one device can hold (`balanced_bounds`, `max_layers_per_stage`).
"""

from __future__ import annotations

import bisect
from collections import deque

import torch

from .world import World, _collective

# Runs whose sends may be outstanding at once: enough for the next stage to start one while this one computes
# the next, few enough that the hidden states in transit stay a small multiple of one run's.
IN_FLIGHT = 2
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.bool, torch.float64)
_MAX_DIMS = 6
_FIELDS = 3 + _MAX_DIMS  # per tensor: present, dtype code, number of dims, the dims; after the run's index


def layer_work(num_layers: int, candidates: list[int], steps: int) -> list[float]:
    """Expected forwards of each decoder layer per window in a cached greedy search of `steps` flips among
    `candidates` (the layers that may turn S), taking every remaining candidate as equally likely to flip next.

    Every layer runs once for the starting pattern; at step t each of the K − t candidates still F reruns the
    layers from itself on, and the commit reruns the winner's (a pipeline keeps no candidate's run). So layer l
    works in proportion to the candidates at or below it: later layers get more, and an even split would leave
    the last stage the bottleneck."""
    k = len(candidates)
    work = [1.0] * num_layers
    if k == 0:
        return work
    per_candidate = sum((k - t) / k for t in range(steps)) + steps / k
    for layer in range(num_layers):
        work[layer] += bisect.bisect_right(candidates, layer) * per_candidate
    return work


def balanced_bounds(work: list[float], stages: int, max_layers: int | None = None) -> list[int]:
    """Stage boundaries [0, b1, …, N]: stage s holds layers bounds[s] … bounds[s + 1] − 1, contiguous, at least one
    and at most `max_layers` each, chosen to make the busiest stage's summed `work` as small as possible (ties:
    the earliest boundaries)."""
    n = len(work)
    cap = n if max_layers is None else max_layers
    if not 1 <= stages <= n or stages * cap < n:
        raise ValueError(f"{n} layers do not split into {stages} stages of 1 to {cap} layers")
    prefix = [0.0]
    for w in work:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]  # best[s][i]: layers 0..i-1 over s stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(max(s - 1, i - cap), i):
                load = max(best[s - 1][j], prefix[i] - prefix[j])
                if load < best[s][i]:
                    best[s][i], cut[s][i] = load, j
    bounds = [n]
    for s in range(stages, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    return bounds[::-1]


def max_layers_per_stage(layer_bytes: list[int], other_bytes: int, device_bytes: int, reserve: float) -> int:
    """The most decoder layers one stage may hold so that its weights fit a device of `device_bytes`, keeping
    the `reserve` fraction free for activations: every layer counted at the largest layer's bytes, and the
    embeddings and head (`other_bytes`) on every stage, so the bound holds wherever the boundaries fall. The
    prefix cache goes where it fits (`--cache auto`: host memory when the device has no room)."""
    return max(0, int((device_bytes * (1 - reserve) - other_bytes) // max(layer_bytes)))


class StageLink:
    """This rank's stage: the layers it holds and the sends and receives to the stages either side.

    With one stage (no pipeline) it holds every layer and never communicates.

    Attributes:
        bounds: [0, b1, …, N], stage s holding layers bounds[s] … bounds[s + 1] − 1; start, stop: this stage's.
    """

    def __init__(self, world: World, bounds: list[int]):
        self.world = world
        self.bounds = bounds
        self.stage = world.stage
        self.start, self.stop = bounds[self.stage], bounds[self.stage + 1]
        first_rank = world.replica * world.stages
        self._prev = first_rank + self.stage - 1
        self._next = first_rank + self.stage + 1
        self._last_rank = first_rank + world.stages - 1
        self._sending: deque[list] = deque()
        self._expected, self._count, self._device = 0, 0, torch.device("cpu")
        self._header = self._header_work = None

    @classmethod
    def alone(cls, num_layers: int) -> StageLink:
        return cls(World(), [0, num_layers])

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.world.stages - 1

    def stage_of(self, layer: int) -> int:
        """The stage holding decoder layer `layer`."""
        return bisect.bisect_right(self.bounds, layer) - 1

    def send(self, run: int, tensors: list[torch.Tensor | None]) -> None:
        """Send run `run`'s `tensors` (None: absent, e.g. no index buffer yet) to the next stage without waiting
        for it to take them."""
        header = torch.zeros(1 + len(tensors) * _FIELDS, dtype=torch.int64)
        header[0] = run
        for i, t in enumerate(tensors):
            if t is not None:
                row = [1, _DTYPES.index(t.dtype), t.dim(), *t.shape]
                header[1 + i * _FIELDS : 1 + i * _FIELDS + len(row)] = torch.tensor(row)
        device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
        outgoing = [header.to(device), *(t.contiguous() for t in tensors if t is not None)]
        with _collective("sending to the next stage"):
            works = [torch.distributed.isend(t, self._next, group=self.world.group) for t in outgoing]
        self._sending.append([works, outgoing])  # the tensors must live until their sends complete
        while len(self._sending) > IN_FLIGHT:
            self._wait_oldest()

    def expect(self, runs: int, tensors: int, device: torch.device) -> None:
        """Start a stream in which the previous stage sends `runs` runs of `tensors` tensors each."""
        self._expected, self._count, self._device = runs, tensors, device
        self._listen()

    def _listen(self) -> None:
        self._header = self._header_work = None
        if self._expected:
            self._header = torch.empty(1 + self._count * _FIELDS, dtype=torch.int64, device=self._device)
            with _collective("receiving from the previous stage"):
                self._header_work = torch.distributed.irecv(self._header, self._prev, group=self.world.group)

    @property
    def expecting(self) -> bool:
        """Whether the previous stage still has runs to send in this stream."""
        return self._expected > 0

    def arrived(self) -> bool:
        """Whether the next run from the previous stage is here (taking it will not wait)."""
        return self._header_work is not None and self._header_work.is_completed()

    def receive(self) -> tuple[int, list[torch.Tensor | None]]:
        """The next run the previous stage sent: its index and its tensors, on the stream's device."""
        with _collective("receiving from the previous stage"):
            self._header_work.wait()
            run, *fields = self._header.tolist()
            out: list[torch.Tensor | None] = []
            for present, dtype, dims, *shape in (fields[i : i + _FIELDS] for i in range(0, len(fields), _FIELDS)):
                if not present:
                    out.append(None)
                    continue
                t = torch.empty(shape[:dims], dtype=_DTYPES[dtype], device=self._device)
                torch.distributed.recv(t, self._prev, group=self.world.group)
                out.append(t)
        self._expected -= 1
        self._listen()  # only now: the tensors above came on the same channel, after this run's header
        return run, out

    def flush(self) -> None:
        """Wait until every send has been received."""
        while self._sending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        works, _ = self._sending.popleft()
        with _collective("sending to the next stage"):
            for work in works:
                work.wait()

    def from_last(self, obj):
        """The last stage's `obj`, on every stage of this pipeline."""
        if self.world.stages == 1:
            return obj
        box = [obj]
        with _collective("receiving the last stage's losses"):
            torch.distributed.broadcast_object_list(box, src=self._last_rank, group=self.world.group)
        return box[0]
