#!/usr/bin/env python
"""Issue 20's measurements in one GPU call: the split-K decode indexer, decode and prefill through `indexcache
bench`'s own functions (MoE and dense MLP), and the sparse MLA prefill kernel against its gather floor.

    python scripts/bench_decode.py --out DIR            # on the GPU (one H200: about 5 minutes)
    python scripts/bench_decode.py --tiny --out DIR     # CPU smoke run: Triton interpreter, tiny shapes and models

Sections, in order; each is saved to DIR/bench_decode.json when it ends, a failing one is recorded and skipped,
and sections left when `--budget-s` has passed are skipped:
  ceilings        bf16 matmul 8192³ and a 2 GiB device copy: the run's own ceilings.
  decode_check    a small random GLM-DSA model (bf16): decode steps through the kernels vs the last position of the
                  stock transformers prefill under the same pattern; the decode indexer vs its reference.
  decode_indexer  split-K decode indexer, GLM-5 (32 × 128) and DeepSeek-V3.2 (64 × 128) shapes, T keys × B
                  sequences, CUDA-graph replays over rotated key sets (never timing L2-resident keys); the prefill
                  kernel at S = 1 (the decode path before) in the same run; the floor: reading the keys once.
  glm5 / dsv32 / glm5_dense   `bench.decode.decode_bench` and `bench.prefill.bench` on K = 2 layers built from
                  transformers' GlmMoeDsaConfig() / DeepseekV32Config() (the released models' shapes), all-F vs the
                  uniform 1/4 pattern, with the model's MoE (random router) or the dense MLP.
  absorption      GLM-5 (MoE) all-F prefill layers at 8K / 128K / 200K: the attention's absorption matmuls through
                  head-major views (shipped) vs the einsum form they replaced, patched in, in the same run.
  mla_sweep       sparse MLA prefill kernel launch variants on 4,096 queries over 128K keys, and the gather floor
                  (the same latent rows read by index_select).
The table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch

TOPK = 2048
INDEXER_SHAPES = {"glm5": (32, 128), "dsv32": (64, 128)}  # indexer heads × dim


class Run:
    def __init__(self, args):
        self.args = args
        self.cuda = torch.cuda.is_available() and not args.tiny
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.start = time.monotonic()
        self.copy_tb_s = 4.0
        self.results = {"meta": self.meta(), "sections": {}}

    def meta(self) -> dict:
        import transformers
        import triton

        meta = {"date": datetime.date.today().isoformat(), "argv": sys.argv, "torch": torch.__version__}
        meta["commit"] = os.environ.get("GIT_COMMIT")  # the device machine's copy has no .git
        meta |= {"triton": triton.__version__, "transformers": transformers.__version__}
        if self.cuda:
            meta["card"] = torch.cuda.get_device_name()
        return meta

    def save(self):
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_decode.json").write_text(json.dumps(self.results, indent=1, default=str))

    def time_ms(self, fn, reps: int = 20) -> float:
        """Median ms of `fn` over `reps` runs after a warm-up (CUDA events on a GPU)."""
        fn()
        times = []
        for _ in range(reps if self.cuda else 1):
            if self.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def graph_ms(self, fn, reps: int = 20) -> float:
        """Median ms of a CUDA-graph replay of `fn` (eager on the CPU)."""
        if not self.cuda:
            return self.time_ms(fn, 1)
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self.time_ms(graph.replay, reps)

    def per_set_us(self, fn, inputs: list[tuple]) -> float:
        """µs per call of `fn(*args)`, from one graph that calls it once on each input set."""
        return self.graph_ms(lambda: [fn(*args) for args in inputs]) * 1e3 / len(inputs)

    def kernel_us(self, fn, inputs: list[tuple], calls: int = 10) -> dict:
        """Mean device µs per call of each kernel (and memset) that `fn(*args)` launches, over `calls` rounds of the
        input sets (torch.profiler: time on the GPU only, so the sum leaves out the gaps between launches)."""
        from torch.profiler import ProfilerActivity, profile

        for args in inputs:
            fn(*args)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                for args in inputs:
                    fn(*args)
            torch.cuda.synchronize()
        per_call = calls * len(inputs)
        return {e.key: e.device_time_total / per_call for e in prof.key_averages() if e.device_time_total > 0}

    def free(self):
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    # ---- sections --------------------------------------------------------------------------------------------
    def ceilings(self) -> dict:
        n = 256 if self.args.tiny else 8192
        a, b = (torch.randn(n, n, device=self.device).bfloat16() for _ in range(2))
        ms = self.time_ms(lambda: a @ b)
        x = torch.randn(2**18 if self.args.tiny else 2**28, device=self.device)
        y = torch.empty_like(x)
        copy_ms = self.time_ms(lambda: y.copy_(x))
        self.copy_tb_s = 2 * x.numel() * 4 / copy_ms / 1e9
        return {"matmul_tflops": 2 * n**3 / ms / 1e9, "copy_tb_s": self.copy_tb_s}

    def decode_check(self) -> dict:
        from transformers import GlmMoeDsaConfig

        from indexcache.kernels.backend import forced
        from indexcache.kernels.indexer.reference import index_scores_reference
        from indexcache.kernels.indexer_decode import decode_indexer_topk
        from indexcache.kernels.testing import selection_report
        from indexcache.models import architecture_for
        from indexcache.runtime.decode import LatentCache, decoding, step_inputs
        from indexcache.runtime.forward import LayerwiseModel
        from indexcache.runtime.patch import index_sharing

        tiny = self.args.tiny
        config = GlmMoeDsaConfig(
            vocab_size=512, hidden_size=64 if tiny else 1024, intermediate_size=128 if tiny else 2048,
            num_hidden_layers=4, first_k_dense_replace=4, num_attention_heads=4 if tiny else 16,
            num_key_value_heads=4 if tiny else 16, q_lora_rank=32 if tiny else 512, kv_lora_rank=32 if tiny else 512,
            qk_nope_head_dim=16 if tiny else 128, qk_rope_head_dim=16 if tiny else 64, v_head_dim=16 if tiny else 128,
            index_n_heads=8 if tiny else 32, index_head_dim=32 if tiny else 128, index_topk=16 if tiny else 256,
        )  # fmt: skip
        config._attn_implementation = "eager"
        from transformers import GlmMoeDsaForCausalLM

        torch.manual_seed(0)
        dtype = torch.float32 if tiny else torch.bfloat16
        model = GlmMoeDsaForCausalLM(config).to(self.device, dtype).eval()
        arch = architecture_for("glm_moe_dsa")
        lw = LayerwiseModel(model, arch)
        total, steps = (40, 2) if tiny else (3000, 3)
        ids = torch.randint(0, 512, (2, total), generator=torch.Generator().manual_seed(1)).to(self.device)
        out = {}
        for pattern in ("FFFF", "FSFS"):
            with torch.no_grad(), index_sharing(model, arch, pattern):
                hidden, inputs = lw.embed(ids)
                want = lw.run_layers(hidden, inputs, 0, 4)[:, -steps:].float()
            caches = [LatentCache.allocate(arch.attention(layer), 2, total, c == "F", dtype, self.device)
                      for layer, c in zip(lw.layers, pattern, strict=True)]  # fmt: skip
            got = []
            # What `auto` picks on a GPU; forced: on the CPU (--tiny) the kernels run in the interpreter.
            with (
                torch.no_grad(),
                forced("triton"),
                decoding(model, arch, caches, torch.device("cuda"), "auto", pattern) as (_, name),
            ):
                hidden, inputs = lw.embed(ids[:, : total - steps])
                lw.run_layers(hidden, inputs, 0, 4)
                for pos in range(total - steps, total):
                    hidden, inputs = step_inputs(lw, ids[:, pos : pos + 1], pos)
                    got.append(lw.run_layers(hidden, inputs, 0, 4)[:, 0].float())
            got = torch.stack(got, 1)
            out[pattern] = {"backend": name, "rel_err": ((got - want).norm() / want.norm()).item()}
        gen = torch.Generator(device=self.device).manual_seed(3)
        for name, (heads, dim) in INDEXER_SHAPES.items():
            num_keys = 300 if tiny else 50_000
            q = torch.randn(3, heads, dim, device=self.device, generator=gen).bfloat16()
            k = torch.randn(3, num_keys, dim, device=self.device, generator=gen).bfloat16()
            w = torch.randn(3, heads, device=self.device, generator=gen) * heads**-0.5
            got = decode_indexer_topk(q, k, w, 16 if tiny else TOPK, dim**-0.5)
            scores = index_scores_reference(q[:, None], k, w[:, None], dim**-0.5)
            out[f"indexer_{name}"] = selection_report(got[:, None], scores, 16 if tiny else TOPK)
        return out

    def decode_indexer(self) -> dict:
        from indexcache.kernels.indexer.kernel import lightning_indexer_topk_triton
        from indexcache.kernels.indexer_decode.kernel import decode_indexer_topk_triton

        tiny = self.args.tiny
        topk = 16 if tiny else TOPK
        sizes = [300] if tiny else [32768, 131072, 204800]
        gen = torch.Generator(device=self.device).manual_seed(0)
        rows = []
        variants = {  # launch options as functions of (batch, keys), timed at 128K and 200K on the GLM-5 shape
            "split_1024_keys": lambda batch, keys: {"n_split": math.ceil(keys / 1024)},  # kern2's rule at batch 1
            "no_pdl": lambda batch, keys: {"pdl": False},  # each launch waits for the previous one to end
            "stages4": lambda batch, keys: {"num_stages": 4},
            "block256_warps8": lambda batch, keys: {"block_n": 256, "num_warps": 8},
        }
        for name, (heads, dim) in INDEXER_SHAPES.items():
            for num_keys in sizes:
                for batch in (1, 2) if tiny else (1, 32):
                    key_bytes = batch * num_keys * dim * 2
                    sets = 1 if tiny else min(16, math.ceil(256e6 / key_bytes))  # rotate: keys never sit in L2
                    scale = dim**-0.5
                    w = torch.randn(batch, heads, device=self.device, generator=gen) * heads**-0.5
                    inputs = [
                        (torch.randn(batch, heads, dim, device=self.device, generator=gen).bfloat16(),
                         torch.randn(batch, num_keys, dim, device=self.device, generator=gen).bfloat16())
                        for _ in range(sets)
                    ]  # fmt: skip
                    row = {"shape": name, "keys": num_keys, "batch": batch}
                    row["floor_us"] = key_bytes / self.copy_tb_s / 1e6
                    timed_variants = variants if name == "glm5" and num_keys >= 131072 and not tiny else {}
                    for label, launch in {"default": lambda batch, keys: {}, **timed_variants}.items():
                        split_k = partial(
                            decode_indexer_topk_triton,
                            weights=w,
                            topk=topk,
                            softmax_scale=scale,
                            **launch(batch, num_keys),
                        )
                        row[f"{label}_us"] = self.per_set_us(lambda q, k, f=split_k: f(q, k), inputs)
                    if num_keys == 131072 and name == "glm5" and self.cuda:
                        default = partial(decode_indexer_topk_triton, weights=w, topk=topk, softmax_scale=scale)
                        row["profiled_kernels"] = self.kernel_us(default, inputs)
                    prefill = partial(lightning_indexer_topk_triton, weights=w[:, None], topk=topk, softmax_scale=scale)
                    row["prefill_kernel_us"] = self.per_set_us(lambda q, k, f=prefill: f(q[:, None], k), inputs)
                    row["x_floor"] = row["default_us"] / row["floor_us"]
                    row["tb_s"] = key_bytes / row["default_us"] / 1e6
                    rows.append(row)
                    print("decode indexer", row, flush=True)
                    del inputs
                    self.free()
        return {"rows": rows}

    def model_stack(self, key: str):
        """(config, K = 2 layer stack) of one model config: the released model's shapes, tiny ones with --tiny."""
        from transformers import DeepseekV32Config, GlmMoeDsaConfig

        from indexcache.bench.prefill import build_stack

        make = {"glm5": GlmMoeDsaConfig, "dsv32": DeepseekV32Config, "glm5_dense": GlmMoeDsaConfig}[key]
        small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32)
        small |= dict(qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, index_n_heads=4, index_head_dim=32)
        small |= dict(index_topk=16, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8)
        small |= dict(num_experts_per_tok=2, n_group=1, topk_group=1)
        config = make(**small) if self.args.tiny else make()
        mlp = "dense" if key == "glm5_dense" else "moe"
        dtype = torch.float32 if self.args.tiny else torch.bfloat16
        return config, build_stack(config, 2, self.device, dtype, mlp=mlp)

    def model_rows(self, key: str) -> dict:
        """decode_bench and bench rows of one model config (K = 2 layers), 1/4 uniform vs all-F."""
        from indexcache.bench.decode import decode_bench
        from indexcache.bench.prefill import bench, named_patterns

        tiny = self.args.tiny
        config, stack = self.model_stack(key)
        patterns = named_patterns(config.num_hidden_layers, None, 0.25)
        decode_contexts = [40] if tiny else [32768, 131072, 204800]
        prefill_contexts = [40] if tiny else [8192, 32768, 131072, 204800]
        out = {"mlp": stack.mlp, "decode": [], "prefill": [], "errors": []}
        reps = 1 if tiny else 3
        for context in decode_contexts if "decode" in self.args.phases else []:
            try:
                out["decode"] += decode_bench(stack, [context], [1, 32], patterns, self.device, "auto", reps)
            except Exception as e:  # noqa: BLE001 - record and go on (OOM at the largest sizes)
                out["errors"].append(f"decode {context}: {type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc()
            self.free()
            self.save_partial(key, out)
        for context in prefill_contexts if "prefill" in self.args.phases else []:
            try:
                out["prefill"] += bench(stack, [context], patterns, self.device, "auto", 1 if tiny else 2)
            except Exception as e:  # noqa: BLE001
                out["errors"].append(f"prefill {context}: {type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc()
            self.free()
            self.save_partial(key, out)
        del stack
        self.free()
        return out

    def absorption(self) -> dict:
        """GLM-5 (MoE) prefill layers, all-F, through `bench`: the absorption matmuls as shipped (bmm through
        head-major views) against the einsum form they replaced (permute copies), patched in, same run."""
        from indexcache.bench.prefill import bench, named_patterns
        from indexcache.runtime import absorbed

        def einsum_form(x, w, out):  # before: einsum copies x head-major and its head-major result back
            out.copy_(torch.einsum("nhi,hio->nho", x, w))

        config, stack = self.model_stack("glm5")
        all_f = [p for p in named_patterns(config.num_hidden_layers, None, 0.25) if p[0] == "all-F"]
        shipped = absorbed._per_head_matmul
        out = {"rows": [], "errors": []}
        for context in [40] if self.args.tiny else [8192, 131072, 204800]:
            for label, form in (("views", shipped), ("einsum", einsum_form)):
                absorbed._per_head_matmul = form
                try:
                    rows = bench(stack, [context], all_f, self.device, "auto", 1 if self.args.tiny else 2)
                    out["rows"] += [r | {"absorption": label} for r in rows]
                except Exception as e:  # noqa: BLE001 - record and go on
                    out["errors"].append(f"{label} {context}: {type(e).__name__}: {str(e)[:300]}")
                    traceback.print_exc()
                finally:
                    absorbed._per_head_matmul = shipped
                self.free()
                self.save_partial("absorption", out)
        del stack
        self.free()
        return out

    def save_partial(self, key: str, record: dict) -> None:
        self.results["sections"][key] = record
        self.save()

    def mla_sweep(self) -> dict:
        from indexcache.kernels.sparse_attention.kernel import sparse_mla_attention_triton

        tiny = self.args.tiny
        num_keys, n_q, topk = (300, 8, 16) if tiny else (131072, 4096, TOPK)
        gen = torch.Generator(device=self.device).manual_seed(0)
        kv = torch.randn(1, num_keys, 576, device=self.device, generator=gen).bfloat16()
        kv_latent, k_rope = kv[..., :512], kv[..., 512:].contiguous()
        kv_latent = kv_latent.contiguous()
        idx = torch.rand(n_q, num_keys, device=self.device, generator=gen).topk(topk, -1).indices.int()[None]
        gather_ms = self.time_ms(lambda: torch.index_select(kv[0], 0, idx.flatten().long()))
        gathered = n_q * topk * 576 * 2
        # index_select reads the rows and writes a copy of them: half its time is what reading them once costs
        out = {"gather": {"ms": gather_ms, "read_floor_ms": gather_ms / 2, "tb_s": 2 * gathered / gather_ms / 1e9}}
        out["rows"] = []
        variants = {
            "glm5": (64, [dict(), dict(block_k=32, num_stages=3), dict(num_stages=3), dict(block_k=128, num_warps=8)]),
            "dsv32": (
                128,
                [
                    dict(),
                    dict(block_h=128, num_warps=16),
                    dict(block_h=128, block_k=32, num_warps=16),
                    dict(block_k=32, num_stages=3),
                ],
            ),  # fmt: skip
        }
        for name, (heads, launches) in variants.items():
            h = 4 if tiny else heads
            q_latent = torch.randn(1, n_q, h, 512, device=self.device, generator=gen).bfloat16()
            q_rope = torch.randn(1, n_q, h, 64, device=self.device, generator=gen).bfloat16()
            flops = 2 * n_q * h * topk * (576 + 512)
            ref = sparse_mla_attention_triton(q_latent, q_rope, kv_latent, k_rope, idx, 0.07).float()
            for launch in launches:
                try:
                    res = sparse_mla_attention_triton(q_latent, q_rope, kv_latent, k_rope, idx, 0.07, **launch)
                    err = ((res.float() - ref).norm() / ref.norm()).item()
                    run = partial(sparse_mla_attention_triton, q_latent, q_rope, kv_latent, k_rope, idx, 0.07, **launch)
                    ms = self.time_ms(run)
                    row = {"shape": name, "launch": launch, "ms": ms, "tflops": flops / ms / 1e9, "rel_err": err}
                except Exception as e:  # noqa: BLE001
                    row = {"shape": name, "launch": launch, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                out["rows"].append(row)
                print("mla", row, flush=True)
        return out

    def run(self):
        order = ["ceilings", "decode_check", "decode_indexer", "glm5", "dsv32", "glm5_dense", "absorption", "mla_sweep"]
        for name in order:
            if self.args.sections and name not in self.args.sections:
                continue
            if time.monotonic() - self.start > self.args.budget_s:
                self.results["sections"][name] = {"skipped": "time budget"}
                continue
            t0 = time.monotonic()
            try:
                fn = getattr(self, name) if hasattr(self, name) else (lambda name=name: self.model_rows(name))
                record = fn()
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                record = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            record["seconds"] = time.monotonic() - t0
            self.results["sections"][name] = record
            self.save()
            self.free()
            print(f"== {name}: {record['seconds']:.1f} s", flush=True)
        print_table(self.results)


def print_table(results: dict) -> None:
    sec = results["sections"]
    print(
        "\n",
        results["meta"].get("card", "cpu"),
        results["meta"]["date"],
        {k: v for k, v in sec.get("ceilings", {}).items()},
    )
    check = sec.get("decode_check", {})
    for key in ("FFFF", "FSFS"):
        if key in check:
            print(f"decode check {key}: rel err {check[key]['rel_err']:.2e} ({check[key]['backend']})")
    print("decode indexer: shape keys batch | split-K us (x floor, TB/s) | prefill kernel us | variants")
    for r in sec.get("decode_indexer", {}).get("rows", []):
        skip = ("default_us", "prefill_kernel_us", "floor_us")
        extra = {k: round(v, 1) for k, v in r.items() if k.endswith("_us") and k not in skip}
        print(f"  {r['shape']} {r['keys']} {r['batch']} | {r['default_us']:.1f} ({r['x_floor']:.2f}x, "
              f"{r['tb_s']:.2f}) | {r['prefill_kernel_us']:.1f} | {extra}")  # fmt: skip
        if "profiled_kernels" in r:
            print("    profiled, µs per call:", {name[:40]: round(us, 1) for name, us in r["profiled_kernels"].items()})
    for key in ("glm5", "dsv32", "glm5_dense"):
        rec = sec.get(key, {})
        for r in rec.get("decode", []):
            print(f"{key} decode {r['context']} b{r['batch']} {r['name']}: {r['ms_per_layer']:.3f} ms/layer "
                  f"(F {r['f_layer_ms']:.3f} S {r['s_layer_ms']:.3f}) {r['projected_ms_per_token']:.2f} ms/token "
                  f"{r['speedup_vs_all_f']:.3f}x graph={r['cuda_graph']}")  # fmt: skip
        for r in rec.get("prefill", []):
            sp = r["split_ms_per_layer"]
            print(f"{key} prefill {r['context']} {r['name']}: {r['ms_per_layer']:.1f} ms/layer "
                  f"({sp['indexer']:.1f}/{sp['attention']:.1f}/{sp['rest']:.1f}) {r['speedup_vs_all_f']:.3f}x "
                  f"peak {r['peak_gib']}")  # fmt: skip
        for e in rec.get("errors", []):
            print(f"{key} error: {e}")
    for r in sec.get("absorption", {}).get("rows", []):
        sp = r["split_ms_per_layer"]
        print(f"absorption {r['absorption']} prefill {r['context']} {r['name']}: {r['ms_per_layer']:.1f} ms/layer "
              f"({sp['indexer']:.1f}/{sp['attention']:.1f}/{sp['rest']:.1f}) peak {r['peak_gib']}")  # fmt: skip
    for e in sec.get("absorption", {}).get("errors", []):
        print(f"absorption error: {e}")
    mla = sec.get("mla_sweep", {})
    if "gather" in mla:
        print(f"mla gather floor {mla['gather']['ms']:.2f} ms {mla['gather']['tb_s']:.2f} TB/s")
    for r in mla.get("rows", []):
        ms, tflops, err = r.get("ms", float("nan")), r.get("tflops", 0), r.get("rel_err", float("nan"))
        print(
            "  mla", r.get("shape"), r.get("launch"), f"{ms:.2f} ms {tflops:.0f} TF/s err {err:.1e}", r.get("error", "")
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_decode_out")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: Triton interpreter, tiny shapes")
    parser.add_argument("--sections", nargs="*", default=None)
    parser.add_argument("--budget-s", type=float, default=400.0, help="skip the sections left after this long")
    parser.add_argument("--phases", nargs="*", default=["decode", "prefill"], help="model sections: which rows")
    args = parser.parse_args()
    if args.tiny:
        from indexcache.kernels.testing import use_triton_interpreter

        use_triton_interpreter()
    Run(args).run()


if __name__ == "__main__":
    main()
