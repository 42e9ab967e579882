"""Greedy IndexCache search (Bai et al., arXiv 2603.12201, training-free variant).

Start with every indexer layer F; at each step try turning each remaining F layer (never the first indexer
layer, never a forced block start) into S, score the calibration loss, commit the flip with the lowest loss
(ties: lowest layer), and stop at the target number of F layers. Every candidate's loss is recorded. How
candidates are scored (full forwards, prefix reuse, pruning) lives in `scoring.py`; this file is only the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..errors import IndexCacheError
from ..patterns.layout import first_indexer_layer, from_full_layers, full_layers
from .scoring import CandidateScore, PatternScorer, flip


@dataclass
class Step:
    """One committed flip: the layer turned S, the new pattern and its loss, and every candidate's score."""

    step: int
    flipped: int
    pattern: str
    loss: float
    candidates: dict[int, float]
    candidate_windows: dict[int, int]


@dataclass
class SearchState:
    """Everything needed to continue a search: saved beside the output after every step."""

    start_pattern: str
    target_full: int
    forced_full: list[int]
    loss_all_full: float | None = None
    trajectory: list[Step] = field(default_factory=list)

    @property
    def pattern(self) -> str:
        return self.trajectory[-1].pattern if self.trajectory else self.start_pattern

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SearchState:
        steps = [
            Step(
                **{
                    **s,
                    "candidates": {int(k): v for k, v in s["candidates"].items()},
                    "candidate_windows": {int(k): v for k, v in s["candidate_windows"].items()},
                }
            )
            for s in data["trajectory"]
        ]
        return cls(data["start_pattern"], data["target_full"], data["forced_full"], data["loss_all_full"], steps)


def block_starts(num_layers: int, blocks: int, indexer_layers: list[int] | None = None) -> list[int]:
    """The first indexer layer of each of `blocks` contiguous pipeline stages of decoder layers (sizes as equal
    as possible, larger first), so no stage reads another's top-k. A stage without an indexer layer adds none.

    indexer_layers: the layers with an indexer (`DsaArchitecture.dsa_layer_ids`); None: every layer."""
    if not 1 <= blocks <= num_layers:
        raise IndexCacheError(f"--blocks {blocks} must lie between 1 and the number of layers ({num_layers})")
    have = set(range(num_layers) if indexer_layers is None else indexer_layers)
    base, extra = divmod(num_layers, blocks)
    starts, at = [], 0
    for b in range(blocks):
        size = base + (b < extra)
        starts += [i for i in range(at, at + size) if i in have][:1]
        at += size
    return starts


def initial_state(num_layers: int, indexer_layers: list[int], target_full: int, forced: list[int]) -> SearchState:
    """All layers with an indexer (`indexer_layers`, with weights) start F; the search removes indexers until
    `target_full` remain. The first of them stays F throughout (nothing precedes it to share)."""
    missing = [f for f in forced if f not in indexer_layers]
    if missing:
        raise IndexCacheError(f"layers {missing} must be F (pipeline block starts) but have no indexer weights")
    first = first_indexer_layer(indexer_layers)
    if target_full < len(set(forced) | {first}):
        raise IndexCacheError(
            f"the target keeps {target_full} F layers but layer {first} (the first with an indexer) and the block "
            f"starts already need {len(set(forced) | {first})}; raise --ratio/--num-full or lower --blocks"
        )
    return SearchState(from_full_layers(indexer_layers, num_layers), target_full, sorted(forced))


class Observer:
    """Progress hooks; the CLI draws them with rich. All no-ops by default."""

    def step_started(self, step: int, total: int, candidates: list[int]) -> None: ...
    def candidate_scored(self, layer: int, score: CandidateScore, best: float) -> None: ...
    def step_committed(self, step: Step) -> None: ...


class _BestSoFar:
    """Feeds each scored candidate to the observer with the best exact loss of the step so far."""

    def __init__(self, observer: Observer, num_windows: int):
        self.observer = observer
        self.num_windows = num_windows
        self.best = float("inf")

    def __call__(self, layer: int, score: CandidateScore) -> None:
        if score.windows == self.num_windows:
            self.best = min(self.best, score.loss)
        self.observer.candidate_scored(layer, score, self.best)


def _stop_unless_finite(losses: dict[str, float]) -> None:
    """A NaN must never win a step (`min` keeps a leading NaN) nor pass as a baseline: stop with one line."""
    bad = [f"{name} ({loss})" for name, loss in losses.items() if not math.isfinite(loss)]
    if bad:
        raise IndexCacheError(f"non-finite calibration loss for {', '.join(bad)}; check the weights and --dtype")


def greedy_search(
    scorer: PatternScorer,
    state: SearchState,
    observer: Observer | None = None,
    checkpoint: Callable[[SearchState], None] | None = None,
) -> SearchState:
    """Run (or continue) the greedy search from `state` until it holds `state.target_full` F layers."""
    observer = observer or Observer()
    pattern = state.pattern
    loss = scorer.commit(pattern)
    if state.loss_all_full is None:
        state.loss_all_full = loss if loss is not None else scorer.loss(pattern)
    _stop_unless_finite({"the starting pattern": state.loss_all_full})
    total = len(full_layers(state.start_pattern)) - state.target_full
    while len(full_layers(pattern)) > state.target_full:
        # The first F layer is the first indexer layer: it never turns S.
        candidates = [i for i in full_layers(pattern)[1:] if i not in state.forced_full]
        observer.step_started(len(state.trajectory) + 1, total, candidates)
        report = _BestSoFar(observer, scorer.num_windows)
        scores = scorer.score(pattern, candidates, on_candidate=report)
        _stop_unless_finite({f"candidate layer {i} → S": s.loss for i, s in scores.items()})
        # Only candidates scored on every window compete (pruning leaves others with partial losses).
        exact = [i for i in candidates if scores[i].windows == scorer.num_windows]
        chosen = min(exact, key=lambda i: (scores[i].loss, i))
        pattern = flip(pattern, chosen)
        step = Step(
            step=len(state.trajectory) + 1,
            flipped=chosen,
            pattern=pattern,
            loss=scores[chosen].loss,
            candidates={i: s.loss for i, s in scores.items()},
            candidate_windows={i: s.windows for i, s in scores.items()},
        )
        state.trajectory.append(step)
        scorer.commit(pattern)
        observer.step_committed(step)
        if checkpoint:
            checkpoint(state)
    assert full_layers(pattern)[0] == full_layers(state.start_pattern)[0]
    return state
