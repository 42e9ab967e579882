"""The calibration loss is exact: an fp32 LM head, not bf16 logits, so candidate gaps are not rounding noise."""

from __future__ import annotations

import pytest
import torch

from indexcache.models import architecture_for
from indexcache.runtime import forward
from indexcache.runtime.forward import LayerwiseModel
from indexcache.runtime.patch import index_sharing

from tiny_models import glm_model, random_ids

ARCH = architecture_for("glm_moe_dsa")


def _final_hidden(model, ids):
    lw = LayerwiseModel(model, ARCH)
    with torch.no_grad(), index_sharing(model, ARCH):
        hidden, inputs = lw.embed(ids)
        return lw, lw.run_layers(hidden, inputs, 0, lw.num_layers)


def _fp64_nll(lw, hidden, ids, first_label=1):
    """The definition: the model's own final norm, then head and cross-entropy in fp64."""
    with torch.no_grad():
        normed = lw.base.norm(hidden).double()
        logits = normed @ lw.model.get_output_embeddings().weight.double().T
        logp = torch.log_softmax(logits[:, first_label - 1 : -1], -1)
        return -logp.gather(-1, ids[:, first_label:, None]).squeeze(-1).sum(-1)


@pytest.mark.parametrize(
    "vocab_slice,token_chunk",
    [(2**26, 2**26), (48 * 7, 7 * 5)],  # one slice; odd slices of 7 vocabulary rows and 5 tokens
    ids=["whole", "sliced"],
)
def test_bf16_model_loss_matches_fp64_head(monkeypatch, vocab_slice, token_chunk):
    monkeypatch.setattr(forward, "VOCAB_SLICE_ELEMENTS", vocab_slice)
    monkeypatch.setattr(forward, "LOGIT_CHUNK_ELEMENTS", token_chunk)
    model = glm_model(seed=3).to(torch.bfloat16)
    ids = random_ids(2, 57, seed=3)
    lw, hidden = _final_hidden(model, ids)
    assert hidden.dtype == torch.bfloat16
    with torch.no_grad():
        ours = lw.nll_sum(hidden, ids)
    exact = _fp64_nll(lw, hidden, ids)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, exact, rtol=1e-6, atol=0)


def test_prefix_positions_are_not_scored():
    model = glm_model(seed=4)
    ids = random_ids(2, 33, seed=4)
    lw, hidden = _final_hidden(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(
            lw.nll_sum(hidden, ids, first_label=3), _fp64_nll(lw, hidden, ids, 3), rtol=1e-6, atol=0
        )
        assert not torch.allclose(lw.nll_sum(hidden, ids, first_label=3), lw.nll_sum(hidden, ids))
