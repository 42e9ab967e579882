"""Helpers shared by the kernel tests and `scripts/bench_kernels.py`: the device the kernels run on (the CPU through
Triton's interpreter when there is no GPU), poisoned outputs, random index rows, the selection check, and a
transformers model wired to the kernels."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import torch

INT_POISON = -(2**31)  # never a key index, never the -1 sentinel
# Reloaded in this order: the decode indexer imports the prefill indexer's select passes.
_KERNEL_MODULES = (
    "indexcache.kernels.indexer.kernel",
    "indexcache.kernels.indexer_decode.kernel",
    "indexcache.kernels.sparse_attention.kernel",
)


def use_triton_interpreter() -> None:
    """Run this package's Triton kernels on the CPU through Triton's interpreter.

    `triton.jit` picks interpreter or compiler when a function is defined, and importing transformers' models
    imports Triton (through torch._dynamo) before a test module can set TRITON_INTERPRET. So: set it, turn the
    already-defined `triton.language` helpers (tl.zeros, tl.sum's combine functions, ...) into interpreted
    functions, and (re)load our kernel modules so that their kernels are defined under the interpreter.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for name, module in list(sys.modules.items()):
        if name == "triton.language" or name.startswith("triton.language."):
            for attr, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    setattr(module, attr, InterpretedFunction(value.fn))
    for name in _KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])


def kernel_device() -> torch.device:
    """Where the kernel and model tests put their tensors: the GPU when there is one (the kernels compiled),
    else the CPU with the kernels under Triton's interpreter (turned on here, before the caller imports them)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    use_triton_interpreter()
    return torch.device("cpu")


@contextmanager
def poisoned_empty() -> Iterator[None]:
    """Inside, `torch.empty` returns NaN-filled floats and INT_POISON-filled integers, so a kernel that skips an
    element of its output (or of a buffer it reads back) leaves a value the checks see."""
    real_empty = torch.empty

    def empty(*size, dtype=None, device=None, **kwargs):
        out = real_empty(*size, dtype=dtype, device=device, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else INT_POISON)

    with mock.patch.object(torch, "empty", empty):
        yield


def random_topk_indices(
    batch: int,
    seq_len: int,
    num_keys: int,
    topk: int,
    generator: torch.Generator,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """int32 [B, S, topk]: per query, up to `topk` distinct visible keys (causal with q_offset = T - S, not padding)
    in random order, the free slots -1 and scattered among them. A stand-in for an indexer's output."""
    q_offset = num_keys - seq_len
    visible = torch.arange(num_keys)[None, None, :] <= (torch.arange(seq_len)[None, :, None] + q_offset)
    visible = visible.expand(batch, seq_len, num_keys)
    if key_mask is not None:
        visible = visible & key_mask[:, None, :].cpu().bool()
    priority = torch.rand(batch, seq_len, num_keys, generator=generator).masked_fill(~visible, -1.0)
    values, keys = priority.topk(min(topk, num_keys), dim=-1)
    out = torch.full((batch, seq_len, topk), -1, dtype=torch.int32)
    out[..., : keys.shape[-1]] = torch.where(values >= 0, keys, -1).to(torch.int32)
    shuffle = torch.rand(batch, seq_len, topk, generator=generator).argsort(dim=-1)
    return out.gather(-1, shuffle)


def selection_report(got: torch.Tensor, scores: torch.Tensor, topk: int) -> dict[str, float | bool]:
    """How an indexer selection `got` (int32 [B, S, topk]) compares with the exact top-k of reference `scores`
    (fp32 [B, S, T], -inf where not visible). Selections may differ only at near-ties:

    * `written`, `counts_ok`, `packed`, `distinct`, `visible`: every element written, min(topk, visible) picks
      per row followed by -1s, no key twice, no key the query may not see;
    * `worst_pick_gap`: max over rows of (reference k-th best - lowest picked score) / max |score| in the row
      (0 or below when every pick is in the exact top k; fp32 reassociation gives ~1e-6);
    * `sum_rel_err`: max over rows of |sum of picked scores - reference top-k sum| / sum of |reference top-k|;
    * `identical_rows`: fraction of rows whose set equals the reference's.
    """
    got, scores = got.long(), scores.float()
    written = bool((got >= -1).all())
    n_visible = torch.isfinite(scores).sum(-1)
    n_want = n_visible.clamp(max=topk)
    picked = got >= 0
    slots = torch.arange(topk, device=got.device)
    sorted_picks = got.sort(-1).values
    dup = (sorted_picks[..., 1:] == sorted_picks[..., :-1]) & (sorted_picks[..., 1:] >= 0)
    picked_scores = scores.gather(-1, got.clamp(min=0)).masked_fill(~picked, 0.0)

    ref_values, ref_keys = scores.topk(min(topk, scores.shape[-1]), dim=-1)
    ref_finite = torch.isfinite(ref_values)
    ref_values = torch.where(ref_finite, ref_values, 0.0)
    kth = ref_values.gather(-1, (n_want - 1).clamp(min=0)[..., None]).squeeze(-1)
    row_scale = scores.masked_fill(~torch.isfinite(scores), 0).abs().amax(-1).clamp(min=1e-30)
    lowest_pick = picked_scores.masked_fill(~picked, float("inf")).amin(-1)
    has_picks = n_want > 0
    gap = ((kth - lowest_pick) / row_scale).masked_fill(~has_picks, float("-inf"))
    sum_err = (picked_scores.sum(-1) - ref_values.sum(-1)).abs() / ref_values.abs().sum(-1).clamp(min=1e-30)
    ref_set = torch.where(ref_finite, ref_keys, -1).sort(-1).values
    got_set = sorted_picks[..., -ref_set.shape[-1] :] if topk >= ref_set.shape[-1] else sorted_picks
    return {
        "written": written,
        "counts_ok": bool(torch.equal(picked.sum(-1), n_want)),
        "packed": bool(torch.equal(picked, slots < n_want[..., None])),
        "distinct": not bool(dup.any()),
        "visible": bool(torch.isfinite(picked_scores).all()),
        "worst_pick_gap": gap.max().item(),
        "sum_rel_err": sum_err.max().item(),
        "identical_rows": (got_set == ref_set).all(-1).float().mean().item(),
    }


def assert_selection_ok(report: dict[str, float | bool], gap: float = 1e-5, sum_rel: float = 1e-3) -> None:
    """The acceptance rule for an indexer selection (see `selection_report`)."""
    for flag in ("written", "counts_ok", "packed", "distinct", "visible"):
        assert report[flag], f"selection check failed: {flag} ({report})"
    assert report["worst_pick_gap"] <= gap, f"a pick is below the k-th best by more than a near-tie ({report})"
    assert report["sum_rel_err"] <= sum_rel, f"picked scores sum too far from the top-k sum ({report})"


@contextmanager
def wired_model(model: torch.nn.Module, rope: str, select=None) -> Iterator[None]:
    """`model` (a GlmMoeDsa/DeepseekV32 ForCausalLM) on the kernels: every stock indexer's forward replaced by
    `select` (default `wiring.indexer_topk`), attention switched to the registered sparse implementation."""
    from . import wiring

    select = wiring.indexer_topk if select is None else select
    indexers = [layer.self_attn.indexer for layer in model.model.layers if layer.self_attn.indexer is not None]
    for indexer in indexers:
        indexer.forward = lambda h, q_resid, pos, mask, position_ids, cache=None, _ix=indexer: select(
            _ix, rope, h, q_resid, pos, _ix.index_topk
        )
    previous = model.config._attn_implementation
    model.set_attn_implementation(wiring.register_sparse_attention())
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        for indexer in indexers:
            del indexer.forward
