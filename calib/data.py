"""Calibration windows like real inputs: text streamed through `datasets`, tokenised only as far as needed.

Every window starts with the tokenizer's own prefix (BOS, or GLM's `[gMASK]<sop>`), which is fed but not
scored. `packed` windows cut a stream of documents joined with the tokenizer's EOS; `document` windows are cut
inside single documents long enough to hold one. Windows are taken in a seeded order that is shuffled within
blocks of `defaults.WINDOW_BLOCK` consecutive windows, so reading stops after the blocks that hold the windows
needed, and calibration (the first windows of the order) and evaluation (the next ones) never overlap.

A dataset whose rows already hold equal-length `input_ids` lists is used as-is, row by row: the escape hatch
for exact, reproducible calibration sets.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch

from .. import defaults
from ..errors import IndexCacheError

EMBEDDED_SAMPLE = "python-docs-calib.jsonl"
_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TOKENISE_DOCUMENTS = 64  # documents tokenised per call


@dataclass(frozen=True)
class DataSpec:
    """Where calibration text comes from and how it is cut. `dataset=None` means the embedded sample."""

    dataset: str | None = None
    dataset_config: str | None = None
    split: str = defaults.SPLIT
    text_column: str = defaults.TEXT_COLUMN
    num_samples: int = defaults.NUM_SAMPLES
    seq_len: int | None = defaults.SEQ_LEN
    seed: int = defaults.SEED
    windows: str = defaults.WINDOWS

    def __post_init__(self):
        if self.num_samples < 1 or (self.seq_len is not None and self.seq_len < 2):
            raise IndexCacheError(f"--num-samples ({self.num_samples}) must be ≥ 1 and --seq-len ({self.seq_len}) ≥ 2")
        if self.windows not in defaults.WINDOW_KINDS:
            raise IndexCacheError(f"--windows {self.windows} is not one of {', '.join(defaults.WINDOW_KINDS)}")

    def with_model_defaults(self, index_topk: int | None, tokens_per_entry: int = 1) -> DataSpec:
        """This spec with `seq_len` filled in from the model when it was left to it (None)."""
        if self.seq_len is not None:
            return self
        return replace(self, seq_len=default_seq_len(index_topk, tokens_per_entry))


def default_seq_len(index_topk: int | None, tokens_per_entry: int = 1) -> int:
    """max(quick default, 4 × index_topk entries): long enough that most scored positions choose among more keys
    than they keep (8192 for GLM-5's top-2048 tokens and for DeepSeek-V4-Flash's top-512 entries of 4 tokens),
    short enough for the tiny model's quick start (512)."""
    return max(defaults.QUICK_SEQ_LEN, defaults.SEQ_LEN_PER_TOPK * (index_topk or 0) * tokens_per_entry)


def first_choosing_position(index_topk: int, tokens_per_entry: int = 1) -> int:
    """The first query position that sees more than `index_topk` keys, so that its top-k is a choice.

    Position t sees t + 1 tokens, or (t + 1) // r entries of r tokens each (DeepSeek-V4's compressed entries)."""
    return tokens_per_entry * (index_topk + 1) - 1


def check_window_length(seq_len: int, index_topk: int | None, tokens_per_entry: int = 1) -> None:
    """Refuse windows in which the indexer keeps every key (or entry): every pattern would score the same."""
    if index_topk is not None and seq_len <= first_choosing_position(index_topk, tokens_per_entry):
        if tokens_per_entry == 1:
            why = f"windows of {seq_len} tokens are not longer than the model's index_topk ({index_topk}): every key"
        else:
            why = (
                f"in windows of {seq_len} tokens no query sees more than the model's index_topk ({index_topk}) "
                f"compressed entries (position t sees (t + 1) // {tokens_per_entry}): every entry"
            )
        raise IndexCacheError(
            f"{why} is in the top-k, so all patterns score the same; use --seq-len "
            f"{default_seq_len(index_topk, tokens_per_entry)} or more"
        )


@dataclass(frozen=True)
class Windows:
    """Token windows and where they came from.

    Attributes:
        input_ids: int64 [num_samples, seq_len], each row the prefix tokens then the window's text.
        fingerprint: sha256 of the windows (int32 little-endian), so two runs can tell they saw the same data.
        offset: how many windows of the seeded order were skipped (eval skips the calibration ones).
        tokens_read: tokens read from the data before there were enough windows.
        prefix: the token ids every window starts with (fed to the model, not scored).
    """

    input_ids: torch.Tensor
    spec: DataSpec
    fingerprint: str
    offset: int
    tokens_read: int
    prefix: list[int] = field(default_factory=list)

    @property
    def first_label(self) -> int:
        """Position of the first scored token: the one after the prefix (a window without prefix scores 1..)."""
        return max(1, len(self.prefix))

    def describe(self) -> dict:
        return {
            **asdict(self.spec),
            "seq_len": self.input_ids.shape[1],
            "source": self.spec.dataset or f"embedded sample ({EMBEDDED_SAMPLE})",
            "window_offset": self.offset,
            "tokens_read": self.tokens_read,
            "prefix_tokens": self.prefix,
            "fingerprint": self.fingerprint,
        }

    def selection_coverage(self, index_topk: int | None, tokens_per_entry: int = 1) -> dict:
        """How many scored positions choose among more keys (or entries) than the indexer keeps (the rest select
        all they see).

        Positions first_label - 1 .. seq_len - 2 predict scored tokens; see `first_choosing_position`.
        """
        windows, seq_len = self.input_ids.shape
        scored = seq_len - self.first_label
        if index_topk is None:
            over = scored
        else:
            first = first_choosing_position(index_topk, tokens_per_entry)
            over = max(0, seq_len - 1 - max(self.first_label - 1, first))
        return {"scored_positions": windows * scored, "positions_over_topk": windows * over}


def embedded_sample_path() -> Path:
    return Path(str(resources.files("indexcache.calib") / "samples" / EMBEDDED_SAMPLE))


def fingerprint(input_ids: torch.Tensor) -> str:
    data = input_ids.to(torch.int32).contiguous().numpy().astype("<i4").tobytes()
    return hashlib.sha256(str(tuple(input_ids.shape)).encode() + data).hexdigest()


def windows_from_tensor(input_ids: torch.Tensor, source: str = "in-memory token windows") -> Windows:
    """Wrap ready-made windows (int [N, L]) for the Python API, e.g. a benchmark's random tokens."""
    spec = DataSpec(dataset=source, num_samples=input_ids.shape[0], seq_len=input_ids.shape[1])
    return Windows(input_ids.long(), spec, fingerprint(input_ids), 0, input_ids.numel())


def _data_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS)
    builders = {_BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders or len(builders) != 1:
        raise IndexCacheError(
            f"dataset {path} must be one .txt/.jsonl/.json/.parquet file or a folder of files of one such kind"
        )
    return builders.pop(), [str(p) for p in files]


def _load_error(source: str, exc: Exception) -> IndexCacheError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return IndexCacheError(f"could not load dataset {source!r}: {first}")


def stream_rows(spec: DataSpec) -> Iterator[dict]:
    """The dataset split's rows, streamed (a hub split is never downloaded whole); local file/folder or hub name."""
    import datasets

    datasets.disable_progress_bars()
    source = spec.dataset or str(embedded_sample_path())
    path = Path(source).expanduser()
    try:
        if path.exists():
            builder, files = _data_files(path)
            rows = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        elif source.startswith((".", "/", "~")) or path.suffix in _BUILDERS:
            raise IndexCacheError(f"dataset path {source} does not exist; give a local file/folder or a hub name")
        else:
            rows = datasets.load_dataset(source, spec.dataset_config, split=spec.split, streaming=True)
        yield from rows
    except IndexCacheError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the message, not the stack
        raise _load_error(source, exc) from exc


def window_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before a text (BOS; `[gMASK]<sop>` for GLM), else its BOS token, else none."""
    sample = "Hello"
    plain = tokenizer(sample, add_special_tokens=False)["input_ids"]
    special = tokenizer(sample, add_special_tokens=True)["input_ids"]
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            if start:
                return list(special[:start])
            break
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def document_separator(tokenizer, eos_token_id) -> int:
    """The tokenizer's own EOS, else the config's (the first of a list, as GLM configs give several)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise IndexCacheError("the tokenizer and config define no EOS token to separate documents with")
    return int(eos)


def seeded_order(num_windows: int, seed: int) -> torch.Tensor:
    """A seeded permutation of window indices, shuffled within blocks of `defaults.WINDOW_BLOCK`: its first n
    entries depend only on the first ceil(n / block) blocks, so reading can stop there."""
    block = defaults.WINDOW_BLOCK
    parts = []
    for b, start in enumerate(range(0, num_windows, block)):
        key = int(hashlib.sha256(f"{seed}:{b}".encode()).hexdigest()[:15], 16)
        size = min(block, num_windows - start)
        parts.append(start + torch.randperm(size, generator=torch.Generator().manual_seed(key)))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def make_windows(spec: DataSpec, tokenizer, eos_token_id, offset: int = 0) -> Windows:
    """`spec.num_samples` windows, skipping the first `offset` windows of the seeded order.

    `eos_token_id` (int or list) separates documents when the tokenizer defines none. Raises IndexCacheError
    when the data holds too few tokens, saying how many were found and needed.
    """
    rows = stream_rows(spec)
    try:
        first = next(rows)
    except StopIteration:
        raise IndexCacheError(f"dataset {spec.dataset or EMBEDDED_SAMPLE!r} has no rows") from None
    if "input_ids" in first:
        return _pretokenised(first, rows, spec, offset)
    if spec.text_column not in first:
        raise IndexCacheError(
            f"dataset has no column '{spec.text_column}' (columns: {', '.join(first)}); pass --text-column"
        )
    if tokenizer is None:
        raise IndexCacheError("text data needs a tokenizer: pass --tokenizer or use input_ids rows")
    if spec.seq_len is None:
        raise IndexCacheError("the window length is not set: fill it from the model first (with_model_defaults)")
    prefix = window_prefix(tokenizer)
    body = spec.seq_len - len(prefix)
    if body < 2:
        raise IndexCacheError(f"--seq-len {spec.seq_len} leaves no room after the {len(prefix)} prefix tokens")
    eos = document_separator(tokenizer, eos_token_id)
    needed = offset + spec.num_samples
    enough = math.ceil(needed / defaults.WINDOW_BLOCK) * defaults.WINDOW_BLOCK
    cutter = _PackedCutter(body, eos) if spec.windows == "packed" else _DocumentCutter(body)
    texts = (row[spec.text_column] for row in _chain(first, rows))
    for batch in _batches(t for t in texts if t):
        for doc in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            cutter.add(doc)
        if len(cutter.windows) >= enough:
            break
    if len(cutter.windows) < needed:
        where = "" if spec.windows == "packed" else f" inside documents of at least {body} tokens"
        raise IndexCacheError(
            f"calibration text has {cutter.tokens_read:,} tokens but {needed * body:,} are needed "
            f"({needed} windows × {body}{where}); add text or lower --num-samples/--seq-len"
        )
    order = seeded_order(len(cutter.windows), spec.seed)[offset:needed]
    bodies = torch.tensor([cutter.windows[i] for i in order.tolist()], dtype=torch.int64)
    windows = torch.cat([torch.tensor(prefix, dtype=torch.int64).expand(len(bodies), -1), bodies], dim=1)
    return Windows(windows, spec, fingerprint(windows), offset, cutter.tokens_read, prefix)


def _chain(first, rest):
    yield first
    yield from rest


def _batches(texts) -> Iterator[list[str]]:
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == _TOKENISE_DOCUMENTS:
            yield batch
            batch = []
    if batch:
        yield batch


class _PackedCutter:
    """Documents joined with EOS into one stream, cut into consecutive windows of `length` tokens."""

    def __init__(self, length: int, eos: int):
        self.length, self.eos = length, eos
        self.pending: list[int] = []
        self.windows: list[list[int]] = []
        self.tokens_read = 0

    def add(self, doc: list[int]) -> None:
        self.pending += [*doc, self.eos]
        self.tokens_read += len(doc) + 1
        while len(self.pending) >= self.length:
            self.windows.append(self.pending[: self.length])
            self.pending = self.pending[self.length :]


class _DocumentCutter:
    """Consecutive windows of `length` tokens inside each document; a document's remainder is dropped."""

    def __init__(self, length: int):
        self.length = length
        self.windows: list[list[int]] = []
        self.tokens_read = 0

    def add(self, doc: list[int]) -> None:
        self.tokens_read += len(doc)
        for start in range(0, len(doc) - self.length + 1, self.length):
            self.windows.append(doc[start : start + self.length])


def _pretokenised(first: dict, rows, spec: DataSpec, offset: int) -> Windows:
    """The first `offset + num_samples` rows, read as they are (no prefix, no cutting)."""
    needed = offset + spec.num_samples
    taken = [first["input_ids"]]
    for row in rows:
        if len(taken) == needed:
            break
        taken.append(row["input_ids"])
    lengths = set(len(r) for r in taken)
    if len(lengths) != 1:
        raise IndexCacheError(f"input_ids rows must all have one length; found lengths {sorted(lengths)[:5]}")
    if len(taken) < needed:
        raise IndexCacheError(
            f"dataset has {len(taken)} input_ids rows but {needed} are needed; add rows or lower --num-samples"
        )
    windows = torch.tensor(taken[offset:needed], dtype=torch.int64)
    return Windows(windows, spec, fingerprint(windows), offset, len(taken) * lengths.pop())
