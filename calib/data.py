"""Calibration windows: text through `datasets`, tokenised, joined with EOS and cut into seeded windows.

A dataset whose rows already hold equal-length `input_ids` lists is used as-is, row by row: the escape hatch
for exact, reproducible calibration sets.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from .. import defaults
from ..errors import IndexCacheError

EMBEDDED_SAMPLE = "python-docs-calib.jsonl"
_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class DataSpec:
    """Where calibration text comes from and how it is cut. `dataset=None` means the embedded sample."""

    dataset: str | None = None
    dataset_config: str | None = None
    split: str = defaults.SPLIT
    text_column: str = defaults.TEXT_COLUMN
    num_samples: int = defaults.NUM_SAMPLES
    seq_len: int = defaults.SEQ_LEN
    seed: int = defaults.SEED

    def __post_init__(self):
        if self.num_samples < 1 or self.seq_len < 2:
            raise IndexCacheError(f"--num-samples ({self.num_samples}) must be ≥ 1 and --seq-len ({self.seq_len}) ≥ 2")


@dataclass(frozen=True)
class Windows:
    """Token windows and where they came from.

    Attributes:
        input_ids: int64 [num_samples, seq_len].
        fingerprint: sha256 of the windows (int32 little-endian), so two runs can tell they saw the same data.
        offset: how many windows of the seeded order were skipped (eval skips the calibration ones).
    """

    input_ids: torch.Tensor
    spec: DataSpec
    fingerprint: str
    offset: int
    total_tokens: int

    def describe(self) -> dict:
        return {
            **asdict(self.spec),
            "seq_len": self.input_ids.shape[1],
            "source": self.spec.dataset or f"embedded sample ({EMBEDDED_SAMPLE})",
            "window_offset": self.offset,
            "tokens_available": self.total_tokens,
            "fingerprint": self.fingerprint,
        }


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


def load_rows(spec: DataSpec):
    """The dataset split as a `datasets.Dataset`, local file/folder or hub name."""
    import datasets

    datasets.disable_progress_bars()
    source = spec.dataset or str(embedded_sample_path())
    path = Path(source).expanduser()
    try:
        if path.exists():
            builder, files = _data_files(path)
            return datasets.load_dataset(builder, data_files=files, split="train")
        if source.startswith((".", "/", "~")) or path.suffix in _BUILDERS:
            raise IndexCacheError(f"dataset path {source} does not exist; give a local file/folder or a hub name")
        return datasets.load_dataset(source, spec.dataset_config, split=spec.split)
    except IndexCacheError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the message, not the stack
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IndexCacheError(f"could not load dataset {source!r}: {first}") from exc


def make_windows(spec: DataSpec, tokenizer, eos_token_id: int | None, offset: int = 0) -> Windows:
    """`spec.num_samples` windows, skipping the first `offset` windows of the seeded order.

    Raises IndexCacheError when the data holds too few tokens, saying how many were found and needed.
    """
    rows = load_rows(spec)
    if "input_ids" in rows.column_names:
        return _pretokenised(rows, spec, offset)
    if spec.text_column not in rows.column_names:
        raise IndexCacheError(
            f"dataset has no column '{spec.text_column}' (columns: {', '.join(rows.column_names)}); pass --text-column"
        )
    if tokenizer is None:
        raise IndexCacheError("the model folder has no tokenizer; add its tokenizer files or use input_ids rows")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos_token_id
    if eos is None:
        raise IndexCacheError("the tokenizer and config define no EOS token to join documents with")
    texts = [t for t in rows[spec.text_column] if t]
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    stream = torch.tensor([tok for doc in ids for tok in (*doc, eos)], dtype=torch.int64)
    # Cut the stream into consecutive windows, then pick them in one seeded order: calibration takes the
    # first `num_samples`, evaluation the next ones, so the two never overlap.
    num_windows = stream.numel() // spec.seq_len
    needed = (offset + spec.num_samples) * spec.seq_len
    if num_windows < offset + spec.num_samples:
        raise IndexCacheError(
            f"calibration text has {stream.numel():,} tokens but {needed:,} are needed "
            f"({offset + spec.num_samples} windows × {spec.seq_len}); add text or lower --num-samples/--seq-len"
        )
    order = torch.randperm(num_windows, generator=torch.Generator().manual_seed(spec.seed))
    chosen = order[offset : offset + spec.num_samples]
    windows = stream[: num_windows * spec.seq_len].view(num_windows, spec.seq_len)[chosen]
    return Windows(windows, spec, fingerprint(windows), offset, stream.numel())


def _pretokenised(rows, spec: DataSpec, offset: int) -> Windows:
    lengths = set(len(r) for r in rows["input_ids"])
    if len(lengths) != 1:
        raise IndexCacheError(f"input_ids rows must all have one length; found lengths {sorted(lengths)[:5]}")
    if len(rows) < offset + spec.num_samples:
        raise IndexCacheError(
            f"dataset has {len(rows)} input_ids rows but {offset + spec.num_samples} are needed; "
            "add rows or lower --num-samples"
        )
    windows = torch.tensor(rows["input_ids"][offset : offset + spec.num_samples], dtype=torch.int64)
    return Windows(windows, spec, fingerprint(windows), offset, len(rows) * lengths.pop())
