"""`indexcache distill` on the command line: options, a rich progress bar with the KL per layer group, a summary.

Registered in cli/app.py; the work is `indexcache.distill.distill`.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import defaults
from .common import (
    BatchSize,
    DatasetConfig,
    Device,
    DeviceMap,
    Dtype,
    Model,
    Seed,
    SeqLen,
    Split,
    TextColumn_,
    Tokenizer,
    _data_spec,
    _fail,
    err,
    out,
)


def _group_text(kl: dict[int, float], pattern_groups: dict[int, list[int]]) -> str:
    """'L0-3 0.412 · L4-7 0.193 …': each F layer's group and its KL this step."""
    parts = []
    for layer, value in sorted(kl.items()):
        served = pattern_groups[layer]
        span = f"L{served[0]}" if len(served) == 1 else f"L{served[0]}-{served[-1]}"
        parts.append(f"{span} {value:.3f}")
    return " · ".join(parts)


def distill(
    pattern: Path = typer.Argument(..., help="Pattern JSON written by `indexcache search`."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint folder to write (must not exist)."),
    steps: int = typer.Option(..., help="Optimizer steps."),
    model: str | None = Model,
    dataset: str | None = typer.Option(
        None,
        help="Training text (default: the pattern's calibration source, windows past its calibration and "
        "held-out windows).",
    ),
    dataset_config: str | None = DatasetConfig,
    split: str = Split,
    text_column: str = TextColumn_,
    num_samples: int = typer.Option(defaults.DISTILL_NUM_SAMPLES, help="Training windows (cycled through)."),
    seq_len: int = SeqLen,
    seed: int = Seed,
    lr: float = typer.Option(defaults.DISTILL_LR, help="Peak learning rate of the F indexers (AdamW)."),
    batch_size: int = BatchSize,
    objective: str = typer.Option(
        defaults.DISTILL_OBJECTIVE, help="multi (each F indexer learns all the layers it serves) or single."
    ),
    save_every: int = typer.Option(defaults.DISTILL_SAVE_EVERY, help="Save the training state every K steps."),
    resume: bool = typer.Option(False, help="Continue the distillation saved beside --output."),
    dtype: str = Dtype,
    device: str = Device,
    device_map: str | None = DeviceMap,
    tokenizer: str | None = Tokenizer,
):
    """Train the pattern's F indexers to select for every layer they serve; writes a servable checkpoint."""
    from ..distill.checkpoint import state_path
    from ..distill.train import distill as run
    from ..distill.train import served_layers
    from ..patterns import file as pattern_file

    data = None
    if dataset is not None:
        data = _data_spec(dataset, dataset_config, split, text_column, num_samples, seq_len, seed)
    groups = served_layers(pattern_file.read(pattern)["index_topk_pattern"])
    try:
        with Progress(
            TextColumn("distill"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("KL {task.fields[kl]}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as progress:
            task = progress.add_task("distill", total=steps, kl="–")

            def observe(step: int, total: int, kl: dict[int, float]) -> None:
                progress.update(task, completed=step, kl=_group_text(kl, groups))

            record = run(
                pattern,
                output,
                steps,
                model,
                data,
                num_samples,
                lr,
                batch_size,
                objective,
                save_every,
                resume,
                dtype,
                device,
                device_map,
                tokenizer,
                observer=observe,
                log=lambda m: progress.console.print(m, highlight=False),
            )
    except KeyboardInterrupt:
        if state_path(output).exists():
            _fail("interrupted; run the same command with --resume to continue from the last saved step", 130)
        raise
    first, last = record["losses"][0]["kl"], record["losses"][-1]["kl"]
    out.print(
        f"[bold]{record['index_topk_pattern']}[/]  {record['steps']} steps, {record['tokens']:,} tokens in "
        f"{record['seconds']:.1f} s → {output}\n"
        f"KL first step: {_group_text(first, groups)}\nKL last step:  {_group_text(last, groups)}",
        highlight=False,
        soft_wrap=True,
    )
