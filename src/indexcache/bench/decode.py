"""`indexcache bench --decode`: one decode step per layer against a latent cache, for all-F, a pattern and the
uniform interleave, through the product's decode path (`runtime.decode.decoding` + `LayerwiseModel`).

The K layers of `prefill.build_stack` get one `LatentCache` each, filled with random rows for `context` earlier
tokens of `batch` sequences (latent rows on every layer, indexer keys on F layers only); the timed step feeds one
new token per sequence through the K layers: F layers run the split-K decode indexer over all cached keys, S layers
reuse the selection, every layer attends over 2,048 cached rows and runs its MLP on `batch` tokens. On CUDA the
step is captured in a CUDA graph and its replays are timed (a serving engine's decode loop, without launch gaps).
As for prefill, t_F and t_S are measured on the K layers (all-F, then F followed by S) and a pattern of N layers
costs nF·t_F + nS·t_S per generated token (the LM head and sampling are not timed).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ..errors import IndexCacheError
from ..patterns.layout import full_layers
from ..runtime.decode import LatentCache, decoding, step_inputs
from ..runtime.forward import LayerwiseModel
from .prefill import VOCAB, LayerStack

_REPLAYS = 10  # graph replays per timed repetition: a step at batch 1 lasts well under a millisecond


def _median_ms(run: Callable[[], object], reps: int, cuda: bool) -> float:
    """Median over `reps` of the mean time of `_REPLAYS` runs (CUDA events on a GPU)."""
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(_REPLAYS):
                run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / _REPLAYS)
        else:
            start_s = time.perf_counter()
            for _ in range(_REPLAYS):
                run()
            times.append((time.perf_counter() - start_s) * 1e3 / _REPLAYS)
    return statistics.median(times)


def _graphed(step: Callable[[], object]) -> Callable[[], object] | None:
    """`step` captured in a CUDA graph (after two warm-up runs on a side stream, which compile the kernels), or
    None when it cannot be captured (a host synchronisation inside, e.g. eager MoE experts)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    return graph.replay


def time_step(
    stack: LayerStack, context: int, batch: int, pattern: str, device: torch.device, kernels: str, reps: int
) -> dict:
    """One decode step of the K layers under `pattern`, at position `context` of `batch` sequences: ms, backend,
    whether a CUDA graph was replayed."""
    lw = LayerwiseModel(stack.model, stack.arch)
    dtype = next(stack.model.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(0)
    caches = [
        LatentCache.allocate(
            stack.arch.attention(layer),
            batch,
            context + 1,
            letter == "F",
            dtype,
            device,
            fill=lambda t: t.normal_(generator=gen),
        )  # fmt: skip
        for layer, letter in zip(lw.layers, pattern, strict=True)
    ]
    ids = torch.randint(0, VOCAB, (batch, 1), generator=torch.Generator().manual_seed(0))
    cuda = device.type == "cuda"
    with torch.inference_mode(), decoding(stack.model, stack.arch, caches, device, kernels, pattern) as (_, backend):
        hidden, inputs = step_inputs(lw, ids, context)

        def step():
            for cache in caches:  # every run writes the new token at the same position
                cache.length = context
            return lw.run_layers(hidden, inputs, 0, lw.num_layers)

        run = _graphed(step) if cuda else None
        if run is None:
            step()  # warm-up
        ms = _median_ms(run or step, reps, cuda)
    return {"ms": ms, "backend": backend, "cuda_graph": run is not None}


def decode_bench(
    stack: LayerStack,
    contexts: list[int],
    batches: list[int],
    patterns: list[tuple[str, str]],
    device: torch.device,
    kernels: str = "auto",
    reps: int = 3,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per (context, batch, named pattern): ms per layer (the pattern's mean, and t_F, t_S), projected
    full-model ms per generated token, tokens/s over the batch, KV-cache bytes per sequence, speedup vs all-F."""
    layers = stack.arch.layers(stack.model)
    k, n = len(layers), stack.num_layers
    if k < 2:
        raise IndexCacheError("--layers must be at least 2 to time both an F and an S layer")
    dtype = next(stack.model.parameters()).dtype
    attn = stack.arch.attention(layers[0])
    latent_bytes, full_bytes = (LatentCache.allocate(attn, 1, 1, f, dtype, "meta").bytes_per_token() for f in (0, 1))
    index_bytes = full_bytes - latent_bytes  # an F layer's indexer key per token
    rows = []
    for context in contexts:
        for batch in batches:
            all_f = time_step(stack, context, batch, "F" * k, device, kernels, reps)
            one_f = time_step(stack, context, batch, "F" + "S" * (k - 1), device, kernels, reps)
            f_ms = all_f["ms"] / k
            s_ms = (one_f["ms"] - f_ms) / (k - 1)
            group = []
            for name, pattern in patterns:
                n_full = len(full_layers(pattern))
                step_ms = n_full * f_ms + (n - n_full) * s_ms
                group.append(
                    {
                        "phase": "decode",
                        "context": context,
                        "batch": batch,
                        "name": name,
                        "pattern": pattern,
                        "num_full": n_full,
                        "num_layers": n,
                        "layers_timed": k,
                        "backend": all_f["backend"],
                        "mlp": stack.mlp,
                        "cuda_graph": all_f["cuda_graph"] and one_f["cuda_graph"],
                        "ms_per_layer": step_ms / n,
                        "f_layer_ms": f_ms,
                        "s_layer_ms": s_ms,
                        "projected_ms_per_token": step_ms,
                        "tokens_per_s": batch / (step_ms / 1e3),
                        "kv_cache_bytes_per_sequence": context * (n * latent_bytes + n_full * index_bytes),
                    }
                )
            for row in group:
                row["speedup_vs_all_f"] = group[0]["projected_ms_per_token"] / row["projected_ms_per_token"]
                if on_row:
                    on_row(row)
            rows += group
    return rows
