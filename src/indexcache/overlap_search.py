"""`indexcache search --strategy overlap`: a pattern from one all-F forward instead of ~N²/2 candidate forwards.

The all-F forward measures the cross-layer top-k overlap (`analyze.py`); dynamic programming (`overlap.py`) picks
the F layers that keep the most of it; one more forward measures the chosen pattern's calibration loss, so the file
compares with greedy ones. Writes the same pattern-file schema as the greedy search, with an empty trajectory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .analyze import analyze_windows, matrix_sha256, model_record
from .atomic import write_json
from .backends import kernels_installed
from .calib import DataSpec, Windows, make_windows
from .errors import IndexCacheError
from .forward import LayerwiseModel
from .models import load_model
from .overlap import best_full_layers, retained_overlap
from .patterns import file as pattern_file
from .patterns.layout import from_full_layers, num_full_for_ratio
from .scoring import PatternScorer
from .search import block_starts


def search_by_overlap(
    load: tuple,
    ratio: float | None,
    num_full: int | None,
    data: DataSpec | Windows,
    output: Path,
    blocks: int | None,
    resume: bool,
    batch_size: int,
    kernels: str,
    log=print,
) -> dict:
    """The F layers that maximise the retained top-k overlap; writes the pattern file to `output`, returns it.

    `load` holds `load_model`'s arguments (model, dtype, device, device_map, tokenizer).
    """
    if resume:
        raise IndexCacheError(
            "--resume continues a greedy search; --strategy overlap runs in two forwards, run it again"
        )
    loaded = load_model(*load)
    n = loaded.num_layers
    target = num_full if num_full is not None else num_full_for_ratio(ratio, n)
    if not 1 <= target <= n:
        raise IndexCacheError(f"--num-full {target} must lie between 1 and the number of layers ({n})")
    windows = (
        data
        if isinstance(data, Windows)
        else make_windows(
            data.with_model_defaults(getattr(loaded.text_config, "index_topk", None)),
            loaded.tokenizer,
            loaded.text_config.eos_token_id,
        )
    )
    forced = block_starts(n, blocks) if blocks is not None else []
    if len(loaded.indexer_layers) < n:
        missing = sorted(set(range(n)) - set(loaded.indexer_layers))
        log(f"layers {missing} have no indexer weights in this checkpoint: they stay S; choosing among the rest")
    if target > len(loaded.indexer_layers):
        log(f"the checkpoint has only {len(loaded.indexer_layers)} indexers: nothing to remove")

    started = time.perf_counter()
    analysis, backend = analyze_windows(loaded, windows, batch_size, kernels)
    full = best_full_layers(analysis.overlap, min(target, len(loaded.indexer_layers)), loaded.indexer_layers, forced)
    pattern = from_full_layers(full, n)
    lw = LayerwiseModel(loaded.model, loaded.arch)
    install = kernels_installed(loaded.model, loaded.arch, lw.input_device, kernels, windows.input_ids.shape[1])
    with torch.inference_mode(), install as (sharing, _):
        scorer = PatternScorer(lw, sharing, windows.input_ids, batch_size)
        loss_final = scorer.loss(pattern)
    if not math.isfinite(loss_final):
        raise IndexCacheError(f"the chosen pattern {pattern} gives a non-finite calibration loss ({loss_final})")
    seconds = time.perf_counter() - started

    result = {
        "schema_version": pattern_file.SCHEMA_VERSION,
        "index_topk_pattern": pattern,
        "full_layers": full,
        "num_layers": n,
        "num_full": len(full),
        "ratio": ratio if num_full is None else None,
        "description": (
            f"IndexCache pattern for {loaded.name}: {len(full)} of {n} layers keep their indexer, chosen to keep the "
            "most cross-layer top-k overlap; S layers reuse the top-k of the nearest preceding F layer"
        ),
        "model": model_record(loaded),
        "calibration": windows.describe(),
        "seed": windows.spec.seed,
        "search": {
            "strategy": "overlap",
            "blocks": blocks,
            "forced_full": forced,
            "pruning": None,
            "cache": None,
            "layer_forwards": analysis.layer_forwards + scorer.layer_forwards,
            "seconds": round(seconds, 3),
            "device": str(lw.input_device),
            "dtype": str(loaded.model.dtype).replace("torch.", ""),
            "kernels": backend,
            "batch_size": batch_size,
            "overlap": {
                "retained_overlap": retained_overlap(pattern, analysis.overlap, loaded.indexer_layers),
                "matrix_sha256": matrix_sha256(analysis.overlap),
                "matrix": analysis.overlap,
                "positions": analysis.positions,
            },
        },
        "versions": pattern_file.library_versions(),
        "loss_all_full": analysis.loss_all_full,
        "loss_final": loss_final,
        "trajectory": [],
    }
    write_json(output, result)
    return result
