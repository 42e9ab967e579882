"""The same cached search on one GPU and on G GPUs, through the product's own launch: speed, answer, memory.

    python3 scripts/bench_distributed.py --out $OUT/bench_distributed.json                 # every visible GPU
    python3 scripts/bench_distributed.py --routed-experts 256 --layers 5 --out …           # GLM-5's full MoE
    python3 scripts/bench_distributed.py --device cpu --processes 2 --out /tmp/bench.json  # plumbing, CPU
    python3 scripts/bench_distributed.py --pipeline-stages 8 --layers 16 --out …           # one 8-stage pipeline

Builds a random-weight glm_moe_dsa checkpoint with GLM-5's layer shapes (`GlmMoeDsaConfig()`: hidden 6144, 64 heads,
q_lora 2048, kv_lora 512, indexer 32 × 128, top-2048, vocab 154,880; layer 0 dense, every other layer MoE with
8 active + 1 shared experts of width 2048 and transformers' default `grouped_mm` experts) with `--routed-experts`
routed experts: GLM-5 has 256 (19 GB a layer in bf16); the default 32 does the same per-token work (8 + 1 experts)
in 2.8 GB a layer, so the build, three loads and the searches fit one device call. Every rank holds the whole
model (the replicas decomposition), or with `--pipeline-stages P` every group of P ranks is one pipeline whose
ranks hold a stage of the layers each; the plain run is the baseline either way, so `--layers` is bounded by one
GPU's memory. The windows are random 8K-token
input_ids rows (`--seq-len`), read as a dataset file.

Then runs, with the same options, `python3 -m indexcache search` (today's plain single process, one GPU) and
`python3 -m torch.distributed.run --nproc-per-node G -m indexcache search` (torchrun's module form) — with G = 1
that is the "no slower than one process" check. A warm-up search first compiles the Triton kernels into their
on-disk cache, so neither timed run pays for compiling. Writes, per run: wall time of the whole command, the
search loop's own seconds (the pattern file's `search.seconds`), layer-forwards (all ranks) and the one-process
layer-forwards per second of search (the useful rate), peak memory per GPU (nvidia-smi, sampled every 0.2 s,
less what was in use before), the pattern; then speedup (plain / torchrun search seconds) and whether the pattern
and every recorded loss are equal (max relative difference over all candidate losses).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from indexcache.atomic import write_json
from indexcache.models.loading import embedded_model_path

# GLM-5's own dimensions are GlmMoeDsaConfig()'s defaults; layer 0 dense, the rest MoE, as many layers as asked.
GPU_SHAPE = dict(first_k_dense_replace=1)


def cpu_shape() -> dict:
    """CPU plumbing: the shipped tiny model's dims (its config.json, top-k 64), MoE layers of 4 small experts."""
    dims = json.loads((embedded_model_path() / "config.json").read_text())
    per_layer = ("layer_types", "mlp_layer_types", "indexer_types", "architectures", "transformers_version", "dtype")
    for key in (*per_layer, "model_type"):
        dims.pop(key, None)
    return dims | dict(first_k_dense_replace=1, moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2)


def build_checkpoint(folder: Path, device: str, layers: int, experts: int, windows: int, seq_len: int) -> None:
    """Random-weight checkpoint and `windows` random input_ids rows of `seq_len` tokens (rows.jsonl) in `folder`.
    Built on `device`, then freed: the searches run in other processes."""
    from transformers import AutoModelForCausalLM, GlmMoeDsaConfig

    shape = cpu_shape() if device == "cpu" else GPU_SHAPE | dict(n_routed_experts=experts)
    config = GlmMoeDsaConfig(**shape | dict(num_hidden_layers=layers))
    torch.manual_seed(0)
    with torch.device(device):  # built in its own dtype: GLM-5's MoE layers in fp32 would not fit
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    ids = torch.randint(2, config.vocab_size, (windows, seq_len), generator=torch.Generator().manual_seed(0))
    (folder / "rows.jsonl").write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist()))


class GpuMemory:
    """Peak memory in use per GPU while a command runs (nvidia-smi every 0.2 s), less what was in use before."""

    QUERY = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.peak: list[int] = []

    def _used_mib(self) -> list[int]:
        return [int(v) for v in subprocess.run(self.QUERY, capture_output=True, text=True).stdout.split()]

    def __enter__(self):
        if self.enabled:
            self.before = self._used_mib()
            self.peak = list(self.before)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while not self.stop.wait(0.2):
            self.peak = [max(p, u) for p, u in zip(self.peak, self._used_mib(), strict=True)]

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()

    def gib(self) -> list[float] | None:
        return [round((p - b) / 1024, 2) for p, b in zip(self.peak, self.before, strict=True)] if self.enabled else None


def search(
    name: str, launcher: list[str], folder: Path, args: argparse.Namespace, timed: bool = True, extra: tuple = ()
) -> dict:
    """One `indexcache search` through `launcher` (with `extra` options); the pattern file's numbers and the
    command's wall time."""
    output = folder / f"{name}.json"
    options = [
        "search",
        *("--model", str(folder), "--dataset", str(folder / "rows.jsonl"), "--num-samples", str(args.windows)),
        *("--num-full", str(args.num_full), "--strategy", "cached", "--device", args.device, "-o", str(output)),
        *extra,
    ]
    if not timed:  # the warm-up: one window, one step, only to fill the kernels' compile cache
        options[options.index("--num-samples") + 1] = "1"
        options[options.index("--num-full") + 1] = str(args.layers - 1)
    # torchrun gives each of several processes one OpenMP thread unless told; every run gets the same count.
    threads = 1 if args.device == "cpu" else max(1, (os.cpu_count() or 1) // args.processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with GpuMemory(args.device != "cpu") as memory:
        run = subprocess.run([*launcher, *options], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"{name} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    result = json.loads(output.read_text())
    row = {
        "run": name,
        "command": " ".join([Path(launcher[0]).name, *launcher[1:], "search …"]),
        "world_size": result["search"]["world_size"],
        "wall_s": round(wall, 2),
        "search_s": result["search"]["seconds"],
        "layer_forwards": result["search"]["layer_forwards"],
        "peak_gpu_memory_gib": memory.gib(),
        "kernels": result["search"]["kernels"],
        "pattern": result["index_topk_pattern"],
        "loss_final": result["loss_final"],
        "decomposition": result["search"]["decomposition"],
        "stage_bounds": result["search"].get("stage_bounds"),
        "ranks": result["search"]["ranks"],
    }
    print(f"{name:>9}: {wall:7.1f} s wall, {row['search_s']:7.1f} s search, {row['pattern']}", flush=True)
    return row | {"_result": result}


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest relative difference between two searches' recorded losses: all-F and every candidate both scored
    (after a step where the patterns part, the candidates differ; `same_trajectory` tells)."""
    pairs = [(a["loss_all_full"], b["loss_all_full"])]
    for sa, sb in zip(a["trajectory"], b["trajectory"], strict=True):
        pairs += [(loss, sb["candidates"][k]) for k, loss in sa["candidates"].items() if k in sb["candidates"]]
    return max(abs(x - y) / abs(x) for x, y in pairs)


def card(device: str) -> str:
    return platform.processor() or platform.machine() if device == "cpu" else torch.cuda.get_device_name(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--processes", type=int, default=None, help="G (default: every visible GPU; CPU: 2)")
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--routed-experts", dest="experts", type=int, default=32)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--num-full", type=int, default=2)
    parser.add_argument("--pipeline-stages", type=int, default=1, help="P: ranks per pipeline (1: replicas)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoint goes (default: a temp dir)")
    args = parser.parse_args()
    if args.device == "cpu" and args.seq_len == parser.get_default("seq_len"):
        args.seq_len = 128  # the tiny model's top-k is 64
    if args.processes is None:
        args.processes = 2 if args.device == "cpu" else torch.cuda.device_count()
    python = sys.executable
    today = datetime.date.today().isoformat()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp) / "glm5-shaped"
        started = time.perf_counter()
        build_checkpoint(folder, args.device, args.layers, args.experts, args.windows, args.seq_len)
        build_s = round(time.perf_counter() - started, 1)
        print(f"checkpoint built in {build_s} s", flush=True)
        plain = [python, "-m", "indexcache"]
        torchrun = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(args.processes), "-m", "indexcache"]
        if args.device != "cpu":
            search("warm-up", plain, folder, args, timed=False)
        one = search("one", plain, folder, args)
        stages = ("--pipeline-stages", str(args.pipeline_stages))
        several = search(f"torchrun{args.processes}", torchrun, folder, args, extra=stages)
    a, b = one.pop("_result"), several.pop("_result")
    useful = one["layer_forwards"]  # what one process computes; extra ranks rerun commits they did not score
    for row in (one, several):
        row["useful_layer_forwards_per_s"] = round(useful / row["search_s"], 1)
    report = {
        "description": (
            "the same cached search (random-weight GLM-5-shaped model with MoE layers) as one plain process on one "
            f"device and as {args.processes} torchrun processes ("
            + (
                "replicas sharing each step's candidates"
                if args.pipeline_stages == 1
                else f"{args.processes // args.pipeline_stages} × a {args.pipeline_stages}-stage pipeline"
            )
            + ")"
        ),
        "card": card(args.device),
        "processes": args.processes,
        "pipeline_stages": args.pipeline_stages,
        "date": today,
        "model": {
            "config": "GlmMoeDsaConfig() dims" if args.device != "cpu" else "the shipped tiny model's dims",
            "layers": args.layers,
            "routed_experts": args.experts if args.device != "cpu" else 4,
            "first_dense_layers": 1,
        },
        "windows": args.windows,
        "seq_len": args.seq_len,
        "num_full": args.num_full,
        "checkpoint_build_s": build_s,
        "runs": [one, several],
        "speedup_search": round(one["search_s"] / several["search_s"], 3),
        "speedup_wall": round(one["wall_s"] / several["wall_s"], 3),
        "same_pattern": a["index_topk_pattern"] == b["index_topk_pattern"],
        "same_trajectory": a["trajectory"] == b["trajectory"],
        "max_rel_loss_diff": max_rel_diff(a, b),
        "versions": a["versions"],
    }
    write_json(args.out, report)
    print(
        f"{args.processes} processes: search {report['speedup_search']}× ({report['speedup_wall']}× wall), "
        f"same pattern {report['same_pattern']}, max rel loss diff {report['max_rel_loss_diff']:.2e} → {args.out}"
    )


if __name__ == "__main__":
    main()
