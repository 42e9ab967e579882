"""Projected time of a cached greedy search on one process and on R replicas, from a measured layer time.

    python scripts/project_node_time.py --out scripts/results/project_node_time_2026-12-01.json

Counts the decoder-layer forwards of `--strategy cached` exactly as the scorer runs them (each window: N at the
start; a candidate l reruns layers l … N−1; a commit installs the winner's recorded run, so it costs nothing in
one process) for a search from all-F to `--num-full` F, under three flip orders (which layers the search turns S
first decides the cost: late layers are cheap to rerun): late layers first, early layers first, and a seeded
random order. For R replicas each step's candidates are split as `indexcache.distributed.balanced_shares` splits
them; the step lasts as long as the busiest replica's share plus, where that replica did not score the winner,
the winner's rerun at commit; every replica builds the starting cache. Times are forwards × the layer time given
(defaults: one GLM-5 decoder layer with its MoE on one H200, product path, 33.9 ms at 8K and 135.7 ms at 32K
tokens; ../shared/MEASUREMENTS.md, 2026-12-01). A replica is one process holding the whole model: on one GPU, or
over a node's GPUs with --device-map (one GPU busy at a time, the same layer time).
"""

from __future__ import annotations

import argparse
import datetime
import random
from pathlib import Path

from indexcache.atomic import write_json
from indexcache.distributed import balanced_shares


def flip_orders(num_layers: int, steps: int, seed: int) -> dict[str, list[int]]:
    """The layers turned S, in order, for each assumed order (layer 0 never flips)."""
    layers = list(range(1, num_layers))
    shuffled = random.Random(seed).sample(layers, len(layers))
    return {"late_first": layers[::-1][:steps], "early_first": layers[:steps], "random": shuffled[:steps]}


def cached_search_cost(num_layers: int, flipped: list[int], replicas: int) -> dict:
    """Layer-forwards per window of a cached search that flips `flipped` in order, on `replicas` replicas.

    Returns {"forwards": all replicas' forwards, "critical": forwards on the slowest path (what sets the time)}."""
    full = set(range(num_layers))
    forwards, critical = num_layers * replicas, num_layers  # every replica caches the all-F pattern at once
    for winner in flipped:
        candidates = sorted(full - {0})
        costs = [num_layers - layer for layer in candidates]
        shares = balanced_shares(costs, replicas)
        rerun = num_layers - winner  # at commit, on every replica that did not score the winner
        step = []
        for share in shares:
            holds_winner = candidates.index(winner) in share
            step.append(sum(costs[i] for i in share) + (0 if holds_winner else rerun))
        forwards += sum(step)
        critical += max(step)
        full.remove(winner)
    return {"forwards": forwards, "critical": critical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-layers", type=int, default=78)
    parser.add_argument("--num-full", type=int, default=20)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--replicas", default="1,2,4,8,16")
    parser.add_argument("--layer-ms", default="8192=33.9,32768=135.7", help="tokens=ms of one layer forward")
    parser.add_argument("--layer-source", default="GLM-5 MoE decoder layer, one H200, MEASUREMENTS.md 2026-12-01")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    layer_ms = {int(k): float(v) for k, v in (p.split("=") for p in args.layer_ms.split(","))}
    replicas = [int(r) for r in args.replicas.split(",")]
    steps = args.num_layers - args.num_full
    rows = []
    for order, flipped in flip_orders(args.num_layers, steps, args.seed).items():
        one = cached_search_cost(args.num_layers, flipped, 1)["critical"]
        for r in replicas:
            cost = cached_search_cost(args.num_layers, flipped, r)
            rows.append(
                {
                    "order": order,
                    "replicas": r,
                    "layer_forwards_per_window": cost["forwards"],
                    "critical_forwards_per_window": cost["critical"],
                    "speedup": round(one / cost["critical"], 2),
                    "efficiency": round(one / cost["critical"] / r, 3),
                    "hours": {
                        str(tokens): round(cost["critical"] * args.windows * ms / 1000 / 3600, 2)
                        for tokens, ms in layer_ms.items()
                    },
                }
            )
            print(
                f"{order:>11} R={r:<3} {cost['critical']:>7,} forwards/window on the critical path  "
                f"{rows[-1]['speedup']:5.2f}×  "
                + "  ".join(f"{int(t) // 1024}K {h:6.2f} h" for t, h in rows[-1]["hours"].items())
            )
    write_json(
        args.out,
        {
            "description": "projected cached greedy search time on R replicas (scripts/project_node_time.py)",
            "date": datetime.date.today().isoformat(),
            "num_layers": args.num_layers,
            "num_full": args.num_full,
            "windows": args.windows,
            "layer_ms": {str(k): v for k, v in layer_ms.items()},
            "layer_source": args.layer_source,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
