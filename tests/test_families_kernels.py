"""The product kernel path (`select_backend` → `index_sharing`) on the new families: axk2 (DeepSeek-V3.2's layout),
hy_v4 (rotary dims at the end of the head, half-split RoPE, fp32 k_norm, softmax_scale folded into the weights;
stock attention because of its sinks) and mistral_large4 (no q-LoRA, per-position query scaling, NoPE
layers, sparse-attention kernel). Triton runs compiled on a GPU, under TRITON_INTERPRET=1 on the CPU."""

from __future__ import annotations

import pytest
import torch

from indexcache.kernels.testing import kernel_device

DEVICE = kernel_device()  # before the kernel modules load: they pick compiler or interpreter then

from indexcache.errors import IndexCacheError  # noqa: E402
from indexcache.kernels.backend import forced  # noqa: E402
from indexcache.models import architecture_for  # noqa: E402
from indexcache.runtime.backends import select_backend  # noqa: E402
from indexcache.runtime.forward import LayerwiseModel  # noqa: E402
from indexcache.runtime.patch import index_sharing  # noqa: E402

from tiny_families import axk2_model, dots3_note_text_model, hy_v4_model, mistral_large4_model  # noqa: E402
from tiny_models import random_ids  # noqa: E402

BUILDERS = {
    "mistral_large4": mistral_large4_model,
    "hy_v4": hy_v4_model,
    "axk2": axk2_model,
    "dots3_note_text": dots3_note_text_model,
}
# F and S layers; dense layers (axk2 has 4 layers, dots3_note_text's 2-4 are sliding-window) are S.
PATTERNS = {"mistral_large4": "FSFSSF", "hy_v4": "FSFSSF", "axk2": "FSFS", "dots3_note_text": "FSSSSF"}
# 8 indexer heads: with 2, a quarter of the keys score exactly 0 after the ReLU and top-k breaks those ties
# arbitrarily (the kernel and the reference legitimately differ there).
INDEXER = dict(index_n_heads=8, index_head_dim=32)
# Same arithmetic in another order (fused head sum, gathered softmax): ~1e-7 relative; a wrong selection moves the
# loss by far more (the oracle tests show every pattern of these models has its own loss).
LOSS_RTOL = 1e-5


def _loss(model, arch, pattern: str, ids: torch.Tensor, backend: str) -> float:
    lw = LayerwiseModel(model, arch)
    name, indexer_fn, attn = select_backend(arch, torch.device("cuda"), backend)  # the CUDA choice, on any device
    with torch.no_grad(), index_sharing(model, arch, pattern, indexer_fn, attn), forced(backend):
        hidden, inputs = lw.embed(ids)
        hidden = lw.run_layers(hidden, inputs, 0, lw.num_layers)
        return lw.nll_sum(hidden, ids).sum().item() / (ids.shape[0] * (ids.shape[1] - 1))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_kernel_path_reproduces_reference_loss(family):
    """For mistral_large4 an F layer that is NoPE (layer 2) and KV-sharing layers; for dots3_note_text the stock
    attention of sliding-window layers between the DSA layers."""
    model = BUILDERS[family](seed=1, **INDEXER).to(DEVICE)
    arch = architecture_for(family)
    pattern = PATTERNS[family]
    ids = random_ids(1, 32, seed=3).to(DEVICE)
    reference = _loss(model, arch, pattern, ids, "reference")
    assert _loss(model, arch, pattern, ids, "triton") == pytest.approx(reference, rel=LOSS_RTOL)


def test_hy_v4_keeps_its_own_attention_on_the_kernel_path():
    """Our sparse-attention kernel has no attention sinks: hy_v4 gets the indexer kernel only, and short windows
    keep its own (eager) attention, not sdpa, which it does not support."""
    cuda = torch.device("cuda")
    assert select_backend(architecture_for("hy_v4"), cuda, "triton")[2] is None
    assert select_backend(architecture_for("hy_v4"), cuda, "auto", 128)[::2] == ("reference", None)
    assert select_backend(architecture_for("mistral_large4"), cuda, "triton")[2] is not None
    assert select_backend(architecture_for("mistral_large4"), cuda, "auto", 128)[::2] == ("sdpa", "sdpa")


def test_block_level_indexer_takes_the_reference_path():
    """minimax_m3_vl selects key blocks, which the Triton indexer does not compute: auto → reference, even on CUDA;
    asking for triton is one clear error."""
    arch = architecture_for("minimax_m3_vl_text")
    assert select_backend(arch, torch.device("cuda"), "auto")[0] == "reference"
    with pytest.raises(IndexCacheError, match="has no kernel here; use --kernels reference"):
        select_backend(arch, torch.device("cuda"), "triton")
