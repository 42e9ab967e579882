"""Shared fixtures: tiny DSA checkpoints on disk with a real tokenizer, and real text to calibrate on."""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

# One intra-op thread per test process and for the commands tests start (torchrun ranks, CLI subprocesses): the
# tiny models' ops are too small for two threads to share, and `pytest -n 2` (CI) runs one process per core.
if not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import VOCAB, deepseek_model, glm_model  # noqa: E402


def stdlib_text() -> list[str]:
    """Real documents that every CPython ships: the sources of a few stdlib modules."""
    import argparse
    import collections
    import json as json_module
    import textwrap

    return [inspect.getsource(m) for m in (argparse, collections, json_module, textwrap)]


def _tokenizer(save_dir: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(stdlib_text(), vocab_size=VOCAB, special_tokens=["<eos>"], show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(save_dir)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_text()))
    return path


@pytest.fixture(scope="session")
def glm_checkpoint(tmp_path_factory) -> Path:
    """A 6-layer glm_moe_dsa checkpoint (2 dense + 4 MoE layers, top-k 8) with a byte-level BPE tokenizer."""
    path = tmp_path_factory.mktemp("glm")
    glm_model(seed=0).save_pretrained(path)
    _tokenizer(path)
    return path


@pytest.fixture(scope="session")
def deepseek_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dsv32")
    deepseek_model(seed=0).save_pretrained(path)
    _tokenizer(path)
    return path
