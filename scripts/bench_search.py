"""Benchmark the search strategies: wall time and decoder-layer forwards of naive, cached and pruned.

    python scripts/bench_search.py cpu-tiny          # the shipped tiny model, default calibration data (CPU)
    python scripts/bench_search.py gpu-glm5          # random GLM-5-shaped model, 24 layers, 8 × 8K-token windows

Each preset runs `indexcache.api.search` three times (one per strategy) on the same inputs and writes
scripts/results/bench_search_<preset>.json with the card, the date and library versions. When the three do not
fit in one device call, run some strategies with `--keep-trajectories`, then the rest with `--merge` of that
file on the same (still warm) machine; the merged file must match preset, shape, target, card and date. The
committed H100 result came from two such calls (naive alone takes ~5 minutes):

    python scripts/bench_search.py gpu-glm5 --num-full 23 --strategies cached,pruned --keep-trajectories \
        --out /tmp/first.json
    python scripts/bench_search.py gpu-glm5 --num-full 23 --strategies naive --merge /tmp/first.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from indexcache import api
from indexcache.calib import DataSpec, Windows, windows_from_tensor
from indexcache.patterns.file import library_versions

RESULTS = Path(__file__).parent / "results"
STRATEGIES = ["naive", "cached", "pruned"]


def glm5_shaped_checkpoint(
    folder: Path, num_layers: int, seq_len: int, windows: int, device: str
) -> tuple[str, Windows]:
    """Random-weight glm_moe_dsa with GLM-5's attention shapes (16 heads here), saved with random token windows."""
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    config = GlmMoeDsaConfig(
        vocab_size=32768,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=192,
        qk_rope_head_dim=64,
        v_head_dim=256,
        index_n_heads=32,
        index_head_dim=128,
        index_topk=2048,
        first_k_dense_replace=num_layers,
        max_position_embeddings=seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        eos_token_id=1,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = GlmMoeDsaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    ids = torch.randint(2, config.vocab_size, (windows, seq_len), generator=torch.Generator().manual_seed(0))
    return str(folder), windows_from_tensor(ids, "random token windows")


def run(
    preset: str,
    strategies: list[str],
    num_full: int | None,
    ratio: float,
    shape: argparse.Namespace,
    earlier: dict | None = None,
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if preset == "cpu-tiny":
            model, data, device = None, DataSpec(), "cpu"
        else:
            device = shape.device
            model, data = glm5_shaped_checkpoint(Path(tmp) / "glm5", shape.layers, shape.seq_len, shape.windows, device)
        rows = []
        for strategy in strategies:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            result = api.search(
                model,
                ratio,
                num_full,
                data,
                Path(tmp) / f"{strategy}.json",
                strategy,
                cache=shape.cache,
                device=device,
                log=lambda m: print("  ", m),
            )
            wall = time.perf_counter() - started
            rows.append(
                {
                    "strategy": strategy,
                    "wall_s": round(wall, 2),
                    "search_s": result["search"]["seconds"],
                    "layer_forwards": result["search"]["layer_forwards"],
                    "pattern": result["index_topk_pattern"],
                    "loss_final": result["loss_final"],
                    "loss_all_full": result["loss_all_full"],
                    "kernels": result["search"]["kernels"],
                    "trajectory": result["trajectory"],
                }
            )
            print(
                f"{strategy:>7}: {rows[-1]['search_s']:8.1f} s  {rows[-1]['layer_forwards']:>7,} layer-forwards  "
                f"{rows[-1]['pattern']}  loss {rows[-1]['loss_final']:.5f}",
                flush=True,
            )
    if earlier:
        rows = sorted([*earlier["rows"], *rows], key=lambda r: STRATEGIES.index(r["strategy"]))
    naive = next((r for r in rows if r["strategy"] == "naive"), None)
    if naive:
        for r in rows:
            r["forwards_vs_naive"] = round(naive["layer_forwards"] / r["layer_forwards"], 2)
            r["time_vs_naive"] = round(naive["search_s"] / r["search_s"], 2)
            r["same_pattern_as_naive"] = r["pattern"] == naive["pattern"]
            r["loss_cost_vs_naive"] = r["loss_final"] - naive["loss_final"]
            if r["strategy"] == "cached":  # exactness: every recorded candidate loss, naive vs cached
                r["max_rel_diff_vs_naive"] = max(
                    abs(exact - cached) / abs(exact)
                    for a, b in zip(naive["trajectory"], r["trajectory"], strict=True)
                    for exact, cached in zip(_by_layer(a), _by_layer(b), strict=True)
                )
    setting = _setting(preset, num_full, ratio, shape)
    return {**setting, "cache": shape.cache, "versions": library_versions(), "rows": rows}


def _by_layer(step: dict) -> list[float]:
    """Candidate losses in layer order (a merged report read back from JSON has string keys)."""
    return [loss for _, loss in sorted((int(k), v) for k, v in step["candidates"].items())]


def _setting(preset: str, num_full: int | None, ratio: float, shape: argparse.Namespace) -> dict:
    """What merged runs must share."""
    return {
        "preset": preset,
        "date": datetime.date.today().isoformat(),
        "card": torch.cuda.get_device_name()
        if torch.cuda.is_available() and preset.startswith("gpu")
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "shape": None
        if preset == "cpu-tiny"
        else {"layers": shape.layers, "seq_len": shape.seq_len, "windows": shape.windows},
        "num_full": num_full,
        "ratio": ratio,
    }


def load_earlier(path: Path, preset: str, num_full: int | None, ratio: float, shape: argparse.Namespace) -> dict:
    """An earlier run's report (trajectories kept) with the same setting, to merge with this one."""
    earlier = json.loads(path.read_text())
    expected = _setting(preset, num_full, ratio, shape)
    differs = [k for k in expected if earlier.get(k) != expected[k]]
    if differs:
        raise SystemExit(f"--merge {path} differs in {', '.join(differs)}: rerun it with the same setting")
    if any("trajectory" not in r for r in earlier["rows"]):
        raise SystemExit(f"--merge {path} was written without --keep-trajectories")
    return earlier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=["cpu-tiny", "gpu-glm5"])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--num-full", type=int, default=None)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=24, help="gpu-glm5: decoder layers")
    parser.add_argument("--seq-len", type=int, default=8192, help="gpu-glm5: tokens per window")
    parser.add_argument("--windows", type=int, default=8, help="gpu-glm5: calibration windows")
    parser.add_argument("--device", default="cuda", help="gpu-glm5: cpu for a dry run at small sizes")
    parser.add_argument("--cache", default="auto", help="prefix cache location (indexcache search --cache)")
    parser.add_argument("--merge", type=Path, default=None, help="rows of an earlier run of the same setting")
    parser.add_argument("--keep-trajectories", action="store_true", help="keep each row's trajectory (for --merge)")
    args = parser.parse_args()
    earlier = args.merge and load_earlier(args.merge, args.preset, args.num_full, args.ratio, args)
    report = run(args.preset, args.strategies.split(","), args.num_full, args.ratio, args, earlier)
    if not args.keep_trajectories:
        for r in report["rows"]:
            r["steps"] = len(r.pop("trajectory"))
    out = args.out or RESULTS / f"bench_search_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'strategy':>8} {'seconds':>9} {'layer-fwd':>10} {'fwd×':>6} {'time×':>6} same  loss")
    for r in report["rows"]:
        print(
            f"{r['strategy']:>8} {r['search_s']:9.1f} {r['layer_forwards']:10,} {r.get('forwards_vs_naive', 0):6.2f} "
            f"{r.get('time_vs_naive', 0):6.2f} {str(r.get('same_pattern_as_naive', '')):>5} {r['loss_final']:.5f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
