"""Small host-side helpers shared by the Triton launchers."""

from __future__ import annotations

import os

import torch
import triton
from triton.language.extra import cuda as triton_cuda


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where tl.dot must get fp32 operands: the CPU interpreter multiplies bf16 bit
    patterns as integers (Triton 3.9)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dependent_launch() -> bool:
    """True where a kernel can be launched programmatically dependent on the previous one (Hopper and later, a
    Triton with grid dependency control; never in the interpreter, which runs launches one after another): its
    programs then start while the previous kernel finishes and wait for its writes with `gdc_wait`."""
    if interpreting() or not hasattr(triton_cuda, "gdc_wait"):
        return False
    target = triton.runtime.driver.active.get_current_target()
    return target.backend == "cuda" and target.arch >= 90


def descriptor_rows(t: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """[..., D] as a contiguous [rows, D'] for a tensor descriptor, D zero-padded to `width` (default: to 16 bytes);
    a copy only if needed."""
    width = -(-t.shape[-1] // (16 // t.element_size())) * (16 // t.element_size()) if width is None else width
    pad = width - t.shape[-1]
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.contiguous().view(-1, t.shape[-1])
