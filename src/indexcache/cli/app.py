"""`indexcache` command line: a thin Typer layer over `indexcache.api` (defaults live in `defaults.py`)."""

from __future__ import annotations

import itertools
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import defaults
from .bench import bench
from .common import (
    BatchSize,
    Dataset,
    DatasetConfig,
    Device,
    DeviceMap,
    Dtype,
    Kernels,
    MaxMemory,
    Model,
    PipelineStages,
    PlotPath,
    Seed,
    SeqLen,
    Split,
    TextColumn_,
    Tokenizer,
    Windows_,
    _data_spec,
    _fail,
    across_ranks,
    err,
    friendly_errors,
    out,
    print_table,
)
from .distill import distill

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find and use IndexCache patterns (which DSA layers keep their lightning indexer).",
)


class _RichObserver:
    """Draws the greedy search: one bar per step, candidate being scored and best loss so far."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = None

    def step_started(self, step, total, candidates):
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.step_label = f"step {step}/{total}"
        self.task = self.progress.add_task(self.step_label, total=len(candidates), best="–")

    def candidate_scored(self, layer, score, best):
        best_text = f"{best:.5f}" if best != float("inf") else "–"
        self.progress.update(
            self.task,
            advance=1,
            best=best_text,
            description=f"{self.step_label} · layer {layer} → S: {score.loss:.5f}",
        )

    def step_committed(self, step):
        self.progress.console.print(
            f"step {step.step}: layer {step.flipped} → S   loss {step.loss:.5f}   {step.pattern}",
            highlight=False,
        )


@app.command()
@friendly_errors
@across_ranks
def search(
    model: str | None = Model,
    ratio: float = typer.Option(defaults.RATIO, help="Fraction of indexers to keep, in (0, 1]: F = ceil(ratio·N)."),
    num_full: int | None = typer.Option(None, help="Number of F layers to keep (overrides --ratio)."),
    output: Path = typer.Option(Path(defaults.OUTPUT), "--output", "-o", help="Pattern JSON to write."),
    dataset: str | None = Dataset,
    dataset_config: str | None = DatasetConfig,
    split: str = Split,
    text_column: str = TextColumn_,
    num_samples: int = typer.Option(defaults.NUM_SAMPLES, help="Number of calibration windows."),
    seq_len: int | None = SeqLen,
    seed: int = Seed,
    windows: str = Windows_,
    strategy: str = typer.Option(
        defaults.STRATEGY, help="naive, cached (prefix reuse, same answer), pruned, or overlap (one all-F forward)."
    ),
    blocks: int | None = typer.Option(None, help="Pipeline stages: force the first layer of each of P blocks F."),
    resume: bool = typer.Option(False, help="Continue the search saved beside --output."),
    batch_size: int = BatchSize,
    cache: str = typer.Option(defaults.CACHE, help="Prefix cache: auto, device, host or every:K."),
    prune_keep: float = typer.Option(defaults.PRUNE_KEEP, help="Fraction of candidates kept per pruning stage."),
    kernels: str = Kernels,
    dtype: str = Dtype,
    device: str = Device,
    device_map: str | None = DeviceMap,
    max_memory: str | None = MaxMemory,
    tokenizer: str | None = Tokenizer,
    plot: Path | None = PlotPath,
    pipeline_stages: int = PipelineStages,
):
    """Greedy search for the F/S pattern with the lowest calibration loss; writes a pattern JSON."""
    from .. import api
    from ..models.loading import parse_max_memory

    data = _data_spec(dataset, dataset_config, split, text_column, num_samples, seq_len, seed, windows)
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("best {task.fields[best]}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as progress:
            result = api.search(
                model,
                None if num_full is not None else ratio,
                num_full,
                data,
                output,
                strategy,
                blocks,
                resume,
                batch_size,
                cache,
                prune_keep,
                kernels,
                dtype,
                device,
                device_map,
                tokenizer,
                observer=_RichObserver(progress),
                log=lambda m: progress.console.print(m, highlight=False),
                max_memory=parse_max_memory(max_memory),
                pipeline_stages=pipeline_stages,
            )
    except KeyboardInterrupt:
        if api.search_state_path(output).exists():
            _fail("interrupted; run the same command with --resume to continue after the last step", 130)
        raise
    out.print(
        f"[bold]{result['index_topk_pattern']}[/]  {result['num_full']}/{len(result['model']['dsa_layers'])} F   "
        f"loss {result['loss_final']:.5f} (all-F {result['loss_all_full']:.5f})   "
        f"{result['search']['layer_forwards']:,} layer-forwards in {result['search']['seconds']:.1f} s → {output}",
        highlight=False,
        soft_wrap=True,
    )
    if plot is not None:
        from ..plot import plot_pattern_file

        plot_pattern_file(output, plot)


@app.command("eval")
@friendly_errors
@across_ranks
def eval_(
    pattern: Path = typer.Argument(..., help="Pattern JSON written by `indexcache search`."),
    model: str | None = typer.Option(None, "--model", help="Checkpoint (default: the one the pattern records)."),
    dataset: str | None = typer.Option(
        None,
        help="Held-out data (default: the pattern's calibration source, windows disjoint from the calibration ones).",
    ),
    dataset_config: str | None = DatasetConfig,
    split: str = Split,
    text_column: str = TextColumn_,
    num_samples: int | None = typer.Option(
        None, show_default=str(defaults.NUM_SAMPLES), help="Number of held-out windows."
    ),
    seq_len: int | None = typer.Option(
        None,
        show_default="with --dataset: from the model; else the calibration's",
        help="Tokens per window; without --dataset it must equal the calibration's (windows stay disjoint).",
    ),
    seed: int | None = typer.Option(
        None, show_default=str(defaults.SEED), help="Window order seed; without --dataset, the calibration's."
    ),
    windows: str = Windows_,
    batch_size: int = BatchSize,
    kernels: str = Kernels,
    dtype: str = Dtype,
    device: str = Device,
    device_map: str | None = DeviceMap,
    max_memory: str | None = MaxMemory,
    tokenizer: str | None = Tokenizer,
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results as JSON."),
    plot: Path | None = PlotPath,
    pipeline_stages: int = PipelineStages,
):
    """Held-out loss of the pattern vs all-F and the uniform interleave with the same number of F layers."""
    from .. import api
    from ..models.loading import parse_max_memory

    data = None
    if dataset is not None:
        data = _data_spec(
            dataset,
            dataset_config,
            split,
            text_column,
            num_samples or defaults.NUM_SAMPLES,
            seq_len,
            defaults.SEED if seed is None else seed,
            windows,
        )
    rows = api.evaluate(
        pattern,
        model,
        data,
        batch_size,
        kernels,
        dtype,
        device,
        device_map,
        tokenizer,
        json_path,
        log=lambda m: err.print(m, highlight=False),
        num_samples=num_samples,
        seq_len=seq_len,
        seed=seed,
        max_memory=parse_max_memory(max_memory),
        pipeline_stages=pipeline_stages,
    )
    table = Table(title=f"held-out loss · {pattern}")
    for col, kw in [
        ("", {}),
        ("F/S pattern", {}),
        ("F", {"justify": "right"}),
        ("loss", {"justify": "right"}),
        ("Δ vs all-F", {"justify": "right"}),
        ("ppl", {"justify": "right"}),
    ]:
        table.add_column(col, **kw)
    for r in rows:
        table.add_row(
            r["name"],
            r["pattern"],
            str(r["num_full"]),
            f"{r['loss']:.5f}",
            f"{r['delta_vs_all_full']:+.5f}",
            f"{r['perplexity']:.3f}",
        )
    print_table(table)
    if plot is not None:
        from ..patterns import file as pattern_file
        from ..plot import pattern_figure, save_png

        save_png(pattern_figure(pattern_file.read(pattern), {"results": rows}), plot)


@app.command()
@friendly_errors
@across_ranks
def analyze(
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write analysis.json and overlap.png into."),
    model: str | None = Model,
    dataset: str | None = Dataset,
    dataset_config: str | None = DatasetConfig,
    split: str = Split,
    text_column: str = TextColumn_,
    num_samples: int = typer.Option(defaults.NUM_SAMPLES, help="Number of calibration windows."),
    seq_len: int = SeqLen,
    seed: int = Seed,
    batch_size: int = BatchSize,
    kernels: str = Kernels,
    dtype: str = Dtype,
    device: str = Device,
    device_map: str | None = DeviceMap,
    tokenizer: str | None = Tokenizer,
):
    """One all-F forward: the layers' top-k overlap matrix and indexer score entropy, as JSON and a heatmap."""
    from ..analyze import ANALYSIS_JSON, OVERLAP_PNG
    from ..analyze import analyze as run_analysis

    data = _data_spec(dataset, dataset_config, split, text_column, num_samples, seq_len, seed)
    result = run_analysis(output, model, data, batch_size, kernels, dtype, device, device_map, tokenizer)
    layers = result["model"]["indexer_layers"]  # consecutive indexer layers (every layer in most families)
    adjacent = [result["overlap"][a][b] for a, b in itertools.pairwise(layers)]
    shown = ", ".join("–" if v is None else f"{v:.0%}" for v in adjacent)
    out.print(f"adjacent indexer layers' top-k overlap: {shown}", highlight=False, soft_wrap=True)
    out.print(f"wrote {output / ANALYSIS_JSON} and {output / OVERLAP_PNG}", highlight=False)


@app.command()
@friendly_errors
def plot(
    pattern: Path = typer.Argument(..., help="Pattern JSON written by `indexcache search`."),
    output: Path = typer.Option(..., "--output", "-o", help="PNG to write."),
    eval_json: Path | None = typer.Option(None, "--eval", help="JSON written by `indexcache eval --json`."),
):
    """Draw a pattern: F/S strip, greedy trajectory, and with --eval the pattern vs all-F vs uniform losses."""
    from ..plot import plot_pattern_file

    plot_pattern_file(pattern, output, eval_json)
    out.print(f"wrote {output}", highlight=False)


@app.command()
@friendly_errors
def apply(
    pattern: Path = typer.Argument(..., help="Pattern JSON written by `indexcache search`."),
    model: Path = typer.Option(..., "--model", help="Checkpoint folder to copy."),
    output: Path = typer.Option(..., "--output", "-o", help="New checkpoint folder to create."),
    copy: bool = typer.Option(False, help="Copy weight files instead of symlinking them."),
):
    """Write a servable copy of a checkpoint with the pattern in config.json (index_topk_pattern)."""
    from ..export import apply_pattern

    path = apply_pattern(pattern, model, output, copy, log=lambda m: err.print(m, highlight=False, soft_wrap=True))
    out.print(f"wrote {path} (config.json carries the pattern; weights {'copied' if copy else 'linked'})")


app.command("bench")(friendly_errors(bench))


app.command("distill")(friendly_errors(distill))


def main() -> None:
    app(prog_name="indexcache")
