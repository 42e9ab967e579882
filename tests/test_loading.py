"""Loading checkpoints whose config.json already carries a sharing pattern."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import GlmMoeDsaForCausalLM

from indexcache import api
from indexcache.calib import DataSpec, windows_from_tensor
from indexcache.errors import IndexCacheError
from indexcache.models import load_model, loading, open_checkpoint
from indexcache.runtime.patch import index_sharing

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


def _shipped_pattern_checkpoint(path, bin_weights: bool = False):
    """A checkpoint that ships pattern FFSSFS: its S layers (2, 3, 5) carry no indexer weights."""
    torch.manual_seed(0)
    model = GlmMoeDsaForCausalLM(glm_config(index_topk_pattern="FFSSFS"))
    if bin_weights:
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        model.save_pretrained(path)
    return path


def _assert_only_layers_with_weights_can_be_full(loaded):
    assert loaded.indexer_layers == [0, 1, 4]
    assert [layer.self_attn.indexer is not None for layer in loaded.model.model.layers] == [1, 1, 0, 0, 1, 0]
    with index_sharing(loaded.model, loaded.arch) as sharing, pytest.raises(IndexCacheError, match=r"\[2\]"):
        sharing.pattern = "FFFSFS"


def test_bin_checkpoint_is_checked_for_indexer_weights(tmp_path):
    path = _shipped_pattern_checkpoint(tmp_path, bin_weights=True)
    assert not list(path.glob("*.safetensors"))
    assert open_checkpoint(str(path)).indexer_layers == [0, 1, 4]
    _assert_only_layers_with_weights_can_be_full(load_model(str(path), device="cpu"))


def test_indexers_reported_missing_at_load_cannot_be_full(tmp_path, monkeypatch):
    """Where no weight listing is reachable, transformers' loading report decides after the load."""
    path = _shipped_pattern_checkpoint(tmp_path)
    monkeypatch.setattr(loading, "weight_names", lambda name, local: None)
    assert open_checkpoint(str(path)).indexer_layers == list(range(6))  # assumed before the load
    _assert_only_layers_with_weights_can_be_full(load_model(str(path), device="cpu"))


def test_hub_checkpoint_reads_its_safetensors_listing(monkeypatch):
    import huggingface_hub
    from transformers import AutoConfig

    names = {f"model.layers.{i}.self_attn.indexer.wk.weight" for i in (0, 2)} | {"model.embed_tokens.weight"}
    asked = []

    def listing(repo_id):
        asked.append(repo_id)
        return SimpleNamespace(weight_map=dict.fromkeys(names, "model-00001-of-00001.safetensors"))

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", listing)
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda name, **kw: glm_config(num_layers=4))
    checkpoint = open_checkpoint("someone/glm-dsa")
    assert asked == ["someone/glm-dsa"] and checkpoint.path is None
    assert checkpoint.indexer_layers == [0, 2]
    assert checkpoint.config.indexer_types == ["full", "shared", "full", "shared"]


def test_unreachable_hub_listing_leaves_the_decision_to_the_load(monkeypatch):
    import huggingface_hub

    def offline(repo_id):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", offline)
    assert loading.weight_names("someone/glm-dsa", None) is None


def test_data_is_checked_before_the_weights_load(tmp_path, monkeypatch):
    glm_model(seed=0).save_pretrained(tmp_path / "ckpt")
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "no text column"}\n')

    def never(*args, **kwargs):
        raise AssertionError("weights loaded before the data was checked")

    monkeypatch.setattr(api, "load_weights", never)
    with pytest.raises(IndexCacheError, match="no column 'text'"):
        api.search(str(tmp_path / "ckpt"), data=DataSpec(dataset=str(data)), output=tmp_path / "p.json")
    with pytest.raises(IndexCacheError, match="not longer than the model's index_topk"):
        api.search(str(tmp_path / "ckpt"), data=windows_from_tensor(random_ids(2, 8)), output=tmp_path / "p.json")
