"""What `indexcache distill` writes: the servable output folder, and the resumable training state beside it.

The output is the input checkpoint folder, rewritten tensor by tensor from its own safetensors files: F layers'
indexer tensors replaced by the trained ones (in the stored dtype), S layers' indexer tensors dropped (the layout
GLM-5.2 ships: a Shared layer has no indexer), every other tensor copied bit for bit. config.json carries the
pattern; the run's record sits beside it. The folder is built in a staging folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..atomic import write_json
from ..errors import IndexCacheError
from ..export import config_with_pattern

INDEX_FILE = "model.safetensors.index.json"
RECORD_FILE = "indexcache_distill.json"
PATTERN_FILE = "indexcache_pattern.json"


def state_path(output: Path) -> Path:
    """Where the training state is saved every K steps, for `resume=True`."""
    return output.with_name(output.name + ".distill-state.pt")


def save_state(output: Path, state: dict) -> None:
    """torch.save to a temporary file beside the target, then rename: a reader never sees half a state."""
    path = state_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(output: Path) -> dict:
    path = state_path(output)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        state = None
    if not isinstance(state, dict) or not {"inputs", "step", "masters", "optimizer", "losses"} <= state.keys():
        raise IndexCacheError(f"--resume: {path} is not a saved distillation; delete it and run without --resume")
    return state


def _shards(model_dir: Path) -> dict[str, list[str]]:
    """{shard file name: [tensor names]} of a local safetensors checkpoint."""
    from safetensors import safe_open

    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise IndexCacheError(f"{model_dir} holds no .safetensors weights; distill writes safetensors checkpoints")
    shards = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as handle:
            shards[name] = list(handle.keys())
    return shards


def _pattern_for_output(pattern_data: dict, output: Path, staging: Path, pattern: str) -> dict:
    """The input pattern file, its model now the output folder: `indexcache eval OUT/indexcache_pattern.json`
    evaluates the distilled indexers, never silently the source model's."""
    model = {
        **pattern_data["model"],
        "name": str(output.resolve()),
        "config_sha256": hashlib.sha256((staging / "config.json").read_bytes()).hexdigest(),
        "indexer_layers": [i for i, c in enumerate(pattern) if c == "F"],
    }
    return {**pattern_data, "model": model, "distilled_from": pattern_data["model"]}


def write_checkpoint(
    model_dir: Path,
    output: Path,
    pattern: str,
    trained: dict[str, torch.Tensor],
    dropped_prefixes: list[str],
    pattern_data: dict,
    record: dict,
) -> None:
    """Write `output` from `model_dir` with `trained` tensors replacing theirs and `dropped_prefixes` removed.

    trained: {tensor name: fp32 tensor}; each must exist in the checkpoint and is cast to its stored dtype.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    shards = _shards(model_dir)
    stored = {key for keys in shards.values() for key in keys}
    absent = sorted(set(trained) - stored)
    if absent:
        raise IndexCacheError(f"the checkpoint stores no tensor {absent[0]}; cannot write the trained indexer there")

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the checkpoint from a serving engine's user
    try:
        weight_map, total_size, total_params = {}, 0, 0
        for name, keys in shards.items():
            tensors = {}
            with safe_open(str(model_dir / name), framework="pt") as handle:
                metadata = handle.metadata() or {"format": "pt"}
                for key in keys:
                    if key.startswith(tuple(dropped_prefixes)):
                        continue
                    tensor = handle.get_tensor(key)
                    if key in trained:
                        tensor = trained[key].detach().to("cpu", tensor.dtype).contiguous()
                    tensors[key] = tensor
            save_file(tensors, str(staging / name), metadata=metadata)
            for key, tensor in tensors.items():
                weight_map[key] = name
                total_size += tensor.numel() * tensor.element_size()
                total_params += tensor.numel()
        if (model_dir / INDEX_FILE).exists():
            index = json.loads((model_dir / INDEX_FILE).read_text())
            index["metadata"] = {**index.get("metadata", {}), "total_size": total_size}
            if "total_parameters" in index["metadata"]:
                index["metadata"]["total_parameters"] = total_params
            index["weight_map"] = dict(sorted(weight_map.items()))
            write_json(staging / INDEX_FILE, index)
        for item in sorted(model_dir.iterdir()):
            is_weights = item.suffix == ".safetensors" or item.name in (INDEX_FILE, "config.json")
            if is_weights or item.name in (RECORD_FILE, PATTERN_FILE) or item.name.startswith("."):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        write_json(staging / "config.json", config_with_pattern(config, pattern))
        write_json(staging / PATTERN_FILE, _pattern_for_output(pattern_data, output, staging, pattern))
        write_json(staging / RECORD_FILE, record)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
