"""The Python API behind the CLI: `search`, `evaluate`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import defaults
from .atomic import write_json
from .calib import DataSpec, Windows
from .distributed import PeerLost, World, current
from .distributed.pipeline import StageLink, balanced_bounds, layer_work, max_layers_per_stage
from .errors import IndexCacheError
from .models import Checkpoint, LoadedModel, load_weights, open_checkpoint
from .models.loading import resolve_device, weight_bytes_by_layer
from .patterns import file as pattern_file
from .patterns.layout import from_full_layers, full_layers, num_full_for_ratio, uniform
from .search.greedy import Observer, SearchState, block_starts, greedy_search, initial_state
from .search.scoring import (
    CachedScorer,
    PatternScorer,
    PrunedScorer,
    parse_cache_option,
    plan_cache,
    window_threads,
)
from .steps import calibration_context, calibration_windows


def search_state_path(output: Path) -> Path:
    """Where `search` saves its state after every step, for `resume=True`."""
    return output.with_name(output.name + ".state.json")


def _read_state(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict) or not {"inputs", "state", "layer_forwards", "seconds"} <= saved.keys():
        raise IndexCacheError(f"--resume: {path} is not a saved search; delete it and run without --resume")
    return saved


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise IndexCacheError(f"--batch-size {batch_size} must be at least 1")


def _check_search_options(output: Path, ratio, num_full, strategy, blocks, batch_size, cache, prune_keep):
    """Reject bad search options before a model is loaded, so a typo costs seconds, not a model load."""
    if output.is_dir():
        raise IndexCacheError(f"output {output} is a folder; give the pattern JSON file to write (-o)")
    if num_full is None:
        if ratio is None:
            raise IndexCacheError("give either a ratio or a number of F layers (--ratio / --num-full)")
        num_full_for_ratio(ratio, 1)
    if strategy not in defaults.STRATEGIES:
        raise IndexCacheError(f"--strategy {strategy} is not one of {', '.join(defaults.STRATEGIES)}")
    if blocks is not None and blocks < 1:
        raise IndexCacheError(f"--blocks {blocks} must be at least 1")
    _check_batch_size(batch_size)
    parse_cache_option(cache)
    if not 0.0 < prune_keep <= 1.0:
        raise IndexCacheError(f"--prune-keep {prune_keep} is outside (0, 1]: the fraction of candidates kept")


def make_scorer(
    strategy,
    lw,
    state,
    windows: Windows,
    batch_size,
    cache,
    prune_keep,
    world: World | None = None,
    link: StageLink | None = None,
    threads: int = 1,
) -> PatternScorer:
    """The scorer of `strategy` (naive, cached, pruned) over `windows`, with its prefix-cache plan; under several
    processes (`world`) each step's candidates are shared among the replicas, and `link` is this rank's
    pipeline stage (its prefix cache holds the stage's layers only); `threads` batches run at once."""
    ids, first_label = windows.input_ids, windows.first_label
    where = {"first_label": first_label, "world": world, "link": link, "threads": threads}
    if strategy == "naive":
        return PatternScorer(lw, state, ids, batch_size, **where)
    plan = plan_cache(lw, ids, cache, None if link is None else link.stop - link.start)
    if link is not None:  # a pipeline learns a share's losses only at its end: it keeps no candidate's run
        plan = replace(plan, spare=0.0)
    if strategy == "cached":
        return CachedScorer(lw, state, ids, batch_size, plan, **where)
    return PrunedScorer(lw, state, ids, batch_size, plan, keep=prune_keep, **where)


def pipeline_stage(
    world: World, checkpoint: Checkpoint, device: str, device_map, work: list[float]
) -> StageLink | None:
    """This rank's stage when `world` is cut into pipelines (None otherwise): contiguous layers, the boundaries
    balanced by `work`, each layer's expected forwards in the command (`pipeline.layer_work` for a search), with
    no more layers per stage than the GPU `device` holds (from the safetensors headers' sizes)."""
    if world.stages == 1:
        return None
    if device_map is not None:
        raise IndexCacheError("--pipeline-stages places the layers itself, one stage per GPU; drop --device-map")
    if checkpoint.arch.shared_state:
        raise IndexCacheError(
            f"{checkpoint.arch.model_type} layers share their {checkpoint.arch.shared_state} with later layers, "
            "which pipeline stages do not carry between GPUs; run without --pipeline-stages"
        )
    if world.stages > checkpoint.num_layers:
        raise IndexCacheError(
            f"--pipeline-stages {world.stages} exceeds the model's {checkpoint.num_layers} decoder layers"
        )
    max_layers = None
    sizes = weight_bytes_by_layer(checkpoint) if device.startswith("cuda") else None
    if sizes is not None:
        capacity = torch.cuda.get_device_properties(torch.device(device)).total_memory
        max_layers = max_layers_per_stage(*sizes, capacity, defaults.STAGE_MEMORY_RESERVE)
        if max_layers * world.stages < checkpoint.num_layers:
            raise IndexCacheError(
                f"{world.stages} stages of at most {max_layers} layers (what a {capacity / 2**30:.0f} GiB GPU holds "
                f"of these weights) cannot hold the model's {checkpoint.num_layers} layers; use more GPUs per "
                "pipeline (--pipeline-stages)"
            )
    return StageLink(world, balanced_bounds(work, world.stages, max_layers))


def _held(link: StageLink | None) -> range | None:
    return None if link is None else range(link.start, link.stop)


@dataclass
class _Resumable:
    """A search state with the work already spent on it (zero for a fresh start)."""

    state: SearchState
    layer_forwards: int = 0
    seconds: float = 0.0


def start_or_resume(state_path: Path, inputs_key: dict, fresh: SearchState, resume: bool, log) -> _Resumable:
    """`fresh`, or the state saved at `state_path` when resuming a search with the very same inputs."""
    if not resume:
        return _Resumable(fresh)
    saved = _read_state(state_path)
    if saved["inputs"] != inputs_key:
        changed = [k for k in inputs_key if saved["inputs"].get(k) != inputs_key[k]]
        raise IndexCacheError(f"--resume: saved search differs in {', '.join(changed)}; run without --resume")
    log(f"resuming after step {len(saved['state']['trajectory'])} from {state_path}")
    return _Resumable(SearchState.from_json(saved["state"]), saved["layer_forwards"], saved["seconds"])


def search(
    model: str | None = None,
    ratio: float | None = defaults.RATIO,
    num_full: int | None = None,
    data: DataSpec | Windows | None = None,
    output: str | Path = defaults.OUTPUT,
    strategy: str = defaults.STRATEGY,
    blocks: int | None = None,
    resume: bool = False,
    batch_size: int = defaults.BATCH_SIZE,
    cache: str = defaults.CACHE,
    prune_keep: float = defaults.PRUNE_KEEP,
    kernels: str = defaults.KERNELS,
    dtype: str = defaults.DTYPE,
    device: str = defaults.DEVICE,
    device_map: str | dict | None = None,
    tokenizer: str | None = None,
    observer: Observer | None = None,
    log=print,
    max_memory: dict | None = None,
    pipeline_stages: int = 1,
) -> dict:
    """Greedy IndexCache search; writes the pattern file atomically to `output` and returns its contents.

    `data` is a `DataSpec` (text or input_ids rows through `datasets`) or ready-made `Windows`. Config, tokenizer
    and windows are read and checked before the weights load. The search state is saved beside `output`
    (`<output>.state.json`) after every step; `resume=True` continues from it and ends with the same pattern as
    an uninterrupted run. `device_map`/`max_memory` go to accelerate (e.g. "auto" and {0: "20GiB", 1: "70GiB"}).

    Under torchrun (`distributed.joined`) the ranks split each step's candidates among replicas: each rank holds
    the model, or with `pipeline_stages` P each group of P ranks is a pipeline whose stages hold contiguous layers
    (boundaries balanced by the work the search gives each layer). Rank 0 alone reads and writes the files, and
    the answer is the one-process answer.
    """
    output = Path(output)
    _check_search_options(output, ratio, num_full, strategy, blocks, batch_size, cache, prune_keep)
    if strategy == "overlap" and pipeline_stages > 1:
        raise IndexCacheError(
            "--strategy overlap compares every layer's selections with every other's, which pipeline stages would "
            "have to ship between GPUs; run it without --pipeline-stages"
        )
    world = current().pipelined(pipeline_stages)
    world.check_device_map(device_map)
    state_path = search_state_path(output)
    if strategy == "overlap" and resume:
        raise IndexCacheError(
            "--resume continues a greedy search; --strategy overlap runs in two forwards, run it again"
        )
    if resume and not world.from_main(state_path.exists):
        raise IndexCacheError(f"--resume found no saved search at {state_path}; run without --resume")

    checkpoint = open_checkpoint(model)
    n, dsa_layers = checkpoint.num_layers, checkpoint.dsa_layers
    # Ratios, counts and block starts are over the indexer layers (every layer for most families).
    target = num_full if num_full is not None else num_full_for_ratio(ratio, len(dsa_layers))
    if not 1 <= target <= len(dsa_layers):
        raise IndexCacheError(
            f"--num-full {target} must lie between 1 and the number of layers with an indexer ({len(dsa_layers)})"
        )
    forced = block_starts(n, blocks, dsa_layers) if blocks is not None else []
    windows = calibration_windows(checkpoint, data or DataSpec(), tokenizer)
    flippable = [i for i in checkpoint.indexer_layers[1:] if i not in forced]
    steps = max(0, len(checkpoint.indexer_layers) - target)
    work = [1.0] * n if strategy == "naive" else layer_work(n, flippable, steps)
    link = pipeline_stage(world, checkpoint, resolve_device(world.device(device)), device_map, work)
    loaded = load_weights(checkpoint, dtype, world.device(device), device_map, max_memory, held=_held(link))
    missing = sorted(set(dsa_layers) - set(loaded.indexer_layers))
    if missing:
        log(f"layers {missing} have no indexer weights in this checkpoint: they stay S; searching the rest")
    if strategy == "overlap":
        from .search.overlap_strategy import search_by_overlap

        pattern, loss_all_full, loss_final, run = search_by_overlap(
            loaded, windows, target, forced, blocks, batch_size, kernels, world
        )
        state = SearchState(pattern, target, forced, loss_all_full)
        run.update(_placement(loaded, world))
        result = pattern_record(
            loaded, checkpoint, windows, state, ratio if num_full is None else None, run, loss_final
        )
        if world.is_main:
            write_json(output, result)
        return result

    with calibration_context(loaded, kernels, windows.input_ids.shape[1]) as (lw, sharing, backend):
        threads = window_threads(lw.input_device, backend, world.size)
        scorer = make_scorer(strategy, lw, sharing, windows, batch_size, cache, prune_keep, world, link, threads)
        inputs_key = {
            "model_config_sha256": loaded.config_sha256,
            "data_fingerprint": windows.fingerprint,
            "strategy": strategy,
            "target_full": target,
            "forced_full": forced,
            "batch_size": batch_size,
            "prune_keep": prune_keep,
            "dtype": str(loaded.model.dtype),
            "kernels": backend,
        }
        fresh = initial_state(n, loaded.indexer_layers, target, forced)
        before = world.from_main(lambda: start_or_resume(state_path, inputs_key, fresh, resume, log))
        if isinstance(scorer, CachedScorer):
            log(f"strategy {strategy}: {scorer.plan.describe()}")
        if len(full_layers(before.state.start_pattern)) <= target:
            log(f"the checkpoint has only {len(full_layers(before.state.start_pattern))} indexers: nothing to remove")
        started = time.perf_counter()

        def save(st: SearchState) -> None:
            layer_forwards = before.layer_forwards + world.total(scorer.layer_forwards)
            if world.is_main:
                write_json(
                    state_path,
                    {
                        "inputs": inputs_key,
                        "state": st.to_json(),
                        "layer_forwards": layer_forwards,
                        "seconds": before.seconds + time.perf_counter() - started,
                    },
                )

        try:
            state = greedy_search(scorer, before.state, observer, save)
        except PeerLost as exc:
            if not (world.is_main and state_path.exists()):
                raise
            raise PeerLost(f"{exc}; the state after the last finished step is kept: rerun with --resume") from exc
        run = {
            "strategy": strategy,
            "blocks": blocks,
            "forced_full": forced,
            "pruning": scorer.describe() if isinstance(scorer, PrunedScorer) else None,
            "cache": scorer.plan.describe() if isinstance(scorer, CachedScorer) else None,
            "layer_forwards": before.layer_forwards + world.total(scorer.layer_forwards),
            "seconds": round(before.seconds + time.perf_counter() - started, 3),
            "device": str(lw.input_device),
            "dtype": str(loaded.model.dtype).replace("torch.", ""),
            "kernels": backend,
            "batch_size": batch_size,
            "threads": threads,
            **_placement(loaded, world, link),
        }

    result = pattern_record(loaded, checkpoint, windows, state, ratio if num_full is None else None, run)
    if world.is_main:
        write_json(output, result)
        state_path.unlink(missing_ok=True)
    return result


def _layers_on(loaded: LoadedModel) -> dict[str, list[int]]:
    """device → the decoder layers whose weights live there (several devices under a device map)."""
    placed: dict[str, list[int]] = {}
    for i, layer in enumerate(loaded.arch.layers(loaded.model)):
        device = next(layer.parameters()).device
        if device.type != "meta":  # a pipeline stage leaves the other stages' layers on meta
            placed.setdefault(str(device), []).append(i)
    return placed


def _placement(loaded: LoadedModel, world: World, link: StageLink | None = None) -> dict:
    """Where the work ran: this process's layers, and under torchrun the decomposition and every rank's layers
    (with pipeline stages, their number and boundaries too)."""
    placed = {
        "layers_on": _layers_on(loaded),
        "world_size": world.size,
        "decomposition": world.decomposition,
        "ranks": world.describe(_layers_on(loaded)) if world.size > 1 else None,
    }
    if link is not None:
        placed.update(stages=world.stages, stage_bounds=link.bounds)
    return placed


def pattern_record(
    loaded: LoadedModel,
    checkpoint: Checkpoint,
    windows: Windows,
    state: SearchState,
    ratio,
    run: dict,
    loss_final: float | None = None,
) -> dict:
    """The pattern file's contents (schema in `patterns/file.py`) for a finished search. `loss_final` defaults to
    the last greedy step's loss; the overlap strategy, which has no steps, measures it and passes it."""
    pattern, n = state.pattern, loaded.num_layers
    if loss_final is None:
        loss_final = state.trajectory[-1].loss if state.trajectory else state.loss_all_full
    return {
        "schema_version": pattern_file.SCHEMA_VERSION,
        "index_topk_pattern": pattern,
        "full_layers": full_layers(pattern),
        "num_layers": n,
        "num_full": len(full_layers(pattern)),
        "ratio": ratio,
        "description": (
            f"IndexCache pattern for {loaded.name}: {len(full_layers(pattern))} of the {len(loaded.dsa_layers)} "
            f"layers with an indexer keep it ({n} layers); S layers reuse the top-k of the nearest preceding F layer"
        ),
        "model": {
            "name": loaded.name,
            "model_type": loaded.arch.model_type,
            "config_sha256": loaded.config_sha256,
            "num_layers": n,
            "index_topk": checkpoint.index_topk,
            "indexer_layers": loaded.indexer_layers,
            "dsa_layers": loaded.dsa_layers,
        },
        "calibration": {
            **windows.describe(),
            **windows.selection_coverage(checkpoint.index_topk, checkpoint.tokens_per_entry),
        },
        "seed": windows.spec.seed,
        "search": run,
        "versions": pattern_file.library_versions(),
        "loss_all_full": state.loss_all_full,
        "loss_final": loss_final,
        "trajectory": [s.__dict__ for s in state.trajectory],
    }


def _named_patterns(data: dict, indexer_layers: list[int]) -> list[tuple[str, str]]:
    n, num_full = data["num_layers"], len(full_layers(data["index_topk_pattern"]))
    return [
        ("pattern", data["index_topk_pattern"]),
        ("all-F", from_full_layers(indexer_layers, n)),
        ("uniform", uniform(n, num_full, indexer_layers)),
    ]


def _held_out_losses(
    checkpoint, windows, named, batch_size, kernels, dtype, device, device_map, max_memory, world, link
):
    """Loads `checkpoint` and scores `named(indexer layers)` — (row name, pattern) pairs — on `windows`.

    Returns (model name, rows); the weights are released on return, so a second model can load after. Under
    several processes (`world`) each pattern's windows are shared among the replicas (`link`: this rank's
    pipeline stage)."""
    loaded = load_weights(checkpoint, dtype, device, device_map, max_memory, held=_held(link))
    rows = []
    with calibration_context(loaded, kernels, windows.input_ids.shape[1]) as (lw, sharing, backend):
        threads = window_threads(lw.input_device, backend, world.size)
        where = {"first_label": windows.first_label, "world": world, "link": link, "threads": threads}
        scorer = PatternScorer(lw, sharing, windows.input_ids, batch_size, **where)
        for name, pattern in named(loaded.indexer_layers):
            rows.append(
                {"name": name, "pattern": pattern, "num_full": len(full_layers(pattern)), "loss": scorer.loss(pattern)}
            )
    return loaded.name, rows


def _source_checkpoint(data_file: dict, distilled: Checkpoint, log) -> Checkpoint:
    """The checkpoint a distilled folder was trained from (`distilled_from`), checked against the distilled one."""
    source = data_file["distilled_from"]
    name = source.get("name")
    checkpoint = open_checkpoint(None if str(name).startswith("embedded:") else name)
    if (checkpoint.arch.model_type, checkpoint.num_layers) != (distilled.arch.model_type, distilled.num_layers):
        raise IndexCacheError(
            f"the source checkpoint {checkpoint.name} ({checkpoint.arch.model_type}, {checkpoint.num_layers} layers) "
            f"is not the model {distilled.name} was distilled from"
        )
    if source.get("config_sha256") not in (None, checkpoint.config_sha256):
        log(f"note: the source model's config.json differs from the one {distilled.name} was distilled from")
    return checkpoint


def _held_out_data(data_file: dict, pattern_path, num_samples, seq_len, seed) -> tuple[DataSpec, int]:
    """The pattern's calibration source, and the offset of the first window after its calibration windows.

    `num_samples` (if given) sets how many held-out windows; a `seq_len` or `seed` other than the calibration's
    is refused: another window length or order could overlap the calibration windows.
    """
    calib = data_file.get("calibration")
    fields = ("dataset", "dataset_config", "split", "text_column", "num_samples", "seq_len", "seed")
    if not isinstance(calib, dict) or any(k not in calib for k in (*fields, "window_offset")):
        raise IndexCacheError(f"pattern file {pattern_path} records no calibration data; pass --dataset")
    for option, value in (("seq-len", seq_len), ("seed", seed)):
        recorded = calib[option.replace("-", "_")]
        if value is not None and value != recorded:
            raise IndexCacheError(
                f"--{option} {value} differs from the calibration's {recorded}: held-out windows from the pattern's "
                f"own source keep its window length and seed so they never overlap the calibration windows; "
                "pass --dataset to evaluate on other windows"
            )
    spec = DataSpec(**{k: calib[k] for k in fields}, windows=calib.get("windows", defaults.WINDOWS))
    offset = calib["window_offset"] + calib["num_samples"]
    return (replace(spec, num_samples=num_samples) if num_samples is not None else spec), offset


def evaluate(
    pattern_path: str | Path,
    model: str | None = None,
    data: DataSpec | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    kernels: str = defaults.KERNELS,
    dtype: str = defaults.DTYPE,
    device: str = defaults.DEVICE,
    device_map: str | dict | None = None,
    tokenizer: str | None = None,
    json_path: str | Path | None = None,
    log=print,
    num_samples: int | None = None,
    seq_len: int | None = None,
    seed: int | None = None,
    max_memory: dict | None = None,
    pipeline_stages: int = 1,
) -> list[dict]:
    """Held-out loss of the pattern, of all-F and of the uniform interleave with the same F count. For the pattern
    file of a distilled folder (`distilled_from`): the distilled pattern, the same pattern `undistilled` on the
    source checkpoint and the `source all-F`, all on the same windows; Δ is then against the source's all-F.

    By default the data is the pattern's own calibration source with the windows that follow the calibration
    windows in the same seeded order, so the two sets never overlap; `num_samples` sets how many (`seq_len` and
    `seed` must then match the calibration's). With `data`, those three come from the DataSpec instead.
    """
    _check_batch_size(batch_size)
    world = current().pipelined(pipeline_stages)
    world.check_device_map(device_map)
    data_file = pattern_file.read(pattern_path)
    recorded = data_file["model"].get("name")
    if model is None and recorded is None:
        raise IndexCacheError(f"pattern file {pattern_path} names no model; pass --model")
    if data is None:
        data, offset = _held_out_data(data_file, pattern_path, num_samples, seq_len, seed)
    else:
        offset = 0
    checkpoint = open_checkpoint(model or (None if recorded.startswith("embedded:") else recorded))
    pattern_file.check_matches(data_file, checkpoint.arch.model_type, checkpoint.num_layers, checkpoint.recorded)
    if data_file["model"].get("config_sha256") != checkpoint.config_sha256:
        log("note: the model's config.json differs from the one the pattern was searched on")
    windows = calibration_windows(checkpoint, data, tokenizer, offset=offset)
    every_layer_alike = [1.0] * checkpoint.num_layers
    link = pipeline_stage(world, checkpoint, resolve_device(world.device(device)), device_map, every_layer_alike)
    run = (batch_size, kernels, dtype, world.device(device), device_map, max_memory, world, link)
    pattern = data_file["index_topk_pattern"]
    if "distilled_from" in data_file:
        # Only the F layers of a distilled folder have indexers: compare with the same pattern undistilled and
        # with every indexer of the source, on the same windows.
        source = _source_checkpoint(data_file, checkpoint, log)
        name, rows = _held_out_losses(checkpoint, windows, lambda _: [("distilled", pattern)], *run)
        source_name, source_rows = _held_out_losses(
            source,
            windows,
            lambda layers: [("undistilled", pattern), ("source all-F", from_full_layers(layers, len(pattern)))],
            *run,
        )
        rows += source_rows
        base = source_rows[1]["loss"]
    else:
        name, rows = _held_out_losses(checkpoint, windows, lambda layers: _named_patterns(data_file, layers), *run)
        source_name, base = None, rows[1]["loss"]
    for row in rows:
        row["delta_vs_all_full"] = row["loss"] - base
        row["perplexity"] = float(torch.tensor(row["loss"]).exp())
    if json_path is not None and world.is_main:
        write_json(
            json_path,
            {
                "pattern_file": str(pattern_path),
                "model": name,
                **({"source_model": source_name} if source_name is not None else {}),
                "data": windows.describe(),
                "results": rows,
            },
        )
    return rows


__all__ = [
    "calibration_context",
    "calibration_windows",
    "evaluate",
    "make_scorer",
    "pattern_record",
    "search",
    "search_state_path",
    "start_or_resume",
]
