"""Train the tiny checkpoint's byte-level BPE tokenizer on the train split, and tokenise every split.

Reads --work/corpus/{train,calib,eval}.jsonl (from scripts/tiny_corpus.py). Writes
  --work/tokenizer/   a PreTrainedTokenizerFast (AutoTokenizer.from_pretrained loads it)
  --work/tokens/{train,calib,eval}.bin   uint16 token ids, each document followed by EOS
  --work/tokens/meta.json                vocab size, EOS id, token counts, sha256 of each .bin

    python scripts/tiny_tokenizer.py --work .work/tiny
"""

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
VOCAB_SIZE = 8192
SPLITS = ("train", "calib", "eval")


def read_texts(path: Path) -> list[str]:
    with path.open() as f:
        return [json.loads(line)["text"] for line in f]


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / ".work" / "tiny")
    args = ap.parse_args()

    texts = {name: read_texts(args.work / "corpus" / f"{name}.jsonl") for name in SPLITS}
    tok = train_tokenizer(texts["train"])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, model_max_length=1024
    ).save_pretrained(args.work / "tokenizer")
    eos_id = tok.token_to_id(EOS)
    assert tok.get_vocab_size() == VOCAB_SIZE and eos_id == 0, (tok.get_vocab_size(), eos_id)

    out = args.work / "tokens"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": VOCAB_SIZE, "eos_token_id": eos_id, "splits": {}}
    for name in SPLITS:
        docs = tok.encode_batch(texts[name])
        flat = np.fromiter((t for doc in docs for t in (*doc.ids, eos_id)), dtype=np.uint16)
        flat.tofile(out / f"{name}.bin")
        n_bytes = sum(len(t.encode()) for t in texts[name])
        meta["splits"][name] = {
            "tokens": int(flat.size),
            "bytes_per_token": round(n_bytes / flat.size, 3),
            "sha256": hashlib.sha256(flat.tobytes()).hexdigest(),
        }
        print(f"{name:6s} {flat.size:9d} tokens ({n_bytes / flat.size:.2f} bytes/token)")
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
