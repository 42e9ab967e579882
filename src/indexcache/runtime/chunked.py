"""A long window's MLP in token chunks, so that a 200K-token prefill of a MoE layer fits one GPU.

transformers' MoE experts (`grouped_mm`) hold several [tokens · top-k, hidden] buffers at once: the routed copies
of the hidden states, the expert outputs and, once multiplied by the fp32 router weights, an fp32 copy of those
(37.5 GiB for GLM-5 at 200K tokens, 28 GiB for DeepSeek-V3.2 at 128K: the out-of-memory errors of `bench`). The
MLP works on each token alone, so running it on chunks of positions gives what the whole window gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

MLP_CHUNK_TOKENS = 16384  # GLM-5's fp32 expert buffer at this size: 3 GiB


@contextmanager
def mlp_in_chunks(layers: nn.ModuleList, chunk_tokens: int = MLP_CHUNK_TOKENS) -> Iterator[None]:
    """Inside, each layer's `mlp` (layers without one are left alone) called on hidden states [B, S, D] with
    S > chunk_tokens runs on consecutive chunks of `chunk_tokens` positions, its outputs written into one
    [B, S, D] tensor; other calls (extra arguments, other shapes, outputs that are not [B, s, D] tensors) run
    unchanged. Restores every module on exit."""
    patched = []
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            continue
        own = vars(mlp).get("forward")
        mlp.forward = _chunked(mlp.forward, chunk_tokens)
        patched.append((mlp, own))
    try:
        yield
    finally:
        for mlp, own in patched:
            if own is None:
                del mlp.forward
            else:
                mlp.forward = own


def _chunked(forward, chunk_tokens: int):
    def chunked_forward(hidden_states, *args, **kwargs):
        if args or kwargs or not torch.is_tensor(hidden_states) or hidden_states.dim() != 3:
            return forward(hidden_states, *args, **kwargs)
        if hidden_states.shape[1] <= chunk_tokens:
            return forward(hidden_states)
        parts = [part.contiguous() for part in hidden_states.split(chunk_tokens, 1)]  # MoE views them flat
        first = forward(parts[0])
        if not torch.is_tensor(first) or first.shape != parts[0].shape:
            return forward(hidden_states)  # not a token-wise [B, s, D] -> [B, s, D] module: the whole window
        out = first.new_empty(hidden_states.shape)
        out[:, :chunk_tokens] = first
        for i, part in enumerate(parts[1:], 1):
            out[:, i * chunk_tokens : i * chunk_tokens + part.shape[1]] = forward(part)
        return out

    return chunked_forward
