"""The steps every command takes, in order: the checkpoint's config, the windows (built and checked before any
weight loads, so bad data costs seconds), the weights, then the calibration context around the forwards."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .calib import DataSpec, Windows, check_window_length, make_windows
from .models import Checkpoint, LoadedModel, load_tokenizer
from .runtime.backends import kernels_installed
from .runtime.forward import LayerwiseModel


@contextmanager
def calibration_context(loaded: LoadedModel, kernels: str, seq_len: int | None = None):
    """No grad, eval mode, the F/S patch and the chosen kernels (for windows of `seq_len` tokens), for one model.

    Yields (LayerwiseModel, SharingState, backend name)."""
    lw = LayerwiseModel(loaded.model, loaded.arch)
    with (
        torch.inference_mode(),
        kernels_installed(loaded.model, loaded.arch, lw.input_device, kernels, seq_len) as (
            state,
            backend,
        ),
    ):
        yield lw, state, backend


def calibration_windows(
    checkpoint: Checkpoint, data: DataSpec | Windows, tokenizer: str | None = None, offset: int = 0
) -> Windows:
    """The token windows for `checkpoint`, built and checked before any weight loads.

    The window length defaults from the model (`DataSpec.seq_len=None`); windows in which the indexer keeps
    every key (or compressed entry) are refused, since every pattern would score the same on them.
    """
    if isinstance(data, Windows):
        windows = data
    else:
        spec = data.with_model_defaults(checkpoint.index_topk, checkpoint.tokens_per_entry)
        tok = load_tokenizer(checkpoint, tokenizer, required=tokenizer is not None)
        windows = make_windows(spec, tok, checkpoint.config.get_text_config().eos_token_id, offset=offset)
    check_window_length(windows.input_ids.shape[1], checkpoint.index_topk, checkpoint.tokens_per_entry)
    return windows
