"""Calibration windows: seeded, disjoint between calibration and evaluation, clear errors on too little text."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from indexcache.calib import DataSpec, make_windows
from indexcache.errors import IndexCacheError


@pytest.fixture(scope="module")
def tokenizer(glm_checkpoint):
    return AutoTokenizer.from_pretrained(glm_checkpoint)


def test_windows_are_seeded_and_fingerprinted(text_file, tokenizer):
    spec = DataSpec(dataset=str(text_file), num_samples=4, seq_len=64, seed=3)
    a, b = make_windows(spec, tokenizer, None), make_windows(spec, tokenizer, None)
    assert a.input_ids.shape == (4, 64) and a.input_ids.dtype == torch.int64
    assert torch.equal(a.input_ids, b.input_ids) and a.fingerprint == b.fingerprint
    other = make_windows(DataSpec(dataset=str(text_file), num_samples=4, seq_len=64, seed=4), tokenizer, None)
    assert other.fingerprint != a.fingerprint


def test_documents_are_joined_with_eos(text_file, tokenizer):
    texts = [json.loads(line)["text"] for line in text_file.read_text().splitlines()]
    total = sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    spec = DataSpec(dataset=str(text_file), num_samples=total // 64, seq_len=64)
    windows = make_windows(spec, tokenizer, None)
    assert windows.tokens_read == total
    # every document boundary lands in some window; only the stream's last EOS may fall in the cut-off tail
    assert (windows.input_ids == tokenizer.eos_token_id).sum() >= len(texts) - 1


def test_evaluation_offset_gives_disjoint_windows(text_file, tokenizer):
    spec = DataSpec(dataset=str(text_file), num_samples=8, seq_len=64)
    calib = make_windows(spec, tokenizer, None)
    held_out = make_windows(spec, tokenizer, None, offset=8)
    rows = {tuple(r.tolist()) for r in calib.input_ids}
    assert not rows & {tuple(r.tolist()) for r in held_out.input_ids}


def test_too_little_text_says_found_and_needed(tmp_path, tokenizer):
    path = tmp_path / "small.txt"
    path.write_text("def f():\n    return 1\n" * 5)
    with pytest.raises(IndexCacheError, match=r"has [\d,]+ tokens but 4,096 are needed"):
        make_windows(DataSpec(dataset=str(path), num_samples=4, seq_len=1024), tokenizer, None)


def test_pretokenised_rows_are_used_as_is(tmp_path):
    rows = [[i, i + 1, i + 2, i + 3, i + 4] for i in range(6)]
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    windows = make_windows(DataSpec(dataset=str(path), num_samples=3, seq_len=999), None, None)
    assert windows.input_ids.tolist() == rows[:3]
    assert make_windows(DataSpec(dataset=str(path), num_samples=3), None, None, offset=3).input_ids.tolist() == rows[3:]


def test_ragged_pretokenised_rows_are_rejected(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2]}\n')
    with pytest.raises(IndexCacheError, match="one length"):
        make_windows(DataSpec(dataset=str(path), num_samples=2), None, None)


def test_folder_of_text_files(tmp_path, text_file, tokenizer):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, line in enumerate(text_file.read_text().splitlines()):
        (folder / f"{i}.txt").write_text(json.loads(line)["text"])
    windows = make_windows(DataSpec(dataset=str(folder), num_samples=2, seq_len=64), tokenizer, None)
    assert windows.input_ids.shape == (2, 64)


def test_missing_text_column_names_the_columns(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "hello"}\n')
    with pytest.raises(IndexCacheError, match="no column 'text'.*body"):
        make_windows(DataSpec(dataset=str(path), num_samples=1, seq_len=8), tokenizer, None)
