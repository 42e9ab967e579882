"""What every command of the CLI shares: the consoles, one-line errors, tables that fit the console, and the options
of several commands."""

from __future__ import annotations

import functools
import os

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import defaults
from ..errors import IndexCacheError

out = Console()
err = Console(stderr=True)


def _rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    return int(os.environ.get("RANK", "0"))


def _fail(message: str, code: int = 2, own: bool = False) -> None:
    """Print `message` as the one error line and exit. Under torchrun rank 0 speaks for the run; another rank
    prints only a failure that may be its own alone (`own`: its GPU's memory, its files), naming itself."""
    if own and _rank() != 0:
        err.quiet = False
        message = f"rank {_rank()}: {message}"
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def friendly_errors(fn):
    """Every user-fixable failure becomes one line on stderr and exit code 2, never a traceback. Under torchrun only
    rank 0 prints, save a rank's own out-of-memory or file error: input errors are the same on every rank, and an
    error in another rank's share of the work reaches rank 0 through the collectives."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        out.quiet = err.quiet = _rank() != 0
        try:
            return fn(*args, **kwargs)
        except IndexCacheError as exc:
            _fail(str(exc))
        except torch.cuda.OutOfMemoryError as exc:
            _fail(OOM_HINT, own=not getattr(exc, "collective", False))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as exc:
            _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), own=True)

    return wrapper


def across_ranks(fn):
    """Under torchrun, the command runs as one rank of torchrun's process group (`distributed.joined`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..distributed import joined

        with joined(defaults.COLLECTIVE_TIMEOUT_S):
            return fn(*args, **kwargs)

    return wrapper


def print_table(table: Table, keys: int = 1) -> None:
    """Print `table` on stdout with no cell cut, at any console width (a pipe gets 80 columns).

    A table wider than the console is split into several, each repeating the first `keys` columns (which say what
    a row is) and taking as many of the others as fit; a cell too long even then (a 78-layer F/S pattern in 80
    columns) folds onto the next line instead of ending in "…". Only the first part carries the title.
    """
    rest = list(range(keys, len(table.columns)))
    title = table.title
    while rest:
        shown = [*range(keys), rest.pop(0)]
        while rest and _natural_width(_part(table, [*shown, rest[0]])) <= out.width:
            shown.append(rest.pop(0))
        out.print(_part(table, shown, title))
        title = None


def _part(table: Table, shown: list[int], title=None) -> Table:
    """The columns `shown` of `table`, folding what does not fit."""
    columns = [table.columns[i] for i in shown]
    part = Table(title=title)
    for column in columns:
        part.add_column(column.header, justify=column.justify, overflow="fold")
    for cells in zip(*(list(column.cells) for column in columns), strict=True):
        part.add_row(*cells)
    return part


def _natural_width(table: Table) -> int:
    """Columns the table takes when nothing wraps."""
    return out.measure(table, options=out.options.update_width(10**6)).maximum


# The prefix cache (hidden states and top-k index buffers) follows --cache; model and activations do not.
OOM_HINT = (
    "CUDA out of memory: move the prefix cache off the GPU with --cache host (or --cache every:K), lower "
    "--batch-size or --seq-len, or spread the model over GPUs with --device-map auto"
)


def _data_spec(dataset, dataset_config, split, text_column, num_samples, seq_len, seed, windows=defaults.WINDOWS):
    from ..calib import DataSpec

    return DataSpec(dataset, dataset_config, split, text_column, num_samples, seq_len, seed, windows)


# Options shared by search and eval.
Model = typer.Option(None, "--model", help="Checkpoint folder or hub id (default: the embedded tiny GLM-DSA model).")
Dataset = typer.Option(
    None,
    help="Local .txt/.jsonl/.json/.parquet file or folder, or a hub dataset name "
    "(default: the embedded calibration sample).",
)
DatasetConfig = typer.Option(None, help="Hub dataset configuration name.")
Split = typer.Option(defaults.SPLIT, help="Dataset split (hub datasets).")
TextColumn_ = typer.Option(defaults.TEXT_COLUMN, help="Column holding the text.")
SeqLen = typer.Option(
    defaults.SEQ_LEN,
    show_default="from the model: max(512, 4 × index_topk)",
    help="Tokens per calibration window, prefix tokens included; must exceed the model's index_topk.",
)
Windows_ = typer.Option(
    defaults.WINDOWS, help="packed (documents joined with EOS, then cut) or document (cut inside single documents)."
)
Seed = typer.Option(defaults.SEED, help="Seed for choosing the windows.")
BatchSize = typer.Option(defaults.BATCH_SIZE, help="Windows per forward.")
Kernels = typer.Option(defaults.KERNELS, help="auto (Triton on CUDA), triton, or reference (stock transformers).")
Dtype = typer.Option(defaults.DTYPE, help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32.")
Device = typer.Option(defaults.DEVICE, help="auto, cpu, cuda or cuda:N.")
DeviceMap = typer.Option(None, "--device-map", help="'auto' spreads a large model over all GPUs (accelerate).")
MaxMemory = typer.Option(
    None, "--max-memory", help="Per-device limits for --device-map, e.g. '0=20GiB,1=70GiB,cpu=200GiB'."
)
Tokenizer = typer.Option(None, help="Tokenizer folder, when the checkpoint has none.")
PipelineStages = typer.Option(
    1,
    "--pipeline-stages",
    min=1,
    help="Under torchrun: each group of this many ranks is one pipeline, each rank holding a contiguous stage of "
    "the layers (a model larger than one GPU); the groups are replicas. 1: every rank holds the whole model.",
)
PlotPath = typer.Option(None, "--plot", help="Also draw the pattern (and its trajectory or losses) to this PNG.")
