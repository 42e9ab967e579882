"""`indexcache apply`: a servable copy of a checkpoint whose config.json carries the pattern."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from copy import deepcopy
from pathlib import Path

from .errors import IndexCacheError
from .models import architecture_for
from .models.loading import indexer_layers_in, weight_names
from .patterns import file as pattern_file
from .patterns.layout import full_layers, index_topk_freq, indexer_types, validate

# Keys that express an older sharing schedule; the pattern replaces them.
_SCHEDULE_KEYS = ("index_topk_freq", "index_skip_topk_offset")
# Files `apply` writes itself: never linked from the source (a folder made by `apply` has them too).
_WRITTEN = ("config.json", "indexcache_pattern.json")


def _write_new(path: Path, text: str) -> None:
    """Create `path` fresh: never through a symlink or over an existing file (O_EXCL | O_NOFOLLOW)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _check_indexer_weights(pattern: str, model_dir: Path, arch, num_layers: int) -> None:
    """Refuse a pattern whose F layers have no indexer weights in this checkpoint (they would select at random)."""
    try:
        names = weight_names(str(model_dir), model_dir)
    except Exception as exc:
        raise IndexCacheError(f"could not list the weights of {model_dir}: {str(exc).splitlines()[0]}") from exc
    if names is None:
        raise IndexCacheError(f"{model_dir} holds no .safetensors or .bin weights; point --model at a checkpoint")
    with_weights = indexer_layers_in(names, arch, num_layers)
    missing = [i for i in full_layers(pattern) if i not in with_weights]
    if missing:
        raise IndexCacheError(
            f"the pattern makes layers {missing} F but {model_dir} has no indexer weights for them; "
            "search a pattern on this checkpoint"
        )


def _text_config(model_dir: Path):
    """The checkpoint's (text) config as transformers reads it: where its layer types come from."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir).get_text_config()
    except Exception as exc:
        raise IndexCacheError(f"could not read the model config of {model_dir}: {str(exc).splitlines()[0]}") from exc


def config_with_pattern(config: dict, pattern: str, dsa_layers: list[int] | None = None) -> dict:
    """config.json's contents with the pattern under the keys the family's readers use.

    `indexer_types` where transformers has it (GlmMoeDsaConfig and MistralLarge4TextConfig prefer it over
    `index_topk_pattern`; HYV4Config reads nothing else), `index_topk_pattern` where the family's readers take it,
    `use_index_cache: true` where vLLM serves the family (it ignores the pattern without it); a vision-language
    checkpoint gets them in its `text_config`. Families whose readers count the pattern over the indexer layers
    (`dsa_layers`; deepseek_v4's CSA layers) get one letter per indexer layer, and `index_topk_freq` as well when
    the pattern is a uniform schedule. Older schedule keys are dropped: the pattern replaces them.
    """
    config = deepcopy(config)
    arch = architecture_for(config.get("model_type"))
    text_config = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    for key in (*_SCHEDULE_KEYS, "index_topk_pattern"):
        text_config.pop(key, None)
    values = {"index_topk_pattern": pattern, "indexer_types": indexer_types(pattern), "use_index_cache": True}
    if arch.pattern_per_indexer_layer:
        values["index_topk_pattern"] = "".join(pattern[i] for i in dsa_layers)
        values["index_topk_freq"] = index_topk_freq(values["index_topk_pattern"])
    text_config.update({key: values[key] for key in arch.pattern_keys if values.get(key) is not None})
    return config


def apply_pattern(
    pattern_path: str | Path, model_dir: str | Path, output_dir: str | Path, copy: bool = False, log=print
) -> Path:
    """Write `output_dir`: `model_dir` with the pattern in config.json (`config_with_pattern`).

    Says in one line (`log`) when stock transformers ignores the pattern for this family. Weights and tokenizer
    files are symlinked (copied with `copy=True`). The folder appears all at once: it is built beside the target
    and renamed into place.
    """
    data = pattern_file.read(pattern_path)
    model_dir, output_dir = Path(model_dir).expanduser(), Path(output_dir).expanduser()
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise IndexCacheError(f"{model_dir} has no config.json; point --model at a checkpoint folder")
    if output_dir.exists():
        raise IndexCacheError(f"output {output_dir} already exists; choose a new folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IndexCacheError(f"{config_path} is not valid JSON; point --model at a checkpoint") from None
    arch = architecture_for(config.get("model_type"))
    text_config = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    pattern_file.check_matches(data, arch.model_type, text_config.get("num_hidden_layers"), str(model_dir))

    dsa_layers = arch.dsa_layer_ids(_text_config(model_dir))
    validate(data["index_topk_pattern"], text_config["num_hidden_layers"], dsa_layers)
    _check_indexer_weights(data["index_topk_pattern"], model_dir, arch, text_config["num_hidden_layers"])
    config = config_with_pattern(config, data["index_topk_pattern"], dsa_layers)
    note = arch.pattern_note(data["index_topk_pattern"], dsa_layers)
    if note:
        log(note)

    # Listed before staging exists, so an output inside the model folder does not link staging to itself.
    items = [item for item in sorted(model_dir.iterdir()) if item.name not in _WRITTEN]
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the checkpoint from a serving engine's user
    try:
        for item in items:
            target = staging / item.name
            if copy:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, target)
            else:
                os.symlink(item.resolve(), target)
        _write_new(staging / "config.json", json.dumps(config, indent=2) + "\n")
        _write_new(staging / "indexcache_pattern.json", json.dumps(data, indent=2) + "\n")
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir
