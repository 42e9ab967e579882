"""A layer-by-layer forward over a DSA model's own modules, and the calibration loss.

Running the decoder stack one layer at a time (exactly as `GlmMoeDsaModel.forward` / `DeepseekV32Model.forward`
do, with `use_cache=False`) lets the search start a forward at any layer from cached hidden states. Tests
check that it reproduces the stock model's loss. What differs between families (hyper-connection streams,
state shared across layers, logit soft-capping) comes from the adapter's data, never from a family name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import KVSharingDict
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..models import DsaArchitecture

# fp32 logits are materialised at most this many at a time ([tokens, vocab slice]), and the head weight is
# converted to fp32 a slice of at most this many elements at a time.
LOGIT_CHUNK_ELEMENTS = 2**26
VOCAB_SLICE_ELEMENTS = 2**26


@dataclass
class LayerInputs:
    """What every decoder layer of one batch receives besides the hidden states.

    Attributes:
        position_embeddings: (cos, sin), each [B, S, rope_dim]; by layer type where layers differ; None without
            positional encoding (glm5_next).
        position_ids: [1, S].
        attention_mask: the model's causal mask ([B, 1, S, S] on the eager/sdpa paths), or the bool [B, S] token
            mask of `layer_mask="token_valid"`; by layer type where layers differ (dots3_note's sliding-window
            layers).
        layer_types: each layer's key into the two dicts above, or None when every layer takes the same.
        extra: the window's token ids [B, S] under each name in `arch.token_id_inputs` (deepseek_v4's hash-routed
            MoE reads `input_ids`, qwen4_exp's per-layer embeddings `ple_input_ids`).
    """

    position_embeddings: tuple[torch.Tensor, torch.Tensor] | dict[str, tuple[torch.Tensor, torch.Tensor]] | None
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | dict[str, torch.Tensor] | None
    layer_types: list[str] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def for_layer(self, layer_idx: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """(position_embeddings, attention_mask) for one layer."""
        if self.layer_types is None:
            return self.position_embeddings, self.attention_mask
        layer_type = self.layer_types[layer_idx]
        return self.position_embeddings[layer_type], self.attention_mask[layer_type]


# State that layers pass to later layers besides the hidden states, or None: transformers' KVSharingDict, the
# container mistral_large4's layers fill with the latent KV that later layers reuse (`kv_source_layers`).
LayerState = KVSharingDict | None


class LayerwiseModel:
    """Embed → decoder layers [start, stop) → norm → chunked next-token NLL, on the model's own modules."""

    def __init__(self, model: nn.Module, arch: DsaArchitecture):
        self.model = model
        self.arch = arch
        self.base = arch.base_model(model)
        self.layers = arch.layers(model)
        self.num_layers = len(self.layers)
        self.streams = getattr(self.base.config, arch.hidden_streams) if arch.hidden_streams else None

    @property
    def hidden_values_per_token(self) -> int:
        """Values of one token's hidden state between layers (hidden_size × hyper-connection streams)."""
        return self.base.config.hidden_size * (self.streams or 1)

    def new_layer_state(self) -> LayerState:
        """Empty cross-layer state for a forward from layer 0 (None when the family shares none)."""
        return KVSharingDict() if self.arch.shared_state else None

    @staticmethod
    def snapshot(layer_state: LayerState) -> LayerState:
        """What `layer_state` holds now. Later layers add or replace entries (mistral_large4's KV-source layers)
        but never write into a tensor, so a shallow copy keeps this moment's state."""
        return None if layer_state is None else KVSharingDict(dict(layer_state))

    @property
    def input_device(self) -> torch.device:
        """The device of the first weights held: the embeddings' (a pipeline stage leaves others' on `meta`)."""
        return next(p.device for p in self.base.parameters() if not p.is_meta)

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, LayerInputs]:
        """input_ids: [B, S] → hidden [B, S, D] ([B, S, n, D] with n hyper-connection streams, [B, S, n·D] where
        they lie flat) and the per-batch layer inputs."""
        input_ids = input_ids.to(self.input_device)
        hidden = self.base.embed_tokens(input_ids)
        inputs = self._layer_inputs(input_ids, hidden)
        if self.streams:
            hidden = hidden.unsqueeze(2).expand(-1, -1, self.streams, -1)
            hidden = (hidden.flatten(2) if self.arch.flat_streams else hidden).contiguous()
        return hidden, inputs

    def layer_inputs(self, input_ids: torch.Tensor) -> LayerInputs:
        """The per-batch layer inputs of `embed` without the embedding table (a pipeline stage after the first
        holds none): masks and rotary tables need only the embeddings' shape, dtype and device."""
        input_ids = input_ids.to(self.input_device)
        like = torch.zeros((), dtype=self.model.dtype, device=self.input_device)
        return self._layer_inputs(input_ids, like.expand(*input_ids.shape, self.base.config.hidden_size))

    def _layer_inputs(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> LayerInputs:
        position_ids = torch.arange(input_ids.shape[1], device=hidden.device).unsqueeze(0)
        if self.arch.inputs_by_layer_type:
            inputs = self._inputs_by_layer_type(hidden, position_ids)
        else:
            mask = self._layer_mask(hidden, position_ids)
            inputs = LayerInputs(self._rotary(hidden, position_ids), position_ids, mask)
        inputs.extra = {name: input_ids for name in self.arch.token_id_inputs}
        return inputs

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """None (no positional encoding), one (cos, sin) table, or {label: (cos, sin)} for the adapter's
        `rotary_labels` (layers pick theirs)."""
        if not self.arch.rotary:
            return None
        axes = self.arch.rotary_position_axes
        positions = position_ids if axes is None else position_ids[None].expand(axes, hidden.shape[0], -1)
        if not self.arch.rotary_labels:
            return self.base.rotary_emb(hidden, position_ids=positions)
        return {
            label: self.base.rotary_emb(hidden, position_ids=positions, layer_type=label)
            for label in self.arch.rotary_labels
        }

    def _layer_mask(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor | None:
        if self.arch.layer_mask == "token_valid":  # unpadded windows: every token is real
            return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask_fn = create_sliding_window_causal_mask if self.arch.layer_mask == "sliding" else create_causal_mask
        return self._mask(mask_fn, hidden, position_ids)

    def _mask(self, mask_fn, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor | None:
        return mask_fn(
            config=self.base.config,
            inputs_embeds=hidden,
            attention_mask=None,
            cache=None,
            position_ids=position_ids,
            allow_is_causal_skip=False,  # the indexer needs causality spelled out, as in the stock model
        )

    def _inputs_by_layer_type(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> LayerInputs:
        """One mask and one rotary table per layer type, as the model's own forward builds them."""
        layer_types = list(self.base.config.layer_types)
        masks, rotary = {}, {}
        for layer_type in set(layer_types):
            sliding = layer_type == "sliding_attention"
            masks[layer_type] = self._mask(
                create_sliding_window_causal_mask if sliding else create_causal_mask, hidden, position_ids
            )
            x = hidden.float() if layer_type in self.arch.fp32_rotary_layer_types else hidden
            rotary[layer_type] = self.base.rotary_emb(x, position_ids, layer_type)
        return LayerInputs(rotary, position_ids, masks, layer_types)

    def run_layers(
        self, hidden: torch.Tensor, inputs: LayerInputs, start: int, stop: int, layer_state: LayerState = None
    ) -> torch.Tensor:
        """hidden: [B, S, D] entering layer `start` → hidden entering layer `stop`.

        layer_state: the cross-layer state entering `start` (filled in place); None starts a fresh one, which only
            layer 0 may do."""
        extra = dict(inputs.extra)
        if self.arch.shared_state:
            if layer_state is None and start > 0:
                raise ValueError(f"layer {start} needs the {self.arch.shared_state} that earlier layers left")
            extra[self.arch.shared_state] = self.new_layer_state() if layer_state is None else layer_state
        for layer_idx in range(start, stop):
            position_embeddings, attention_mask = inputs.for_layer(layer_idx)
            out = self.layers[layer_idx](
                hidden,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                position_ids=inputs.position_ids,
                cache=None,
                use_cache=False,
                **extra,
            )
            # glm_moe_dsa layers also return their top-k; our patch passes indices through its own buffer.
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def nll_sum(self, hidden: torch.Tensor, input_ids: torch.Tensor, first_label: int = 1) -> torch.Tensor:
        """Summed next-token NLL per sequence, fp64 [B], from the last layer's output hidden [B, S, D].

        Scores the tokens at positions `first_label` .. S-1 (a window's prefix tokens, e.g. BOS, are not scored).
        The LM head runs in fp32 (candidates differ by less than bf16 logits' rounding), a slice of tokens and of
        the vocabulary at a time, so neither [S, vocab] logits nor an fp32 copy of the head is ever held.
        """
        if self.arch.streams_head:
            hidden = getattr(self.base, self.arch.streams_head)(hidden)
        if self.arch.final_norm:
            hidden = getattr(self.base, self.arch.final_norm)(hidden)
        head = self.model.get_output_embeddings()
        softcap = getattr(self.model, self.arch.logit_softcap) if self.arch.logit_softcap else None
        hidden = hidden.to(head.weight.device)
        labels = input_ids.to(hidden.device)[:, first_label:]
        hidden = hidden[:, first_label - 1 : -1]
        batch = labels.shape[0]
        nll = fp32_head_nll(hidden.flatten(0, 1), labels.flatten(), head.weight, head.bias, softcap)
        return nll.view(batch, -1).sum(-1, dtype=torch.float64).cpu()


def fp32_head_nll(
    hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias=None, softcap: float | None = None
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T (+ bias)` (soft-capped: tanh(x / c) · c) against `labels`, fp32 [N],
    computed in fp32 throughout.

    hidden: [N, D] (any dtype), labels: int [N], weight: [V, D]. The log-sum-exp is combined over vocabulary
    slices of VOCAB_SLICE_ELEMENTS weights; token chunks keep logits to LOGIT_CHUNK_ELEMENTS.
    """
    vocab, dim = weight.shape
    v_step = max(1, min(vocab, VOCAB_SLICE_ELEMENTS // dim))
    t_step = max(1, LOGIT_CHUNK_ELEMENTS // v_step)
    out = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
    for t0 in range(0, labels.numel(), t_step):
        h = hidden[t0 : t0 + t_step].float()
        lab = labels[t0 : t0 + t_step]
        log_norm = torch.full(lab.shape, float("-inf"), device=h.device)
        target = torch.zeros(lab.shape, device=h.device)
        for v0 in range(0, vocab, v_step):
            logits = h @ weight[v0 : v0 + v_step].float().T  # [tokens, v_step]
            if bias is not None:
                logits += bias[v0 : v0 + v_step].float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            log_norm = torch.logaddexp(log_norm, torch.logsumexp(logits, -1))
            inside = (lab >= v0) & (lab < v0 + logits.shape[1])
            picked = logits.gather(1, (lab - v0).clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
            target = torch.where(inside, picked, target)
        out[t0 : t0 + t_step] = log_norm - target
    return out
