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
from .calib import Windows
from .errors import IndexCacheError
from .forward import LayerwiseModel
from .models import LoadedModel
from .overlap import best_full_layers, retained_overlap
from .patterns import file as pattern_file
from .patterns.layout import from_full_layers
from .scoring import PatternScorer


def search_by_overlap(
    loaded: LoadedModel,
    windows: Windows,
    target: int,
    forced: list[int],
    ratio: float | None,
    num_full: int | None,
    output: Path,
    blocks: int | None,
    batch_size: int,
    kernels: str,
) -> dict:
    """The `target` F layers (with the `forced` block starts) that maximise the retained top-k overlap on
    `windows`; writes the pattern file to `output` and returns it. `api.search` builds the windows and loads the
    weights, in that order, as for the greedy search."""
    n = loaded.num_layers
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
