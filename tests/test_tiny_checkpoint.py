"""The embedded glm-dsa-tiny checkpoint: stock transformers loads it, it is a DSA model of the promised
shape, and it is trained (its held-out loss meets the bound its model card records)."""

import json
from contextlib import ExitStack
from importlib.resources import as_file, files
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="module")
def asset():
    with ExitStack() as stack:
        yield Path(stack.enter_context(as_file(files("indexcache.assets") / "glm-dsa-tiny")))


@pytest.fixture(scope="module")
def record(asset):
    return json.loads((asset / "heldout_loss.json").read_text())


@pytest.fixture(scope="module")
def model(asset):
    return AutoModelForCausalLM.from_pretrained(asset, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(asset):
    return AutoTokenizer.from_pretrained(asset)


def test_is_a_dsa_model_with_trained_shape(model, record):
    cfg = model.config
    assert cfg.model_type == "glm_moe_dsa"
    assert cfg.num_hidden_layers >= 16
    assert cfg.index_topk * 16 <= record["seq_len"]
    assert cfg.indexer_types == ["full"] * cfg.num_hidden_layers
    assert all(layer.self_attn.indexer is not None for layer in model.model.layers)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


def test_weights_fit_the_wheel(asset):
    shards = list(asset.glob("*.safetensors"))
    assert shards and all(p.stat().st_size <= 16_000_000 for p in shards)
    assert sum(p.stat().st_size for p in shards) <= 24_000_000


def test_tokenizer_round_trips_with_eos(tokenizer, model):
    text = "def f(x):\n    return x ** 2  # square\n\n.. note:: ünïcode"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert len(tokenizer) == model.config.vocab_size


def test_card_states_the_recorded_bound(asset, record):
    assert f"**{record['loss_bound']:.2f}**" in (asset / "README.md").read_text()


def test_calibration_loss_is_below_the_bound(model, tokenizer, record):
    sample = files("indexcache.calib") / "samples" / record["calib_sample"]
    texts = [json.loads(line)["text"] for line in sample.read_text().splitlines()]
    ids = [t for doc in tokenizer(texts)["input_ids"] for t in (*doc, tokenizer.eos_token_id)]
    n, seq = record["windows"], record["seq_len"]
    windows = torch.tensor(ids[: n * seq]).view(n, seq)
    with torch.no_grad():  # one window per forward: the fastest CPU path
        losses = [F.cross_entropy(model(w[None]).logits[0, :-1], w[1:]).item() for w in windows]
    loss = sum(losses) / n
    assert loss < record["loss_bound"], (loss, record)
    assert loss == pytest.approx(record["loss"], abs=0.02)
