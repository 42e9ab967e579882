"""Greedy search: each step is the brute-force argmin, rounding, layer 0, determinism, resume, strategies."""

from __future__ import annotations

import pytest
import torch

from indexcache.errors import IndexCacheError
from indexcache.models import architecture_for
from indexcache.patterns.layout import full_layers, num_full_for_ratio
from indexcache.runtime.forward import LayerwiseModel
from indexcache.runtime.patch import index_sharing
from indexcache.search import scoring
from indexcache.search.greedy import SearchState, block_starts, greedy_search, initial_state
from indexcache.search.scoring import (
    CachedScorer,
    CachePlan,
    PatternScorer,
    PrunedScorer,
    flip,
    plan_cache,
    reuse_room,
)

from tiny_models import glm_model, random_ids

NUM_LAYERS = 7
ARCH = architecture_for("glm_moe_dsa")


def _run(
    strategy: str,
    target: int,
    seed: int = 0,
    plan: CachePlan | None = None,
    state=None,
    checkpoint=None,
    batch_size: int = 2,
    forced=(),
    threads: int = 1,
):
    model = glm_model(seed=seed, num_layers=NUM_LAYERS)
    windows = random_ids(4, 40, seed=seed)
    lw = LayerwiseModel(model, ARCH)
    with torch.no_grad(), index_sharing(model, ARCH) as sharing:
        scorer = {
            "naive": lambda: PatternScorer(lw, sharing, windows, batch_size, threads=threads),
            "cached": lambda: CachedScorer(lw, sharing, windows, batch_size, plan, threads=threads),
            "pruned": lambda: PrunedScorer(lw, sharing, windows, 1, plan, threads=threads),
        }[strategy]()
        state = state or initial_state(NUM_LAYERS, list(range(NUM_LAYERS)), target, list(forced))
        result = greedy_search(scorer, state, checkpoint=checkpoint)
    return result, scorer, (model, windows)


def _brute_force_losses(model, windows, pattern: str, candidates: list[int]) -> dict[int, float]:
    lw = LayerwiseModel(model, ARCH)
    with torch.no_grad(), index_sharing(model, ARCH) as sharing:
        scorer = PatternScorer(lw, sharing, windows, batch_size=4)  # other batching than the search's
        return {layer: scorer.loss(flip(pattern, layer)) for layer in candidates}


@pytest.mark.parametrize("seed", [0, 1], ids=lambda s: f"seed{s}")
def test_each_step_is_the_brute_force_argmin(seed):
    state, _, (model, windows) = _run("naive", target=2, seed=seed)
    assert len(state.trajectory) == NUM_LAYERS - 2
    previous = "F" * NUM_LAYERS
    for step in state.trajectory:
        candidates = [i for i, c in enumerate(previous) if c == "F" and i != 0]
        assert sorted(step.candidates) == candidates
        brute = _brute_force_losses(model, windows, previous, candidates)
        for layer in candidates:
            assert step.candidates[layer] == pytest.approx(brute[layer], rel=1e-6)
        assert step.flipped == min(candidates, key=lambda i: (brute[i], i))
        assert step.pattern == flip(previous, step.flipped)
        previous = step.pattern
    assert state.pattern[0] == "F" and state.pattern.count("F") == 2


@pytest.mark.parametrize(
    "ratio,layers,expected",
    [(0.25, 16, 4), (0.25, 78, 20), (0.5, 7, 4), (1.0, 7, 7), (0.01, 7, 1), (0.3, 10, 3), (1 / 3, 9, 3)],
    ids=lambda v: str(v),
)
def test_ratio_rounding(ratio, layers, expected):
    assert num_full_for_ratio(ratio, layers) == expected


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan")], ids=str)
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(IndexCacheError, match="outside"):
        num_full_for_ratio(ratio, 16)


def test_target_one_keeps_only_layer_zero_and_runs_are_deterministic():
    first, _, _ = _run("cached", target=1)
    second, _, _ = _run("cached", target=1)
    assert first.pattern == "F" + "S" * (NUM_LAYERS - 1)
    assert [s.__dict__ for s in first.trajectory] == [s.__dict__ for s in second.trajectory]


@pytest.mark.parametrize("plan", [CachePlan("device", 1), CachePlan("device", 3)], ids=["every1", "every3"])
def test_cached_equals_naive(plan):
    naive, naive_scorer, _ = _run("naive", target=2)
    cached, cached_scorer, _ = _run("cached", target=2, plan=plan)
    assert cached.pattern == naive.pattern
    assert cached.loss_all_full == pytest.approx(naive.loss_all_full, rel=1e-6)
    for a, b in zip(naive.trajectory, cached.trajectory, strict=True):
        assert a.flipped == b.flipped
        assert b.candidates == pytest.approx(a.candidates, rel=1e-6)
    assert cached_scorer.layer_forwards < naive_scorer.layer_forwards


@pytest.mark.parametrize("every", [1, 3], ids=lambda e: f"every{e}")
@pytest.mark.parametrize("strategy", ["cached", "pruned"])
def test_commit_installs_the_winners_run_instead_of_recomputing(strategy, every):
    spares = (0.0, 0.3, 2.0, reuse_room(NUM_LAYERS))
    runs = {spare: _run(strategy, target=2, plan=CachePlan("device", every, spare)) for spare in spares}
    recomputed, recomputing_scorer, _ = runs[0.0]
    for state, scorer, _ in runs.values():
        assert [s.__dict__ for s in state.trajectory] == [s.__dict__ for s in recomputed.trajectory]
        assert state.loss_all_full == recomputed.loss_all_full
        for mine, theirs in zip(scorer.cache, recomputing_scorer.cache, strict=True):
            assert mine.hidden.keys() == theirs.hidden.keys()
            assert all(torch.equal(mine.hidden[i], theirs.hidden[i]) for i in mine.hidden)
            assert mine.entering_index.keys() == theirs.entering_index.keys() == mine.hidden.keys()
            assert all(torch.equal(mine.entering_index[i], theirs.entering_index[i]) for i in mine.hidden if i)
            assert torch.equal(mine.nll, theirs.nll)
    # With room for two suffixes every commit is free: it would have rerun layers ≥ l* on all 4 windows.
    commit_cost = sum((NUM_LAYERS - (s.flipped - s.flipped % every)) * 4 for s in recomputed.trajectory)
    forwards = [runs[spare][1].layer_forwards for spare in spares]
    assert forwards[2] <= recomputing_scorer.layer_forwards - commit_cost
    assert forwards[3] <= forwards[2] <= forwards[1] <= forwards[0]
    if strategy == "cached":
        # With room for every candidate's run, candidate l restarts at the last flipped layer w when w > l.
        expected, full, last = NUM_LAYERS, set(range(NUM_LAYERS)), 0
        for s in recomputed.trajectory:
            restarts = [max(layer, last) for layer in full - {0}]
            expected += sum(NUM_LAYERS - (r - r % every) for r in restarts)
            full.remove(s.flipped)
            last = s.flipped
        assert forwards[3] == expected * 4


@pytest.mark.parametrize("strategy", ["naive", "cached", "pruned"])
def test_batches_on_two_threads_give_the_same_bits(strategy):
    """Windows scored on two threads at once (the CPU search): the same trajectory, cache and work, bit for bit."""
    plan = CachePlan("device", 1, reuse_room(NUM_LAYERS))
    (one, one_scorer, _), (two, two_scorer, _) = (
        _run(strategy, target=2, plan=plan, batch_size=1, threads=t) for t in (1, 2)
    )
    assert [s.__dict__ for s in two.trajectory] == [s.__dict__ for s in one.trajectory]
    assert two.loss_all_full == one.loss_all_full
    assert two_scorer.layer_forwards == one_scorer.layer_forwards
    assert two_scorer.state.indexer_calls == one_scorer.state.indexer_calls
    for mine, theirs in zip(getattr(two_scorer, "cache", []), getattr(one_scorer, "cache", []), strict=True):
        assert mine.hidden.keys() == theirs.hidden.keys()
        assert all(torch.equal(mine.hidden[i], theirs.hidden[i]) for i in mine.hidden)


def test_cache_plan_follows_free_memory(monkeypatch):
    lw = LayerwiseModel(glm_model(num_layers=NUM_LAYERS), ARCH)
    windows = random_ids(4, 40)
    # fp32 hidden states and int32 top-8 indices per layer
    need = NUM_LAYERS * windows.numel() * (lw.base.config.hidden_size * 4 + 8 * 4)
    for free, expected in [
        (100 * need, CachePlan("device", 1, reuse_room(NUM_LAYERS))),
        (2.4 * need, CachePlan("device", 1, pytest.approx(0.8))),
        (0.5 * need, CachePlan("device", 4, pytest.approx(0.5))),
    ]:
        monkeypatch.setattr(scoring, "_host_available_bytes", lambda free=free: int(free))
        assert plan_cache(lw, windows) == expected
    assert plan_cache(lw, windows, "every:2").every == 2
    assert "commits recompute" in CachePlan("host", 1, 0.0).describe()
    # Room for the hidden states alone, not for the index buffers too: the plan must thin the cache.
    hidden_only = NUM_LAYERS * windows.numel() * lw.base.config.hidden_size * 4
    monkeypatch.setattr(scoring, "_host_available_bytes", lambda: int(2 * hidden_only * 1.05))
    assert plan_cache(lw, windows).every == 2


def test_device_free_memory_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    """After one run in the process, PyTorch keeps freed blocks reserved; the driver reports them as used."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 50 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 20 << 30)
    assert scoring.device_free_bytes(torch.device("cuda", 0)) == 40 << 30


def test_index_buffers_are_stored_with_the_hidden_states_once_per_buffer(monkeypatch):
    """`--cache host` must move the [B, S, k] index buffers too, and S layers sharing one must not copy it."""
    stored = []

    def store(self, t):
        stored.append(t.clone())  # stands in for the copy to pinned host memory
        return stored[-1]

    monkeypatch.setattr(CachedScorer, "_store", store)
    _, scorer, _ = _run("cached", target=3, plan=CachePlan("host", 1, 2.0))
    kept = {id(t) for t in stored}
    for entry in scorer.cache:
        buffers = [t for t in entry.entering_index.values() if t is not None]
        assert buffers and all(id(t) in kept for t in buffers)
        entering = [i for i in full_layers(scorer.committed) if i < NUM_LAYERS - 1]  # F layers with a layer after
        assert len({id(t) for t in buffers}) == len(entering)  # one per F layer, shared by the S layers after it


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("strategy", ["naive", "cached", "pruned"])
def test_interrupted_search_resumes_to_the_same_pattern(strategy):
    full, _, _ = _run(strategy, target=2)
    saved = {}

    def stop_after_two(state: SearchState) -> None:
        saved["json"] = state.to_json()
        if len(state.trajectory) == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        _run(strategy, target=2, checkpoint=stop_after_two)
    resumed, _, _ = _run(strategy, target=2, state=SearchState.from_json(saved["json"]))
    assert resumed.pattern == full.pattern
    assert [s.__dict__ for s in resumed.trajectory] == [s.__dict__ for s in full.trajectory]


def test_pruned_scores_fewer_windows_and_commits_only_exact_candidates():
    pruned, scorer, _ = _run("pruned", target=2)
    _, cached_scorer, _ = _run("cached", target=2, batch_size=1)
    assert scorer.layer_forwards < cached_scorer.layer_forwards
    for step in pruned.trajectory:
        assert step.candidate_windows[step.flipped] == scorer.num_windows
        if len(step.candidates) > 2:
            assert min(step.candidate_windows.values()) < scorer.num_windows


def test_blocks_force_pipeline_stage_starts():
    assert block_starts(10, 3) == [0, 4, 7]
    assert block_starts(78, 4) == [0, 20, 40, 59]
    forced = block_starts(NUM_LAYERS, 2)  # [0, 4]; the target keeps one F layer more than the forced ones
    free, _, _ = _run("cached", target=3)
    assert not set(forced) <= set(full_layers(free.pattern))  # unforced, the search drops a block start
    state, _, _ = _run("cached", target=3, forced=forced)
    assert set(forced) < set(full_layers(state.pattern)) and state.pattern.count("F") == 3
    assert all(set(forced) <= set(full_layers(step.pattern)) for step in state.trajectory)
    with pytest.raises(IndexCacheError, match="block starts"):
        initial_state(NUM_LAYERS, list(range(NUM_LAYERS)), 2, block_starts(NUM_LAYERS, 3))


def _nan_after(model, layer: int, when) -> None:
    """Make decoder `layer` output NaN whenever `when()` holds (a broken weight, a bf16 overflow)."""

    def hook(module, args, output):
        if not when():
            return output
        if isinstance(output, tuple):
            return (output[0] * float("nan"), *output[1:])
        return output * float("nan")

    ARCH.layers(model)[layer].register_forward_hook(hook)


@pytest.mark.parametrize("strategy", ["naive", "cached"])
def test_non_finite_all_full_loss_stops_naming_layer_and_batch(strategy):
    model = glm_model(num_layers=NUM_LAYERS)
    _nan_after(model, 3, lambda: True)
    lw = LayerwiseModel(model, ARCH)
    with torch.no_grad(), index_sharing(model, ARCH) as sharing:
        scorer = (PatternScorer if strategy == "naive" else CachedScorer)(lw, sharing, random_ids(4, 40), 2)
        with pytest.raises(IndexCacheError, match=r"batch 0 \(windows 0–1\) under pattern F{7}: .* in layer 3;"):
            greedy_search(scorer, initial_state(NUM_LAYERS, list(range(NUM_LAYERS)), 2, []))


@pytest.mark.parametrize("strategy", ["naive", "cached", "pruned"])
def test_nan_candidate_stops_the_run_instead_of_winning(strategy):
    model = glm_model(num_layers=NUM_LAYERS)
    lw = LayerwiseModel(model, ARCH)
    with torch.no_grad(), index_sharing(model, ARCH) as sharing:
        _nan_after(model, 4, lambda: sharing.pattern[2] == "S")  # only the candidate "layer 2 → S" breaks
        scorer = {"naive": PatternScorer, "cached": CachedScorer, "pruned": PrunedScorer}[strategy](
            lw, sharing, random_ids(4, 40), 1
        )
        with pytest.raises(IndexCacheError, match=r"batch 0 \(window 0\) under pattern FFSFFFF: .* in layer 4;"):
            greedy_search(scorer, initial_state(NUM_LAYERS, list(range(NUM_LAYERS)), 2, []))


class _FixedScores(PatternScorer):
    """A scorer whose candidate losses are given: what the loop does with them, without a model."""

    def __init__(self, losses: dict[int, float]):
        self.losses, self.num_windows = losses, 1

    def commit(self, pattern):
        return 1.0

    def score(self, pattern, candidates, on_candidate=None):
        return {i: scoring.CandidateScore(self.losses[i], 1) for i in candidates}


def test_greedy_loop_refuses_a_nan_candidate_whatever_the_scorer():
    scorer = _FixedScores({1: float("nan"), 2: 0.5, 3: 0.7})
    with pytest.raises(IndexCacheError, match=r"candidate layer 1 → S \(nan\)"):
        greedy_search(scorer, initial_state(4, [0, 1, 2, 3], 3, []))
