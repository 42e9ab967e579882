#!/usr/bin/env python
"""Compile the Triton kernels for an H100/H200 (sm_90) on a machine without a GPU, and print each kernel's
registers, spills and shared memory: what the interpreter accepts but the compiler refuses (a module global that is
not `tl.constexpr`, a variable whose type a branch changes, ...) fails here instead of in a device call.

    python scripts/compile_sm90.py            # every launch of the decode indexer, prefill indexer and sparse MLA

Each launcher runs on small CPU tensors with its default launch, its kernels compiled (Triton's `warmup`) and not
run: the outputs are garbage and never read.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


class _Sm90:
    """Just enough of a CUDA driver for `JITFunction.run(warmup=True)` to compile for sm_90."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def compile_launches(call) -> list[tuple[str, object]]:
    """(kernel name, compiled kernel) of every launch `call()` makes, compiled for sm_90 and not run."""
    compiled = []

    def getitem(self, grid):
        return lambda *args, **kwargs: compiled.append((self.fn.__name__, self.run(*args, grid=grid, warmup=True,
                                                                                   **kwargs)))  # fmt: skip

    real = JITFunction.__getitem__
    JITFunction.__getitem__ = getitem
    try:
        call()
    finally:
        JITFunction.__getitem__ = real
    return compiled


def ptxas_report(kernel) -> str:
    """Registers and spill bytes from the ptxas that ships with Triton, for the kernel's PTX."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the PTX version Triton writes
            run = subprocess.run([bin_dir / name, "-arch=sm_90a", "-v", ptx, "-o", os.devnull], capture_output=True,
                                 text=True)  # fmt: skip
            if run.returncode == 0:
                regs = re.findall(r"Used (\d+) registers", run.stderr)
                spills = re.findall(r"(\d+) bytes spill stores", run.stderr)
                return f"{regs[0]} registers, {spills[0]} B spilled"
    return "ptxas failed: " + run.stderr.strip()[:200]


def examples():
    from indexcache.kernels.indexer.kernel import lightning_indexer_topk_triton
    from indexcache.kernels.indexer_decode.kernel import decode_indexer_topk_triton
    from indexcache.kernels.sparse_attention.kernel import sparse_mla_attention_triton

    for heads in (32, 64):  # GLM-5 and DeepSeek-V3.2 indexers
        q, k, w = torch.randn(32, heads, 128).bfloat16(), torch.randn(32, 4096, 128).bfloat16(), torch.randn(32, heads)
        yield f"decode indexer, {heads} heads", lambda q=q, k=k, w=w: decode_indexer_topk_triton(q, k, w, 2048, 0.088)
    q, k, w = torch.randn(1, 256, 32, 128).bfloat16(), torch.randn(1, 4096, 128).bfloat16(), torch.randn(1, 256, 32)
    yield "prefill indexer, 32 heads", lambda: lightning_indexer_topk_triton(q, k, w, 2048, 0.088)
    for heads in (64, 128):
        ql, qr = torch.randn(1, 64, heads, 512).bfloat16(), torch.randn(1, 64, heads, 64).bfloat16()
        kv, kr = torch.randn(1, 4096, 512).bfloat16(), torch.randn(1, 4096, 64).bfloat16()
        idx = torch.randint(0, 4096, (1, 64, 2048), dtype=torch.int32)
        yield f"sparse MLA, {heads} heads", lambda a=(ql, qr, kv, kr, idx): sparse_mla_attention_triton(*a, 0.07)


def main() -> int:
    driver.set_active(_Sm90())  # this machine has no CUDA driver to go back to
    failed = 0
    for label, call in examples():
        try:
            for name, kernel in compile_launches(call):
                print(f"{label}: {name}: {ptxas_report(kernel)}, {kernel.metadata.shared} B shared memory")
        except Exception as e:  # noqa: BLE001 - report every launcher, then fail
            failed += 1
            print(f"{label}: FAILED {type(e).__name__}: {str(e).strip()[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
