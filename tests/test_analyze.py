"""`analyze`: the overlap matrix and score entropy from one all-F forward, against direct computations."""

from __future__ import annotations

import pytest
import torch
from transformers import GlmMoeDsaForCausalLM

from indexcache import analyze as analyze_module
from indexcache.analyze import analyze_windows, entropy_sums
from indexcache.calib import windows_from_tensor
from indexcache.errors import IndexCacheError
from indexcache.models import load_model
from indexcache.runtime.forward import LayerwiseModel
from indexcache.runtime.patch import index_sharing, reference_indexer
from indexcache.search.scoring import PatternScorer

from tiny_models import glm_config, random_ids

TOPK = 8  # the glm_checkpoint fixture


def selections(loaded, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every layer's stock top-k [W, S, k] with all layers F, recorded around transformers' own indexer."""
    lw = LayerwiseModel(loaded.model, loaded.arch)
    seen: dict[int, list[torch.Tensor]] = {}

    def recording(indexer, *args, **kwargs):
        out = reference_indexer(indexer, *args, **kwargs)
        seen.setdefault(indexer.layer_idx, []).append(out)
        return out

    with torch.inference_mode(), index_sharing(loaded.model, loaded.arch, None, recording):
        for window in ids.split(1):
            hidden, inputs = lw.embed(window)
            lw.run_layers(hidden, inputs, 0, lw.num_layers)
    return {layer: torch.cat(outs) for layer, outs in seen.items()}


def test_overlap_matrix_and_loss_match_a_direct_computation(glm_checkpoint):
    loaded = load_model(str(glm_checkpoint), device="cpu")
    ids = random_ids(3, 40, seed=1)
    analysis, backend = analyze_windows(loaded, windows_from_tensor(ids), batch_size=2, kernels="auto")

    chosen = selections(loaded, ids)
    n = loaded.num_layers
    for i in range(n):
        for j in range(n):
            a, b = chosen[i][:, TOPK:], chosen[j][:, TOPK:]  # positions with more than k candidates
            expected = (b.unsqueeze(-1) == a.unsqueeze(-2)).any(-1).double().mean().item()
            assert analysis.overlap[i][j] == pytest.approx(expected, abs=1e-12)
    off_diagonal = [analysis.overlap[i][j] for i in range(n) for j in range(n) if i != j]
    assert min(off_diagonal) < 0.9 and max(off_diagonal) > 0.1  # random layers select differently, yet overlap
    assert analysis.positions == 3 * (40 - TOPK)
    assert analysis.layer_forwards == 3 * n
    assert backend == "reference"
    with torch.inference_mode(), index_sharing(loaded.model, loaded.arch) as sharing:
        lw = LayerwiseModel(loaded.model, loaded.arch)
        assert analysis.loss_all_full == pytest.approx(
            PatternScorer(lw, sharing, ids).loss("F" * n), rel=1e-6
        )  # batch 2 vs 1
    assert all(0.0 < e < 1.0 for e in analysis.entropy_normalised)


def test_entropy_in_chunks_equals_the_full_softmax(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    q, k, w = torch.randn(2, 30, 3, 8, generator=gen), torch.randn(2, 30, 8, generator=gen), torch.randn(2, 30, 3)
    scores = torch.relu(torch.einsum("bshd,btd->bsht", q, k) * 0.5)
    scores = torch.einsum("bsh,bsht->bst", w, scores)
    causal = torch.ones(30, 30, dtype=torch.bool).tril()
    p = scores.masked_fill(~causal, float("-inf")).softmax(-1)[:, 5:]
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).double()  # [2, 25]
    visible = torch.arange(6, 31, dtype=torch.float64)

    monkeypatch.setattr(analyze_module, "_ENTROPY_CHUNK_ELEMENTS", 2 * 3 * 30 * 4)  # 4 queries a chunk
    nats, normalised = entropy_sums(q, k, w, 0.5, first=5)

    assert nats == pytest.approx(entropy.sum().item(), rel=1e-6)
    assert normalised == pytest.approx((entropy / visible.log()).sum().item(), rel=1e-6)


def test_layers_without_indexer_weights_have_no_row(tmp_path):
    torch.manual_seed(0)
    GlmMoeDsaForCausalLM(glm_config(index_topk_pattern="FFSSFS")).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    analysis, _ = analyze_windows(loaded, windows_from_tensor(random_ids(1, 24)), 1, "auto")
    assert [row[0] is None for row in analysis.overlap] == [False, False, True, True, False, True]
    assert analysis.overlap[0][2] is None and analysis.overlap[1][4] is not None
    assert analysis.entropy[3] is None and analysis.entropy[4] is not None


def test_windows_no_longer_than_top_k_are_refused(glm_checkpoint):
    loaded = load_model(str(glm_checkpoint), device="cpu")
    with pytest.raises(IndexCacheError, match="not above the model's top-k"):
        analyze_windows(loaded, windows_from_tensor(random_ids(1, TOPK)), 1, "auto")
