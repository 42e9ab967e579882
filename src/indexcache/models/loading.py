"""Load a DSA checkpoint with transformers' own classes, every indexer that has weights switched on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..errors import IndexCacheError
from .registry import DsaArchitecture, architecture_for

EMBEDDED_MODEL = "glm-dsa-tiny"
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


@dataclass
class LoadedModel:
    """A loaded DSA model and what the pattern file needs to know about it.

    Attributes:
        indexer_layers: layers whose indexer has weights (the only layers that can be F).
        config_sha256: hash of the checkpoint's config.json as read (before indexcache changed anything).
    """

    model: nn.Module
    arch: DsaArchitecture
    tokenizer: object | None
    name: str
    config_sha256: str
    indexer_layers: list[int]

    @property
    def num_layers(self) -> int:
        return len(self.arch.layers(self.model))

    @property
    def text_config(self):
        """The language model's config (the model's own one unless it is a vision-language checkpoint)."""
        return self.model.config.get_text_config()


def embedded_model_path() -> Path:
    return Path(str(resources.files("indexcache.assets") / EMBEDDED_MODEL))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IndexCacheError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise IndexCacheError(f"--dtype {dtype} is not one of auto, bf16, fp16, fp32")
    return _DTYPES[dtype]


def _checkpoint_keys(path: Path) -> set[str] | None:
    """Every tensor name in a local safetensors checkpoint, from the index or the file headers."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def load_model(
    model: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    tokenizer: str | None = None,
) -> LoadedModel:
    """Load `model` (a local checkpoint folder, or a hub id where the network allows; None = embedded tiny model).

    Layers whose checkpoint has indexer weights are built with their indexer even when config.json carries a
    sharing pattern (`index_topk_pattern`, `index_topk_freq`, `indexer_types`), so the search can use them.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    name = model or str(embedded_model_path())
    path = Path(name).expanduser()
    if path.exists():
        name = str(path.resolve())  # recorded in pattern files: eval must find it from any directory
    if not path.exists() and not _looks_like_hub_id(name):
        raise IndexCacheError(f"model path {name} does not exist; give a checkpoint folder or a hub id")
    if path.exists() and not (path / "config.json").exists():
        raise IndexCacheError(f"{name} has no config.json; point --model at a transformers checkpoint folder")
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as exc:
        raise IndexCacheError(f"could not read the model config of {name}: {str(exc).splitlines()[0]}") from exc
    arch = architecture_for(getattr(config, "model_type", None))
    config_text = (path / "config.json").read_bytes() if path.exists() else json.dumps(config.to_dict()).encode()

    # A vision-language checkpoint (mistral_large4, hy_v4_vl) keeps the DSA settings on its text config.
    text_config = config.get_text_config()
    num_layers = text_config.num_hidden_layers
    keys = _checkpoint_keys(path) if path.exists() else None
    if keys is None:
        with_weights = list(range(num_layers))
    else:
        prefixes = [arch.checkpoint_indexer_prefixes(i) for i in range(num_layers)]
        with_weights = [i for i in range(num_layers) if any(k.startswith(prefixes[i]) for k in keys)]
    if hasattr(text_config, "indexer_types"):
        text_config.indexer_types = ["full" if i in with_weights else "shared" for i in range(num_layers)]

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        loaded = getattr(transformers, arch.auto_class).from_pretrained(
            name,
            config=config,
            dtype=torch_dtype,
            device_map=device_map,
            attn_implementation="eager",
        )
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        raise IndexCacheError(f"could not load model weights from {name}: {str(exc).splitlines()[0]}") from exc
    if device_map is None:
        loaded.to(device)
    loaded.eval()

    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or name)
    except Exception:
        if tokenizer is not None:
            raise IndexCacheError(f"could not load a tokenizer from {tokenizer}") from None
    return LoadedModel(
        model=loaded,
        arch=arch,
        tokenizer=tok,
        name=name if model else "embedded:" + EMBEDDED_MODEL,
        config_sha256=hashlib.sha256(config_text).hexdigest(),
        indexer_layers=[i for i in range(num_layers) if i in with_weights],
    )
