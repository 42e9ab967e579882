"""A cached greedy search of GLM-5 through pipeline stages on 8 × H200: placement, memory and projected time.

    python scripts/project_pipeline.py --out scripts/results/project_pipeline_2026-12-01.json

Placement: GLM-5's layers (`GlmMoeDsaConfig()`, built on `meta` by transformers, so every shape is the
model's own) counted in FP8 as the released FP8 checkpoint stores them — one byte per weight of every matrix
of the decoder layers (experts, attention, indexer) plus one fp32 scale per 128 × 128 block, bf16 for the
norms, the routers, the embeddings and the head — then split by the product's own functions
(`pipeline.layer_work`, `max_layers_per_stage`, `balanced_bounds`) for `--stages` GPUs of `--gpu-gib`.

Time: the search's runs (16 windows per candidate, candidates in the order the scorer streams them, the commit
rerunning the winner's layers) are played through the stages as the product schedules them (`stream_time`),
and every stream ends when the last stage is done (the losses are shared). One layer forward costs the
measured GLM-5 MoE layer time (33.9 ms at 8K, 135.7 ms at 32K on one H200, ../shared/MEASUREMENTS.md,
2026-12-01); sends (100 MB per run at 8K over NVLink) and the LM head are not counted. The baseline is one
process over the node with `--device-map` (one GPU busy at a time), as scripts/project_node_time.py counts it.
"""

from __future__ import annotations

import argparse
import datetime
import math
import runpy
from pathlib import Path

import torch
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

from indexcache.atomic import write_json
from indexcache.defaults import STAGE_MEMORY_RESERVE
from indexcache.distributed import balanced_shares
from indexcache.distributed.pipeline import IN_FLIGHT, balanced_bounds, layer_work, max_layers_per_stage

NODE = runpy.run_path(str(Path(__file__).with_name("project_node_time.py")))
BLOCK = 128


def fp8_bytes(name: str, param: torch.Tensor) -> int:
    """Bytes of one tensor in the FP8 checkpoint: matrices of the decoder layers in FP8 with a block scale,
    everything else (norms, routers, embeddings, head) in bf16."""
    matrix = param.dim() >= 2 and ".layers." in name and ".gate." not in name
    if not matrix:
        return param.numel() * 2
    rows, cols = param.shape[-2:]
    blocks = param.numel() // (rows * cols) * -(-rows // BLOCK) * -(-cols // BLOCK)
    return param.numel() + 4 * blocks


def glm5_bytes() -> tuple[list[int], int]:
    """(bytes of each decoder layer, bytes of the embeddings, final norm and head) of GLM-5 in FP8."""
    config = GlmMoeDsaConfig()
    with torch.device("meta"):
        model = GlmMoeDsaForCausalLM(config)
    layers, rest = [0] * config.num_hidden_layers, 0
    for name, param in model.named_parameters():
        size = fp8_bytes(name, param)
        if name.startswith("model.layers."):
            layers[int(name.split(".")[2])] += size
        else:
            rest += size
    return layers, rest


def stream_time(starts: list[int], bounds: list[int]) -> tuple[float, list[float]]:
    """Layer-forward units until the last stage finishes a stream of runs (run i enters at layer starts[i]),
    and each stage's busy time, as `PatternScorer._stream` schedules them: a free stage takes the earliest run
    the previous stage has sent and it has not taken, else starts its next own run (one entering at its
    layers), else waits for one to arrive; after a send it waits while more than `IN_FLIGHT` of its sends are
    not yet taken."""
    stages = len(bounds) - 1
    own = [[i for i, at in enumerate(starts) if bounds[s] <= at < bounds[s + 1]] for s in range(stages)]
    todo = [len(own[s]) + sum(at < bounds[s] for at in starts) for s in range(stages)]
    inbox: list[list[tuple[float, int]]] = [[] for _ in range(stages)]  # (arrival time, run)
    untaken: list[set[int]] = [set() for _ in range(stages)]  # runs sent on and not yet taken by the next stage
    free, busy, taken_own = [0.0] * stages, [0.0] * stages, [0] * stages
    end = 0.0
    while live := [s for s in range(stages) if todo[s] and free[s] < math.inf]:
        s = min(live, key=lambda s: (free[s], s))
        now, lo, hi = free[s], bounds[s], bounds[s + 1]
        arrived = [a for a in inbox[s] if a[0] <= now]
        if arrived:
            inbox[s].remove(first := min(arrived))
            run, start = first[1], lo
            untaken[s - 1].discard(run)
            if free[s - 1] == math.inf:
                free[s - 1] = now  # the sender was waiting for room
        elif taken_own[s] < len(own[s]):
            run = own[s][taken_own[s]]
            taken_own[s] += 1
            start = starts[run]
        else:
            free[s] = min((a[0] for a in inbox[s]), default=math.inf)  # wait for the next arrival
            continue
        work = hi - max(start, lo)
        busy[s] += work
        todo[s] -= 1
        free[s] = end_of_run = now + work
        end = max(end, end_of_run)
        if s + 1 < stages:
            inbox[s + 1].append((end_of_run, run))
            untaken[s].add(run)
            if free[s + 1] == math.inf:
                free[s + 1] = end_of_run
            if len(untaken[s]) > IN_FLIGHT:
                free[s] = math.inf  # until the next stage takes one
    return end, busy


def pipeline_search(num_layers: int, flipped: list[int], bounds: list[int], windows: int, replicas: int) -> dict:
    """Critical-path layer-forward units of a cached search flipping `flipped` in order over `windows` windows
    (one run each per candidate), on `replicas` pipelines of `bounds`, and how busy the stages were."""
    full = set(range(num_layers))
    total, busy_sum = 0.0, 0.0
    t, busy = stream_time([0] * windows, bounds)  # every replica caches the starting pattern at once
    total += t
    busy_sum += sum(busy) * replicas
    for winner in flipped:
        candidates = sorted(full - {0})
        costs = [num_layers - layer for layer in candidates]
        step = 0.0
        for share in balanced_shares(costs, replicas):
            starts = [candidates[i] for i in share for _ in range(windows)]
            t, busy = stream_time(starts, bounds)
            step = max(step, t)
            busy_sum += sum(busy)
        t, busy = stream_time([winner] * windows, bounds)  # every replica commits: reruns the winner's layers
        total += step + t
        busy_sum += sum(busy) * replicas
        full.remove(winner)
    gpus = replicas * (len(bounds) - 1)
    return {"critical": total, "utilisation": round(busy_sum / (total * gpus), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--gpu-gib", type=float, default=139.0, help="memory of one GPU (H200: about 139 GiB)")
    parser.add_argument("--num-full", type=int, default=20)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--layer-ms", default="8192=33.9,32768=135.7", help="tokens=ms of one layer forward")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    layer_ms = {int(k): float(v) for k, v in (p.split("=") for p in args.layer_ms.split(","))}
    layer_bytes, rest = glm5_bytes()
    n = len(layer_bytes)
    config = GlmMoeDsaConfig()
    cache_per_layer = args.windows * args.seq_len * (config.hidden_size * 2 + config.index_topk * 4)
    steps = n - args.num_full
    work = layer_work(n, list(range(1, n)), steps)
    cap = max_layers_per_stage(layer_bytes, rest, int(args.gpu_gib * 2**30), STAGE_MEMORY_RESERVE)
    layouts = {
        "balanced": balanced_bounds(work, args.stages, cap),
        "balanced, no memory cap": balanced_bounds(work, args.stages),
        "even": balanced_bounds([1.0] * n, args.stages),
    }
    placement = {}
    for name, bounds in layouts.items():
        stages = []
        for s in range(args.stages):
            lo, hi = bounds[s], bounds[s + 1]
            weights = sum(layer_bytes[lo:hi]) + (rest if s in (0, args.stages - 1) else 0)
            stages.append(
                {
                    "layers": [lo, hi - 1],
                    "weights_gib": round(weights / 2**30, 1),
                    "cache_gib": round((hi - lo) * cache_per_layer / 2**30, 1),
                    "work_share": round(sum(work[lo:hi]) / sum(work), 3),
                }
            )
        placement[name] = {"bounds": bounds, "stages": stages}
    rows = []
    for order, flipped in NODE["flip_orders"](n, steps, args.seed).items():
        one = NODE["cached_search_cost"](n, flipped, 1)["critical"] * args.windows
        rows.append({"order": order, "layout": "one process over the node (--device-map)", "critical": one})
        for name, bounds in layouts.items():
            for replicas in (1, 2):
                cost = pipeline_search(n, flipped, bounds, args.windows, replicas)
                rows.append({"order": order, "layout": name, "replicas": replicas, **cost})
        for row in rows[-len(layouts) * 2 - 1 :]:
            row["speedup"] = round(one / row["critical"], 2)
            row["hours"] = {str(t): round(row["critical"] * ms / 1000 / 3600, 2) for t, ms in layer_ms.items()}
            print(
                f"{order:>11} {row['layout']:>42} R={row.get('replicas', 1)} {row['speedup']:5.2f}×  "
                f"busy {row.get('utilisation', 1 / args.stages):.2f}  "
                + "  ".join(f"{int(t) // 1024}K {h:6.2f} h" for t, h in row["hours"].items())
            )
    for name, layout in placement.items():
        print(name, [(s["layers"], s["weights_gib"]) for s in layout["stages"]])
    write_json(
        args.out,
        {
            "description": "GLM-5 (FP8) cached greedy search through pipeline stages: placement and projected time "
            "(scripts/project_pipeline.py)",
            "date": datetime.date.today().isoformat(),
            "card": f"NVIDIA H200 × {args.stages} (projected: {args.gpu_gib} GiB each; layer times measured on one)",
            "num_layers": n,
            "num_full": args.num_full,
            "windows": args.windows,
            "seq_len": args.seq_len,
            "layer_gib": [round(b / 2**30, 2) for b in layer_bytes],
            "embeddings_head_gib": round(rest / 2**30, 2),
            "model_gib": round((sum(layer_bytes) + rest) / 2**30, 1),
            "max_layers_per_stage": cap,
            "memory_reserve": STAGE_MEMORY_RESERVE,
            "in_flight": IN_FLIGHT,
            "layer_ms": {str(k): v for k, v in layer_ms.items()},
            "placement": placement,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
