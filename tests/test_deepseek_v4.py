"""DeepSeek-V4 (`deepseek_v4`) on a tiny random model: sliding, CSA and HCA layers, indexers on the CSA layers only
(2, 4, 6, 7), selections of compressed entries. Checked against stock transformers with forward hooks that hand
each S CSA layer the previous F CSA layer's selection (an oracle that never touches our patch), the prefix cache
against full forwards, the Triton kernel path (interpreter) against the reference, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

from indexcache.kernels.testing import kernel_device

DEVICE = kernel_device()  # before the kernel modules load: they pick compiler or interpreter then

from indexcache.cli.app import app  # noqa: E402
from indexcache.kernels.backend import forced  # noqa: E402
from indexcache.models import architecture_for  # noqa: E402
from indexcache.patterns.layout import full_layers, index_topk_freq  # noqa: E402
from indexcache.runtime.backends import select_backend  # noqa: E402
from indexcache.runtime.forward import LayerwiseModel  # noqa: E402
from indexcache.runtime.patch import index_sharing  # noqa: E402
from indexcache.search.scoring import CachedScorer, CachePlan, PatternScorer, cache_bytes_per_layer  # noqa: E402

from conftest import _tokenizer  # noqa: E402
from tiny_families import V4_CSA_LAYERS, V4_SEQ, v4_model  # noqa: E402
from tiny_models import patched_loss, random_ids, stock_loss  # noqa: E402

ARCH = architecture_for("deepseek_v4")
ALL_F = "SSFSFSFF"
# One F CSA layer, alternating, a late F after a run of S, S right after the first F.
PATTERNS = [ALL_F, "SSFSSSSS", "SSFSFSSS", "SSFSSSFS", "SSFSSSSF"]


@pytest.fixture(scope="module")
def model():
    return v4_model(seed=1)


@pytest.fixture(scope="module")
def ids():
    return random_ids(2, V4_SEQ, seed=3)


def hooked_stock_loss(model, pattern: str, ids: torch.Tensor) -> float:
    """Stock transformers, every indexer running, with forward hooks replacing each S CSA layer's selection by the
    last F CSA layer's: what the pattern means, built without our patch."""
    last = {}

    def hook(layer):
        def replace(module, args, out):
            if pattern[layer] == "F":
                last["selection"] = out
                return None
            return last["selection"]

        return replace

    handles = [model.model.layers[i].self_attn.compressor.indexer.register_forward_hook(hook(i)) for i in V4_CSA_LAYERS]
    try:
        return stock_loss(model, ids)
    finally:
        for h in handles:
            h.remove()


def test_indexer_layers_are_the_csa_layers(model):
    assert ARCH.dsa_layer_ids(model.config) == V4_CSA_LAYERS and ARCH.tokens_per_entry(model.config) == 4
    assert ARCH.indexer_weight_prefix(2) == "model.layers.2.self_attn.compressor.indexer."


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patched_loss_matches_the_hook_oracle(model, ids, pattern):
    """All-F equals the stock model; every pattern equals stock + hooks; only F CSA layers run their indexer."""
    ours, calls = patched_loss(model, ARCH, pattern, ids)
    assert ours == pytest.approx(hooked_stock_loss(model, pattern, ids), rel=1e-5)
    assert sorted(calls) == full_layers(pattern)
    if pattern == ALL_F:
        assert ours == pytest.approx(stock_loss(model, ids), rel=1e-5)


def test_patterns_change_the_loss(model, ids):
    """Guard against an oracle that passes because sharing never matters on this tiny model."""
    losses = {p: patched_loss(model, ARCH, p, ids)[0] for p in PATTERNS}
    assert len({round(v, 6) for v in losses.values()}) == len(PATTERNS)


def test_prefix_cache_equals_full_forwards(model, ids):
    """Restarting at a CSA layer from the cache (hyper-connection hidden states, the int64 entry buffer) gives the
    full forward's loss; also keeping every 2nd layer and in host memory."""
    lw = LayerwiseModel(model, ARCH)
    # The cache plan counts 4 fp32 hyper-connection streams of 32 values and top-4 int64 entry ids per token.
    assert cache_bytes_per_layer(lw, ids) == ids.numel() * (4 * 32 * 4 + 4 * 8)
    with torch.no_grad(), index_sharing(model, ARCH) as sharing:
        naive = PatternScorer(lw, sharing, ids, batch_size=1)
        expected = {layer: naive.loss(ALL_F[:layer] + "S" + ALL_F[layer + 1 :]) for layer in (4, 6, 7)}
        for plan in (CachePlan("device", 1), CachePlan("device", 2), CachePlan("host", 1)):
            scores = CachedScorer(lw, sharing, ids, batch_size=1, plan=plan).score(ALL_F, [4, 6, 7])
            assert {layer: s.loss for layer, s in scores.items()} == expected


def _kernel_loss(model, pattern: str, ids: torch.Tensor, backend: str, record: list | None = None) -> float:
    """The loss through `select_backend`'s CUDA choice (run on the CPU); `record` collects what F layers select."""
    lw = LayerwiseModel(model, ARCH)
    name, indexer_fn, attn = select_backend(ARCH, torch.device("cuda"), backend, ratio=4)
    assert attn is None  # sinks and the sliding-window keys: the model's own attention stays
    recorded = indexer_fn if record is None else lambda *a, **k: record.append(indexer_fn(*a, **k)) or record[-1]
    with torch.no_grad(), index_sharing(model, ARCH, pattern, recorded, attn), forced(backend):
        hidden, inputs = lw.embed(ids)
        hidden = lw.run_layers(hidden, inputs, 0, lw.num_layers)
        return lw.nll_sum(hidden, ids).sum().item() / (ids.shape[0] * (ids.shape[1] - 1))


def test_kernel_path_selects_what_the_stock_indexer_selects():
    """The Triton indexer over compressed entries (compiled on a GPU, TRITON_INTERPRET=1 on the CPU), through the
    product's backend choice, returns the stock indexer's int64 entry ids (-1 where a query sees no entry yet), and
    the loss through it is the reference's."""
    model = v4_model(seed=1, index_n_heads=8, index_head_dim=32).to(DEVICE)  # 8 heads: few exact ties after ReLU
    ids = random_ids(1, V4_SEQ, seed=3).to(DEVICE)
    stock, kernel = [], []
    indexer = model.model.layers[2].self_attn.compressor.indexer
    handle = indexer.register_forward_hook(lambda module, args, out: stock.append(out))
    reference = _kernel_loss(model, "SSFSSSSS", ids, "reference")  # the stock indexer runs on layer 2 only
    handle.remove()
    assert _kernel_loss(model, "SSFSSSSS", ids, "triton", kernel) == pytest.approx(reference, rel=1e-5)
    (got,), (want,) = kernel, stock
    assert got.dtype == want.dtype == torch.int64 and got.shape == want.shape == (1, V4_SEQ, 4)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values) and (got[:, :3] == -1).all()


# ------------------------------------------------------------------------------ the CLI end to end


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4")
    v4_model(seed=0).save_pretrained(path)
    _tokenizer(path)
    return path


def test_cli_search_eval_apply(checkpoint, text_file, tmp_path):
    """A search keeps half of the 4 CSA indexers, the first CSA layer (2) among them; the oracle reproduces its
    losses; eval's uniform row spaces CSA ordinals; apply writes vLLM's CSA-only pattern."""
    out = tmp_path / "p.json"
    sizes = f"--num-samples 2 --seq-len {V4_SEQ} --ratio 0.5 --device cpu"
    result = invoke("search", "--model", checkpoint, "--dataset", text_file, *sizes.split(), "-o", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    pattern = data["index_topk_pattern"]
    assert len(pattern) == 8 and full_layers(pattern)[0] == 2 and set(full_layers(pattern)) <= set(V4_CSA_LAYERS)
    assert data["num_full"] == 2 and data["model"]["dsa_layers"] == V4_CSA_LAYERS
    # Query t sees (t + 1) // 4 entries: it chooses among more than top-4 from t = 19 on (positions 19..94).
    assert data["calibration"]["positions_over_topk"] == 2 * (V4_SEQ - 20)

    stock = v4_model(seed=0)
    windows = torch.tensor(_calibration_windows(checkpoint, data))
    for step in data["trajectory"]:
        assert step["loss"] == pytest.approx(hooked_stock_loss(stock, step["pattern"], windows), rel=1e-5)

    result = invoke("eval", out, "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads((tmp_path / "eval.json").read_text())["results"]}
    assert rows["all-F"]["pattern"] == ALL_F and rows["uniform"]["pattern"] == "SSFSSSFS"

    applied = tmp_path / "applied"
    result = invoke("apply", out, "--model", checkpoint, "--output", applied)
    assert result.exit_code == 0, result.output
    assert "ignores the pattern" in result.stderr
    config = json.loads((applied / "config.json").read_text())
    letters = "".join(pattern[i] for i in V4_CSA_LAYERS)
    assert config["index_topk_pattern"] == letters and letters[0] == "F" and config["use_index_cache"] is True
    assert "indexer_types" not in config and config.get("index_topk_freq") == index_topk_freq(letters)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(applied)
    assert [i for i, layer in enumerate(loaded.model.layers) if ARCH.indexer(layer) is not None] == V4_CSA_LAYERS


def _calibration_windows(checkpoint, data: dict) -> list[list[int]]:
    """The search's calibration windows, rebuilt from what its pattern file records."""
    from indexcache.calib import DataSpec
    from indexcache.models import open_checkpoint
    from indexcache.steps import calibration_windows

    calib = data["calibration"]
    fields = ("dataset", "dataset_config", "split", "text_column", "num_samples", "seq_len", "seed", "windows")
    windows = calibration_windows(open_checkpoint(str(checkpoint)), DataSpec(**{k: calib[k] for k in fields}))
    assert windows.fingerprint == calib["fingerprint"]
    return windows.input_ids.tolist()


def test_apply_writes_index_topk_freq_for_a_uniform_pattern(checkpoint, tmp_path):
    from indexcache.export import config_with_pattern

    config = json.loads((checkpoint / "config.json").read_text())
    written = config_with_pattern(config, "SSFSSSFS", V4_CSA_LAYERS)  # CSA ordinals 0 and 2: every 2nd
    assert written["index_topk_pattern"] == "FSFS" and written["index_topk_freq"] == 2
    assert "index_topk_freq" not in config_with_pattern(config, "SSFSFSSF", V4_CSA_LAYERS)  # FFSF: no schedule


@pytest.mark.parametrize(
    "command,line",
    [
        pytest.param(
            ("search", "--seq-len", "19", "--num-samples", "1"),
            "no query sees more than the model's index_topk (4)",
            id="window-in-entries",
        ),
        pytest.param(("distill",), "distill: DeepSeek-V4's attention reads the selection as a mask", id="distill"),
    ],
)
def test_refusals_are_one_line(command, line, checkpoint, text_file, tmp_path):
    """19 tokens: query 18 sees 19 // 4 = 4 entries, no more than top-4, so every pattern would tie."""
    if command[0] == "distill":
        pattern = tmp_path / "p.json"
        pattern.write_text(json.dumps({**_minimal_pattern_file(checkpoint), "index_topk_pattern": "SSFSSSFS"}))
        args = ("distill", pattern, "--steps", "1", "-o", tmp_path / "out")
    else:
        args = (*command, "--model", checkpoint, "--dataset", text_file, "--device", "cpu", "-o", tmp_path / "p.json")
    result = invoke(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and line in lines[0]


def _minimal_pattern_file(checkpoint) -> dict:
    return {
        "schema_version": 1,
        "num_layers": 8,
        "model": {"name": str(checkpoint), "model_type": "deepseek_v4", "dsa_layers": V4_CSA_LAYERS},
    }


def test_flash_and_pro_layouts_count_csa_layers():
    """V4-Flash's layout (2 sliding layers, CSA on the even layers 2-42) and transformers' default one (2 HCA
    layers, then CSA/HCA interleaved, the first CSA layer 3): patterns, ratios and window defaults over CSA layers."""
    from transformers import DeepseekV4Config

    from indexcache.bench.prefill import named_patterns
    from indexcache.calib import default_seq_len

    flash = DeepseekV4Config(compress_ratios=[0, 0] + [4, 128] * 20 + [4])
    default = DeepseekV4Config()
    assert ARCH.dsa_layer_ids(flash) == list(range(2, 43, 2)) and ARCH.dsa_layer_ids(default)[:2] == [3, 5]
    for config, csa in ((flash, 21), (default, 20)):
        rows = dict(named_patterns(config.num_hidden_layers, None, 0.25, ARCH.dsa_layer_ids(config)))
        assert rows["all-F"] == "F" * csa and rows["uniform"].count("F") == -(-csa // 4) and rows["uniform"][0] == "F"
    assert default_seq_len(flash.index_topk, ARCH.tokens_per_entry(flash)) == 8192  # 4 × 512 entries × 4 tokens
    assert default_seq_len(1024, 4) == 16384  # V4-Pro's top-1024
