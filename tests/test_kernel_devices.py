"""Kernel launches run on their tensors' GPU (and its current stream), not on whatever device is current.

Under accelerate's device_map a layer on cuda:1 hands the dispatcher cuda:1 tensors while cuda:0 is current;
Triton launches on the current device, so each dispatcher must enter `torch.cuda.device(tensor.device)` around
the launch. The CPU cannot hold a CUDA tensor, so the tensors here only claim a device and the launch records
where it happened; `scripts/multi_gpu_check.py` shows the same on two real GPUs.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from indexcache.kernels import indexer, sparse_attention
from indexcache.kernels.indexer import kernel as indexer_kernel
from indexcache.kernels.sparse_attention import kernel as attention_kernel

ON_GPU_1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))

CASES = [
    pytest.param(indexer.lightning_indexer_topk, indexer_kernel, "lightning_indexer_topk_triton", 5, id="indexer"),
    pytest.param(sparse_attention.sparse_attention, attention_kernel, "sparse_attention_triton", 5, id="attention"),
    pytest.param(
        sparse_attention.sparse_mla_attention, attention_kernel, "sparse_mla_attention_triton", 6, id="mla-attention"
    ),
]


@pytest.mark.parametrize(("dispatcher", "module", "launcher", "num_args"), CASES)
def test_dispatcher_launches_inside_the_tensors_device(monkeypatch, dispatcher, module, launcher, num_args):
    events = []

    @contextmanager
    def device_guard(device):
        events.append(f"enter {device}")
        yield
        events.append(f"exit {device}")

    monkeypatch.setattr(torch.cuda, "device", device_guard)
    monkeypatch.setattr(module, launcher, lambda *args, **kwargs: events.append("launch"))
    dispatcher(ON_GPU_1, *[None] * (num_args - 1))
    assert events == ["enter cuda:1", "launch", "exit cuda:1"]
