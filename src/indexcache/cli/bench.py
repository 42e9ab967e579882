"""The `indexcache bench` command: options, model/config resolution, the rich table and the JSON rows."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import typer
from rich.table import Table

from .. import defaults
from ..atomic import write_json
from ..errors import IndexCacheError
from .common import out, print_table


def parse_counts(text: str, option: str, items: str, least: str) -> list[int]:
    """A comma-separated list of integers, each at least int(`least`'s first word), or one line saying what is wrong:
    `items` names the list's entries, `least` the bound ("2 tokens")."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise IndexCacheError(f"{option} {text} is not a comma-separated list of {items}") from None
    if not counts or min(counts) < int(least.split()[0]):
        raise IndexCacheError(f"{option} {text}: give one or more values of at least {least}")
    return counts


def parse_contexts(text: str) -> list[int]:
    return parse_counts(text, "--context", "token counts", "2 tokens")


def _device(device: str) -> torch.device:
    if device == "auto":
        if not torch.cuda.is_available():
            raise IndexCacheError(
                "no CUDA GPU is visible: indexcache bench times prefill and decode on a GPU (--device cpu smoke-runs "
                "the reference path on tiny models only)"
            )
        device = "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IndexCacheError(f"--device {device} was asked for but no CUDA GPU is visible")
    return torch.device(device)


def run_bench(
    pattern_path: Path | None,
    model: str | None,
    contexts: str,
    layers: int,
    ratio: float,
    weights: bool,
    kernels: str,
    dtype: str,
    device: str,
    reps: int,
    json_path: Path | None,
    decode: bool = False,
    batches: str = defaults.BENCH_BATCHES,
    dense_mlp: bool = False,
) -> list[dict]:
    """Checks every option before anything is built; returns the rows (also written to `json_path`)."""
    from transformers import AutoConfig

    from ..bench.decode import decode_bench
    from ..bench.prefill import bench, build_stack, named_patterns, timed_layers
    from ..models.loading import embedded_model_path, resolve_dtype
    from ..patterns import file as pattern_file

    context_list = parse_contexts(contexts)
    batch_list = parse_counts(batches, "--batch", "batch sizes", "1 sequence")
    if weights and dense_mlp:
        raise IndexCacheError("--dense-mlp builds random layers; --weights loads the checkpoint's own MLPs")
    if layers < 2:
        raise IndexCacheError(f"--layers {layers} must be at least 2 (an F and an S layer are timed)")
    if reps < 1:
        raise IndexCacheError(f"--reps {reps} must be at least 1")
    if json_path is not None and json_path.is_dir():
        raise IndexCacheError(f"--json {json_path} is a folder; give the JSON file to write")
    data = pattern_file.read(pattern_path) if pattern_path is not None else None
    if model is None and data is not None and not str(data["model"].get("name", "")).startswith("embedded:"):
        model = data["model"].get("name")
    name = model or str(embedded_model_path())
    if not Path(name).expanduser().exists():
        raise IndexCacheError(f"model path {name} does not exist; give a checkpoint folder with --model")
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as exc:
        raise IndexCacheError(f"could not read the model config of {name}: {str(exc).splitlines()[0]}") from exc
    if data is not None:
        num_layers = config.get_text_config().num_hidden_layers
        pattern_file.check_matches(data, getattr(config, "model_type", None), num_layers, name)
    if not 0.0 < ratio <= 1.0:
        raise IndexCacheError(f"--ratio {ratio} is outside (0, 1]")
    timed = timed_layers(config)  # the pattern's letters on the indexer layers: the other layers are never timed
    num_layers = len(timed)
    untimed = config.get_text_config().num_hidden_layers - num_layers
    if untimed:
        out.print(
            f"note: the {untimed} layers without an indexer cost the same under every pattern and are not timed; "
            f"rows count the {num_layers} indexer layers",
            highlight=False,
        )
    pattern = data["index_topk_pattern"] if data else None
    patterns = named_patterns(config.get_text_config().num_hidden_layers, pattern, ratio, timed)
    dev = _device(device)
    torch_dtype = resolve_dtype(dtype, dev.type)

    mlp = "dense" if dense_mlp else "moe"
    stack = build_stack(config, min(layers, num_layers), dev, torch_dtype, name if weights else None, mlp)
    if decode:
        rows = decode_bench(stack, context_list, batch_list, patterns, dev, kernels, reps)
    else:
        rows = bench(stack, context_list, patterns, dev, kernels, reps)
    if json_path is not None:
        write_json(
            json_path,
            {
                "model": name,
                "model_type": config.model_type,
                "layers_timed": min(layers, num_layers),
                "weights": "checkpoint" if weights else f"random, {'MoE' if stack.mlp == 'moe' else 'dense MLP'}",
                "phase": "decode" if decode else "prefill",
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "dtype": str(torch_dtype).replace("torch.", ""),
                "date": datetime.date.today().isoformat(),
                "versions": pattern_file.library_versions(),
                "rows": rows,
            },
        )
    return rows


def print_rows(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("context", "", "F", "backend", "ms/layer", "idx/attn/rest ms", "tokens/s", "peak GiB", "× all-F"):
        table.add_column(col, justify="left" if col in ("", "backend") else "right")
    table.add_column("prefill (projected)", justify="right")
    for r in rows:
        split = r["split_ms_per_layer"]
        table.add_row(
            f"{r['context']:,}",
            r["name"],
            f"{r['num_full']}/{r['num_layers']}",
            r["backend"],
            f"{r['ms_per_layer']:.2f}",
            f"{split['indexer']:.1f}/{split['attention']:.1f}/{split['rest']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
            f"{r['speedup_vs_all_f']:.2f}×",
            f"{r['projected_prefill_s']:.2f} s",
        )
    print_table(table, keys=2)  # context and row name head every part in a narrow console


def print_decode_rows(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("context", "batch", "", "F", "ms/layer", "ms/token", "tokens/s", "KV GiB/seq", "× all-F"):
        table.add_column(col, justify="left" if col == "" else "right")
    for r in rows:
        table.add_row(
            f"{r['context']:,}",
            str(r["batch"]),
            r["name"],
            f"{r['num_full']}/{r['num_layers']}",
            f"{r['ms_per_layer']:.3f}",
            f"{r['projected_ms_per_token']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['kv_cache_bytes_per_sequence'] / 2**30:.2f}",
            f"{r['speedup_vs_all_f']:.2f}×",
        )
    out.print(table)


def bench(
    pattern: Path | None = typer.Argument(None, help="Pattern JSON (default: the uniform pattern at --ratio)."),
    model: str | None = typer.Option(None, "--model", help="Checkpoint folder (default: the pattern's model)."),
    context: str = typer.Option(defaults.BENCH_CONTEXTS, help="Comma-separated prefill lengths in tokens."),
    layers: int = typer.Option(defaults.BENCH_LAYERS, help="Decoder layers built and timed (K)."),
    ratio: float = typer.Option(defaults.RATIO, help="Without a pattern file: fraction of F layers."),
    weights: bool = typer.Option(False, help="Load the checkpoint's first K layers instead of random weights."),
    kernels: str = typer.Option(defaults.KERNELS, help="auto, triton, or reference (stock transformers)."),
    dtype: str = typer.Option(defaults.DTYPE, help="auto (bf16 on GPU), bf16, fp16 or fp32."),
    device: str = typer.Option(defaults.DEVICE, help="auto (needs CUDA), cuda, cuda:N, or cpu (tiny smoke run)."),
    reps: int = typer.Option(defaults.BENCH_REPS, help="Timed forwards per measurement (median)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the rows as JSON."),
    decode: bool = typer.Option(False, "--decode", help="Time one decode step against a cache of --context tokens."),
    batch: str = typer.Option(defaults.BENCH_BATCHES, help="--decode: comma-separated batch sizes (sequences)."),
    dense_mlp: bool = typer.Option(False, "--dense-mlp", help="Random layers get the config's dense MLP, not MoE."),
):
    """Prefill (or, with --decode, decode-step) time per layer of the model's own layer shapes: all-F vs the pattern
    vs the uniform interleave.

    Random weights with the model's MoE (--dense-mlp: dense MLPs) unless --weights; F- and S-layer times measured on
    K layers and combined by each pattern's F count into a projected full-model time."""
    from ..distributed import launched_processes

    if launched_processes() > 1:  # G copies would time each other's contention, not a layer
        raise IndexCacheError("bench times layers in one process on one GPU; run it without torchrun")
    rows = run_bench(
        pattern, model, context, layers, ratio, weights, kernels, dtype, device, reps, json_path, decode, batch,
        dense_mlp,
    )  # fmt: skip
    where = model or pattern or "embedded model"
    if decode:
        print_decode_rows(rows, f"decode step per layer · {where}")
    else:
        print_rows(rows, f"prefill per layer · {where}")
