"""Where the quick start's CPU time goes: one forward of the embedded tiny model (16 layers, one 512-token window,
the quick start's pattern) plus the fp32 LM head, per attention path and intra-op thread count, and the search's
own way to use two cores: two windows at once, one thread each (`PatternScorer(threads=2)`).

    python scripts/profile_quickstart.py [--reps 3] [--out scripts/results/profile_quickstart_cpu_DATE.json]

For each variant: median wall and CPU (user+sys of this process) seconds per forward over `--reps`, the loss
(so a faster path can be checked for the same result), and the machine's load average while it ran (the
project's CPU machine is shared: a busy machine changes the thread-count rows most). Variants: stock eager
attention (what `--kernels auto` runs on the CPU), stock sdpa, and the absorbed MLA attention through its
PyTorch reference; each at 1 and 2 threads; then eager with two windows on two threads of one intra-op thread
each (per-window figures: the pair's wall and CPU halved). Then a torch.profiler table of the eager forward (1
thread).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from indexcache.atomic import write_json
from indexcache.kernels.backend import forced
from indexcache.models import load_weights, open_checkpoint
from indexcache.patterns.file import library_versions
from indexcache.runtime.absorbed import absorbed_attention
from indexcache.runtime.forward import LayerwiseModel
from indexcache.runtime.patch import index_sharing
from indexcache.search.scoring import PatternScorer

PATTERN = "FFSSFSSSFSSSSSSS"  # the quick start's result (README, Search cost)
VARIANTS = {"eager": ("eager", False), "sdpa": ("sdpa", False), "absorbed reference": (None, True)}


def forward_loss(lw: LayerwiseModel, ids: torch.Tensor) -> float:
    hidden, inputs = lw.embed(ids)
    hidden = lw.run_layers(hidden, inputs, 0, lw.num_layers)
    return lw.nll_sum(hidden, ids).item() / (ids.shape[1] - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()

    loaded = load_weights(open_checkpoint(None), "auto", "cpu", None, None)
    model, arch = loaded.model, loaded.arch
    lw = LayerwiseModel(model, arch)
    ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, (attn, absorbed) in VARIANTS.items():
            with ExitStack() as stack:
                stack.enter_context(torch.inference_mode())
                stack.enter_context(forced("reference"))
                stack.enter_context(index_sharing(model, arch, PATTERN, attn_implementation=attn))
                stack.enter_context(absorbed_attention(model, arch, enabled=absorbed))
                forward_loss(lw, ids)  # warm-up
                walls, cpus, load = [], [], os.getloadavg()[0]
                for _ in range(options.reps):
                    wall, cpu = time.perf_counter(), time.process_time()
                    loss = forward_loss(lw, ids)
                    walls.append(time.perf_counter() - wall)
                    cpus.append(time.process_time() - cpu)
            row = {
                "attention": name,
                "threads": threads,
                "wall_s": round(statistics.median(walls), 4),
                "cpu_s": round(statistics.median(cpus), 4),
                "loss": loss,
                "load_average": round((load + os.getloadavg()[0]) / 2, 2),
            }
            rows.append(row)
            print(row, flush=True)

    with torch.inference_mode(), forced("reference"), index_sharing(model, arch, PATTERN) as sharing:
        pair = torch.cat([ids, ids.roll(1, dims=1)])  # two windows of the same length
        scorer = PatternScorer(lw, sharing, pair, threads=2)
        scorer.loss(PATTERN)  # warm-up (starts the two threads)
        walls, cpus, load = [], [], os.getloadavg()[0]
        for _ in range(options.reps):
            wall, cpu = time.perf_counter(), time.process_time()
            scorer.loss(PATTERN)
            walls.append((time.perf_counter() - wall) / 2)
            cpus.append((time.process_time() - cpu) / 2)
    rows.append(
        {
            "attention": "eager",
            "threads": "2 windows at once, 1 thread each",
            "wall_s": round(statistics.median(walls), 4),
            "cpu_s": round(statistics.median(cpus), 4),
            "loss": None,
            "load_average": round((load + os.getloadavg()[0]) / 2, 2),
        }
    )
    print(rows[-1], flush=True)

    torch.set_num_threads(1)
    with (
        torch.inference_mode(),
        index_sharing(model, arch, PATTERN),
        profile(activities=[ProfilerActivity.CPU]) as prof,
    ):
        forward_loss(lw, ids)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print(table)
    ops = [
        {"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count}
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    ]
    if options.out is not None:
        write_json(
            options.out,
            {
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                "date": datetime.date.today().isoformat(),
                "pattern": PATTERN,
                "window": 512,
                "versions": library_versions(),
                "rows": rows,
                "eager_profile_1_thread": ops,
            },
        )


if __name__ == "__main__":
    main()
