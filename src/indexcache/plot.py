"""Pictures of analyses, patterns, searches and evaluations (matplotlib, headless).

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot: no GUI backend is ever
chosen, nothing global changes, and a figure is garbage once the function returns. Every plotted number comes
from the JSON the function is given (tests read the values back from the figure's artists).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from .atomic import write_bytes
from .errors import IndexCacheError

DPI = 100
OVERLAP_SIZE = (11.0, 5.0)  # inches: 1100 × 500 pixels
PATTERN_SIZE = (9.0, 5.0)
PATTERN_WITH_EVAL_SIZE = (9.0, 7.5)
_FULL_COLOR, _SHARED_COLOR = "#1f77b4", "#d9d9d9"


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _layer_ticks(n: int) -> list[int]:
    """Every layer up to 32 layers, else every ceil(n / 32)-th, so labels never overlap."""
    return list(range(0, n, max(1, math.ceil(n / 32))))


def overlap_matrix(analysis: dict) -> np.ndarray:
    """float [N, N] from an analysis JSON, NaN where a layer has no indexer."""
    return np.array([[np.nan if v is None else v for v in row] for row in analysis["overlap"]], dtype=float)


def overlap_figure(analysis: dict) -> Figure:
    """Heatmap of `analysis["overlap"]` (layers labelled) and, beside it, each layer's normalised score entropy."""
    matrix = overlap_matrix(analysis)
    n = matrix.shape[0]
    fig = _figure(OVERLAP_SIZE)
    heat, bars = fig.subplots(1, 2, width_ratios=[1.15, 1])
    image = heat.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    heat.set_xticks(_layer_ticks(n))
    heat.set_yticks(_layer_ticks(n))
    heat.set_xlabel("layer j")
    heat.set_ylabel("layer i")
    heat.set_title("top-k overlap: share of j's keys that i also selects", fontsize=10)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if i != j and not np.isnan(matrix[i, j]):
                    color = "black" if matrix[i, j] > 0.6 else "white"
                    heat.text(j, i, f"{matrix[i, j] * 100:.0f}", ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(image, ax=heat, shrink=0.85, label="overlap")

    entropy = np.array([np.nan if v is None else v for v in analysis["entropy_normalised"]], dtype=float)
    bars.bar(np.arange(n), entropy, color=_FULL_COLOR)
    bars.set_xticks(_layer_ticks(n))
    bars.set_xlabel("layer")
    bars.set_ylabel("entropy / log(visible keys)")
    bars.set_ylim(0, 1)
    bars.set_title("indexer score entropy (softmax over visible keys; 1 = flat)", fontsize=10)
    model = analysis.get("model", {}).get("name", "")
    fig.suptitle(f"{model} · {analysis.get('positions', '?')} query positions", fontsize=10)
    return fig


def _strip(ax, pattern: str) -> None:
    n = len(pattern)
    cells = np.array([[1.0 if c == "F" else 0.0 for c in pattern]])
    ax.imshow(cells, cmap=ListedColormap([_SHARED_COLOR, _FULL_COLOR]), vmin=0, vmax=1, aspect="auto")
    for i, c in enumerate(pattern):
        ax.text(i, 0, c, ha="center", va="center", fontsize=8, color="white" if c == "F" else "black")
    ax.set_xticks(_layer_ticks(n))
    ax.set_yticks([])
    ax.set_xlabel("layer")
    ax.set_title(
        f"{pattern.count('F')} of {n} layers keep their indexer (F); S layers reuse the previous F", fontsize=10
    )


def _exact_candidates(step: dict) -> dict[int, float]:
    """Candidates scored on every window (pruning leaves others with partial, incomparable losses)."""
    windows = {int(k): v for k, v in step.get("candidate_windows", {}).items()}
    most = max(windows.values(), default=0)
    return {int(k): v for k, v in step["candidates"].items() if windows.get(int(k), most) == most}


def _retained(ax, data: dict) -> None:
    """Strategy overlap: per layer, the share of its own top-k the pattern keeps (1 on F layers)."""
    pattern, matrix = data["index_topk_pattern"], data["search"]["overlap"]["matrix"]
    kept, last_full = [], 0
    for layer, letter in enumerate(pattern):
        last_full = layer if letter == "F" else last_full
        value = matrix[last_full][layer] if letter == "S" else 1.0
        kept.append(np.nan if value is None else value)
    ax.bar(np.arange(len(pattern)), kept, color=[_FULL_COLOR if c == "F" else "grey" for c in pattern])
    ax.set_xticks(_layer_ticks(len(pattern)))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("top-k overlap kept")
    ax.set_title(
        f"share of each layer's own top-k that its F layer selects (mean "
        f"{data['search']['overlap']['retained_overlap']:.3f}); calibration loss {data['loss_final']:.4f}, "
        f"all-F {data['loss_all_full']:.4f}",
        fontsize=10,
    )


def _trajectory(ax, data: dict) -> None:
    steps = data.get("trajectory") or []
    if not steps and (data.get("search") or {}).get("overlap"):
        _retained(ax, data)
        return
    if not steps:
        strategy = data.get("search", {}).get("strategy", "?")
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            f"no greedy trajectory (strategy {strategy})\ncalibration loss: all-F {data['loss_all_full']:.4f}, "
            f"pattern {data['loss_final']:.4f}",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        return
    x = [s["step"] for s in steps]
    for s in steps:
        losses = sorted(_exact_candidates(s).values())
        ax.scatter([s["step"]] * len(losses), losses, s=8, color="grey", alpha=0.5, zorder=1)
        ax.vlines(s["step"], losses[0], losses[-1], color="grey", alpha=0.6, zorder=1)
    ax.plot(x, [s["loss"] for s in steps], marker="o", color=_FULL_COLOR, label="committed flip", zorder=2)
    for s in steps:
        ax.annotate(
            f"{s['flipped']}",
            (s["step"], s["loss"]),
            textcoords="offset points",
            xytext=(0, -11),
            ha="center",
            fontsize=7,
        )
    ax.axhline(data["loss_all_full"], color="black", linestyle="--", linewidth=1, label="all-F")
    ax.set_xlabel("greedy step (number: the layer turned S)")
    ax.set_ylabel("calibration loss")
    ax.set_xticks(x)
    ax.set_title("loss after each step; grey: that step's candidates (min–max)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")


def _eval_bars(ax, evaluation: dict) -> None:
    rows = evaluation["results"]
    names = [r["name"] for r in rows]
    losses = [r["loss"] for r in rows]
    # A distilled folder's rows (distilled, undistilled, source all-F) take the colours of pattern, uniform, all-F.
    colors = {"pattern": _FULL_COLOR, "all-F": "black", "uniform": "#ff7f0e"}
    colors |= {"distilled": colors["pattern"], "source all-F": colors["all-F"], "undistilled": colors["uniform"]}
    ax.bar(names, losses, color=[colors.get(n, "grey") for n in names])
    for i, r in enumerate(rows):
        ax.text(i, r["loss"], f"{r['loss']:.4f} ({r['delta_vs_all_full']:+.4f})", ha="center", va="bottom", fontsize=8)
    low, high = min(losses), max(losses)
    ax.set_ylim(low - 0.1 * (high - low + 1e-3) - 0.05, high + 0.15 * (high - low + 1e-3) + 0.05)
    ax.set_ylabel("held-out loss")
    ax.set_title(f"held-out loss: {' vs '.join(names)} (same windows)", fontsize=10)


def pattern_figure(data: dict, evaluation: dict | None = None) -> Figure:
    """The pattern as an F/S strip, the greedy trajectory, and with an eval JSON the pattern/all-F/uniform bars."""
    if "index_topk_pattern" not in data:
        raise IndexCacheError("plot needs a pattern file written by `indexcache search`")
    if evaluation is not None and not isinstance(evaluation.get("results"), list):
        raise IndexCacheError("--eval needs the JSON written by `indexcache eval --json`")
    fig = _figure(PATTERN_WITH_EVAL_SIZE if evaluation is not None else PATTERN_SIZE)
    heights = [0.7, 3] + ([2.2] if evaluation is not None else [])
    axes = fig.subplots(len(heights), 1, height_ratios=heights)
    _strip(axes[0], data["index_topk_pattern"])
    _trajectory(axes[1], data)
    if evaluation is not None:
        _eval_bars(axes[2], evaluation)
    fig.suptitle(
        f"{data['model'].get('name', '')} · strategy {data.get('search', {}).get('strategy', '?')}", fontsize=10
    )
    return fig


def save_png(fig: Figure, path: str | Path) -> None:
    """Write `fig` as a PNG of exactly figsize × DPI pixels, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    write_bytes(path, buffer.getvalue())


def plot_pattern_file(pattern_path: str | Path, output: str | Path, eval_path: str | Path | None = None) -> None:
    """`indexcache plot`: read a pattern file (and an eval JSON) and write the picture."""
    import json

    from .patterns import file as pattern_file

    data = pattern_file.read(pattern_path)
    evaluation = None
    if eval_path is not None:
        try:
            evaluation = json.loads(Path(eval_path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise IndexCacheError(
                f"--eval {eval_path} is not valid JSON; write it with `indexcache eval --json`"
            ) from None
        if not isinstance(evaluation, dict):
            raise IndexCacheError(f"--eval {eval_path} is not the JSON written by `indexcache eval --json`")
    save_png(pattern_figure(data, evaluation), output)
