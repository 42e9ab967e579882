"""`indexcache analyze`: which layers select alike. One all-F forward over the calibration windows records

- the N × N top-k overlap matrix: `overlap[i][j]` = fraction of layer j's selected keys that layer i also selects,
  averaged over every query position with more than k candidate keys (earlier positions keep all they see);
- each layer's indexer score entropy: the entropy (nats) of the softmax over a query's visible index scores,
  averaged over the same positions, also divided by log(visible keys) so 1 means flat and 0 one key;
- the all-F calibration loss.

Memory: a pairwise statistic from one forward needs every layer's selection of the same window alive until the
last layer has run, so the selections of the current batch are kept, sorted, for positions ≥ k:
N × batch × (S − k) × k int32 (one 8K window of a 78-layer model at k = 2048: 5 GB; use batch size 1). Each
comparison and each entropy chunk is O(S·k) or chunk × H × T; no S × T tensor is kept across layers.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import defaults
from .atomic import write_json
from .calib import DataSpec, Windows, first_choosing_position
from .distributed import World, current
from .errors import IndexCacheError
from .kernels.indexer import index_scores_reference
from .models import DsaArchitecture, LoadedModel
from .models.loading import load_weights, open_checkpoint
from .patterns import file as pattern_file
from .runtime.backends import kernels_installed, scoring_inputs
from .runtime.forward import LayerwiseModel
from .runtime.patch import IndexerFn
from .steps import calibration_windows

ANALYSIS_JSON = "analysis.json"
OVERLAP_PNG = "overlap.png"
# Queries whose scores are formed at once for the entropy: chunk · H · T fp32 values, never S · H · T.
_ENTROPY_CHUNK_ELEMENTS = 1 << 24


def overlap_counts(a_sorted: torch.Tensor, b_sorted: torch.Tensor) -> torch.Tensor:
    """|A ∩ B| per row, fp64 [...]; both int [..., k], each row sorted and free of duplicates. O(rows · k log k)."""
    b_on_a = b_sorted.to(a_sorted.device)
    at = torch.searchsorted(a_sorted, b_on_a).clamp_(max=a_sorted.shape[-1] - 1)
    return ((a_sorted.gather(-1, at) == b_on_a) & (b_on_a >= 0)).sum(-1, dtype=torch.float64)  # -1: no key


def entropy_sums(
    q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, softmax_scale: float, first: int, ratio: int = 1
) -> tuple[float, float]:
    """Summed softmax entropy (nats) of the index scores, and of it over log(visible keys), for queries ≥ `first`.

    q: [B, S, H, D], k: [B, T, D] (T = S tokens, or S // ratio compressed entries of `ratio` tokens: query t sees
    (t + 1) // ratio of them), weights: [B, S, H]; causal prefill. Scored `chunk` queries at a time.
    """
    batch, seq_len, n_heads, _ = q.shape
    chunk = max(1, _ENTROPY_CHUNK_ELEMENTS // max(1, batch * n_heads * k.shape[1]))
    nats = normalised = 0.0
    for start in range(first, seq_len, chunk):
        stop = min(seq_len, start + chunk)
        scores = index_scores_reference(
            q[:, start:stop], k, weights[:, start:stop], softmax_scale, q_offset=start, ratio=ratio
        )
        entropy = torch.special.entr(scores.softmax(-1)).sum(-1, dtype=torch.float64)  # [B, chunk]
        visible = torch.arange(start + 1, stop + 1, device=entropy.device, dtype=torch.float64).div(ratio).floor()
        nats += float(entropy.sum())
        normalised += float((entropy / visible.log()).sum())
    return nats, normalised


@dataclass
class SelectionSums:
    """What the selections of some batches add up to.

    Attributes:
        shared_keys: fp64 [N, N], Σ |A_i ∩ A_j| over query positions; entropy, entropy_normalised: fp64 [N] sums;
        positions: query positions counted; nll: summed token NLL of the forwards.
    """

    shared_keys: torch.Tensor
    entropy: torch.Tensor
    entropy_normalised: torch.Tensor
    positions: int = 0
    nll: float = 0.0

    @classmethod
    def zeros(cls, num_layers: int) -> SelectionSums:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)
        return cls(zeros(num_layers, num_layers), zeros(num_layers), zeros(num_layers))

    def add(self, other: SelectionSums) -> None:
        self.shared_keys += other.shared_keys
        self.entropy += other.entropy
        self.entropy_normalised += other.entropy_normalised
        self.positions += other.positions
        self.nll += other.nll


class SelectionRecorder:
    """An `IndexerFn` that runs the backend's indexer (given by `around`) and records what each F layer selects.

    layer_of: id(indexer module) → its layer; first: the first query position that chooses among more than `topk`
    keys (entries of `ratio` tokens: `calib.first_choosing_position`). Call `end_batch()` after every forward: it
    returns the batch's sums and drops its selections.
    """

    def __init__(self, arch: DsaArchitecture, num_layers: int, layer_of: dict[int, int], first: int, ratio: int = 1):
        self.compute: IndexerFn | None = None
        self.arch = arch
        self.layer_of, self.first, self.ratio = layer_of, first, ratio
        self.num_layers = num_layers
        self.sums = SelectionSums.zeros(num_layers)
        self._batch: dict[int, torch.Tensor] = {}  # layer → sorted int [B, S - first, k]

    def __call__(self, indexer, *args, **kwargs):
        """The arguments are the family's own indexer call (see `patch.IndexerFn`)."""
        indices = self.compute(indexer, *args, **kwargs)
        layer = self.layer_of[id(indexer)]
        selected = indices[:, self.first :].sort(-1).values  # these positions see more than k keys: a real choice
        sums = self.sums
        for other, earlier in self._batch.items():
            shared = float(overlap_counts(earlier, selected).sum())
            sums.shared_keys[other, layer] += shared
            sums.shared_keys[layer, other] += shared
        sums.shared_keys[layer, layer] += float((selected >= 0).sum())  # pooled rows end in -1 after their tail
        self._batch[layer] = selected
        q, keys, weights, scale, stride = scoring_inputs(self.arch, indexer, *args, **kwargs)
        nats, normalised = entropy_sums(q, keys, weights, scale, self.first, stride * self.ratio)
        sums.entropy[layer] += nats
        sums.entropy_normalised[layer] += normalised
        return indices

    def around(self, compute: IndexerFn) -> SelectionRecorder:
        """Record around `compute` (the `wrap_indexer` hook of `kernels_installed`)."""
        self.compute = compute
        return self

    def end_batch(self, nll: float) -> SelectionSums:
        """The sums of the batch just run (whose summed NLL is `nll`); the recorder starts afresh."""
        batch, self.sums = self.sums, SelectionSums.zeros(self.num_layers)
        if self._batch:
            first = next(iter(self._batch.values()))
            batch.positions = first.shape[0] * first.shape[1]
        batch.nll = nll
        self._batch.clear()
        return batch


@dataclass
class Analysis:
    """What one all-F forward measured. Lists are indexed by layer; None where a layer has no indexer.

    Attributes:
        overlap: N × N, fraction of layer j's top-k that layer i also selects (row i, column j).
        entropy, entropy_normalised: per-layer mean indexer score entropy (nats, and over log(visible keys)).
        positions: query positions averaged (windows × (S − k)).
    """

    overlap: list[list[float | None]]
    entropy: list[float | None]
    entropy_normalised: list[float | None]
    positions: int
    loss_all_full: float
    layer_forwards: int


def matrix_sha256(overlap: list[list[float | None]]) -> str:
    """Fingerprint of an overlap matrix as written to JSON (pattern files record it)."""
    return hashlib.sha256(json.dumps(overlap).encode()).hexdigest()


@torch.no_grad()
def analyze_windows(
    loaded: LoadedModel, windows: Windows, batch_size: int, kernels: str, world: World | None = None
) -> tuple[Analysis, str]:
    """Run every indexer layer F over `windows` ([W, S], S > k), batch by batch; returns the analysis and backend.

    Under several processes (`world`) the batches are shared among the ranks and their sums added in batch order,
    so every rank gets the one-process analysis."""
    n, topk = loaded.num_layers, loaded.arch.keys_kept(loaded.text_config)
    if not loaded.arch.indexer_kernel:
        raise IndexCacheError(f"analyze: {loaded.arch.family}'s indexer does not select top-k keys; not supported")
    seq_len, ratio = windows.input_ids.shape[1], loaded.tokens_per_entry
    first = first_choosing_position(topk, ratio)
    if seq_len <= first:
        raise IndexCacheError(
            f"--seq-len {seq_len} is not above the model's top-k ({topk}"
            f"{'' if ratio == 1 else f' entries of {ratio} tokens'}): every layer would select every key, "
            "so the overlap says nothing; raise --seq-len"
        )
    if batch_size < 1:
        raise IndexCacheError(f"--batch-size {batch_size} must be at least 1")
    world = world or World()
    lw = LayerwiseModel(loaded.model, loaded.arch)
    layer_of = {id(loaded.arch.indexer(layer)): i for i, layer in enumerate(lw.layers) if i in loaded.indexer_layers}
    recorder = SelectionRecorder(loaded.arch, n, layer_of, first, ratio)
    batches = windows.input_ids.split(batch_size)
    device = lw.input_device
    install = kernels_installed(loaded.model, loaded.arch, device, kernels, seq_len, wrap_indexer=recorder.around)

    def forward(b: int) -> SelectionSums:
        hidden, inputs = lw.embed(batches[b])
        hidden = lw.run_layers(hidden, inputs, 0, n)
        return recorder.end_batch(float(lw.nll_sum(hidden, batches[b]).sum()))

    with torch.inference_mode(), install as (_, backend):
        per_batch = world.map(forward, range(len(batches)))
    sums = SelectionSums.zeros(n)
    for batch in per_batch.values():
        sums.add(batch)
    loss = sums.nll / (windows.input_ids.shape[0] * (seq_len - 1))
    if not torch.isfinite(torch.tensor(loss)):
        raise IndexCacheError(f"the all-F calibration loss is {loss}: the model or the --dtype gives non-finite logits")
    have = set(loaded.indexer_layers)
    positions = sums.positions
    # Column j over layer j's own selected keys (positions × k, fewer in a pooled indexer's short tails).
    shared = (sums.shared_keys / sums.shared_keys.diagonal().clamp(min=1)[None, :]).tolist()
    overlap = [[shared[i][j] if i in have and j in have else None for j in range(n)] for i in range(n)]
    mean = lambda values: [float(values[i]) / positions if i in have else None for i in range(n)]
    layer_forwards = n * windows.input_ids.shape[0]
    analysis = Analysis(overlap, mean(sums.entropy), mean(sums.entropy_normalised), positions, loss, layer_forwards)
    return analysis, backend


def model_record(loaded: LoadedModel) -> dict:
    """The `model` block of pattern and analysis files."""
    return {
        "name": loaded.name,
        "model_type": loaded.arch.model_type,
        "config_sha256": loaded.config_sha256,
        "num_layers": loaded.num_layers,
        "index_topk": getattr(loaded.model.config, "index_topk", None),
        "indexer_layers": loaded.indexer_layers,
        "dsa_layers": loaded.dsa_layers,
    }


def analyze(
    output_dir: str | Path,
    model: str | None = None,
    data: DataSpec | Windows | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    kernels: str = defaults.KERNELS,
    dtype: str = defaults.DTYPE,
    device: str = defaults.DEVICE,
    device_map: str | None = None,
    tokenizer: str | None = None,
    plot: bool = True,
) -> dict:
    """Writes `analysis.json` (and the heatmap `overlap.png` unless `plot=False`) into `output_dir`; returns it."""
    output_dir = Path(output_dir)
    if output_dir.is_file():
        raise IndexCacheError(f"output {output_dir} is a file; give a folder to write analysis.json and overlap.png")

    world = current()
    world.check_device_map(device_map)
    checkpoint = open_checkpoint(model)
    windows = calibration_windows(checkpoint, data or DataSpec(), tokenizer)
    loaded = load_weights(checkpoint, dtype, world.device(device), device_map)
    started = time.perf_counter()
    analysis, backend = analyze_windows(loaded, windows, batch_size, kernels, world)
    result = {
        "description": (
            f"Top-k overlap between the layers of {loaded.name} (all layers F): overlap[i][j] is the fraction of "
            "layer j's selected keys that layer i also selects, over query positions with more than k candidates; "
            "entropy is the mean softmax entropy of each layer's index scores"
        ),
        "model": model_record(loaded),
        "calibration": windows.describe(),
        "overlap": analysis.overlap,
        "overlap_sha256": matrix_sha256(analysis.overlap),
        "entropy": analysis.entropy,
        "entropy_normalised": analysis.entropy_normalised,
        "positions": analysis.positions,
        "loss_all_full": analysis.loss_all_full,
        "layer_forwards": analysis.layer_forwards,
        "seconds": round(time.perf_counter() - started, 3),
        "device": str(LayerwiseModel(loaded.model, loaded.arch).input_device),
        "dtype": str(loaded.model.dtype).replace("torch.", ""),
        "kernels": backend,
        "batch_size": batch_size,
        "world_size": world.size,
        "versions": pattern_file.library_versions(),
    }
    if not world.is_main:
        return result
    figure = None
    if plot:
        from .plot import overlap_figure, save_png

        figure = overlap_figure(result)  # drawn before anything is written: a failure leaves no partial output
    write_json(output_dir / ANALYSIS_JSON, result)
    if figure is not None:
        save_png(figure, output_dir / OVERLAP_PNG)
    return result
