"""DeepSeek-V4-Flash on one GPU through the product's path: the Triton indexer over compressed entries checked
against its reference and against stock transformers' indexer, its time at 8K / 32K / 128K tokens, and
`indexcache bench` (all-F vs the uniform 1/4 pattern over the 21 CSA layers) where stock attention fits.

V4-Flash's shapes (transformers 5.24 `DeepseekV4Config` defaults: hidden 4096, 64 heads × 512, indexer 64 × 128,
top-512 entries, compress ratio 4) with V4-Flash's layer layout (2 sliding layers, CSA on the even layers 2–42,
HCA on the odd ones) and random weights; the bench's MoE layers get 16 experts instead of 256 (the pattern changes
the indexer's cost, not the MLP's, and 256 random experts would only fill memory).

    python scripts/bench_v4.py --out DIR      # writes DIR/bench_v4_<card>_<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import torch
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Indexer

from indexcache.cli.bench import run_bench
from indexcache.kernels.indexer import index_scores_reference, lightning_indexer_topk
from indexcache.kernels.testing import selection_report
from indexcache.models import architecture_for
from indexcache.patterns.file import library_versions
from indexcache.runtime.backends import indexer_inputs, kernel_indexer

ARCH = architecture_for("deepseek_v4")
RATIO = 4
FLASH_COMPRESS_RATIOS = [0, 0] + [4, 128] * 20 + [4]  # 43 layers: 21 CSA, 20 HCA


def flash_config(**overrides) -> DeepseekV4Config:
    return DeepseekV4Config(compress_ratios=FLASH_COMPRESS_RATIOS, **overrides)


def timed_ms(fn, reps: int = 5) -> float:
    """Median of `reps` CUDA-event timings after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


def indexer_inputs_at(config, seq_len: int, device) -> tuple:
    gen = torch.Generator(device=device).manual_seed(seq_len)
    hidden = torch.randn(1, seq_len, config.hidden_size, device=device, dtype=torch.bfloat16, generator=gen)
    q_residual = torch.randn(1, seq_len, config.q_lora_rank, device=device, dtype=torch.bfloat16, generator=gen)
    position_ids = torch.arange(seq_len, device=device)[None]
    return hidden, q_residual, position_ids, None, 0  # DeepseekV4Indexer.forward's arguments (no cache, layer 0)


def indexer_rows(config, device) -> list[dict]:
    torch.manual_seed(0)
    indexer = DeepseekV4Indexer(config).to(device, torch.bfloat16).eval()
    with torch.no_grad():
        indexer.position_bias.normal_(0, 0.1)
    triton = kernel_indexer(ARCH, RATIO)
    rows = []
    with torch.no_grad():
        for seq_len in (8192, 32768, 131072):
            args = indexer_inputs_at(config, seq_len, device)
            row = {"context": seq_len, "entries": seq_len // RATIO, "topk": config.index_topk}
            q, k, w, scale = indexer_inputs(ARCH, indexer, *args)
            row["kernel_ms"] = timed_ms(lambda q=q, k=k, w=w, s=scale: lightning_indexer_topk(q, k, w, 512, s, ratio=4))
            row["indexer_ms"] = timed_ms(lambda a=args: triton(indexer, *a))  # projections + kernel: an F layer
            if seq_len == 8192:  # stock transformers: [S, H, T] fp32 scores, out of memory far before 32K
                row["stock_indexer_ms"] = timed_ms(lambda a=args: indexer(*a))
                got = triton(indexer, *args)
                report = selection_report(got, index_scores_reference(q, k, w, scale, ratio=RATIO), 512)
                row["vs_reference"] = {key: float(v) for key, v in report.items()}
                stock = indexer(*args)
                same = (got.sort(-1).values == stock.sort(-1).values).all(-1).float().mean()
                row["rows_identical_to_stock"] = float(same)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del q, k, w, args
            torch.cuda.empty_cache()
    return rows


def bench_rows(contexts: str) -> list[dict]:
    """`indexcache bench` (the CLI's function) on a folder holding only V4-Flash's config.json."""
    with tempfile.TemporaryDirectory() as folder:
        flash_config(n_routed_experts=16).save_pretrained(folder)
        rows = run_bench(None, folder, contexts, 2, 0.25, False, "auto", "auto", "cuda", 3, None)
    for row in rows:
        print(json.dumps({k: row[k] for k in ("context", "name", "num_full", "ms_per_layer", "speedup_vs_all_f")}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("scripts/results"))
    args = parser.parse_args()
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    result = {"script": "scripts/bench_v4.py", "device": card, "date": datetime.date.today().isoformat()}
    result["versions"] = library_versions()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_v4_{card.replace(' ', '_')}_{result['date']}.json"
    save = lambda: path.write_text(json.dumps(result, indent=2) + "\n")  # after every part: a cut run keeps some
    result["indexer"] = indexer_rows(flash_config(), device)
    save()
    result["bench"] = bench_rows("4096,8192")
    save()
    try:  # stock attention materialises [B, 64, S, S + S/4] scores: expected to run out of memory at 32K
        result["bench_32k"] = bench_rows("32768")
    except torch.cuda.OutOfMemoryError as exc:
        result["bench_32k"] = f"out of memory: {str(exc).splitlines()[0]}"
        torch.cuda.empty_cache()
    save()
    print(f"{'context':>8} {'kernel ms':>10} {'F indexer ms':>13} {'stock ms':>9}")
    for row in result["indexer"]:
        stock = row.get("stock_indexer_ms")
        print(f"{row['context']:>8} {row['kernel_ms']:>10.2f} {row['indexer_ms']:>13.2f} {stock or '-':>9}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
