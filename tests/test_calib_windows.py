"""Windows like real inputs: the tokenizer's prefix at each start, its own EOS between documents, windows inside
single documents on request, a window length from the model, and data read only as far as needed."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import processors
from transformers import AutoTokenizer

from indexcache.calib import DataSpec, check_window_length, default_seq_len, make_windows
from indexcache.calib import data as calib_data
from indexcache.errors import IndexCacheError


@pytest.fixture(scope="module")
def tokenizer(glm_checkpoint):
    return AutoTokenizer.from_pretrained(glm_checkpoint)


@pytest.fixture
def glm_like_tokenizer(glm_checkpoint):
    """The test tokenizer with a GLM-style two-token prefix ([gMASK]<sop>) added to every text."""
    tok = AutoTokenizer.from_pretrained(glm_checkpoint)
    tok.add_special_tokens({"additional_special_tokens": ["[gMASK]", "<sop>"]})
    gmask, sop = tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", special_tokens=[("[gMASK]", gmask), ("<sop>", sop)]
    )
    return tok, [gmask, sop]


def _docs(text_file) -> list[str]:
    return [json.loads(line)["text"] for line in text_file.read_text().splitlines()]


def test_every_window_starts_with_the_tokenizers_prefix(text_file, glm_like_tokenizer):
    tok, prefix = glm_like_tokenizer
    windows = make_windows(DataSpec(dataset=str(text_file), num_samples=5, seq_len=64), tok, None)
    assert windows.prefix == prefix and windows.first_label == 2
    assert windows.input_ids.shape == (5, 64)
    assert (windows.input_ids[:, :2] == torch.tensor(prefix)).all()
    assert not torch.isin(windows.input_ids[:, 2:], torch.tensor(prefix)).any()  # nowhere else
    assert windows.describe()["prefix_tokens"] == prefix


def test_bos_token_is_the_prefix_when_the_tokenizer_adds_none(text_file, tokenizer):
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path, bos_token="<eos>")
    windows = make_windows(DataSpec(dataset=str(text_file), num_samples=3, seq_len=32), tok, None)
    assert windows.prefix == [tok.bos_token_id] and (windows.input_ids[:, 0] == tok.bos_token_id).all()
    assert windows.first_label == 1  # one prefix token: the first prediction already targets text


class _NoEos:
    """A tokenizer that defines no EOS of its own: documents are separated with the config's."""

    eos_token_id = bos_token_id = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)


def test_list_valued_eos_separates_documents(text_file, tokenizer):
    tok = _NoEos(tokenizer)
    spec = DataSpec(dataset=str(text_file), num_samples=400, seq_len=256)
    windows = make_windows(spec, tok, [7, 9, 11])  # GLM configs give several EOS ids: the first separates
    assert int((windows.input_ids == 7).sum()) >= 2
    assert windows.tokens_read == sum(
        len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in _docs(text_file)
    )
    with pytest.raises(IndexCacheError, match="no EOS"):
        make_windows(spec, tok, [])


def test_document_windows_lie_inside_one_document(text_file, tokenizer):
    docs = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in _docs(text_file)]
    spec = DataSpec(dataset=str(text_file), num_samples=12, seq_len=200, windows="document")
    windows = make_windows(spec, tokenizer, None)
    assert windows.describe()["windows"] == "document"
    for row in windows.input_ids.tolist():
        assert tokenizer.eos_token_id not in row
        assert any(row == d[s : s + 200] for d in docs for s in range(0, len(d) - 199, 200)), "not a chunk of a doc"
    packed = make_windows(DataSpec(dataset=str(text_file), num_samples=500, seq_len=200), tokenizer, None)
    assert (packed.input_ids == tokenizer.eos_token_id).any()  # packed windows do cross documents


def test_document_windows_refuse_documents_too_short(text_file, tokenizer):
    longest = max(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in _docs(text_file))
    spec = DataSpec(dataset=str(text_file), num_samples=1, seq_len=longest + 1, windows="document")
    with pytest.raises(IndexCacheError, match=f"inside documents of at least {longest + 1} tokens"):
        make_windows(spec, tokenizer, None)


def test_reading_stops_once_there_are_enough_windows(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "many.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 4}) + "\n" for i in range(3000))
    )
    tokenised = []
    real_call = type(tokenizer).__call__

    def counting(self, texts, *args, **kwargs):
        tokenised.extend(texts if isinstance(texts, list) else [texts])
        return real_call(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    windows = make_windows(DataSpec(dataset=str(path), num_samples=2, seq_len=64), tokenizer, None)
    assert windows.input_ids.shape == (2, 64)
    # one block of 64 windows × 64 tokens needs a few hundred short documents, not all 3000
    assert len(tokenised) < 600 and windows.tokens_read < 64 * 64 + 2000


def test_hub_datasets_are_streamed_and_read_only_as_far_as_needed(tokenizer, monkeypatch):
    import datasets

    docs = [f"def f{i}(x):\n    return x * {i} + {i}\n" * 16 for i in range(3000)]
    pulled, calls = [], []

    def rows():
        for d in docs:
            pulled.append(d)
            yield {"text": d}

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split, kwargs))
        return rows()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = DataSpec(dataset="someone/corpus", dataset_config="en", split="validation", num_samples=2, seq_len=64)
    make_windows(spec, tokenizer, None)
    assert calls == [("someone/corpus", "en", "validation", {"streaming": True})]
    assert len(pulled) <= 10 * calib_data._TOKENISE_DOCUMENTS < len(docs)


def test_later_windows_of_the_order_do_not_depend_on_how_many_were_asked_for(text_file, tokenizer):
    spec = DataSpec(dataset=str(text_file), num_samples=16, seq_len=64, seed=5)
    both = make_windows(spec, tokenizer, None).input_ids
    second = make_windows(DataSpec(dataset=str(text_file), num_samples=8, seq_len=64, seed=5), tokenizer, None, 8)
    assert torch.equal(both[8:], second.input_ids)


def test_window_length_comes_from_the_model():
    assert default_seq_len(2048) == 8192  # GLM-5, DeepSeek-V3.2
    assert default_seq_len(64) == 512  # the tiny model keeps the quick default
    assert DataSpec().with_model_defaults(2048).seq_len == 8192
    assert DataSpec(seq_len=300).with_model_defaults(2048).seq_len == 300


@pytest.mark.parametrize("seq_len", [64, 32], ids=lambda n: f"T{n}")
def test_windows_no_longer_than_topk_are_refused(seq_len):
    with pytest.raises(IndexCacheError, match=rf"{seq_len} tokens are not longer than .* \(64\).*--seq-len 512"):
        check_window_length(seq_len, 64)
    check_window_length(65, 64)


def test_selection_coverage_counts_positions_choosing_among_more_than_k(text_file, glm_like_tokenizer):
    tok, _ = glm_like_tokenizer
    windows = make_windows(DataSpec(dataset=str(text_file), num_samples=3, seq_len=64), tok, None)
    # scored: predictions of tokens 2..63 from positions 1..62; position i sees i + 1 keys, > 20 from i = 20 on
    assert windows.selection_coverage(20) == {"scored_positions": 3 * 62, "positions_over_topk": 3 * 43}
    assert windows.selection_coverage(63)["positions_over_topk"] == 0
