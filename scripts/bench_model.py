#!/usr/bin/env python
"""Prefill through the product's path (`kernels_installed` + `LayerwiseModel`) on real DSA layer shapes, one GPU.

    python scripts/bench_model.py --out $OUT/bench_model.json        # everything, on CUDA
    python scripts/bench_model.py --tiny --out /tmp/x.json           # CPU smoke run (reference kernels, tiny shapes)

Sections, in order (each saved to the JSON as soon as it finishes; a failure is recorded and the run goes on):
  correctness  GLM-5 and DeepSeek-V3.2 layer shapes (2 layers, "FS", 4K tokens, bf16): hidden states and loss
               of absorbed attention (Triton) vs the expanded-key Triton path and vs absorbed on the reference
               kernels; a transformers FP8-quantised tiny glm_moe_dsa (kv_b_proj in fine-grained FP8, quantised
               by transformers on load) vs the bf16 model holding the dequantised weight.
  crossover    all-F forward per layer, Triton (absorbed) vs stock transformers sdpa, short windows: where
               `--kernels auto` switches (defaults.TRITON_MIN_SEQ_LEN).
  model        per config and window: all-F vs the 1/4 pattern (FSSS…) vs stock sdpa where it fits, the
               indexer / attention / rest split, the sparse kernel's own time and TFLOP/s, peak memory; the
               16-head config also through the previous path (expanded keys) at 8K and 32K.
Random weights, dense MLPs everywhere (MoE routing of random routers would time an arbitrary expert load).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from indexcache.bench.prefill import LayerStack, build_stack, time_forward
from indexcache.kernels import sparse_attention as sparse_module
from indexcache.kernels import wiring
from indexcache.kernels.backend import forced
from indexcache.patterns.file import library_versions
from indexcache.runtime.absorbed import absorbed_attention, dense_weight
from indexcache.runtime.backends import kernel_indexer, kernels_installed
from indexcache.runtime.forward import LayerwiseModel
from indexcache.runtime.patch import index_sharing, reference_indexer


def configs(tiny: bool) -> dict:
    from transformers import DeepseekV32Config, GlmMoeDsaConfig

    if tiny:
        small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32)
        small |= dict(qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, index_n_heads=4, index_head_dim=32)
        small |= dict(index_topk=16, intermediate_size=96)
        return {
            "glm5": GlmMoeDsaConfig(num_hidden_layers=4, **small),
            "dsv32": DeepseekV32Config(num_hidden_layers=4, n_group=1, topk_group=1, **small),
            "16head": GlmMoeDsaConfig(num_hidden_layers=8, **small),
        }
    return {
        # transformers' defaults are the released models' shapes; 4 of their layers, dense MLP
        "glm5": GlmMoeDsaConfig(num_hidden_layers=4),
        "dsv32": DeepseekV32Config(num_hidden_layers=4),
        # the 8-layer 16-head configuration of issue 10's first table (and scripts/bench_search.py gpu-glm5)
        "16head": GlmMoeDsaConfig(
            num_hidden_layers=8,
            hidden_size=2048,
            intermediate_size=5632,
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
        ),
    }


def quarter(k: int) -> str:
    return "".join("F" if i % 4 == 0 else "S" for i in range(k))


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        self.configs = configs(args.tiny)
        meta = {"date": datetime.date.today().isoformat(), "argv": sys.argv, "versions": library_versions()}
        meta["card"] = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.results = {"meta": meta, "sections": {}}

    def save(self):
        Path(self.args.out).write_text(json.dumps(self.results, indent=1, default=str))

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    @contextmanager
    def guard(self, rec: dict):
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            rec["error"] = "OOM"
        except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
            rec["error"] = f"{type(e).__name__}: {e}"[:400]
            traceback.print_exc()
        finally:
            self.free()

    def stack(self, name: str) -> LayerStack:
        config = self.configs[name]
        return build_stack(config, config.num_hidden_layers, self.device, self.dtype, mlp="dense")

    # ---- correctness -------------------------------------------------------------------------------------
    def _hidden_and_loss(self, stack: LayerStack, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        lw = LayerwiseModel(stack.model, stack.arch)
        hidden, inputs = lw.embed(ids)
        hidden = lw.run_layers(hidden, inputs, 0, lw.num_layers)
        return hidden.float(), lw.nll_sum(hidden, ids).item() / (ids.shape[1] - 1)

    def correctness(self) -> dict:
        out = {}
        seq = 64 if self.args.tiny else 4096
        for name in ("glm5", "dsv32"):
            rec = out.setdefault(name, {})
            with self.guard(rec):
                config = self.configs[name]
                stack = build_stack(config, 2, self.device, self.dtype, mlp="dense")
                model, arch = stack.model, stack.arch
                ids = torch.randint(0, 1024, (1, seq), generator=torch.Generator().manual_seed(0)).to(self.device)
                results = {}
                with torch.inference_mode():
                    for label, backend, absorb in (
                        ("absorbed_triton", "triton", True),
                        ("expanded_triton", "triton", False),
                        ("absorbed_reference", "reference", True),
                    ):
                        ctx_backend = "triton" if self.cuda and backend == "triton" else "reference"
                        with (
                            forced(ctx_backend),
                            index_sharing(model, arch, "FS", kernel_indexer(arch), wiring.register_sparse_attention()),
                            absorbed_attention(model, arch, absorb),
                        ):
                            results[label] = self._hidden_and_loss(stack, ids)
                ref_h, ref_loss = results["absorbed_triton"]
                for label in ("expanded_triton", "absorbed_reference"):
                    h, loss = results[label]
                    rec[f"hidden_rel_err_vs_{label}"] = ((h - ref_h).norm() / h.norm()).item()
                    rec[f"loss_rel_diff_vs_{label}"] = abs(loss - ref_loss) / abs(loss)
                rec["loss_absorbed_triton"] = ref_loss
            self.save()
        if self.cuda:
            rec = out.setdefault("fp8", {})
            with self.guard(rec):
                rec.update(self.fp8_check())
        return out

    def fp8_check(self) -> dict:
        """A tiny glm_moe_dsa quantised to fine-grained FP8 by transformers on load, kv_b_proj only (the other
        FP8 layers would need the hub's FP8 matmul kernel, which the device cannot download)."""
        from transformers import FineGrainedFP8Config, GlmMoeDsaConfig, GlmMoeDsaForCausalLM
        from transformers.integrations.finegrained_fp8 import FP8Linear

        config = GlmMoeDsaConfig(
            vocab_size=1024,
            hidden_size=512,
            intermediate_size=1024,
            num_hidden_layers=2,
            first_k_dense_replace=2,
            num_attention_heads=8,
            num_key_value_heads=8,
            q_lora_rank=256,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            index_n_heads=8,
            index_head_dim=128,
            index_topk=256,
        )
        torch.manual_seed(0)
        bf16 = GlmMoeDsaForCausalLM(config).to(torch.bfloat16)
        ids = torch.randint(0, 1024, (1, 2048), generator=torch.Generator().manual_seed(0)).cuda()
        with tempfile.TemporaryDirectory() as tmp:
            bf16.save_pretrained(tmp)
            quant = FineGrainedFP8Config(modules_to_not_convert=[r"(?!.*kv_b_proj).*"])
            fp8 = GlmMoeDsaForCausalLM.from_pretrained(tmp, quantization_config=quant, device_map="cuda").eval()
        kv_b = fp8.model.layers[0].self_attn.kv_b_proj
        rec = {
            "kv_b_proj": type(kv_b).__name__,
            "weight_dtype": str(kv_b.weight.dtype),
            "scale_shape": list(kv_b.weight_scale_inv.shape),
            "fp8_modules": sum(isinstance(m, FP8Linear) for m in fp8.modules()),
        }
        bf16 = bf16.cuda().eval()
        for layer, q_layer in zip(bf16.model.layers, fp8.model.layers, strict=True):
            dequant = dense_weight(q_layer.self_attn.kv_b_proj)
            rec.setdefault("quant_rel_err", []).append(
                ((dequant - layer.self_attn.kv_b_proj.weight.float()).norm() / dequant.norm()).item()
            )
            layer.self_attn.kv_b_proj.weight.data.copy_(dequant)
        losses = {}
        with torch.inference_mode():
            for label, model in (("fp8_absorbed", fp8), ("bf16_dequantised_absorbed", bf16)):
                stack = LayerStack(model, _arch(model), 2)
                with kernels_installed(model, stack.arch, self.device, "triton", ids.shape[1], "FS"):
                    losses[label] = self._hidden_and_loss(stack, ids)[1]
            stack = LayerStack(bf16, _arch(bf16), 2)
            with index_sharing(bf16, stack.arch, "FS", reference_indexer, "sdpa"):
                losses["bf16_dequantised_stock_sdpa"] = self._hidden_and_loss(stack, ids)[1]
        rec["losses"] = losses
        return rec

    # ---- timing ------------------------------------------------------------------------------------------
    def timed(self, stack: LayerStack, seq: int, pattern: str, how: str) -> dict:
        """how: "triton" (absorbed, the product), "expanded" (the previous product path), "sdpa" (stock)."""
        model, arch = stack.model, stack.arch
        kernel_calls: list = []
        real = sparse_module.sparse_mla_attention

        def counted(q_latent, q_rope, kv_latent, k_rope, indices, scaling):
            start = torch.cuda.Event(enable_timing=True) if self.cuda else None
            if start is not None:
                start.record()
            out = real(q_latent, q_rope, kv_latent, k_rope, indices, scaling)
            if start is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                flops_per_key = 2 * q_latent.shape[2] * (2 * q_latent.shape[3] + q_rope.shape[3])
                kernel_calls.append((start, end, (indices >= 0).sum(), flops_per_key))
            return out

        with torch.inference_mode():
            if how == "triton":
                ctx = kernels_installed(model, arch, self.device, "triton" if self.cuda else "reference", seq)
            elif how == "expanded":
                ctx = _expanded(model, arch)
            else:
                ctx = _stock_sdpa(model, arch)
            with ctx as (state, _):
                sparse_module.sparse_mla_attention = counted
                try:
                    rec = time_forward(stack, state, seq, self.device, pattern, self.args.reps, kernel_calls.clear)
                finally:
                    sparse_module.sparse_mla_attention = real
        k = len(pattern)
        rec["ms_per_layer"] = rec["ms"] / k
        if kernel_calls:
            torch.cuda.synchronize()
            forwards = self.args.reps
            ms = sum(a.elapsed_time(b) for a, b, _, _ in kernel_calls) / forwards
            flops = sum(n.item() * f for _, _, n, f in kernel_calls) / forwards
            rec["sparse_kernel_ms"] = ms
            rec["sparse_kernel_tflops"] = flops / ms / 1e9
        return rec

    def crossover(self) -> dict:
        out = {}
        sizes = [32, 64] if self.args.tiny else self.args.crossover_sizes
        for name in ("glm5", "dsv32"):
            stack = self.stack(name)
            for seq in sizes:
                rec = out.setdefault(name, {}).setdefault(str(seq), {})
                k = len(stack.arch.layers(stack.model))
                for how in ("triton", "sdpa"):
                    with self.guard(rec.setdefault(how, {})):
                        rec[how] = self.timed(stack, seq, "F" * k, how)
                if "ms" in rec["triton"] and "ms" in rec["sdpa"]:
                    rec["triton_vs_sdpa"] = rec["sdpa"]["ms"] / rec["triton"]["ms"]
                print(name, seq, json.dumps(rec, default=str)[:400], flush=True)
                self.results["sections"]["crossover"] = out
                self.save()
            del stack
            self.free()
        return out

    def model(self) -> dict:
        out = {}
        sizes = [64, 128] if self.args.tiny else self.args.sizes
        for name in self.args.configs:
            stack = self.stack(name)
            k = len(stack.arch.layers(stack.model))
            runs = [("all-F", "F" * k, "triton"), ("1/4", quarter(k), "triton"), ("stock sdpa", "F" * k, "sdpa")]
            if name == "16head":
                runs.append(("expanded (previous)", "F" * k, "expanded"))
            for seq in sizes:
                rec = out.setdefault(name, {}).setdefault(str(seq), {})
                for label, pattern, how in runs:
                    if how == "sdpa" and seq > self.args.sdpa_max:
                        continue
                    if how == "expanded" and seq > self.args.expanded_max:
                        continue
                    r = rec.setdefault(label, {"pattern": pattern})
                    with self.guard(r):
                        r.update(self.timed(stack, seq, pattern, how))
                    print(name, seq, label, json.dumps(r, default=str)[:300], flush=True)
                    self.results["sections"]["model"] = out
                    self.save()
                if "ms" in rec.get("all-F", {}) and "ms" in rec.get("1/4", {}):
                    rec["quarter_speedup"] = rec["all-F"]["ms"] / rec["1/4"]["ms"]
            del stack
            self.free()
        return out

    def run(self):
        for section in self.args.sections:
            print(f"== {section}", flush=True)
            start = time.perf_counter()
            rec: dict = {}
            with self.guard(rec):
                rec = getattr(self, section)()
            rec["section_s"] = time.perf_counter() - start
            self.results["sections"][section] = rec
            self.save()
        print_table(self.results)


def _arch(model):
    from indexcache.models import architecture_for

    return architecture_for(model.config.model_type)


@contextmanager
def _expanded(model, arch):
    """The product path before absorption: kernel indexer + the registered sparse attention on expanded keys."""
    with index_sharing(model, arch, None, kernel_indexer(arch), wiring.register_sparse_attention()) as state:
        yield state, "expanded"


@contextmanager
def _stock_sdpa(model, arch):
    """Stock transformers: its own indexer, sdpa attention with the DSA mask folded in."""
    with index_sharing(model, arch, None, reference_indexer, "sdpa") as state:
        yield state, "sdpa"


def _f(x, d=1):
    return "-" if x is None else (x[:10] if isinstance(x, str) else f"{x:.{d}f}")


def print_table(results: dict) -> None:
    meta, sections = results["meta"], results["sections"]
    print(f"\n# {meta['card']}  {meta['date']}")
    for name, rec in sections.get("correctness", {}).items():
        if isinstance(rec, dict):
            print(f"correctness {name}: " + json.dumps(rec, default=str)[:400])
    for name, by_s in sections.get("crossover", {}).items():
        if isinstance(by_s, dict):
            for seq, r in by_s.items():
                t, s = r.get("triton", {}), r.get("sdpa", {})
                print(
                    f"crossover {name:6s} {seq:>7s}: triton {_f(t.get('ms_per_layer', t.get('error')), 2)} ms/layer"
                    f"  sdpa {_f(s.get('ms_per_layer', s.get('error')), 2)}"
                    f"  sdpa/triton {_f(r.get('triton_vs_sdpa'), 2)}"
                )
    print("\nconfig        S  run                  ms/fwd   ms/layer idx/attn/rest (ms per fwd)  kernel TFLOP/s  GiB")
    for name, by_s in sections.get("model", {}).items():
        if not isinstance(by_s, dict):
            continue
        for seq, runs in by_s.items():
            for label, r in runs.items():
                if not isinstance(r, dict):
                    continue
                sp = r.get("split_ms", {})
                print(
                    f"{name:7s} {seq:>7s}  {label:20s} {_f(r.get('ms', r.get('error')), 0):>7s} "
                    f"{_f(r.get('ms_per_layer'), 1):>8s}  {_f(sp.get('indexer'), 0)}/{_f(sp.get('attention'), 0)}/"
                    f"{_f(sp.get('rest'), 0):22s} {_f(r.get('sparse_kernel_tflops'), 0):>6s}  "
                    f"{_f(r.get('peak_gib'), 1)}"
                )
            if "quarter_speedup" in runs:
                print(f"{name:7s} {seq:>7s}  1/4 vs all-F: {runs['quarter_speedup']:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", nargs="+", default=["correctness", "crossover", "model"])
    parser.add_argument("--configs", nargs="+", default=["16head", "glm5", "dsv32"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[8192, 32768, 65536, 131072])
    parser.add_argument("--crossover-sizes", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--sdpa-max", type=int, default=16384, help="longest window tried with stock sdpa")
    parser.add_argument("--expanded-max", type=int, default=32768, help="longest window on the previous path")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny shapes (reference kernels)")
    args = parser.parse_args()
    Bench(args).run()


if __name__ == "__main__":
    main()
