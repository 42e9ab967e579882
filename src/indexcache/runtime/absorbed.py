"""Absorbed MLA attention for DSA layers (FlashMLA's layout), installed in place of transformers' attention forward.

transformers' GLM-5 / DeepSeek-V3.2 attention expands the 512-dim latent into per-head keys and values
(`expand_kv`) before calling an attention function: the sparse kernel then gathers H·(Dqk + Dv) values per
selected key, one FLOP per gathered byte. Absorbing `kv_b_proj` moves that projection onto the queries and the
output instead: with k_h = [W_uk_h · c | k_rope] and v_h = W_uv_h · c,

    q_h · k_h = (q_nope_h · W_uk_h) · c + q_rope_h · k_rope      softmax(...) · v_h = W_uv_h · (softmax(...) · c)

so every head attends to the same 576-dim latent row per token (`sparse_mla_attention`) and the per-head values
come from one small matmul after it. W_uk and W_uv are cut out of `kv_b_proj` once, when the forward is installed;
an FP8 block-quantised `kv_b_proj` (transformers' `FP8Linear`: float8 weight + `weight_scale_inv` per block) is
dequantised there.

`absorbed_attention(model, arch)` installs the forward on every layer for the duration of a `with` block; the
layer's indexer (an `index_sharing` switch on F and S layers) still decides the indices. transformers' own KV cache
is refused; with one `runtime.decode.LatentCache` per layer (`caches=`) the new tokens' latent rows are appended to
it and attention reads every cached row: decode, or a prefill that fills the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import IndexCacheError
from ..models import DsaArchitecture

# Query rows (all sequences together) per sparse-attention call: bounds the latent query/output tensors
# ([rows, H, 512] each) to 1 GiB in bf16, whatever the window length. A chunk is still ≥ 8K queries at 128 heads
# (≥ 16K kernel programs).
_QUERY_CHUNK_ELEMENTS = 2**29


@dataclass(frozen=True)
class _Family:
    rope: Callable  # the attention's RoPE (both families rotate interleaved pairs in the MLA attention)
    returns_indices: bool  # glm_moe_dsa layers return (output, weights, top-k indices)


def _families() -> dict[str, _Family]:
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as dsv
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as glm

    return {
        "glm_moe_dsa": _Family(glm.apply_rotary_pos_emb_interleave, returns_indices=True),
        "deepseek_v32": _Family(dsv.apply_rotary_pos_emb_interleave, returns_indices=False),
    }


def supports(arch: DsaArchitecture) -> bool:
    """Whether `absorbed_attention` knows this family's attention layer."""
    return arch.model_type in _families()


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """A linear layer's weight [out, in] in fp32, dequantised when it is transformers' fine-grained FP8.

    FP8: `weight` float8 [out, in] and `weight_scale_inv` fp32 (or UE8M0) [ceil(out/b0), ceil(in/b1)] for
    `block_size` (b0, b1), or one scale (per-tensor); the real weight is weight · scale of its block.
    """
    weight = linear.weight
    scale = getattr(linear, "weight_scale_inv", None)
    if scale is None:
        return weight.detach().float()
    if not weight.is_floating_point() or weight.element_size() != 1:
        raise IndexCacheError(f"cannot absorb a {weight.dtype} quantised kv_b_proj; only FP8 block scales are known")
    weight, scale = weight.detach().float(), scale.detach().float()
    block = getattr(linear, "block_size", None)
    if scale.numel() == 1:
        return weight * scale.reshape(())
    if block is None:
        raise IndexCacheError("FP8 kv_b_proj has block scales but no block_size")
    rows, cols = weight.shape
    per_element = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight * per_element


@dataclass(frozen=True)
class AbsorbedWeights:
    """One layer's `kv_b_proj` split per head: w_uk [H, nope, Dc] (keys), w_uv [H, Dv, Dc] (values)."""

    w_uk: torch.Tensor
    w_uv: torch.Tensor

    @classmethod
    def of(cls, attn: nn.Module) -> AbsorbedWeights:
        nope, v_dim = attn.qk_nope_head_dim, attn.v_head_dim
        dtype = attn.kv_a_layernorm.weight.dtype  # the activations' dtype; norms are never quantised
        kv_b = dense_weight(attn.kv_b_proj).view(attn.num_heads, nope + v_dim, attn.kv_lora_rank)
        return cls(kv_b[:, :nope].to(dtype).contiguous(), kv_b[:, nope:].to(dtype).contiguous())


def absorbed_forward(
    attn: nn.Module,
    weights: AbsorbedWeights,
    family: _Family,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache=None,
    position_ids: torch.Tensor | None = None,
    prev_topk_indices: torch.Tensor | None = None,
    latent_cache=None,
    **kwargs,
):
    """The attention layer's forward with the absorbed latent kernel: hidden [B, S, hidden] -> [B, S, hidden].

    Same projections, norms and RoPE as transformers' layer; the indices come from the layer's indexer (or, on a
    stock glm_moe_dsa "shared" layer, `prev_topk_indices`). With `latent_cache` (a `LatentCache` holding T0
    earlier tokens) the S new tokens are positions T0 … T0 + S - 1: their latent rows join the cache, attention
    reads all T0 + S rows, and the indexer receives the cache as its `cache`. Returns what the family's layer
    returns.
    """
    from ..kernels.sparse_attention import sparse_mla_attention

    if cache is not None:
        raise IndexCacheError("absorbed MLA attention keeps its own latent cache; call the model with use_cache=False")
    batch, seq_len, _ = hidden_states.shape
    n_heads, nope, rope_dim = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
    latent_dim, v_dim = attn.kv_lora_rank, attn.v_head_dim

    q_resid = attn.q_a_layernorm(attn.q_a_proj(hidden_states))
    q_nope, q_rot = attn.q_b_proj(q_resid).view(batch, seq_len, n_heads, -1).split([nope, rope_dim], dim=-1)
    kv_pass, k_rot = attn.kv_a_proj_with_mqa(hidden_states).split([latent_dim, rope_dim], dim=-1)
    kv_latent = attn.kv_a_layernorm(kv_pass).contiguous()  # [B, T, Dc]: keys and values of every head
    cos, sin = position_embeddings
    q_rot, k_rot = family.rope(q_rot, k_rot.view(batch, seq_len, 1, rope_dim), cos, sin, unsqueeze_dim=2)
    k_rot = k_rot.squeeze(2).contiguous()  # [B, T, Dr]
    first_position = 0
    if latent_cache is not None:
        first_position = latent_cache.length
        kv_latent, k_rot = latent_cache.append(kv_latent, k_rot)

    if attn.indexer is not None:
        mask = attention_mask[:, 0, :, :] if attention_mask is not None else None
        indices = attn.indexer(hidden_states, q_resid, position_embeddings, mask, position_ids, cache=latent_cache)
    elif prev_topk_indices is not None:
        indices = prev_topk_indices
    else:
        raise IndexCacheError(f"layer {attn.layer_idx} shares top-k indices but no earlier layer passed any")
    # A stock indexer fills rows with fewer than k visible keys with future ones, which its masked attention then
    # hides; the sparse kernel attends to every index it gets, so drop them: the query at position i sees keys j ≤ i.
    query_pos = first_position + torch.arange(seq_len, device=indices.device)[None, :, None]
    indices = torch.where(indices <= query_pos, indices, -1)

    out = hidden_states.new_empty(batch, seq_len, n_heads * v_dim)
    q_rows = q_nope.reshape(batch * seq_len, n_heads, nope)  # views: (b, s) rows, b major
    out_rows = out.view(batch * seq_len, n_heads, v_dim)
    for b0, b1, s0, s1 in _query_blocks(batch, seq_len, max(1, _QUERY_CHUNK_ELEMENTS // (n_heads * latent_dim))):
        rows = slice(b0 * seq_len + s0, (b1 - 1) * seq_len + s1)
        q_latent = q_nope.new_empty(b1 - b0, s1 - s0, n_heads, latent_dim)
        _per_head_matmul(q_rows[rows], weights.w_uk, q_latent.view(-1, n_heads, latent_dim))
        latent_out = sparse_mla_attention(
            q_latent,
            q_rot[b0:b1, s0:s1].contiguous(),
            kv_latent[b0:b1],
            k_rot[b0:b1],
            indices[b0:b1, s0:s1],
            attn.scaling,
        )  # [b1 - b0, s1 - s0, H, Dc]
        _per_head_matmul(latent_out.reshape(-1, n_heads, latent_dim), weights.w_uv.transpose(1, 2), out_rows[rows])
    output = attn.o_proj(out)
    return (output, None, indices) if family.returns_indices else (output, None)


def _query_blocks(batch: int, seq_len: int, max_rows: int) -> list[tuple[int, int, int, int]]:
    """(b0, b1, s0, s1) blocks of at most `max_rows` query rows, each a contiguous run of the b-major (b, s) rows:
    whole sequences when one fits, else pieces of one sequence."""
    if max_rows >= seq_len:
        per = max_rows // seq_len
        return [(b, min(batch, b + per), 0, seq_len) for b in range(0, batch, per)]
    return [(b, b + 1, s, min(seq_len, s + max_rows)) for b in range(batch) for s in range(0, seq_len, max_rows)]


def _per_head_matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out[n, h] = x[n, h] @ w[h] for every row n and head h: one batched matmul over the heads that reads x and
    writes out through head-major views (row stride H · width), so neither is permuted into a copy the way
    `einsum` does (≈ 10 ms a GLM-5 layer at 128K). x: [N, H, I] (unit last stride), w: [H, I, O], out: [N, H, O]."""
    torch.bmm(x.transpose(0, 1), w, out=out.transpose(0, 1))


@contextmanager
def absorbed_attention(
    model: nn.Module, arch: DsaArchitecture, enabled: bool = True, caches: list | None = None
) -> Iterator[bool]:
    """Every DSA attention layer of `model` runs `absorbed_forward` inside the block; the stock forward after it.
    `caches`: one `LatentCache` per layer, or None (prefill without a cache).

    Yields whether it installed anything: nothing when disabled or when the family is not one it knows (then
    the registered sparse attention over transformers' expanded keys keeps working as before).
    """
    families = _families()
    if not enabled or arch.model_type not in families:
        yield False
        return
    family = families[arch.model_type]
    attns = [arch.attention(layer) for layer in arch.layers(model)]
    try:
        for i, attn in enumerate(attns):
            latent_cache = None if caches is None else caches[i]
            attn.forward = partial(absorbed_forward, attn, AbsorbedWeights.of(attn), family, latent_cache=latent_cache)
        yield True
    finally:
        for attn in attns:
            attn.__dict__.pop("forward", None)
