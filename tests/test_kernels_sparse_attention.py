"""The sparse-attention Triton kernels against their PyTorch references (CPU: Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

from indexcache.kernels.testing import kernel_device, poisoned_empty, random_topk_indices

DEVICE = kernel_device()  # before the kernel modules load: they pick compiler or interpreter then

from indexcache.kernels.sparse_attention import (  # noqa: E402
    sparse_attention_reference,
    sparse_mla_attention_reference,
)
from indexcache.kernels.sparse_attention.kernel import (  # noqa: E402
    sparse_attention_triton,
    sparse_mla_attention_triton,
)

BF16_TOL = 1e-2  # bf16 operands and a bf16 output: METHOD.md's 1e-3..1e-2 band (measured ~3e-3 here)


def _rand(gen, *shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert not got.isnan().any(), "an output element was never written"
    return ((got.double() - ref).norm() / ref.norm()).item()


def _indices(gen, batch, seq_len, num_keys, topk, empty_row=False):
    key_mask = torch.ones(batch, num_keys, dtype=torch.bool)
    key_mask[-1, num_keys // 2] = False  # a padded key nobody may pick
    idx = random_topk_indices(batch, seq_len, num_keys, topk, gen, key_mask)
    if empty_row:
        idx[0, -1] = -1  # a query with no key at all attends to nothing: zeros
    return idx.to(DEVICE)


ATTN_CASES = [
    pytest.param(2, 3, 1, 37, 50, 24, 8, 20, id="B2-H3-Hk1-S37-T50-D24-V8-K20"),
    pytest.param(1, 4, 4, 33, 33, 256, 256, 16, id="B1-H4-S33-D256-V256-K16"),
    pytest.param(2, 2, 2, 1, 300, 16, 16, 64, id="B2-H2-S1-T300-D16-V16-K64-decode"),
]


@pytest.mark.parametrize("batch,n_heads,n_kv_heads,seq_len,num_keys,head_dim,v_dim,topk", ATTN_CASES)
def test_sparse_attention_matches_reference(batch, n_heads, n_kv_heads, seq_len, num_keys, head_dim, v_dim, topk):
    gen = torch.Generator().manual_seed(seq_len * 7 + topk)
    query = _rand(gen, batch, n_heads, seq_len, head_dim)
    key = _rand(gen, batch, n_kv_heads, num_keys, head_dim)
    value = _rand(gen, batch, n_kv_heads, num_keys, v_dim)
    idx = _indices(gen, batch, seq_len, num_keys, topk, empty_row=True)
    with poisoned_empty():
        got = sparse_attention_triton(query, key, value, idx, head_dim**-0.5, block_k=16, num_warps=1)
    ref = sparse_attention_reference(query.double(), key.double(), value.double(), idx, head_dim**-0.5)
    assert got.shape == (batch, seq_len, n_heads, v_dim)
    assert _rel_err(got, ref) < BF16_TOL
    assert (got[0, -1] == 0).all()


def test_sparse_attention_transformers_strides_fp32():
    """transformers hands over value as a strided view of kv_b_proj's output; fp32 gives near-exact results."""
    gen = torch.Generator().manual_seed(11)
    batch, n_heads, seq_len, nope, v_dim = 2, 3, 29, 16, 8
    kv = _rand(gen, batch, seq_len, n_heads, nope + v_dim, dtype=torch.float32).transpose(1, 2)
    key, value = kv[..., :nope], kv[..., nope:]  # non-contiguous, like GlmMoeDsaAttention.expand_kv
    query = _rand(gen, batch, n_heads, seq_len, nope, dtype=torch.float32)
    idx = _indices(gen, batch, seq_len, seq_len, 12)
    with poisoned_empty():
        got = sparse_attention_triton(query, key, value, idx, 0.3, block_k=16, num_warps=1)
    assert _rel_err(got, sparse_attention_reference(query.double(), key.double(), value.double(), idx, 0.3)) < 1e-5


MLA_CASES = [
    pytest.param(2, 3, 37, 50, 16, 8, 20, 16, id="B2-H3-S37-T50-C16-R8-K20"),
    pytest.param(1, 20, 9, 40, 32, 8, 16, 16, id="B1-H20-S9-T40-C32-R8-K16-two-head-blocks"),
    pytest.param(2, 16, 1, 300, 64, 16, 64, 64, id="B2-H16-S1-T300-C64-R16-K64-decode"),
]


@pytest.mark.parametrize("batch,n_heads,seq_len,num_keys,latent,rope,topk,block_h", MLA_CASES)
def test_sparse_mla_matches_reference(batch, n_heads, seq_len, num_keys, latent, rope, topk, block_h):
    gen = torch.Generator().manual_seed(seq_len * 13 + topk)
    q_latent = _rand(gen, batch, seq_len, n_heads, latent)
    q_rope = _rand(gen, batch, seq_len, n_heads, rope)
    kv_latent = _rand(gen, batch, num_keys, latent)
    k_rope = _rand(gen, batch, num_keys, rope)
    idx = _indices(gen, batch, seq_len, num_keys, topk, empty_row=True)
    scale = (latent + rope) ** -0.5
    with poisoned_empty():
        got = sparse_mla_attention_triton(
            q_latent, q_rope, kv_latent, k_rope, idx, scale, block_h=block_h, block_k=16, num_warps=1
        )
    args = [t.double() for t in (q_latent, q_rope, kv_latent, k_rope)]
    ref = sparse_mla_attention_reference(*args, idx, scale)
    assert got.shape == (batch, seq_len, n_heads, latent)
    assert _rel_err(got, ref) < BF16_TOL
    assert (got[0, -1] == 0).all()


def test_absorbed_equals_expanded_attention():
    """The MLA identity the absorbed kernel relies on: with k_h = [W_uk_h c | k_rope], v_h = W_uv_h c, attention
    over expanded keys equals latent attention with q_latent = W_uk_h^T q_nope, followed by W_uv_h."""
    gen = torch.Generator().manual_seed(5)
    batch, n_heads, seq_len, latent, nope, rope, v_dim, topk = 1, 2, 21, 16, 8, 8, 8, 10
    f64 = dict(dtype=torch.float64)
    c = torch.randn(batch, seq_len, latent, generator=gen, **f64)
    k_rope = torch.randn(batch, seq_len, rope, generator=gen, **f64)
    w_uk = torch.randn(n_heads, nope, latent, generator=gen, **f64)
    w_uv = torch.randn(n_heads, v_dim, latent, generator=gen, **f64)
    q = torch.randn(batch, n_heads, seq_len, nope + rope, generator=gen, **f64)
    idx = random_topk_indices(batch, seq_len, seq_len, topk, gen)
    key = torch.cat([torch.einsum("hdc,btc->bhtd", w_uk, c), k_rope[:, None].expand(-1, n_heads, -1, -1)], -1)
    value = torch.einsum("hvc,btc->bhtv", w_uv, c)
    expanded = sparse_attention_reference(q, key, value, idx, 0.2)
    q_latent = torch.einsum("bhsd,hdc->bshc", q[..., :nope], w_uk)
    latent_out = sparse_mla_attention_reference(q_latent, q[..., nope:].transpose(1, 2), c, k_rope, idx, 0.2)
    assert torch.allclose(torch.einsum("bshc,hvc->bshv", latent_out, w_uv), expanded, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_kernels_gpu_default_tiles():
    gen = torch.Generator().manual_seed(0)
    batch, n_heads, seq_len, topk = 1, 16, 3001, 2048
    idx = _indices(gen, batch, seq_len, seq_len, topk)
    query = _rand(gen, batch, n_heads, seq_len, 256)
    key = _rand(gen, batch, n_heads, seq_len, 256)
    value = _rand(gen, batch, n_heads, seq_len, 256)
    with poisoned_empty():
        got = sparse_attention_triton(query, key, value, idx, 256**-0.5)
    ref = sparse_attention_reference(query.float(), key.float(), value.float(), idx, 256**-0.5)
    assert _rel_err(got, ref.double()) < BF16_TOL
    q_latent, q_rope = _rand(gen, batch, seq_len, 128, 512), _rand(gen, batch, seq_len, 128, 64)
    kv_latent, k_rope = _rand(gen, batch, seq_len, 512), _rand(gen, batch, seq_len, 64)
    with poisoned_empty():
        got = sparse_mla_attention_triton(q_latent, q_rope, kv_latent, k_rope, idx, 576**-0.5)
    ref = sparse_mla_attention_reference(
        q_latent.float(), q_rope.float(), kv_latent.float(), k_rope.float(), idx, 576**-0.5
    )
    assert _rel_err(got, ref.double()) < BF16_TOL
