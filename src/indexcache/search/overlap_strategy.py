"""`indexcache search --strategy overlap`: a pattern from one all-F forward instead of ~N²/2 candidate forwards.

The all-F forward measures the cross-layer top-k overlap (`analyze.py`); dynamic programming (`overlap.py`) picks
the F layers that keep the most of it; one more forward measures the chosen pattern's calibration loss, so the file
compares with greedy ones. Writes the same pattern-file schema as the greedy search, with an empty trajectory.
"""

from __future__ import annotations

import math
import time

import torch

from ..analyze import analyze_windows, matrix_sha256
from ..calib import Windows
from ..distributed import World
from ..errors import IndexCacheError
from ..models import LoadedModel
from ..patterns.layout import from_full_layers
from ..runtime.backends import kernels_installed
from ..runtime.forward import LayerwiseModel
from .overlap import best_full_layers, retained_overlap
from .scoring import PatternScorer


def search_by_overlap(
    loaded: LoadedModel,
    windows: Windows,
    target: int,
    forced: list[int],
    blocks: int | None,
    batch_size: int,
    kernels: str,
    world: World | None = None,
) -> tuple[str, float, float, dict]:
    """The `target` F layers (with the `forced` block starts) that maximise the retained top-k overlap on
    `windows`. Returns (pattern, all-F loss, pattern loss, the pattern file's `search` record); `api.search`
    builds the windows, loads the weights and writes the file, as for the greedy search. Under several processes
    (`world`) both forwards share their windows among the ranks."""
    n = loaded.num_layers
    world = world or World()
    started = time.perf_counter()
    analysis, backend = analyze_windows(loaded, windows, batch_size, kernels, world)
    full = best_full_layers(analysis.overlap, min(target, len(loaded.indexer_layers)), loaded.indexer_layers, forced)
    pattern = from_full_layers(full, n)
    lw = LayerwiseModel(loaded.model, loaded.arch)
    install = kernels_installed(loaded.model, loaded.arch, lw.input_device, kernels, windows.input_ids.shape[1])
    with torch.inference_mode(), install as (sharing, _):
        scorer = PatternScorer(lw, sharing, windows.input_ids, batch_size, world=world)
        loss_final = scorer.loss(pattern)
    if not math.isfinite(loss_final):
        raise IndexCacheError(f"the chosen pattern {pattern} gives a non-finite calibration loss ({loss_final})")
    run = {
        "strategy": "overlap",
        "blocks": blocks,
        "forced_full": forced,
        "pruning": None,
        "cache": None,
        "layer_forwards": analysis.layer_forwards + world.total(scorer.layer_forwards),
        "seconds": round(time.perf_counter() - started, 3),
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
    }
    return pattern, analysis.loss_all_full, loss_final, run
