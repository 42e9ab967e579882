"""`indexcache distill`: training-aware IndexCache. Each F layer's indexer learns to select for every layer it serves.

One step: a no-grad forward of the model under the pattern (S layers reuse the nearest preceding F layer's top-k,
as when served). While it runs, `GroupDistiller` builds each F layer's target from the attention of the layers it
serves, one layer at a time into one running [B, S, k] sum (`distill_target`), and when the next F layer starts
it scores the closing group's indexer at its selected keys on detached inputs and backpropagates the KL into
that indexer alone. Memory holds one group at a time, whatever the number of S layers it serves. Then an AdamW
step on fp32 master copies of the F indexers' weights. Nothing else in the model changes.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .. import defaults
from ..calib import DataSpec, Windows, make_windows
from ..distributed import launched_processes
from ..errors import IndexCacheError
from ..models import DsaArchitecture, LoadedModel, architecture_for, load_model
from ..models.loading import embedded_model_path
from ..patterns import file as pattern_file
from ..patterns.layout import FULL, full_layers
from ..runtime.backends import indexer_inputs, kernel_indexer
from ..runtime.forward import LayerwiseModel
from ..runtime.patch import index_sharing
from .checkpoint import load_state, save_state, state_path, write_checkpoint
from .target import attend_selected, index_scores_at, selected_kl, selected_valid

ATTN_IMPLEMENTATION = "indexcache_distill"
OBJECTIVES = ("multi", "single")

# (step, total steps, {F layer: KL}) after every optimizer step.
StepObserver = Callable[[int, int, dict[int, float]], None]


def served_layers(pattern: str) -> dict[int, list[int]]:
    """{F layer: [the layers that use its selection]}: itself and the S layers up to the next F layer (layers
    before the first F layer have no indexer and belong to no group)."""
    groups: dict[int, list[int]] = {}
    for layer, letter in enumerate(pattern):
        if letter == FULL:
            groups[layer] = []
        if groups:
            groups[max(groups)].append(layer)
    return groups


@dataclass
class _OpenGroup:
    """The F layer whose selection the layers now running use, and its target so far."""

    layer: int
    indexer: nn.Module
    call: tuple[tuple, dict]  # the indexer's own call (hidden states first), tensors detached
    indices: torch.Tensor  # [B, S, k]
    target_sum: torch.Tensor | None = None  # fp32 [B, S, k]: Σ over served layers of head-mean attention
    layers: int = 0


@dataclass
class GroupDistiller:
    """Hooks for one forward under `index_sharing`: `indexer_fn` for F layers, `attention` for every layer.

    objective "multi": each F indexer's target averages all the layers it serves (the paper's multi-layer loss);
    "single": its own layer only. After the forward, `losses` holds {F layer: KL} and the F indexers' `.grad`.
    """

    arch: DsaArchitecture
    objective: str
    layer_of: dict[int, int]  # id(indexer module) -> layer
    open: _OpenGroup | None = None
    losses: dict[int, float] = field(default_factory=dict)

    def indexer_fn(self, indexer, *args, **kwargs):
        """An F layer's selection through the indexer kernel (the product path); opens that layer's group."""
        self.close()
        indices = kernel_indexer(self.arch)(indexer, *args, **kwargs)
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v
        call = (tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()})
        self.open = _OpenGroup(self.layer_of[id(indexer)], indexer, call, indices)
        return indices

    def attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, indices=None, **kwargs):
        """transformers' attention-function contract; attends to `indices` only and adds to the open target."""
        group = self.open
        out, probs = attend_selected(query, key, value, indices, scaling)
        if self.objective == "multi" or module.layer_idx == group.layer:
            probs = probs.to(group.indices.device)
            group.target_sum = probs if group.target_sum is None else group.target_sum + probs
            group.layers += 1
        return out, None

    def close(self) -> None:
        """Score the open group's indexer at its selected keys and backpropagate the KL into it."""
        group, self.open = self.open, None
        if group is None:
            return
        with torch.enable_grad():
            args, kwargs = group.call
            q, k, weights, scale = indexer_inputs(self.arch, group.indexer, *args, **kwargs)
            scores = index_scores_at(q, k, weights, scale, group.indices)
            valid = selected_valid(group.indices, k.shape[1])
            loss = selected_kl(group.target_sum / group.layers, scores, valid)
            if not torch.isfinite(loss):
                raise IndexCacheError(f"the distillation loss of layer {group.layer} is not finite; lower --lr")
            loss.backward()
        self.losses[group.layer] = loss.item()


@contextmanager
def distill_context(loaded: LoadedModel, pattern: str, distiller: GroupDistiller):
    """The F/S patch with the distiller's indexer and attention hooks; restores the model on exit."""
    from ..kernels.wiring import register_sparse_attention

    sparse = register_sparse_attention()  # its O(S) key mask is ours too: no S×T mask is built
    AttentionInterface.register(ATTN_IMPLEMENTATION, distiller.attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS[sparse])
    with index_sharing(loaded.model, loaded.arch, pattern, distiller.indexer_fn, ATTN_IMPLEMENTATION):
        yield


def indexer_parameters(loaded: LoadedModel, layers: list[int]) -> dict[str, nn.Parameter]:
    """{checkpoint tensor name: parameter} of the given layers' indexers."""
    arch, stack = loaded.arch, loaded.arch.layers(loaded.model)
    named = {}
    for layer in layers:
        indexer = arch.indexer(stack[layer])
        for name, param in indexer.named_parameters():
            named[arch.indexer_weight_prefix(layer) + name] = param
    return named


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 10% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, total // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0))))


def _check_options(output: Path, steps: int, lr: float, batch_size: int, save_every: int, objective: str) -> None:
    """Reject bad options before a model is loaded."""
    if steps < 1:
        raise IndexCacheError(f"--steps {steps} must be at least 1")
    if not lr > 0 or not math.isfinite(lr):
        raise IndexCacheError(f"--lr {lr} must be a positive number")
    if batch_size < 1:
        raise IndexCacheError(f"--batch-size {batch_size} must be at least 1")
    if save_every < 1:
        raise IndexCacheError(f"--save-every {save_every} must be at least 1")
    if objective not in OBJECTIVES:
        raise IndexCacheError(f"--objective {objective} is not one of {', '.join(OBJECTIVES)}")
    if output.exists():
        raise IndexCacheError(f"output {output} already exists; choose a new folder")
    parent = output.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not _writable(parent):
        raise IndexCacheError(f"cannot create output {output}: {parent} is not a writable folder")


def _writable(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def training_windows(data_file: dict, spec: DataSpec | None, num_samples: int, tokenizer, eos: int | None) -> Windows:
    """`spec`'s windows, or by default `num_samples` windows of the pattern's calibration source past its
    calibration windows and past the held-out windows `indexcache eval` takes next (as many again), so training
    never sees either."""
    if spec is not None:
        return make_windows(spec, tokenizer, eos)
    calib = data_file.get("calibration")
    fields = ("dataset", "dataset_config", "split", "text_column", "seq_len", "seed")
    if not isinstance(calib, dict) or any(k not in calib for k in (*fields, "num_samples", "window_offset")):
        raise IndexCacheError("the pattern file records no calibration data to train on; pass --dataset")
    default = DataSpec(**{k: calib[k] for k in fields}, num_samples=num_samples)
    return make_windows(default, tokenizer, eos, offset=calib["window_offset"] + 2 * calib["num_samples"])


def distill(
    pattern_path: str | Path,
    output: str | Path,
    steps: int,
    model: str | None = None,
    data: DataSpec | None = None,
    num_samples: int = defaults.DISTILL_NUM_SAMPLES,
    lr: float = defaults.DISTILL_LR,
    batch_size: int = defaults.BATCH_SIZE,
    objective: str = defaults.DISTILL_OBJECTIVE,
    save_every: int = defaults.DISTILL_SAVE_EVERY,
    resume: bool = False,
    dtype: str = defaults.DTYPE,
    device: str = defaults.DEVICE,
    device_map: str | None = None,
    tokenizer: str | None = None,
    observer: StepObserver | None = None,
    log=print,
) -> dict:
    """Train the pattern's F indexers on the multi-layer objective; write the servable checkpoint `output`.

    `data` names the training text; None takes `num_samples` windows of the pattern's calibration source that
    neither its calibration nor `indexcache eval`'s default held-out windows use. Step i trains on windows
    i·batch_size … (cycling). Returns the run's record (also written to `output/indexcache_distill.json`). The
    training state is saved beside `output` every `save_every` steps; `resume=True` continues it to the same
    weights as an uninterrupted run.
    """
    output = Path(output)
    if launched_processes() > 1:
        raise IndexCacheError(
            "distill trains in one process (one GPU, or several with --device-map auto); run it without torchrun"
        )
    _check_options(output, steps, lr, batch_size, save_every, objective)
    if resume and not state_path(output).exists():
        raise IndexCacheError(f"--resume found no saved distillation at {state_path(output)}; run without --resume")
    data_file = pattern_file.read(pattern_path)
    arch = architecture_for(data_file["model"]["model_type"])
    if arch.distill_refusal is not None:
        raise IndexCacheError(f"distill: {arch.distill_refusal}")
    recorded = data_file["model"].get("name")
    if model is None and recorded is None:
        raise IndexCacheError(f"pattern file {pattern_path} names no model; pass --model")
    loaded = load_model(
        model or (None if recorded.startswith("embedded:") else recorded), dtype, device, device_map, tokenizer
    )
    model_dir = embedded_model_path() if loaded.name.startswith("embedded:") else Path(loaded.name)
    if not (model_dir / "config.json").is_file():
        raise IndexCacheError(f"distill rewrites a local checkpoint folder; {model_dir} is not one (download it first)")
    pattern_file.check_matches(data_file, loaded.arch.model_type, loaded.num_layers, loaded.name)
    pattern = data_file["index_topk_pattern"]
    full = full_layers(pattern)
    missing = [f for f in full if f not in loaded.indexer_layers]
    if missing:
        raise IndexCacheError(f"layers {missing} are F in the pattern but have no indexer weights in {model_dir}")
    if data is not None:  # a window length left to the model: max(512, 4 × index_topk)
        data = data.with_model_defaults(getattr(loaded.text_config, "index_topk", None), loaded.tokens_per_entry)
    windows = training_windows(data_file, data, num_samples, loaded.tokenizer, loaded.model.config.eos_token_id)

    # Only the F layers' indexers train; their fp32 master copies are what the optimizer updates.
    for param in loaded.model.parameters():
        param.requires_grad_(False)
    params = indexer_parameters(loaded, full)
    masters = {}
    for name, param in params.items():
        param.requires_grad_(True)
        masters[name] = param if param.dtype == torch.float32 else param.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW(list(masters.values()), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    inputs_key = {
        "pattern": pattern,
        "model_config_sha256": loaded.config_sha256,
        "data_fingerprint": windows.fingerprint,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "objective": objective,
        "dtype": str(loaded.model.dtype),
    }
    start, losses, seconds_before = 0, [], 0.0
    if resume:
        saved = load_state(output)
        if saved["inputs"] != inputs_key:
            changed = [k for k in inputs_key if saved["inputs"].get(k) != inputs_key[k]]
            raise IndexCacheError(f"--resume: saved distillation differs in {', '.join(changed)}; run without --resume")
        with torch.no_grad():
            for name, master in masters.items():
                master.copy_(saved["masters"][name])
                params[name].copy_(master)
        optimizer.load_state_dict(saved["optimizer"])
        start, losses, seconds_before = saved["step"], saved["losses"], saved.get("seconds", 0.0)
        log(f"resuming after step {start} from {state_path(output)}")

    lw = LayerwiseModel(loaded.model, loaded.arch)
    stack = loaded.arch.layers(loaded.model)
    layer_of = {id(loaded.arch.indexer(stack[f])): f for f in full}
    distiller = GroupDistiller(loaded.arch, objective, layer_of)
    num_windows = windows.input_ids.shape[0]
    started = time.perf_counter()
    with distill_context(loaded, pattern, distiller):
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, lr)
            rows = [(step * batch_size + j) % num_windows for j in range(batch_size)]
            distiller.losses = {}
            with torch.no_grad():
                hidden, inputs = lw.embed(windows.input_ids[rows])
                lw.run_layers(hidden, inputs, 0, lw.num_layers)
            distiller.close()
            optimizer_step(params, masters, optimizer)
            losses.append({"step": step + 1, "lr": _lr_at(step, steps, lr), "kl": dict(distiller.losses)})
            if observer is not None:
                observer(step + 1, steps, distiller.losses)
            if (step + 1) % save_every == 0 and step + 1 < steps:
                save_state(
                    output,
                    {
                        "inputs": inputs_key,
                        "step": step + 1,
                        "masters": {n: m.detach().cpu().clone() for n, m in masters.items()},
                        "optimizer": optimizer.state_dict(),
                        "losses": losses,
                        "seconds": seconds_before + time.perf_counter() - started,
                    },
                )
    seconds = seconds_before + time.perf_counter() - started

    groups = served_layers(pattern)
    record = {
        "schema_version": 1,
        "description": (
            f"{loaded.name} with its {len(full)} F indexers distilled on the {objective}-layer objective for "
            f"pattern {pattern}; S layers carry no indexer"
        ),
        "index_topk_pattern": pattern,
        "served_layers": {str(f): layers for f, layers in groups.items()},
        "objective": objective,
        "source_model": {"name": loaded.name, "config_sha256": loaded.config_sha256, "path": str(model_dir)},
        "pattern_file": {"path": str(pattern_path), "calibration_fingerprint": _calib_fingerprint(data_file)},
        "data": windows.describe(),
        "steps": steps,
        "lr": lr,
        "schedule": "AdamW (0.9, 0.95), no weight decay, grad-norm clip 1.0, 10% linear warm-up, cosine to 10%",
        "batch_size": batch_size,
        "tokens": steps * batch_size * windows.input_ids.shape[1],
        "seconds": round(seconds, 3),
        "device": str(lw.input_device),
        "dtype": str(loaded.model.dtype).replace("torch.", ""),
        "versions": pattern_file.library_versions(),
        "losses": losses,
    }
    dropped = [loaded.arch.indexer_weight_prefix(i) for i in range(loaded.num_layers) if i not in full]
    write_checkpoint(model_dir, output, pattern, masters, dropped, data_file, record)
    state_path(output).unlink(missing_ok=True)
    return record


def _calib_fingerprint(data_file: dict) -> str | None:
    calib = data_file.get("calibration")
    return calib.get("fingerprint") if isinstance(calib, dict) else None


def optimizer_step(params: dict[str, nn.Parameter], masters: dict[str, torch.Tensor], optimizer) -> None:
    """Move grads to the fp32 masters, clip, step, and copy the masters back into the model's weights."""
    for name, master in masters.items():
        param = params[name]
        if master is not param:
            master.grad = None if param.grad is None else param.grad.float()
            param.grad = None
    torch.nn.utils.clip_grad_norm_(list(masters.values()), defaults.DISTILL_GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, master in masters.items():
            if master is not params[name]:
                params[name].copy_(master)
