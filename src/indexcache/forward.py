"""A layer-by-layer forward over a DSA model's own modules, and the calibration loss.

Running the decoder stack one layer at a time (exactly as `GlmMoeDsaModel.forward` / `DeepseekV32Model.forward`
do, with `use_cache=False`) lets the search start a forward at any layer from cached hidden states. Tests
check that it reproduces the stock model's loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from .models import DsaArchitecture

# fp32 logits are materialised at most this many at a time ([tokens, vocab slice]), and the head weight is
# converted to fp32 a slice of at most this many elements at a time.
LOGIT_CHUNK_ELEMENTS = 2**26
VOCAB_SLICE_ELEMENTS = 2**26


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


class LayerwiseModel:
    """Embed → decoder layers [start, stop) → norm → chunked next-token NLL, on the model's own modules."""

    def __init__(self, model: nn.Module, arch: DsaArchitecture):
        self.model = model
        self.arch = arch
        self.base = arch.base_model(model)
        self.layers = arch.layers(model)
        self.num_layers = len(self.layers)

    @property
    def input_device(self) -> torch.device:
        return self.base.embed_tokens.weight.device

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, LayerInputs]:
        """input_ids: [B, S] → hidden [B, S, D] and the per-batch layer inputs."""
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
        return hidden, LayerInputs(self.base.rotary_emb(hidden, position_ids=position_ids), position_ids, mask)

    def run_layers(self, hidden: torch.Tensor, inputs: LayerInputs, start: int, stop: int) -> torch.Tensor:
        """hidden: [B, S, D] entering layer `start` → hidden entering layer `stop`."""
        for layer in self.layers[start:stop]:
            out = layer(
                hidden,
                attention_mask=inputs.attention_mask,
                position_embeddings=inputs.position_embeddings,
                position_ids=inputs.position_ids,
                cache=None,
                use_cache=False,
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
        hidden = self.base.norm(hidden)
        head = self.model.get_output_embeddings()
        hidden = hidden.to(head.weight.device)
        labels = input_ids.to(hidden.device)[:, first_label:]
        hidden = hidden[:, first_label - 1 : -1]
        batch = labels.shape[0]
        nll = fp32_head_nll(hidden.flatten(0, 1), labels.flatten(), head.weight, head.bias)
        return nll.view(batch, -1).sum(-1, dtype=torch.float64).cpu()


def fp32_head_nll(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, fp32 [N], computed in fp32 throughout.

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
            log_norm = torch.logaddexp(log_norm, torch.logsumexp(logits, -1))
            inside = (lab >= v0) & (lab < v0 + logits.shape[1])
            picked = logits.gather(1, (lab - v0).clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
            target = torch.where(inside, picked, target)
        out[t0 : t0 + t_step] = log_norm - target
    return out
