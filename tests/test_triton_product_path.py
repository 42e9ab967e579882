"""The product's Triton path end to end (compiled on a GPU; on the CPU under TRITON_INTERPRET=1): the backend
`auto` picks for a CUDA device, the F/S patch with the kernel indexer and the registered sparse attention, S layers
reusing the previous F layer's −1-padded indices, and cached restarts (every:2) in a greedy search, on a tiny model
with MoE layers. It must find the reference path's pattern with the same losses."""

from __future__ import annotations

import pytest
import torch

from indexcache.kernels.testing import kernel_device

DEVICE = kernel_device()  # before the kernel modules load: they pick compiler or interpreter then

from indexcache.kernels.backend import forced  # noqa: E402
from indexcache.kernels.indexer import kernel as indexer_kernel  # noqa: E402
from indexcache.kernels.sparse_attention import kernel as attention_kernel  # noqa: E402
from indexcache.models import architecture_for  # noqa: E402
from indexcache.runtime.backends import select_backend  # noqa: E402
from indexcache.runtime.forward import LayerwiseModel  # noqa: E402
from indexcache.runtime.patch import index_sharing  # noqa: E402
from indexcache.search.greedy import greedy_search, initial_state  # noqa: E402
from indexcache.search.scoring import CachedScorer, CachePlan  # noqa: E402

from tiny_models import glm_model, random_ids  # noqa: E402

ARCH = architecture_for("glm_moe_dsa")
LAYERS, TOPK, SEQ_LEN = 4, 8, 16  # positions 0..6 see fewer than 8 keys: their index rows end in −1
# fp32 both ways; the kernels sum in another order than stock transformers (~1e-8 relative here). 8 indexer heads,
# as in the wiring tests: with 2, ReLU leaves many keys at exactly 0 and the kernel and torch.topk break such
# exact ties differently (both are correct top-k selections).
LOSS_RTOL = 1e-6


def _search(picked_for: torch.device):
    model = glm_model(seed=2, num_layers=LAYERS, index_topk=TOPK, index_n_heads=8, index_head_dim=32)  # 2, 3: MoE
    model.to(DEVICE)  # both runs where the kernels run; only the backend `auto` picks differs
    name, indexer_fn, attention = select_backend(ARCH, picked_for, "auto")
    lw = LayerwiseModel(model, ARCH)
    with (
        torch.inference_mode(),
        forced("triton" if name == "triton" else "reference"),  # on the CPU: the kernels under the interpreter
        index_sharing(model, ARCH, None, indexer_fn, attention) as sharing,
    ):
        scorer = CachedScorer(lw, sharing, random_ids(2, SEQ_LEN, seed=2), 2, CachePlan("device", 2, 2.0))
        state = greedy_search(scorer, initial_state(LAYERS, list(range(LAYERS)), 2, []))
        buffers = [t for entry in scorer.cache for t in entry.entering_index.values() if t is not None]
    return name, state, buffers, dict(sharing.indexer_calls)


@pytest.fixture(scope="module")
def reference():
    return _search(torch.device("cpu"))


def test_triton_path_finds_the_reference_pattern(reference, monkeypatch):
    calls = {"indexer": 0, "attention": 0}

    def counting(module, launcher, key):
        real = getattr(module, launcher)

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, launcher, wrapper)

    counting(indexer_kernel, "lightning_indexer_topk_triton", "indexer")
    counting(attention_kernel, "sparse_attention_triton", "attention")
    ref_name, ref_state, _, ref_indexer_calls = reference
    name, state, buffers, indexer_calls = _search(torch.device("cuda"))  # what `auto` picks on a GPU

    assert (ref_name, name) == ("reference", "triton")
    assert calls["indexer"] == sum(indexer_calls.values()) > 0  # every F layer ran the kernel indexer
    assert calls["attention"] > calls["indexer"]  # S layers attended too, with reused indices
    assert indexer_calls == ref_indexer_calls  # the same layers ran their indexer, as often
    assert any((b == -1).any() for b in buffers)  # early positions: fewer keys than k, padded with −1
    assert state.pattern == ref_state.pattern and state.pattern.count("F") == 2
    assert state.loss_all_full == pytest.approx(ref_state.loss_all_full, rel=LOSS_RTOL)
    for ours, theirs in zip(state.trajectory, ref_state.trajectory, strict=True):
        assert ours.flipped == theirs.flipped
        assert ours.candidates == pytest.approx(theirs.candidates, rel=LOSS_RTOL)
