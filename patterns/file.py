"""The pattern file `indexcache search` writes: the F/S string plus everything that produced it.

Schema (version 1), one JSON object:
    schema_version      1
    index_topk_pattern  F/S string, one letter per decoder layer (the key transformers, vLLM and SGLang read);
                        layers without an indexer are S, the first indexer layer is F
    full_layers         indices of the F layers
    num_layers, num_full, ratio   N, the F count, and the requested ratio (null when --num-full was given)
    description         one line on what the file is
    model               {name, model_type, config_sha256, num_layers, index_topk, indexer_layers (with indexer
                         weights: the layers that can be F), dsa_layers (the architecture's indexer layers, which
                         ratios and the uniform interleave count; absent in older files: every layer)}
    calibration         {source, dataset, dataset_config, split, text_column, num_samples, seq_len, seed,
                         windows (packed/document), window_offset, tokens_read, prefix_tokens (fed, not scored),
                         fingerprint (sha256 of the token windows), scored_positions, positions_over_topk}
    seed                the calibration seed
    search              {strategy, blocks, forced_full, pruning, cache, layer_forwards, seconds, device,
                         layers_on (device → decoder layers), dtype, kernels, batch_size, threads (batches run
                         at once)}
    versions            {indexcache, torch, transformers, datasets, python}
    loss_all_full       mean next-token NLL with every available indexer on
    loss_final          mean next-token NLL with the pattern
    trajectory          [{step, flipped, pattern, loss, candidates {layer: loss}, candidate_windows {layer: n}}]
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from ..errors import IndexCacheError
from .layout import validate

SCHEMA_VERSION = 1
REQUIRED = ("schema_version", "index_topk_pattern", "num_layers", "model")


def library_versions() -> dict[str, str]:
    """Installed versions of what produced an artifact (read from package metadata, nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    from .. import __version__

    packages = ("torch", "transformers", "datasets", "triton")
    return {
        "indexcache": __version__,
        **{name: installed(name) for name in packages},
        "python": platform.python_version(),
    }


def read(path: str | Path) -> dict:
    """Load and check a pattern file; any problem is one IndexCacheError line."""
    path = Path(path)
    if not path.is_file():
        raise IndexCacheError(f"pattern file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexCacheError(
            f"pattern file {path} is not valid JSON ({exc.__class__.__name__}); re-run search"
        ) from None
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED):
        raise IndexCacheError(f"pattern file {path} lacks {', '.join(REQUIRED)}; is it an indexcache pattern file?")
    if not isinstance(data["model"], dict) or not isinstance(data["model"].get("model_type"), str):
        raise IndexCacheError(f"pattern file {path}: 'model' must be an object with a 'model_type'")
    if not isinstance(data["num_layers"], int) or isinstance(data["num_layers"], bool):
        raise IndexCacheError(f"pattern file {path}: 'num_layers' is not an integer: {data['num_layers']!r}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise IndexCacheError(
            f"pattern file {path} has schema version {data['schema_version']}; this indexcache reads {SCHEMA_VERSION}"
        )
    dsa_layers = data["model"].get("dsa_layers")
    if dsa_layers is not None and (
        not isinstance(dsa_layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dsa_layers)
    ):
        raise IndexCacheError(f"pattern file {path}: 'model.dsa_layers' is not a list of layer numbers")
    try:
        validate(data["index_topk_pattern"], data["num_layers"], dsa_layers)
    except IndexCacheError as exc:
        raise IndexCacheError(f"pattern file {path}: {exc}") from None
    return data


def check_matches(data: dict, model_type: str, num_layers: int, source: str) -> None:
    """Refuse a pattern made for another architecture or depth."""
    if data["model"].get("model_type") != model_type:
        raise IndexCacheError(
            f"pattern was found for model type {data['model'].get('model_type')} but {source} is {model_type}"
        )
    if data["num_layers"] != num_layers:
        raise IndexCacheError(f"pattern has {data['num_layers']} layers but {source} has {num_layers}")
