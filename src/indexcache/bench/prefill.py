"""`indexcache bench`: prefill time per layer of a checkpoint's own layer shapes for all-F, a pattern and the
uniform interleave with the same F count, through the product's path (`kernels_installed` + `LayerwiseModel`).

By default K decoder layers are built from the checkpoint's config with random weights (nothing is loaded, so
a 700B model's layers can be timed on one GPU), each with the model's own MoE (`mlp="moe"`: a random router
spreads the tokens about evenly over the experts, as trained load-balanced routers do) or the config's dense MLP
(`mlp="dense"`). `weights=True` loads the real first K layers as the checkpoint has them. A layer's cost depends
only on whether it is F or S, so the F-layer and S-layer times are measured on the K layers (all-F, then F
followed by S) and a pattern of N layers costs nF·t_F + nS·t_S; when K covers the whole model each pattern is
timed as it is instead. With `mlp="moe"` the model's few dense layers (GLM-5's first 3 of 78) count as MoE layers.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import IndexCacheError
from ..models import DsaArchitecture, architecture_for
from ..patterns.layout import full_layers, num_full_for_ratio, uniform, validate
from ..runtime.backends import kernels_installed
from ..runtime.forward import LayerwiseModel

VOCAB = 1024  # embeddings are not timed; a small table keeps random-weight builds light


@dataclass
class LayerStack:
    model: nn.Module
    arch: DsaArchitecture
    num_layers: int  # indexer layers of the real model (N, `timed_layers`); the stack holds K of them
    mlp: str  # "moe", "dense" (random weights) or "checkpoint" (the checkpoint's own first K layers)


def timed_layers(config) -> list[int]:
    """The layers of `config`'s model whose cost a pattern changes: the indexer layers. Where only some layers
    have one (the hybrids' linear-attention layers, dots3_note's sliding-window ones) the others cost the same under
    every pattern; the stack then holds indexer layers only and the rows count those."""
    return architecture_for(getattr(config, "model_type", None)).dsa_layer_ids(config.get_text_config())


def has_moe(config) -> bool:
    """Whether the model has MoE layers (a config without `mlp_layer_types` builds its layers as it says)."""
    return "sparse" in (getattr(config.get_text_config(), "mlp_layer_types", None) or [])


def stack_config(config, num_layers: int, mlp: str = "moe"):
    """The checkpoint's config cut to `num_layers` layers, every layer with its indexer and the MLP `mlp` names:
    "moe" (a model with MoE layers gets MoE on all K), "dense", or "checkpoint" (as the config says).

    A vision-language config keeps its vision tower (never timed) and its text config is cut."""
    arch = architecture_for(getattr(config, "model_type", None))
    config = copy.deepcopy(config)
    text = config.get_text_config()
    if arch.dsa_layers is not None:
        attribute, value = arch.dsa_layers
        setattr(text, attribute, [value] * num_layers)
    text.num_hidden_layers = num_layers
    text.vocab_size = VOCAB
    if (getattr(text, "pad_token_id", None) or 0) >= VOCAB:  # glm5_next pads with id 154820
        text.pad_token_id = None
    text.max_position_embeddings = max(getattr(text, "max_position_embeddings", 0), 2**18)
    if mlp == "dense":
        text.first_k_dense_replace = num_layers
        text.mlp_layer_types = ["dense"] * num_layers
    elif mlp == "moe" and has_moe(config):
        text.first_k_dense_replace = 0
        text.mlp_layer_types = ["sparse"] * num_layers
    for attr in ("index_topk_pattern", "index_topk_freq"):
        if hasattr(text, attr):
            setattr(text, attr, None)
    if hasattr(text, "indexer_types"):
        text.indexer_types = ["full"] * num_layers
    return config


def build_stack(
    config,
    num_layers: int,
    device: torch.device,
    dtype: torch.dtype,
    weights_from: str | None = None,
    mlp: str = "moe",
) -> LayerStack:
    """K layers of `config`'s model: random weights with the MLP `mlp` names, or the checkpoint's first K layers."""
    import transformers

    arch = architecture_for(getattr(config, "model_type", None))
    auto_class = getattr(transformers, arch.auto_class)
    full_layers_count = len(timed_layers(config))
    if weights_from is None:
        mlp = mlp if has_moe(config) else "dense"  # what was built: a dense model keeps its dense MLPs
        small = stack_config(config, num_layers, mlp)
        small._attn_implementation = "eager"
        torch.manual_seed(0)
        with torch.device(device):
            model = auto_class.from_config(small, dtype=dtype)
    else:
        mlp = "checkpoint"
        small = stack_config(config, num_layers, mlp)
        small.get_text_config().vocab_size = config.get_text_config().vocab_size
        model = auto_class.from_pretrained(
            weights_from, config=small, dtype=dtype, device_map=str(device), attn_implementation="eager"
        )
    return LayerStack(model.to(device).eval(), arch, full_layers_count, mlp)


class _Split:
    """CUDA-event (or wall-clock) time spent inside the indexer switches and the attention modules."""

    def __init__(self, stack: LayerStack, cuda: bool):
        self.cuda = cuda
        self.spans: dict[str, list] = {"indexer": [], "attention": []}
        self.handles = []
        for layer in stack.arch.layers(stack.model):
            attn = stack.arch.attention(layer)
            self._hook(attn, "attention")
            self._hook(stack.arch.indexer(layer), "indexer")

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _hook(self, module: nn.Module, label: str) -> None:
        def pre(*_):
            module._bench_start = self._now()

        def post(*_):
            self.spans[label].append((module._bench_start, self._now()))

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def totals_ms(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        ms = {
            label: sum(a.elapsed_time(b) if self.cuda else (b - a) * 1e3 for a, b in spans)
            for label, spans in self.spans.items()
        }
        ms["attention"] -= ms["indexer"]  # the indexer runs inside the attention module
        return ms

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def time_forward(
    stack: LayerStack,
    state,
    seq_len: int,
    device: torch.device,
    pattern: str,
    reps: int,
    after_warmup: Callable[[], None] | None = None,
) -> dict:
    """Median of `reps` timed forwards of the K layers (after one warm-up, which compiles the kernels; then
    `after_warmup` is called) under `pattern`: ms, split, peak GiB."""
    lw = LayerwiseModel(stack.model, stack.arch)
    cuda = device.type == "cuda"
    ids = torch.randint(0, VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    state.pattern = pattern
    hidden, inputs = lw.embed(ids)

    def run():
        return lw.run_layers(hidden, inputs, 0, lw.num_layers)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    run()
    if after_warmup is not None:
        after_warmup()
    times, splits = [], []
    for _ in range(reps):
        split = _Split(stack, cuda)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        splits.append(split.totals_ms())
        split.remove()
    best = sorted(range(reps), key=times.__getitem__)[reps // 2]
    rec = {"ms": times[best], "split_ms": splits[best]}
    rec["split_ms"]["rest"] = rec["ms"] - sum(rec["split_ms"].values())
    rec["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    return rec


def named_patterns(
    num_layers: int, pattern: str | None, ratio: float, indexer_layers: list[int] | None = None
) -> list[tuple[str, str]]:
    """(name, pattern over the M indexer layers, one letter each): all-F, the given N-layer pattern (or the
    uniform one at `ratio`), the uniform interleave. `indexer_layers` None: every layer has an indexer (M = N)."""
    indexer_layers = list(range(num_layers)) if indexer_layers is None else indexer_layers
    m = len(indexer_layers)
    if pattern is not None:
        validate(pattern, num_layers, indexer_layers)
        named = [("pattern", "".join(pattern[i] for i in indexer_layers))]
    else:
        named = []
    n_full = len(full_layers(named[0][1])) if named else num_full_for_ratio(ratio, m)
    return [("all-F", "F" * m), *named, ("uniform", uniform(m, n_full))]


def bench(
    stack: LayerStack,
    contexts: list[int],
    patterns: list[tuple[str, str]],
    device: torch.device,
    kernels: str = "auto",
    reps: int = 3,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per (context, named pattern): ms per layer, tokens/s, peak GiB, speedup vs all-F, projected
    full-model prefill seconds, and the indexer / attention / rest split of the layer time."""
    k, n = len(stack.arch.layers(stack.model)), stack.num_layers
    direct = k >= n
    rows = []
    for seq_len in contexts:
        with (
            torch.inference_mode(),
            kernels_installed(stack.model, stack.arch, device, kernels, seq_len) as (
                state,
                backend,
            ),
        ):
            if direct:
                measured = {p: time_forward(stack, state, seq_len, device, p, reps) for _, p in patterns}
            else:
                if k < 2:
                    raise IndexCacheError("--layers must be at least 2 to time both an F and an S layer")
                all_f = time_forward(stack, state, seq_len, device, "F" * k, reps)
                one_f = time_forward(stack, state, seq_len, device, "F" + "S" * (k - 1), reps)
        context_rows = []
        for name, pattern in patterns:
            n_full = len(full_layers(pattern))
            if direct:
                rec = measured[pattern]
                total_ms, split, peak = rec["ms"], rec["split_ms"], rec["peak_gib"]
            else:
                f_ms, s_ms = all_f["ms"] / k, (one_f["ms"] - all_f["ms"] / k) / (k - 1)
                total_ms = n_full * f_ms + (n - n_full) * s_ms
                split = {
                    part: (n_full * all_f["split_ms"][part] / k)
                    + (n - n_full) * (one_f["split_ms"][part] - all_f["split_ms"][part] / k) / (k - 1)
                    for part in all_f["split_ms"]
                }
                peak = max(x for x in (all_f["peak_gib"], one_f["peak_gib"], -1.0) if x is not None)
                peak = None if peak < 0 else peak
            context_rows.append(
                {
                    "phase": "prefill",
                    "context": seq_len,
                    "name": name,
                    "pattern": pattern,
                    "num_full": n_full,
                    "num_layers": n,
                    "layers_timed": k,
                    "backend": backend,
                    "mlp": stack.mlp,
                    "ms_per_layer": total_ms / n,
                    "split_ms_per_layer": {part: v / n for part, v in split.items()},
                    "tokens_per_s": seq_len / (total_ms / 1e3),
                    "peak_gib": peak,
                    "projected_prefill_s": total_ms / 1e3,
                }
            )
        base = context_rows[0]["projected_prefill_s"]
        for row in context_rows:
            row["speedup_vs_all_f"] = base / row["projected_prefill_s"]
            if on_row:
                on_row(row)
        rows += context_rows
    return rows
