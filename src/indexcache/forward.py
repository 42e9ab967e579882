"""A layer-by-layer forward over a DSA model's own modules, and the calibration loss.

Running the decoder stack one layer at a time (exactly as `GlmMoeDsaModel.forward` / `DeepseekV32Model.forward`
do, with `use_cache=False`) lets the search start a forward at any layer from cached hidden states. Tests
check that it reproduces the stock model's loss. What differs between families (hyper-connection streams,
state shared across layers, logit soft-capping) comes from the adapter's data, never from a family name here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import KVSharingDict
from transformers.masking_utils import create_causal_mask

from .models import DsaArchitecture

# Logits are materialised for at most this many tokens at a time: [chunk, vocab] fp32.
LOGIT_CHUNK_ELEMENTS = 2**26


@dataclass
class LayerInputs:
    """What every decoder layer of one batch receives besides the hidden states.

    Attributes:
        position_embeddings: (cos, sin), each [B, S, rope_dim].
        position_ids: [1, S].
        attention_mask: the model's causal mask ([B, 1, S, S] on the eager/sdpa paths).
    """

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None


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
        return self.base.embed_tokens.weight.device

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, LayerInputs]:
        """input_ids: [B, S] → hidden [B, S, D] ([B, S, n, D] with n hyper-connection streams) and the per-batch
        layer inputs."""
        input_ids = input_ids.to(self.input_device)
        hidden = self.base.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.base.config,
            inputs_embeds=hidden,
            attention_mask=None,
            cache=None,
            position_ids=position_ids,
            allow_is_causal_skip=False,  # the indexer needs causality spelled out, as in the stock model
        )
        inputs = LayerInputs(self.base.rotary_emb(hidden, position_ids=position_ids), position_ids, mask)
        if self.streams:
            hidden = hidden.unsqueeze(2).expand(-1, -1, self.streams, -1).contiguous()
        return hidden, inputs

    def run_layers(
        self, hidden: torch.Tensor, inputs: LayerInputs, start: int, stop: int, layer_state: LayerState = None
    ) -> torch.Tensor:
        """hidden: [B, S, D] entering layer `start` → hidden entering layer `stop`.

        layer_state: the cross-layer state entering `start` (filled in place); None starts a fresh one, which only
            layer 0 may do."""
        extra = {}
        if self.arch.shared_state:
            if layer_state is None and start > 0:
                raise ValueError(f"layer {start} needs the {self.arch.shared_state} that earlier layers left")
            extra[self.arch.shared_state] = self.new_layer_state() if layer_state is None else layer_state
        for layer in self.layers[start:stop]:
            out = layer(
                hidden,
                attention_mask=inputs.attention_mask,
                position_embeddings=inputs.position_embeddings,
                position_ids=inputs.position_ids,
                cache=None,
                use_cache=False,
                **extra,
            )
            # glm_moe_dsa layers also return their top-k; our patch passes indices through its own buffer.
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def nll_sum(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Summed next-token NLL per sequence, fp64 [B], from the last layer's output hidden [B, S, D].

        Logits are formed a chunk of tokens at a time so a long window never holds [S, vocab] at once.
        """
        if self.arch.streams_head:
            hidden = getattr(self.base, self.arch.streams_head)(hidden)
        hidden = self.base.norm(hidden)
        head = self.model.get_output_embeddings()
        softcap = getattr(self.model, self.arch.logit_softcap) if self.arch.logit_softcap else None
        hidden = hidden.to(head.weight.device, head.weight.dtype)  # hy_v4 keeps its LM head in fp32
        labels = input_ids.to(hidden.device)[:, 1:]
        hidden = hidden[:, :-1]
        batch, positions = labels.shape
        chunk = max(1, LOGIT_CHUNK_ELEMENTS // (head.weight.shape[0] * batch))
        total = torch.zeros(batch, dtype=torch.float64, device=hidden.device)
        for s in range(0, positions, chunk):
            logits = head(hidden[:, s : s + chunk]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            nll = F.cross_entropy(logits.flatten(0, 1), labels[:, s : s + chunk].flatten(), reduction="none")
            total += nll.view(batch, -1).sum(-1, dtype=torch.float64)
        return total.cpu()
