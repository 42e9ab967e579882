#!/usr/bin/env python
"""Benchmark indexcache's Triton kernels on one GPU against their references and the stock transformers path.

    python scripts/bench_kernels.py --out bench.json            # everything, on CUDA
    python scripts/bench_kernels.py --tiny --sections indexer   # CPU smoke run (Triton interpreter, tiny shapes)

Sections, in order (each saved to the JSON as soon as it finishes; a failing one is recorded and skipped):
  ceilings     bf16 matmul 8192³ and a 1 GiB device copy, measured on this card: the 100 % marks.
  correctness  kernels vs references at a moderate size (selection check for the indexer, rel. error for attention).
  sweep        tile/warp variants of the indexer at 32K; the fastest is used from then on.
  sweep_attention  the same for both attention kernels.
  indexer      prefill top-k per S and shape: time, TFLOP/s, % of matmul peak, memory, score/select split,
               a spot check of the last rows, and the stock transformers indexer module where it fits.
  attention    sparse attention prefill on the last `--query-slice` queries of an S-token sequence (cost per
               query does not grow with S once S > top-k): expanded (transformers' layout) vs absorbed MLA
               latent, with the projections each needs, and the stock SDPA-with-DSA-mask path where it fits.
  decode       one query against a cache of T keys, both ops.
  model        4-layer GLM-5-shaped model (random bf16 weights) through the wiring: time, memory and the
               indexer / attention / rest split of the forward; the stock eager model where it fits.
The table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

SHAPES = {  # indexer heads × dim, attention heads, q/k nope + rope, v, MLA latent; projections of the real models
    "glm5": dict(
        index_heads=32,
        index_dim=128,
        heads=16,
        nope=192,
        rope=64,
        v=256,
        latent=512,
        hidden=6144,
        q_lora=2048,
        rope_style="interleave",
    ),
    "dsv32": dict(
        index_heads=64,
        index_dim=128,
        heads=128,
        nope=128,
        rope=64,
        v=128,
        latent=512,
        hidden=7168,
        q_lora=1536,
        rope_style="half",
    ),
}
TINY_SHAPES = {
    "glm5": dict(
        index_heads=4,
        index_dim=32,
        heads=4,
        nope=16,
        rope=16,
        v=16,
        latent=32,
        hidden=64,
        q_lora=32,
        rope_style="interleave",
    ),
    "dsv32": dict(
        index_heads=8, index_dim=32, heads=8, nope=16, rope=16, v=8, latent=32, hidden=64, q_lora=32, rope_style="half"
    ),
}
V3_SELECT = dict(bracket=False, select_block=512, select_warps=4, bucket_cap=2048)  # v3 and its best launch (run 3)
SECTIONS = ("ceilings", "correctness", "sweep", "sweep_attention", "indexer", "attention", "decode", "model")


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        self.cuda = self.device.type == "cuda"
        self.shapes = TINY_SHAPES if args.tiny else SHAPES
        self.topk = 16 if args.tiny else 2048
        self.results: dict = {"meta": self.meta(), "sections": {}}
        self.configs: dict = {}  # best launch configs found by the sweep
        self.peak_tflops = None
        self.gen = torch.Generator(device=self.device).manual_seed(0)

    def meta(self) -> dict:
        import transformers
        import triton

        meta = {
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "transformers": transformers.__version__,
            "argv": sys.argv,
        }
        if torch.cuda.is_available():
            meta["card"] = torch.cuda.get_device_name()
            meta["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
        return meta

    # ---- measurement -------------------------------------------------------------------------------------
    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn, budget_s: float | None = None, min_reps: int = 2, warm: bool = True) -> dict:
        """Median of repeated timed calls after one warm-up call (compilation included there; `warm=False` when
        the caller warmed up), and the memory the calls allocate beyond what was allocated before, at their peak."""
        budget_s = self.args.budget if budget_s is None else budget_s
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        if warm:
            fn()
            self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        estimate = time.perf_counter() - start
        reps = max(min_reps, min(50, int(budget_s / max(estimate, 1e-6))))
        times = []
        for _ in range(reps):
            if self.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
        out = {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "reps": reps}
        if self.cuda:
            out["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        return out

    def measure_graph(self, fn) -> dict:
        """Replays of a CUDA graph of `fn` (decode: many small launches, whose host cost would dominate)."""
        if not self.cuda:
            return self.measure(fn)
        fn()
        self.sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self.measure(graph.replay)

    def randn(self, *shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, device=self.device, generator=self.gen) * scale).to(dtype)

    def free(self):
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    @contextmanager
    def guard(self, record: dict, key: str = "error"):
        """Runs a measurement; records an out-of-memory or error instead of stopping the benchmark."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            record[key] = "OOM"
        except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
            record[key] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        finally:
            self.free()

    def save(self):
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(self.results, indent=1, default=str))

    def pct_peak(self, tflops: float) -> float | None:
        return None if not self.peak_tflops else 100.0 * tflops / self.peak_tflops

    @property
    def sizes(self) -> list[int]:
        return self.args.sizes

    # ---- inputs ------------------------------------------------------------------------------------------
    def indexer_inputs(self, shape: dict, seq_len: int, num_keys: int | None = None, batch: int = 1):
        num_keys = seq_len if num_keys is None else num_keys
        q = self.randn(batch, seq_len, shape["index_heads"], shape["index_dim"])
        k = self.randn(batch, num_keys, shape["index_dim"])
        w = self.randn(batch, seq_len, shape["index_heads"], dtype=torch.float32, scale=shape["index_heads"] ** -0.5)
        return q, k, w

    def indices_for(self, shape: dict, num_keys: int, n_queries: int) -> torch.Tensor:
        """The kernel indexer's selection for the last `n_queries` queries of a `num_keys`-token sequence
        (random bf16 q, k): what the attention consumes in a model with random weights."""
        from indexcache.kernels.indexer.kernel import lightning_indexer_topk_triton

        q, k, w = self.indexer_inputs(shape, n_queries, num_keys)
        return lightning_indexer_topk_triton(
            q, k, w, self.topk, shape["index_dim"] ** -0.5, **self.configs.get(("indexer", "launch"), {})
        )

    # ---- sections ----------------------------------------------------------------------------------------
    def ceilings(self) -> dict:
        out = {}
        n = 512 if self.args.tiny else 8192
        a, b = self.randn(n, n), self.randn(n, n)
        t = self.measure(lambda: a @ b)
        out["matmul_bf16"] = {"n": n, **t, "tflops": 2 * n**3 / t["ms"] / 1e9}
        self.peak_tflops = out["matmul_bf16"]["tflops"]
        x = torch.empty(2**28 if not self.args.tiny else 2**20, dtype=torch.float32, device=self.device)
        y = torch.empty_like(x)
        t = self.measure(lambda: y.copy_(x))
        out["copy"] = {"bytes": 2 * x.numel() * 4, **t, "tb_s": 2 * x.numel() * 4 / t["ms"] / 1e9}
        return out

    def correctness(self) -> dict:
        from indexcache.kernels.indexer import index_scores_reference, lightning_indexer_topk
        from indexcache.kernels.sparse_attention import (
            sparse_attention,
            sparse_attention_reference,
            sparse_mla_attention,
            sparse_mla_attention_reference,
        )
        from indexcache.kernels.testing import poisoned_empty, selection_report

        out = {}
        seq = 64 if self.args.tiny else 4096
        for name, shape in self.shapes.items():
            rec = out.setdefault(name, {})
            scale = shape["index_dim"] ** -0.5
            cases = {
                "prefill": (1, seq, seq, False),
                "padded_b2": (2, seq - 1000 if seq > 1000 else seq - 7, None, True),
                "decode": (2, 1, seq + 123, True),
            }
            for case, (batch, s_len, t_len, pad) in cases.items():
                with self.guard(rec.setdefault(f"indexer_{case}", {})):
                    q, k, w = self.indexer_inputs(shape, s_len, t_len, batch)
                    key_mask = None
                    if pad:
                        key_mask = torch.ones(batch, k.shape[1], dtype=torch.bool, device=self.device)
                        key_mask[-1, k.shape[1] * 3 // 4 :] = False
                    with poisoned_empty():
                        got = lightning_indexer_topk(q, k, w, self.topk, scale, key_mask)
                    ref = index_scores_reference(q, k, w, scale, key_mask)
                    rec[f"indexer_{case}"] = selection_report(got, ref, self.topk)
            n_q = 32 if self.args.tiny else 256
            if name == "glm5":
                with self.guard(rec.setdefault("select_chosen_scores", {})):
                    rec["select_chosen_scores"] = self.select_chosen_scores(2 * seq)
            with self.guard(rec.setdefault("attention", {})):
                idx = self.indices_for(shape, seq, n_q)
                heads, dqk = shape["heads"], shape["nope"] + shape["rope"]
                query = self.randn(1, heads, n_q, dqk)
                key, value = self.randn(1, heads, seq, dqk), self.randn(1, heads, seq, shape["v"])
                with poisoned_empty():
                    got = sparse_attention(query, key, value, idx, dqk**-0.5)
                ref = sparse_attention_reference(query.float(), key.float(), value.float(), idx, dqk**-0.5)
                rec["attention"] = {"rel_err": ((got.float() - ref).norm() / ref.norm()).item()}
            with self.guard(rec.setdefault("mla", {})):
                idx = self.indices_for(shape, seq, n_q)
                lat, rope = shape["latent"], shape["rope"]
                qc, qr = self.randn(1, n_q, shape["heads"], lat), self.randn(1, n_q, shape["heads"], rope)
                kc, kr = self.randn(1, seq, lat), self.randn(1, seq, rope)
                with poisoned_empty():
                    got = sparse_mla_attention(qc, qr, kc, kr, idx, (lat + rope) ** -0.5)
                ref = sparse_mla_attention_reference(
                    qc.float(), qr.float(), kc.float(), kr.float(), idx, (lat + rope) ** -0.5
                )
                rec["mla"] = {"rel_err": ((got.float() - ref).norm() / ref.norm()).item()}
            with self.guard(rec.setdefault("decode_attention", {})):
                idx = self.indices_for(shape, seq, 1)
                query = self.randn(1, shape["heads"], 1, dqk)
                with poisoned_empty():
                    got = sparse_attention(query, key, value, idx, dqk**-0.5)
                ref = sparse_attention_reference(query.float(), key.float(), value.float(), idx, dqk**-0.5)
                qc, qr = self.randn(1, 1, shape["heads"], lat), self.randn(1, 1, shape["heads"], rope)
                with poisoned_empty():
                    got_mla = sparse_mla_attention(qc, qr, kc, kr, idx, (lat + rope) ** -0.5)
                ref_mla = sparse_mla_attention_reference(
                    qc.float(), qr.float(), kc.float(), kr.float(), idx, (lat + rope) ** -0.5
                )
                rec["decode_attention"] = {
                    "rel_err": ((got.float() - ref).norm() / ref.norm()).item(),
                    "mla_rel_err": ((got_mla.float() - ref_mla).norm() / ref_mla.norm()).item(),
                }
        return out

    def select_chosen_scores(self, num_keys: int) -> dict:
        """The select alone on chosen score rows (the last 256 queries of `num_keys`, causal): v4 against v3, both
        exact with the same tie rule, so the sets must be equal; per kind of row, the fraction of equal rows.
        Kinds: normal scores; scores rounded to 8 mantissa bits (large exact ties, many shared high halves);
        rows whose sampled keys (8 of every 128) are the largest, or the smallest (the bracket misses)."""
        from indexcache.kernels.indexer.kernel import topk_of_scores_triton
        from indexcache.kernels.testing import poisoned_empty

        n_q = min(256, num_keys // 2)
        scores = torch.randn(1, n_q, num_keys, device=self.device, generator=self.gen)
        sampled = (torch.arange(num_keys, device=self.device) % 128) < 8
        kinds = {
            "normal": scores,
            "rounded_ties": (scores * 256).round() / 256,
            "sample_high": scores + 8.0 * sampled,
            "sample_low": scores - 8.0 * sampled,
        }
        keys = torch.arange(num_keys, device=self.device)
        reach = keys[None, :] <= keys[num_keys - n_q :, None]
        out = {}
        for kind, sc in kinds.items():
            sc = sc.masked_fill(~reach, float("-inf"))
            with poisoned_empty():
                v4 = topk_of_scores_triton(sc, self.topk, **self.select_launch())
                v3 = topk_of_scores_triton(sc, self.topk, **{**self.select_launch(), **V3_SELECT})
            out[kind] = (v4.sort(-1).values == v3.sort(-1).values).all(-1).float().mean().item()
        return out

    def select_launch(self) -> dict:
        launch = self.configs.get(("indexer", "launch"), {})
        return {k: v for k, v in launch.items() if k not in ("block_m", "block_n", "num_warps", "num_stages")}

    def sweep(self) -> dict:
        """Indexer launch variants on the GLM-5 shape: score tiles at S = 32K, then select variants at 16K and 32K
        (tiny: 96 and 128), the one with the least summed time relative to v3 (the first) used afterwards."""
        from indexcache.kernels.indexer.kernel import lightning_indexer_topk_triton

        sizes = [96, 128] if self.args.tiny else [16384, 32768]
        out = {}
        shape = self.shapes["glm5"]
        scale = shape["index_dim"] ** -0.5
        inputs = {seq: self.indexer_inputs(shape, seq) for seq in sizes}
        score_variants = [
            dict(block_m=64, block_n=128, num_warps=4, num_stages=3),
            dict(block_m=64, block_n=128, num_warps=4, num_stages=2),
        ]
        select_variants = [  # v3 (radix passes on the row, its best launch in run 3), then v4 (the defaults) variants
            V3_SELECT,
            dict(select_block=512, select_warps=4),
            dict(select_block=1024, select_warps=4),
            dict(select_block=256, select_warps=2),
        ]
        if self.args.tiny:
            score_variants = [dict(block_m=16, block_n=32, num_warps=1, num_stages=1)]
            select_variants = [dict(select_block=64, select_warps=1, bracket=b) for b in (False, True)]
        best = None
        for variant in score_variants:
            rec = {"variant": variant}
            with self.guard(rec):
                q, k, w = inputs[sizes[-1]]
                rec.update(self.measure(partial(lightning_indexer_topk_triton, q, k, w, self.topk, scale, **variant)))
                if best is None or rec["ms"] < best[1]:
                    best = (variant, rec["ms"])
            out.setdefault("indexer_tiles", []).append(rec)
        best_tiles = best[0] if best else {}
        best, baseline = None, {}
        for variant in select_variants:
            rec = {"variant": variant}
            with self.guard(rec):
                launch = {**best_tiles, **variant}
                for seq, (q, k, w) in inputs.items():
                    t = self.measure(partial(lightning_indexer_topk_triton, q, k, w, self.topk, scale, **launch))
                    rec[str(seq)] = t
                    baseline.setdefault(seq, t["ms"])
                rec["relative_to_v3"] = sum(rec[str(seq)]["ms"] / baseline[seq] for seq in sizes) / len(sizes)
                if best is None or rec["relative_to_v3"] < best[1]:
                    best = (variant, rec["relative_to_v3"])
            out.setdefault("indexer_select", []).append(rec)
        self.configs[("indexer", "launch")] = {**best_tiles, **(best[0] if best else {})}
        out["indexer_best"] = self.configs[("indexer", "launch")]
        return out

    def sweep_attention(self) -> dict:
        """Launch variants of the attention kernels on the last 4096 queries of 32K (tiny: 64 of 128)."""
        from indexcache.kernels.sparse_attention.kernel import sparse_attention_triton, sparse_mla_attention_triton

        seq = 128 if self.args.tiny else 32768
        out = {}
        shape = self.shapes["glm5"]

        n_q = 64 if self.args.tiny else 4096
        idx = self.indices_for(shape, seq, n_q)
        dqk = shape["nope"] + shape["rope"]
        query = self.randn(1, shape["heads"], n_q, dqk)
        key, value = self.randn(1, shape["heads"], seq, dqk), self.randn(1, shape["heads"], seq, shape["v"])
        attn_variants = [dict(block_k=16, num_warps=2), dict(block_k=16, num_warps=4), dict(block_k=32, num_warps=4)]
        best = None
        for variant in attn_variants:
            rec = {"variant": variant}
            with self.guard(rec):
                rec.update(self.measure(partial(sparse_attention_triton, query, key, value, idx, 0.06, **variant)))
                if best is None or rec["ms"] < best[1]:
                    best = (variant, rec["ms"])
            out.setdefault("attention", []).append(rec)
        self.configs[("attention", "glm5")] = self.configs[("attention", "dsv32")] = best[0] if best else {}
        del query, key, value

        mla_variants = {  # the first of each list is the launcher's default
            "glm5": [
                dict(block_h=16, block_k=64, num_warps=4, num_stages=2),
                dict(block_h=16, block_k=64, num_warps=4, num_stages=3),
                dict(block_h=16, block_k=32, num_warps=4, num_stages=3),
            ],
            "dsv32": [
                dict(block_h=64, block_k=64, num_warps=8, num_stages=2),
                dict(block_h=64, block_k=32, num_warps=8, num_stages=3),
                dict(block_h=64, block_k=32, num_warps=8, num_stages=2),
            ],
        }
        for name, variants in mla_variants.items():
            shape = self.shapes[name]
            idx = self.indices_for(shape, seq, n_q)
            qc = self.randn(1, n_q, shape["heads"], shape["latent"])
            qr = self.randn(1, n_q, shape["heads"], shape["rope"])
            kc, kr = self.randn(1, seq, shape["latent"]), self.randn(1, seq, shape["rope"])
            best = None
            for variant in variants:
                rec = {"variant": variant}
                with self.guard(rec):
                    rec.update(self.measure(partial(sparse_mla_attention_triton, qc, qr, kc, kr, idx, 0.04, **variant)))
                    if best is None or rec["ms"] < best[1]:
                        best = (variant, rec["ms"])
                out.setdefault(f"mla_{name}", []).append(rec)
            self.configs[("mla", name)] = best[0] if best else {}
        out["best"] = {f"{a}/{b}": v for (a, b), v in self.configs.items()}
        return out

    def indexer(self) -> dict:
        from indexcache.kernels.indexer import index_scores_reference
        from indexcache.kernels.indexer import kernel as indexer_kernel
        from indexcache.kernels.testing import selection_report

        out = {}
        launch = self.configs.get(("indexer", "launch"), {})
        for name, shape in self.shapes.items():
            scale = shape["index_dim"] ** -0.5
            for seq in self.sizes:
                rec = out.setdefault(name, {}).setdefault(str(seq), {})
                with self.guard(rec):
                    q, k, w = self.indexer_inputs(shape, seq)
                    run = partial(_call_indexer, indexer_kernel, q, k, w, self.topk, scale, launch)
                    rec.update(self.measure(run))
                    flops = 2 * shape["index_heads"] * shape["index_dim"] * seq * (seq + 1) / 2
                    rec["tflop"] = flops / 1e12
                    rec["tflops"] = flops / rec["ms"] / 1e9
                    rec["pct_peak"] = self.pct_peak(rec["tflops"])
                    # Score kernel alone: the selection swapped for a no-op.
                    real = indexer_kernel._radix_topk_kernel
                    indexer_kernel._radix_topk_kernel = _NoLaunch()
                    try:
                        rec["score_ms"] = self.measure(run)["ms"]
                    finally:
                        indexer_kernel._radix_topk_kernel = real
                    rec["select_ms"] = rec["ms"] - rec["score_ms"]
                    rec["score_tflops"] = flops / rec["score_ms"] / 1e9
                    # The v3 select (radix passes on the row, no bracket) as the baseline of the same run.
                    v3 = partial(_call_indexer, indexer_kernel, q, k, w, self.topk, scale, {**launch, **V3_SELECT})
                    base = self.measure(v3)
                    rec["v3"] = {
                        "ms": base["ms"],
                        "select_ms": base["ms"] - rec["score_ms"],
                        "pct_peak": self.pct_peak(flops / base["ms"] / 1e9),
                    }
                    rows = min(seq, 4096)  # both selections are exact with the same tie rule: the same sets
                    same = (run()[:, -rows:].sort(-1).values == v3()[:, -rows:].sort(-1).values).all(-1)
                    rec["v3"]["same_sets_last_rows"] = {"rows": rows, "fraction": same.float().mean().item()}
                    rows = min(seq, 128)
                    got = run()[:, -rows:]
                    ref = index_scores_reference(q[:, -rows:], k, w[:, -rows:], scale, q_offset=seq - rows)
                    rec["spot_check_last_rows"] = selection_report(got, ref, self.topk)
                    del q, k, w, got, ref
                stock = rec.setdefault("stock_module", {})
                with self.guard(stock):
                    stock.update(self.stock_indexer(name, shape, seq))
                self.save()
        return out

    def indexer_module(self, name: str, shape: dict):
        from transformers import DeepseekV32Config, GlmMoeDsaConfig
        from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer
        from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaIndexer

        config_cls, module_cls = (
            (GlmMoeDsaConfig, GlmMoeDsaIndexer) if name == "glm5" else (DeepseekV32Config, DeepseekV32Indexer)
        )
        config = config_cls(
            hidden_size=shape["hidden"],
            q_lora_rank=shape["q_lora"],
            index_n_heads=shape["index_heads"],
            index_head_dim=shape["index_dim"],
            qk_rope_head_dim=shape["rope"],
            index_topk=self.topk,
            num_hidden_layers=1,
        )
        module = module_cls(config, 0).to(self.device, torch.bfloat16).eval()
        module.weights_proj.float()
        return module

    def stock_indexer(self, name: str, shape: dict, seq: int) -> dict:
        """The stock transformers indexer module (projections + [B, S, H, T] fp32 scores + topk) against the
        same module through `wiring.indexer_topk` (projections + kernel)."""
        from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRotaryEmbedding

        from indexcache.kernels import wiring

        module = self.indexer_module(name, shape)
        hidden = self.randn(1, seq, shape["hidden"])
        q_resid = self.randn(1, seq, shape["q_lora"])
        rotary = GlmMoeDsaRotaryEmbedding(module.config).to(self.device)
        pos = rotary(hidden, torch.arange(seq, device=self.device)[None])
        rec = {}
        wired = partial(wiring.indexer_topk, module, shape["rope_style"], hidden, q_resid, pos, self.topk)
        with self.guard(rec, "wired_error"):
            t = self.measure(wired)
            rec["wired_ms"], rec["wired_peak_gib"] = t["ms"], t.get("peak_gib")
        causal = torch.ones(seq, seq, dtype=torch.bool, device=self.device).tril()[None]
        stock = partial(module, hidden, q_resid, pos, causal, None)
        with self.guard(rec, "stock_error"):
            t = self.measure(stock, min_reps=1)
            rec["stock_ms"], rec["stock_peak_gib"] = t["ms"], t.get("peak_gib")
        return rec

    def attention(self) -> dict:
        """Per-query costs on the last n_q queries of an S-token sequence, projected to all S queries."""
        from indexcache.kernels.sparse_attention.kernel import sparse_attention_triton, sparse_mla_attention_triton

        out = {}
        for name, shape in self.shapes.items():
            heads, nope, rope, v_dim, lat = (shape[k] for k in ("heads", "nope", "rope", "v", "latent"))
            dqk = nope + rope
            for seq in self.sizes:
                n_q = min(seq, self.args.query_slice)
                rec = out.setdefault(name, {}).setdefault(str(seq), {"queries_timed": n_q})
                with self.guard(rec):
                    idx = self.indices_for(shape, seq, n_q)
                    k_eff = (idx >= 0).sum().item() / n_q
                    rec["mean_selected"] = k_eff
                    # Expanded: per-head keys [B, H, T, Dqk] as transformers' expand_kv builds them.
                    query = self.randn(1, heads, n_q, dqk)
                    key, value = self.randn(1, heads, seq, dqk), self.randn(1, heads, seq, v_dim)
                    cfg = self.configs.get(("attention", name), {})
                    t = self.measure(partial(sparse_attention_triton, query, key, value, idx, dqk**-0.5, **cfg))
                    flops = 2 * n_q * heads * k_eff * (dqk + v_dim)
                    gathered = n_q * heads * k_eff * (dqk + v_dim) * 2
                    rec["expanded"] = {
                        **t,
                        "tflops": flops / t["ms"] / 1e9,
                        "gather_tb_s": gathered / t["ms"] / 1e9,
                        "projected_full_ms": t["ms"] * seq / n_q,
                    }
                    del query, key, value
                    self.free()
                    # Absorbed: one 576-dim latent per token shared by all heads; values are its first 512 dims.
                    qc, qr = self.randn(1, n_q, heads, lat), self.randn(1, n_q, heads, rope)
                    kc, kr = self.randn(1, seq, lat), self.randn(1, seq, rope)
                    cfg = self.configs.get(("mla", name), {})
                    t = self.measure(
                        partial(sparse_mla_attention_triton, qc, qr, kc, kr, idx, (lat + rope) ** -0.5, **cfg)
                    )
                    mla_flops = 2 * n_q * heads * k_eff * (lat + rope + lat)
                    rec["absorbed"] = {
                        **t,
                        "tflops": mla_flops / t["ms"] / 1e9,
                        "tflops_expanded_equivalent": flops / t["ms"] / 1e9,
                        "pct_peak": self.pct_peak(mla_flops / t["ms"] / 1e9),
                        "gather_tb_s": n_q * k_eff * (lat + rope) * 2 / t["ms"] / 1e9,
                        "projected_full_ms": t["ms"] * seq / n_q,
                    }
                    del qc, qr, kc, kr
                    rec["projections"] = self.mla_projections(shape, n_q, seq)
                    rec["expanded"]["with_projections_full_ms"] = (
                        rec["expanded"]["projected_full_ms"] + rec["projections"]["expand_kv_full_ms"]
                    )
                    rec["absorbed"]["with_projections_full_ms"] = (
                        rec["absorbed"]["projected_full_ms"] + rec["projections"]["absorb_full_ms"]
                    )
                stock = rec.setdefault("stock_sdpa", {})
                with self.guard(stock):
                    stock.update(self.stock_attention(shape, seq, n_q))
                self.save()
        return out

    def mla_projections(self, shape: dict, n_q: int, seq: int) -> dict:
        """Per-token costs of the two layouts' projections, measured on n_q tokens and scaled to S:
        expanded = kv_b_proj of every key's latent + key assembly (transformers' expand_kv);
        absorbed = q_nope · W_uk per query head and the latent output · W_uv."""
        heads, nope, rope, v_dim, lat = (shape[k] for k in ("heads", "nope", "rope", "v", "latent"))
        kv_b = self.randn(heads * (nope + v_dim), lat, scale=lat**-0.5)
        latent, k_rot = self.randn(n_q, lat), self.randn(n_q, rope)

        def expand():
            kv = (latent @ kv_b.T).view(n_q, heads, nope + v_dim).transpose(0, 1)
            key = kv.new_empty(heads, n_q, nope + rope)
            key[..., :nope].copy_(kv[..., :nope])
            key[..., nope:].copy_(k_rot)
            return key, kv[..., nope:]

        w_uk = kv_b.view(heads, nope + v_dim, lat)[:, :nope]  # [H, nope, lat]
        w_uv = kv_b.view(heads, nope + v_dim, lat)[:, nope:]  # [H, v, lat]
        q_nope, o_lat = self.randn(heads, n_q, nope), self.randn(heads, n_q, lat)

        def absorb():
            return torch.bmm(q_nope, w_uk), torch.bmm(o_lat, w_uv.transpose(1, 2))

        e, a = self.measure(expand)["ms"], self.measure(absorb)["ms"]
        return {"expand_kv_full_ms": e * seq / n_q, "absorb_full_ms": a * seq / n_q}

    def stock_attention(self, shape: dict, seq: int, n_q: int) -> dict:
        """Stock transformers' sdpa path for the same n_q queries: scatter the indices into a dense [S, T] mask,
        combine with causality, dense SDPA over all T keys."""
        heads, dqk, v_dim = shape["heads"], shape["nope"] + shape["rope"], shape["v"]
        idx = self.indices_for(shape, seq, n_q)
        query = self.randn(1, heads, n_q, dqk)
        key, value = self.randn(1, heads, seq, dqk), self.randn(1, heads, seq, v_dim)
        causal = (
            torch.arange(seq, device=self.device)[None, :] <= torch.arange(seq - n_q, seq, device=self.device)[:, None]
        )

        def run():
            index_mask = torch.ones(1, n_q, seq, dtype=torch.bool, device=self.device)
            index_mask.scatter_(-1, idx.clamp(min=0).long(), False)
            mask = (causal & ~index_mask)[:, None]
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=dqk**-0.5)

        rec = self.measure(run, min_reps=1)
        rec["projected_full_ms"] = rec["ms"] * seq / n_q
        return rec

    def decode(self) -> dict:
        from indexcache.kernels.indexer.kernel import lightning_indexer_topk_triton
        from indexcache.kernels.sparse_attention.kernel import sparse_attention_triton, sparse_mla_attention_triton

        out = {}
        for name, shape in self.shapes.items():
            heads, nope, rope, v_dim, lat = (shape[k] for k in ("heads", "nope", "rope", "v", "latent"))
            dqk = nope + rope
            for num_keys in self.sizes:
                rec = out.setdefault(name, {}).setdefault(str(num_keys), {})
                with self.guard(rec):
                    q, k, w = self.indexer_inputs(shape, 1, num_keys)
                    t = self.measure_graph(
                        partial(lightning_indexer_topk_triton, q, k, w, self.topk, shape["index_dim"] ** -0.5)
                    )
                    rec["indexer"] = {**t, "gb_s": num_keys * shape["index_dim"] * 2 / t["ms"] / 1e6}
                    t = self.measure_graph(
                        partial(
                            lightning_indexer_topk_triton, q, k, w, self.topk, shape["index_dim"] ** -0.5, **V3_SELECT
                        )
                    )
                    rec["indexer_v3"] = {**t, "gb_s": num_keys * shape["index_dim"] * 2 / t["ms"] / 1e6}
                    idx = lightning_indexer_topk_triton(q, k, w, self.topk, shape["index_dim"] ** -0.5)
                    query = self.randn(1, heads, 1, dqk)
                    key, value = self.randn(1, heads, num_keys, dqk), self.randn(1, heads, num_keys, v_dim)
                    t = self.measure_graph(partial(sparse_attention_triton, query, key, value, idx, dqk**-0.5))
                    n_sel = (idx >= 0).sum().item()
                    rec["expanded"] = {**t, "gb_s": n_sel * heads * (dqk + v_dim) * 2 / t["ms"] / 1e6}
                    del key, value
                    qc, qr = self.randn(1, 1, heads, lat), self.randn(1, 1, heads, rope)
                    kc, kr = self.randn(1, num_keys, lat), self.randn(1, num_keys, rope)
                    t = self.measure_graph(
                        partial(sparse_mla_attention_triton, qc, qr, kc, kr, idx, (lat + rope) ** -0.5)
                    )
                    rec["absorbed"] = {**t, "gb_s": n_sel * (lat + rope) * 2 / t["ms"] / 1e6}
                self.save()
        return out

    def glm5_model(self):
        from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

        s = self.shapes["glm5"]
        tiny = self.args.tiny
        config = GlmMoeDsaConfig(
            vocab_size=256 if tiny else 4096,
            hidden_size=s["hidden"] if tiny else 2048,
            intermediate_size=128 if tiny else 6144,
            num_hidden_layers=4,
            first_k_dense_replace=4,
            num_attention_heads=s["heads"],
            num_key_value_heads=s["heads"],
            q_lora_rank=s["q_lora"] if tiny else 1536,
            kv_lora_rank=s["latent"],
            qk_nope_head_dim=s["nope"],
            qk_rope_head_dim=s["rope"],
            v_head_dim=s["v"],
            index_n_heads=s["index_heads"],
            index_head_dim=s["index_dim"],
            index_topk=self.topk,
            max_position_embeddings=262144,
        )
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        with self.device:
            model = GlmMoeDsaForCausalLM(config).to(torch.bfloat16).eval()
        for layer in model.model.layers:
            layer.self_attn.indexer.weights_proj.float()
        return model

    def model(self) -> dict:
        from indexcache.kernels import wiring
        from indexcache.kernels.testing import wired_model

        out = {}
        model = self.glm5_model()
        out["config"] = {
            k: getattr(model.config, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "q_lora_rank",
                "kv_lora_rank",
                "qk_nope_head_dim",
                "qk_rope_head_dim",
                "v_head_dim",
                "index_n_heads",
                "index_head_dim",
                "index_topk",
                "vocab_size",
            )
        }
        timer = _SplitTimer(self.cuda)
        select = timer.wrap("indexer", wiring.indexer_topk)
        attn = timer.wrap("attention", wiring._sparse_attention_forward)
        for seq in self.args.model_sizes:
            rec = out.setdefault("ours", {}).setdefault(str(seq), {})
            with self.guard(rec):
                ids = torch.randint(0, model.config.vocab_size, (1, seq), device=self.device)
                wiring.register_sparse_attention()
                with torch.no_grad(), wired_model(model, "interleave", select=select), _attention_fn(attn):
                    run = partial(model.model, ids, use_cache=False)
                    run()  # compiles the kernels for this size outside the split
                    timer.reset()
                    rec.update(self.measure(run, min_reps=1, warm=False))
                    rec["split_ms_per_forward"] = timer.per_call_totals(rec["reps"] + 1)
                    rec["split_ms_per_forward"]["rest"] = rec["ms"] - sum(rec["split_ms_per_forward"].values())
            self.save()
        for seq in self.args.stock_model_sizes:
            rec = out.setdefault("stock_eager", {}).setdefault(str(seq), {})
            with self.guard(rec):
                ids = torch.randint(0, model.config.vocab_size, (1, seq), device=self.device)
                with torch.no_grad():
                    run = partial(model.model, ids, use_cache=False)
                    rec.update(self.measure(run, min_reps=1))
            self.save()
        return out

    def run(self):
        if self.args.tiny:
            from indexcache.kernels.testing import use_triton_interpreter

            use_triton_interpreter()
        for section in self.args.sections:
            print(f"== {section}", flush=True)
            start = time.perf_counter()
            rec: dict = {}
            with self.guard(rec):
                rec = getattr(self, section)()
            rec["section_s"] = time.perf_counter() - start
            self.results["sections"][section] = rec
            self.save()
            print(json.dumps(rec, default=str)[:3000], flush=True)
        print_table(self.results)


def _call_indexer(module, q, k, w, topk, scale, launch):
    """Looks the launcher up on the module at call time, so that the bench can swap one of its kernels."""
    return module.lightning_indexer_topk_triton(q, k, w, topk, scale, **launch)


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _SplitTimer:
    """CUDA-event time spent inside wrapped functions, summed per label."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.events: dict[str, list] = {}

    def reset(self):
        self.events = {}

    def wrap(self, label, fn):
        def timed(*args, **kwargs):
            if not self.cuda:
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                self.events.setdefault(label, []).append((time.perf_counter() - start) * 1e3)
                return out
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = fn(*args, **kwargs)
            end.record()
            self.events.setdefault(label, []).append((begin, end))
            return out

        return timed

    def per_call_totals(self, n_forwards: int) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return {
            label: sum(e if isinstance(e, float) else e[0].elapsed_time(e[1]) for e in evs) / n_forwards
            for label, evs in self.events.items()
        }


@contextmanager
def _attention_fn(fn):
    """Registers `fn` (a wrapped `_sparse_attention_forward`) under the kernels' attention name for a while."""
    from transformers import AttentionInterface

    from indexcache.kernels import wiring

    AttentionInterface.register(wiring.ATTN_IMPLEMENTATION, fn)
    try:
        yield
    finally:
        wiring.register_sparse_attention()


def _fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x[:12]
    return f"{x:.{digits}f}"


def print_table(results: dict) -> None:
    sections = results["sections"]
    meta = results["meta"]
    print(f"\n# {meta.get('card', 'cpu')}  {meta['date']}  torch {meta['torch']}  triton {meta['triton']}")
    ceil = sections.get("ceilings", {})
    if "matmul_bf16" in ceil:
        print(f"bf16 matmul peak {ceil['matmul_bf16']['tflops']:.0f} TFLOP/s, copy {ceil['copy']['tb_s']:.2f} TB/s")
    corr = sections.get("correctness", {})
    for name, rec in corr.items():
        if isinstance(rec, dict):
            parts = []
            for case, r in rec.items():
                if "sum_rel_err" in r:
                    ok = all(r[f] for f in ("written", "counts_ok", "packed", "distinct", "visible"))
                    parts.append(
                        f"{case}: ok={ok} gap={r['worst_pick_gap']:.1e} sum={r['sum_rel_err']:.1e} "
                        f"same={r['identical_rows']:.3f}"
                    )
                elif "rel_err" in r:
                    parts.append(
                        f"{case}: rel={r['rel_err']:.1e}" + (f"/{r['mla_rel_err']:.1e}" if "mla_rel_err" in r else "")
                    )
                elif case == "select_chosen_scores":
                    parts.append("v4=v3 sets " + " ".join(f"{kind} {v:.3f}" for kind, v in r.items()))
                elif "error" in r:
                    parts.append(f"{case}: {r['error'][:60]}")
            print(f"correct {name}: " + "; ".join(parts))
    idx = sections.get("indexer", {})
    if idx:
        print(
            "\nindexer prefill     S | ms      TFLOP/s  %peak  score_ms sel_ms  GiB   | v3: ms %peak sel_ms same | "
            "wired_ms stock_ms stock_GiB"
        )
        for name, by_s in idx.items():
            if not isinstance(by_s, dict):
                continue
            for seq, r in by_s.items():
                st, v3 = r.get("stock_module", {}), r.get("v3", {})
                print(
                    f"{name:6s} {int(seq):>12d} | {_fmt(r.get('ms'), 2):7s} {_fmt(r.get('tflops'), 0):8s} "
                    f"{_fmt(r.get('pct_peak'), 0):6s} {_fmt(r.get('score_ms'), 2):8s} {_fmt(r.get('select_ms'), 2):6s} "
                    f"{_fmt(r.get('peak_gib'), 2):5s} | {_fmt(v3.get('ms'), 2)} {_fmt(v3.get('pct_peak'), 0)} "
                    f"{_fmt(v3.get('select_ms'), 2)} {_fmt(v3.get('same_sets_last_rows', {}).get('fraction'), 3)} | "
                    f"{_fmt(st.get('wired_ms'), 2):8s} "
                    f"{_fmt(st.get('stock_ms', st.get('stock_error')), 1):8s} {_fmt(st.get('stock_peak_gib'), 1)}"
                    + (f"  ERR {r['error'][:50]}" if "error" in r else "")
                )
    att = sections.get("attention", {})
    if att:
        print(
            "\nattention prefill   S | expanded: ms/q-slice TFLOP/s TB/s full_ms | absorbed: ms TFLOP/s (exp.eq) "
            "%peak full_ms | +proj full: exp abs | stock sdpa full_ms"
        )
        for name, by_s in att.items():
            if not isinstance(by_s, dict):
                continue
            for seq, r in by_s.items():
                e, a, s = r.get("expanded", {}), r.get("absorbed", {}), r.get("stock_sdpa", {})
                print(
                    f"{name:6s} {int(seq):>12d} | {_fmt(e.get('ms'), 2)} {_fmt(e.get('tflops'), 0)} "
                    f"{_fmt(e.get('gather_tb_s'), 1)} {_fmt(e.get('projected_full_ms'), 0)} | "
                    f"{_fmt(a.get('ms'), 2)} {_fmt(a.get('tflops'), 0)} "
                    f"({_fmt(a.get('tflops_expanded_equivalent'), 0)}) "
                    f"{_fmt(a.get('pct_peak'), 0)} {_fmt(a.get('projected_full_ms'), 0)} | "
                    f"{_fmt(e.get('with_projections_full_ms'), 0)} {_fmt(a.get('with_projections_full_ms'), 0)} | "
                    f"{_fmt(s.get('projected_full_ms', s.get('error')), 0)}"
                    + (f"  ERR {r['error'][:50]}" if "error" in r else "")
                )
    dec = sections.get("decode", {})
    if dec:
        print("\ndecode (1 query)    T | indexer us GB/s (v3 us) | expanded us GB/s | absorbed us GB/s")
        for name, by_t in dec.items():
            if not isinstance(by_t, dict):
                continue
            for num_keys, r in by_t.items():
                i, e, a = r.get("indexer", {}), r.get("expanded", {}), r.get("absorbed", {})
                us = lambda d: _fmt(d.get("ms") * 1e3 if d.get("ms") is not None else None, 0)  # noqa: E731
                print(
                    f"{name:6s} {int(num_keys):>12d} | {us(i)} {_fmt(i.get('gb_s'), 0)} "
                    f"({us(r.get('indexer_v3', {}))}) | {us(e)} "
                    f"{_fmt(e.get('gb_s'), 0)} | {us(a)} {_fmt(a.get('gb_s'), 0)}"
                    + (f"  ERR {r['error'][:50]}" if "error" in r else "")
                )
    mod = sections.get("model", {})
    if mod:
        print("\n4-layer GLM-5-shaped forward  S | ms  GiB | indexer attention rest (ms per forward)")
        for kind in ("ours", "stock_eager"):
            for seq, r in mod.get(kind, {}).items():
                sp = r.get("split_ms_per_forward", {})
                print(
                    f"{kind:12s} {int(seq):>18d} | {_fmt(r.get('ms'), 0)} {_fmt(r.get('peak_gib'), 1)} | "
                    f"{_fmt(sp.get('indexer'), 0)} {_fmt(sp.get('attention'), 0)} {_fmt(sp.get('rest'), 0)}"
                    + (f"  ERR {r['error'][:50]}" if "error" in r else "")
                )
    for name, rec in sections.items():
        if isinstance(rec, dict) and "error" in rec:
            print(f"section {name} failed: {rec['error'][:200]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file for all results")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[4096, 16384, 32768, 65536, 131072])
    parser.add_argument("--model-sizes", nargs="+", type=int, default=[4096, 32768, 131072])
    parser.add_argument("--stock-model-sizes", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--query-slice", type=int, default=4096, help="queries timed per attention size")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of repeats per measurement")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU interpreter (smoke test)")
    args = parser.parse_args()
    if args.tiny:
        args.sizes = [64, 96]
        args.model_sizes, args.stock_model_sizes, args.query_slice = [48], [48], 32
    Bench(args).run()


if __name__ == "__main__":
    main()
