"""Load a DSA checkpoint with transformers' own classes, every indexer that has weights switched on."""

from __future__ import annotations

import copy
import hashlib
import json
import re
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
class Checkpoint:
    """A checkpoint as known before its weights load: enough to build and check the calibration windows.

    Attributes:
        name: the resolved folder or hub id; recorded: what pattern files record (`embedded:…` for the default).
        indexer_layers: layers whose indexer weights the checkpoint lists (every layer when no listing could be
            read: then the loading report decides, see `load_weights`).
        config_sha256: hash of the checkpoint's config.json as read (before indexcache changed anything).
    """

    name: str
    recorded: str
    path: Path | None
    config: object
    arch: DsaArchitecture
    config_sha256: str
    indexer_layers: list[int]

    @property
    def num_layers(self) -> int:
        return self.config.get_text_config().num_hidden_layers

    @property
    def index_topk(self) -> int | None:
        """The most tokens one query's selection holds (`DsaArchitecture.keys_kept`)."""
        return self.arch.keys_kept(self.config.get_text_config())

    @property
    def dsa_layers(self) -> list[int]:
        """The indexer layers of the architecture (`DsaArchitecture.dsa_layer_ids`), with weights or not."""
        return self.arch.dsa_layer_ids(self.config.get_text_config())

    @property
    def tokens_per_entry(self) -> int:
        """Tokens per selectable entry (1: the indexer selects tokens; 4: DeepSeek-V4's compressed entries)."""
        return self.arch.tokens_per_entry(self.config.get_text_config())


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

    @property
    def dsa_layers(self) -> list[int]:
        """The indexer layers of the architecture (`DsaArchitecture.dsa_layer_ids`); `indexer_layers` are those
        of them whose weights loaded."""
        return self.arch.dsa_layer_ids(self.text_config)

    @property
    def tokens_per_entry(self) -> int:
        """Tokens per selectable entry (see `Checkpoint.tokens_per_entry`)."""
        return self.arch.tokens_per_entry(self.text_config)


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


def _local_weight_names(path: Path) -> set[str] | None:
    """Every tensor name of a local checkpoint: safetensors index or headers, or a `.bin` index or file."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).exists():
            return set(json.loads((path / index).read_text())["weight_map"])
    if files := sorted(path.glob("*.safetensors")):
        from safetensors import safe_open

        keys: set[str] = set()
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                keys.update(handle.keys())
        return keys
    if files := sorted(path.glob("*.bin")):
        keys = set()
        for f in files:  # memory-mapped: names only, no tensor is read
            keys.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True).keys())
        return keys
    return None


def _hub_weight_names(repo_id: str) -> set[str] | None:
    """Tensor names of a hub checkpoint from its safetensors index or headers, None where the hub is unreachable."""
    try:
        from huggingface_hub import get_safetensors_metadata

        return set(get_safetensors_metadata(repo_id).weight_map)
    except Exception:  # offline, gated, or not safetensors: the loading report decides after the load
        return None


def weight_bytes_by_layer(checkpoint: Checkpoint) -> tuple[list[int], int] | None:
    """(bytes of each decoder layer's tensors, bytes of the rest: embeddings, head, norms) as stored in a local
    safetensors checkpoint, read from the shards' headers (the 8-byte header length, then its JSON: every
    tensor's byte range); None for other formats. Tensors of layers past the decoder stack (GLM-5's MTP layer)
    are not loaded, so not counted."""
    if checkpoint.path is None or not (files := sorted(checkpoint.path.glob("*.safetensors"))):
        return None
    layers, rest = [0] * checkpoint.num_layers, 0
    for f in files:
        with open(f, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            size = entry["data_offsets"][1] - entry["data_offsets"][0]
            match = re.search(r"\blayers\.(\d+)\.", name)
            if match is None:
                rest += size
            elif int(match[1]) < checkpoint.num_layers:
                layers[int(match[1])] += size
    return layers, rest


def weight_names(checkpoint: str, path: Path | None) -> set[str] | None:
    """Every tensor name the checkpoint holds, read without loading a weight; None when no listing is reachable."""
    return _local_weight_names(path) if path is not None else _hub_weight_names(checkpoint)


def indexer_layers_in(names: set[str] | None, arch: DsaArchitecture, num_layers: int) -> list[int]:
    if names is None:
        return list(range(num_layers))
    prefixes = [arch.checkpoint_indexer_prefixes(i) for i in range(num_layers)]
    return [i for i in range(num_layers) if any(k.startswith(prefixes[i]) for k in names)]


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def open_checkpoint(model: str | None = None) -> Checkpoint:
    """Read `model`'s config and weight listing (a local folder, a hub id where the network allows, None = the
    embedded tiny model), without loading a weight: enough to build and check the data first."""
    from transformers import AutoConfig

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
    local = Path(name) if path.exists() else None
    # A vision-language checkpoint (mistral_large4, hy_v4_vl) keeps the DSA settings on its text config.
    text_config = config.get_text_config()
    num_layers = text_config.num_hidden_layers
    with_weights = indexer_layers_in(weight_names(name, local), arch, num_layers)
    if hasattr(text_config, "indexer_types"):
        # Build an indexer on every layer that has weights, even where config.json carries a sharing pattern.
        text_config.indexer_types = ["full" if i in with_weights else "shared" for i in range(num_layers)]
    return Checkpoint(
        name=name,
        recorded=name if model else "embedded:" + EMBEDDED_MODEL,
        path=local,
        config=config,
        arch=arch,
        config_sha256=hashlib.sha256(config_text).hexdigest(),
        indexer_layers=with_weights,
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def load_tokenizer(checkpoint: Checkpoint, tokenizer: str | None = None, required: bool = True):
    """The tokenizer of `tokenizer` (a folder or hub id) or of the checkpoint.

    A checkpoint folder without tokenizer files gives None when not `required`; any other failure is its own
    one-line error, never swallowed.
    """
    from transformers import AutoTokenizer

    source = tokenizer or checkpoint.name
    local = Path(source).expanduser()
    if tokenizer is None and checkpoint.path is not None and not any((local / f).exists() for f in _TOKENIZER_FILES):
        if not required:
            return None
        raise IndexCacheError(f"{source} has no tokenizer files; pass --tokenizer or use input_ids rows")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IndexCacheError(f"could not load the tokenizer from {source}: {first}") from exc


class _StageKeys:
    """What transformers' loader asks a pipeline stage (`model._pp_stage`): which stage owns a weight. Rank 0 is
    this stage; 1 stands for the others, whose tensors are skipped unread instead of reported unexpected."""

    pp_rank = 0

    def __init__(self, set_aside: list[str]):
        self.set_aside = tuple(name + "." for name in set_aside)

    def find_rank_for_key(self, key: str, num_layers: int, base_model_prefix: str) -> int | None:
        return 1 if key.startswith(self.set_aside) else None


def _stage_class(model_class: type, arch: DsaArchitecture, held: range) -> type:
    """`model_class` for one pipeline stage holding decoder layers `held` (the embeddings too where it starts at
    layer 0; the final norm and LM head where it ends at the last layer).

    transformers builds the model on `meta`, then calls `maybe_distribute_model` before any weight loads; here
    that sets aside every module the stage does not hold, so only the stage's tensors are read from the
    safetensors shards. `restore_set_aside` puts those modules back afterwards, still on `meta` (no memory):
    the model keeps its full structure and layer numbering.
    """

    class Stage(model_class):
        @classmethod
        def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
            from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

            base, layers = arch.base_model(model), arch.layers(model)
            tied = model.config.get_text_config().tie_word_embeddings
            head = model.get_output_embeddings()
            modules = {id(m): name for name, m in model.named_modules()}
            aside: list[tuple[nn.Module, str, nn.Module]] = []
            aside += [(layers, str(i), layers[i]) for i in range(len(layers)) if i not in held]
            if held.start > 0 and not (tied and held.stop == len(layers)):  # tied: the head needs the table
                aside.append((base, "embed_tokens", base.embed_tokens))
            if held.stop < len(layers):
                aside += [(base, name, getattr(base, name)) for name in (arch.streams_head, arch.final_norm) if name]
                head_name = modules[id(head)].rpartition(".")
                owner = model.get_submodule(head_name[0]) if head_name[0] else model
                aside.append((owner, head_name[2], head))
                if tied:
                    model.all_tied_weights_keys = {}
            model._pp_stage = _StageKeys([modules[id(m)] for _, _, m in aside])
            model._indexcache_set_aside = aside
            for parent, name, _ in aside:
                parent._modules[name] = PipelineIdentityLayer()
            return model

    Stage.__name__ = Stage.__qualname__ = model_class.__name__
    return Stage


def restore_set_aside(model: nn.Module) -> None:
    """Put back the modules a stage set aside before its load (on `meta`), and forget the stage's key map."""
    for parent, name, module in model.__dict__.pop("_indexcache_set_aside", []):
        parent._modules[name] = module
    model.__dict__.pop("_pp_stage", None)


def load_weights(
    checkpoint: Checkpoint,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    tokenizer=None,
    held: range | None = None,
) -> LoadedModel:
    """Load the weights of an opened checkpoint with transformers' own classes.

    A layer whose indexer weights the checkpoint turns out not to hold (transformers reports them missing and
    initialises them at random) loses its indexer module, so it can never be F. With `held` (a pipeline stage's
    decoder layers) only those layers' tensors are read, with the embeddings on the stage that starts at layer 0
    and the final norm and LM head on the one that ends at the last; every other module stays on `meta`.
    """
    import transformers
    from transformers.models.auto.auto_factory import _get_model_class
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model_class = getattr(transformers, checkpoint.arch.auto_class)
    stage = {}
    if held is not None:
        concrete = _get_model_class(checkpoint.config, model_class._model_mapping)
        model_class = _stage_class(concrete, checkpoint.arch, held)
        # A distributed config (of one process) makes transformers call the stage's hook; a copy of the config
        # keeps it off the checkpoint's own.
        stage = {"distributed_config": transformers.DistributedConfig(), "config": copy.deepcopy(checkpoint.config)}
        device_map = {"": device}  # placed as loaded: `.to()` cannot move the modules left on meta
    try:
        loaded, info = model_class.from_pretrained(
            checkpoint.name,
            **{"config": checkpoint.config, **stage},
            dtype=torch_dtype,
            device_map=device_map,
            max_memory=max_memory,
            attn_implementation="eager",
            output_loading_info=True,
        )
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        raise IndexCacheError(
            f"could not load model weights from {checkpoint.name}: {str(exc).splitlines()[0]}"
        ) from exc
    restore_set_aside(loaded)
    if device_map is None:
        loaded.to(device)
    loaded.eval()
    arch = checkpoint.arch
    missing = set(info.get("missing_keys", ()))
    with_weights = [
        i for i in checkpoint.indexer_layers if not any(k.startswith(arch.indexer_weight_prefix(i)) for k in missing)
    ]
    for i, layer in enumerate(arch.layers(loaded)):
        if i not in with_weights and arch.indexer(layer) is not None:
            setattr(arch.indexer_owner(layer), arch.indexer_attr, None)  # random weights: never let it be F
    return LoadedModel(
        model=loaded,
        arch=arch,
        tokenizer=tokenizer,
        name=checkpoint.recorded,
        config_sha256=checkpoint.config_sha256,
        indexer_layers=with_weights,
    )


def parse_max_memory(text: str | None) -> dict | None:
    """`--max-memory "0=20GiB,1=70GiB,cpu=200GiB"` → accelerate's {0: "20GiB", 1: "70GiB", "cpu": "200GiB"}."""
    if text is None:
        return None
    limits = {}
    for part in text.split(","):
        device, sep, size = part.strip().partition("=")
        if not sep or not device or not size:
            raise IndexCacheError(f"--max-memory {text!r}: give DEVICE=SIZE pairs such as 0=20GiB,1=70GiB,cpu=200GiB")
        limits[int(device) if device.isdigit() else device] = size
    return limits


def load_model(
    model: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    tokenizer: str | None = None,
    max_memory: dict | None = None,
) -> LoadedModel:
    """Open, tokenizer (if the checkpoint has one) and weights in one call, for scripts and tests.

    Layers whose checkpoint has indexer weights are built with their indexer even when config.json carries a
    sharing pattern (`index_topk_pattern`, `index_topk_freq`, `indexer_types`), so the search can use them.
    """
    checkpoint = open_checkpoint(model)
    tok = load_tokenizer(checkpoint, tokenizer, required=tokenizer is not None)
    return load_weights(checkpoint, dtype, device, device_map, max_memory, tok)
