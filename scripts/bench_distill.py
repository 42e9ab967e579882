"""What a distillation step costs against a plain forward under the same pattern (shipped tiny model, CPU).

    python scripts/bench_distill.py --pattern FSSSFSSSFSSSFSSS --seq-len 512 --repeats 5

Times, on the same window: (a) the product path's patched forward with the loss (`PatternScorer`, stock eager
attention), (b) one `indexcache distill` step (no-grad forward through the distiller's attention, which returns
the output and the target's share in one pass, plus each F indexer's re-scoring at its selected keys, the KL
backward and the AdamW step). Median of `--repeats`, after one warm-up. Writes scripts/results/bench_distill.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from indexcache.calib import DataSpec, make_windows
from indexcache.distill.train import GroupDistiller, distill_context, indexer_parameters, optimizer_step
from indexcache.models import load_model
from indexcache.patterns.file import library_versions
from indexcache.patterns.layout import full_layers
from indexcache.runtime.forward import LayerwiseModel
from indexcache.runtime.patch import index_sharing
from indexcache.search.scoring import PatternScorer

RESULTS = Path(__file__).parent / "results"


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pattern", default="FSSSFSSSFSSSFSSS")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    loaded = load_model(None, device="cpu")
    ids = make_windows(DataSpec(num_samples=1, seq_len=args.seq_len), loaded.tokenizer, 0).input_ids
    lw = LayerwiseModel(loaded.model, loaded.arch)
    with torch.inference_mode(), index_sharing(loaded.model, loaded.arch) as sharing:
        scorer = PatternScorer(lw, sharing, ids)
        forward_s = median_seconds(lambda: scorer.loss(args.pattern), args.repeats)

    full = full_layers(args.pattern)
    for param in loaded.model.parameters():
        param.requires_grad_(False)
    params = indexer_parameters(loaded, full)
    for param in params.values():
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-4)
    stack = loaded.arch.layers(loaded.model)
    layer_of = {id(loaded.arch.indexer(stack[f])): f for f in full}
    distiller = GroupDistiller(loaded.arch, "multi", layer_of)

    def step():
        with torch.no_grad():
            hidden, inputs = lw.embed(ids)
            lw.run_layers(hidden, inputs, 0, lw.num_layers)
        distiller.close()
        optimizer_step(params, params, optimizer)

    with distill_context(loaded, args.pattern, distiller):
        step_s = median_seconds(step, args.repeats)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})",
        "pattern": args.pattern,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "forward_seconds": round(forward_s, 4),
        "distill_step_seconds": round(step_s, 4),
        "ratio": round(step_s / forward_s, 3),
        "versions": library_versions(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_distill.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
