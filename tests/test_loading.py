"""Loading checkpoints whose config.json already carries a sharing pattern."""

from __future__ import annotations

import json

import torch
from transformers import GlmMoeDsaForCausalLM

from indexcache import api
from indexcache.calib import windows_from_tensor
from indexcache.models import load_model

from tiny_models import glm_config, glm_model, random_ids


def test_pattern_in_config_with_all_indexer_weights_loads_every_indexer(tmp_path):
    glm_model(seed=0).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["indexer_types"] = ["full", "shared", "shared", "full", "shared", "shared"]
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.indexer_layers == list(range(6))
    assert all(layer.self_attn.indexer is not None for layer in loaded.model.model.layers)


def test_layers_without_indexer_weights_stay_shared_in_the_search(tmp_path):
    torch.manual_seed(0)
    config = glm_config(index_topk_pattern="FFSSFS")
    GlmMoeDsaForCausalLM(config).save_pretrained(tmp_path)  # S layers are saved without indexer weights

    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.indexer_layers == [0, 1, 4]
    messages = []
    result = api.search(
        str(tmp_path), None, 2, windows_from_tensor(random_ids(2, 24)), tmp_path / "p.json", log=messages.append
    )
    assert any("[2, 3, 5] have no indexer weights" in m for m in messages)
    assert result["model"]["indexer_layers"] == [0, 1, 4]
    assert result["trajectory"][0]["candidates"].keys() == {1, 4}
    assert result["index_topk_pattern"].count("F") == 2 and result["index_topk_pattern"][2:4] == "SS"
