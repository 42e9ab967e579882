"""Which implementation an op runs: Triton on CUDA tensors, the PyTorch reference otherwise.

`forced("triton")` makes CPU tensors take the Triton kernels too (under TRITON_INTERPRET=1, how the CPU tests run
the kernels inside a model); `forced("reference")` sends CUDA tensors to the references.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

import torch

_FORCED: ContextVar[str | None] = ContextVar("indexcache_kernel_backend", default=None)


def use_triton(tensor: torch.Tensor) -> bool:
    forced = _FORCED.get()
    return tensor.is_cuda if forced is None else forced == "triton"


@contextmanager
def forced(backend: str) -> Iterator[None]:
    if backend not in ("triton", "reference"):
        raise ValueError(f"backend must be 'triton' or 'reference', not {backend!r}")
    token = _FORCED.set(backend)
    try:
        yield
    finally:
        _FORCED.reset(token)


def on_device_of(tensor: torch.Tensor) -> AbstractContextManager:
    """Run a Triton launch on `tensor`'s GPU and that GPU's current stream.

    Triton launches on the *current* CUDA device and stream, not on the device its arguments live on: under
    accelerate's device_map a layer on cuda:1 would otherwise launch on cuda:0 with pointers into cuda:1's memory.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()
