"""Decode against the latent cache: a decode step of a tiny model gives the last position of a full prefill (the
stock transformers forward under the same F/S pattern), on the references and through the kernels (CPU: Triton's
interpreter), and S layers keep no indexer keys."""

from __future__ import annotations

import pytest
import torch

from indexcache.kernels.testing import use_triton_interpreter

if not torch.cuda.is_available():
    use_triton_interpreter()

from indexcache.errors import IndexCacheError  # noqa: E402
from indexcache.kernels.backend import forced  # noqa: E402
from indexcache.kernels.indexer_decode import kernel as decode_kernel  # noqa: E402
from indexcache.models import architecture_for  # noqa: E402
from indexcache.runtime.decode import LatentCache, decoding, step_inputs  # noqa: E402
from indexcache.runtime.forward import LayerwiseModel  # noqa: E402
from indexcache.runtime.patch import index_sharing  # noqa: E402

from tiny_models import deepseek_model, glm_model, random_ids  # noqa: E402

CPU = torch.device("cpu")


def stock_hidden(model, arch, pattern: str, ids: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, S, D] after the last layer, stock transformers layers under our F/S patch."""
    lw = LayerwiseModel(model, arch)
    with torch.no_grad(), index_sharing(model, arch, pattern):
        hidden, inputs = lw.embed(ids)
        return lw.run_layers(hidden, inputs, 0, lw.num_layers)


def decoded_hidden(model, arch, pattern: str, ids: torch.Tensor, device=CPU) -> tuple[torch.Tensor, list]:
    """Prefill ids[:, :-1] into fresh caches, then decode ids[:, -1]: hidden [B, D] of the new token, the caches.
    `device`: the device whose backend `decoding` picks (the tensors stay on the CPU)."""
    lw = LayerwiseModel(model, arch)
    batch, total = ids.shape
    caches = [
        LatentCache.allocate(arch.attention(layer), batch, total, letter == "F", torch.float32, CPU)
        for layer, letter in zip(lw.layers, pattern, strict=True)
    ]
    with torch.no_grad(), decoding(model, arch, caches, device, "auto", pattern):
        hidden, inputs = lw.embed(ids[:, :-1])
        lw.run_layers(hidden, inputs, 0, lw.num_layers)
        hidden, inputs = step_inputs(lw, ids[:, -1:], total - 1)
        return lw.run_layers(hidden, inputs, 0, lw.num_layers)[:, 0], caches


@pytest.mark.parametrize(
    "build,pattern",
    [
        pytest.param(glm_model, "FSFSSF", id="glm_moe_dsa-FSFSSF"),
        pytest.param(glm_model, "FFFFFF", id="glm_moe_dsa-all-F"),
        pytest.param(deepseek_model, "FSSF", id="deepseek_v32-FSSF"),
    ],
)
def test_decode_step_is_the_last_prefill_position(build, pattern):
    # 8 indexer heads: with 2, many keys score exactly 0 (every head's ReLU off) and the stock top-k breaks that tie
    # differently for different window lengths, so even two stock prefills disagree at their common positions.
    model = build(seed=1, index_n_heads=8)
    arch = architecture_for(model.config.model_type)
    ids = random_ids(2, 29, seed=4)  # 28 cached tokens, top-8: every layer selects
    want = stock_hidden(model, arch, pattern, ids)[:, -1]
    got, caches = decoded_hidden(model, arch, pattern, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(c.length == ids.shape[1] for c in caches)
    assert [c.index_keys is not None for c in caches] == [letter == "F" for letter in pattern]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check; scripts/bench_decode.py checks the GPU")
def test_decode_through_the_kernels(monkeypatch):
    """What `auto` picks on a GPU: the F layers' decode step runs the split-K decode indexer, attention the sparse
    MLA kernel over the cache; the same hidden state as the stock prefill's last position."""
    calls = []
    real = decode_kernel.decode_indexer_topk_triton
    monkeypatch.setattr(decode_kernel, "decode_indexer_topk_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = glm_model(seed=2, num_layers=3, index_n_heads=8)
    arch = architecture_for("glm_moe_dsa")
    ids = random_ids(1, 21, seed=6)
    want = stock_hidden(model, arch, "FSF", ids)[:, -1]
    with forced("triton"):
        got, _ = decoded_hidden(model, arch, "FSF", ids, torch.device("cuda"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(calls) == 2  # the two F layers, once each


def test_s_layer_bytes_leave_out_indexer_keys():
    model = glm_model(seed=0)
    attn = architecture_for("glm_moe_dsa").attention(model.model.layers[0])
    full = LatentCache.allocate(attn, 1, 4, True, torch.bfloat16, CPU)
    shared = LatentCache.allocate(attn, 1, 4, False, torch.bfloat16, CPU)
    latent = (attn.kv_lora_rank + attn.qk_rope_head_dim) * 2
    assert shared.bytes_per_token() == latent
    assert full.bytes_per_token() == latent + attn.indexer.head_dim * 2


def test_a_cache_too_small_is_one_line():
    model = glm_model(seed=0)
    arch = architecture_for("glm_moe_dsa")
    lw = LayerwiseModel(model, arch)
    caches = [LatentCache.allocate(arch.attention(layer), 1, 4, True, torch.float32, CPU) for layer in lw.layers]
    with torch.no_grad(), decoding(model, arch, caches, CPU), pytest.raises(IndexCacheError, match="holds 4 tokens"):
        hidden, inputs = lw.embed(random_ids(1, 5))
        lw.run_layers(hidden, inputs, 0, lw.num_layers)
