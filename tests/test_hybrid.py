"""The hybrid families (linear-attention layers between DSA layers): glm5_next (kpool pools, NoPE, 2-D token mask,
[B, S, 4, H] streams) and qwen4_exp (QSA compressed blocks returned as a mask, mRoPE, PLE inputs, flat [B, S, 4H]
streams, no final norm). Oracles are stock transformers: the model itself for all-F, and the model with forward
hooks that hand each S indexed layer's attention the previous F indexed layer's indexer output."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers.masking_utils import create_causal_mask
from typer.testing import CliRunner

from indexcache.kernels.testing import kernel_device

DEVICE = kernel_device()  # before the kernel modules load: they pick compiler or interpreter then

from indexcache.cli.app import app  # noqa: E402
from indexcache.kernels.backend import forced  # noqa: E402
from indexcache.models import architecture_for  # noqa: E402
from indexcache.runtime.backends import select_backend  # noqa: E402
from indexcache.runtime.forward import LayerwiseModel  # noqa: E402
from indexcache.runtime.patch import index_sharing  # noqa: E402
from indexcache.runtime.pooled import kpool_kernel, qsa_kernel, qsa_reference, selection_mask  # noqa: E402
from indexcache.search.scoring import CachedScorer, CachePlan, PatternScorer  # noqa: E402

from conftest import _tokenizer  # noqa: E402
from tiny_families import glm5_next_model, qwen4_exp_model, qwen4_exp_text_model  # noqa: E402
from tiny_models import patched_loss, random_ids, stock_loss  # noqa: E402

SEQ = 40  # a query keeps at most 8 + 3 tokens: most of the 40 positions choose


def _qsa_inputs(model, seq_len: int, seed: int, batch: int = 2):
    """Layer 3's QSA indexer with its stock inputs on the model's device: hidden [B, S, H], (cos, sin) of mRoPE
    positions, the mask."""
    gen = torch.Generator().manual_seed(seed)
    base, device = model.model, model.device
    hidden = torch.randn(batch, seq_len, base.config.hidden_size, generator=gen).to(device)
    positions = torch.arange(seq_len, device=device)[None, None].expand(3, batch, -1)
    rotary = base.rotary_emb(hidden, positions)
    mask = create_causal_mask(
        config=base.config, inputs_embeds=hidden, attention_mask=None, cache=None,
        position_ids=positions[0, :1], allow_is_causal_skip=False,
    )  # fmt: skip
    return base.layers[3].self_attn.indexer, hidden, rotary, mask


@pytest.mark.parametrize("seq_len", [pytest.param(45, id="S45"), pytest.param(10, id="S10-no-choice")])
def test_vectorised_qsa_reference_equals_the_stock_indexer(seq_len):
    """The stock QSA indexer loops in Python over every (batch, query); ours scores a chunk of queries at once and
    must give exactly its mask, also where no query sees more blocks than it keeps (S10)."""
    indexer, hidden, rotary, mask = _qsa_inputs(qwen4_exp_text_model(seed=2), seq_len, seed=seq_len)
    with torch.no_grad():
        stock = indexer(hidden, rotary, mask, None)
        ours = qsa_reference(indexer, hidden, rotary)
    assert ours.shape == (2, seq_len, 8 + 3) and ours.dtype == torch.int32
    assert torch.equal(selection_mask(ours), stock)
    if seq_len > 11:  # the selection matters: some query keeps fewer tokens than it sees
        assert (selection_mask(ours)[:, 0].sum(-1) < torch.arange(1, seq_len + 1)).any()


def _rows(selection: torch.Tensor) -> torch.Tensor:
    return selection.sort(-1).values


def test_kernel_selections_equal_the_references():
    """Compiled on a GPU, under Triton's interpreter on the CPU: the pooled kernel path selects glm5_next's stock
    token set (pools expanded, tail appended) and the QSA reference's set. 8 indexer heads with positive weights, so
    no exact ties at zero."""
    model = glm5_next_model(seed=3, index_n_heads=8).to(DEVICE)
    indexer = model.model.language_model.layers[3].self_attn.indexer
    with torch.no_grad():
        indexer.weights_proj.weight.abs_()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 30, 32, generator=gen).to(DEVICE)
    q_resid = torch.randn(1, 30, 24, generator=gen).to(DEVICE)
    valid = torch.ones(1, 30, dtype=torch.bool, device=DEVICE)
    with torch.no_grad(), forced("triton"):
        stock = indexer(hidden_states=hidden, q_resid=q_resid, attention_mask=valid, cache=None)
        ours = kpool_kernel(indexer, hidden_states=hidden, q_resid=q_resid, attention_mask=valid, cache=None)
    assert ours.shape == stock.shape and torch.equal(_rows(ours), _rows(stock))

    qwen = qwen4_exp_text_model(seed=4, indexer_n_heads=8).to(DEVICE)
    indexer, hidden, rotary, _ = _qsa_inputs(qwen, 30, seed=1, batch=1)
    with torch.no_grad(), forced("triton"):
        got = qsa_kernel(indexer, hidden, rotary)
    assert torch.equal(_rows(got), _rows(qsa_reference(indexer, hidden, rotary)))


# ------------------------------------------------------------------- the F/S patch against stock transformers

BUILDERS = {"glm5_next": glm5_next_model, "qwen4_exp_text": qwen4_exp_text_model}
INDEXED = [3, 7, 11]
ALL_FULL = "SSSFSSSFSSSF"  # layers without an indexer are S
# One long S run over eight linear layers, S right after linear layers, a late F.
PATTERNS = ["SSSFSSSSSSSS", "SSSFSSSFSSSS", "SSSFSSSSSSSF"]


def hooked_stock_loss(model, arch, pattern: str, ids: torch.Tensor) -> float:
    """The oracle: the stock model (every indexer runs), with each S indexed layer's indexer output replaced by a
    forward hook with the output of the previous F indexed layer's indexer. Nothing of our patch is involved."""
    last = {}

    def hook(module, args, output, layer):
        if pattern[layer] == "F":
            last["output"] = output
            return None
        return last["output"]

    handles = [
        arch.attention(layer).indexer.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i))
        for i, layer in enumerate(arch.layers(model))
        if i in INDEXED
    ]
    try:
        return stock_loss(model, ids)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_all_full_equals_stock_and_only_indexed_layers_run_an_indexer(family):
    model, arch = BUILDERS[family](seed=1), architecture_for(family)
    ids = random_ids(2, SEQ, seed=3)
    loss, calls = patched_loss(model, arch, ALL_FULL, ids)
    assert loss == pytest.approx(stock_loss(model, ids), rel=1e-5)
    assert sorted(calls) == INDEXED


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_s_layers_after_linear_layers_match_the_hooked_stock_model(family):
    """Our loss with S indexed layers (after any number of linear layers) equals the oracle's, each pattern has its
    own loss (sharing matters on these models), and S layers never ran their indexer."""
    model, arch = BUILDERS[family](seed=1), architecture_for(family)
    ids = random_ids(2, SEQ, seed=3)
    losses = {}
    for pattern in PATTERNS:
        losses[pattern], calls = patched_loss(model, arch, pattern, ids)
        assert losses[pattern] == pytest.approx(hooked_stock_loss(model, arch, pattern, ids), rel=1e-5)
        assert sorted(calls) == [i for i, c in enumerate(pattern) if c == "F"]
    losses[ALL_FULL] = patched_loss(model, arch, ALL_FULL, ids)[0]
    assert len({round(v, 6) for v in losses.values()}) == len(losses)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_prefix_cache_equals_full_forwards(family):
    """Restarting at an indexed layer from the cache (hidden streams, the index buffer, the layer inputs with PLE
    token ids) gives exactly the full forward's loss, in device and host memory and keeping every 2nd layer."""
    model, arch = BUILDERS[family](seed=1), architecture_for(family)
    lw = LayerwiseModel(model, arch)
    windows = random_ids(2, SEQ, seed=4)
    with torch.no_grad(), index_sharing(model, arch) as sharing:
        naive = PatternScorer(lw, sharing, windows, batch_size=1)
        expected = {layer: naive.loss(ALL_FULL[:layer] + "S" + ALL_FULL[layer + 1 :]) for layer in (7, 11)}
        for plan in (CachePlan("device", 1), CachePlan("device", 2), CachePlan("host", 1)):
            cached = CachedScorer(lw, sharing, windows, batch_size=1, plan=plan)
            assert {layer: s.loss for layer, s in cached.score(ALL_FULL, [7, 11]).items()} == expected


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_kernel_path_reproduces_the_reference_loss(family):
    """`--kernels triton`'s choice (compiled on a GPU, Triton's interpreter on the CPU): the pooled kernel selection
    and the family's own attention give the reference loss."""
    overrides = {"glm5_next": {"index_n_heads": 8}, "qwen4_exp_text": {"indexer_n_heads": 8}}[family]
    model, arch = BUILDERS[family](seed=2, **overrides).to(DEVICE), architecture_for(family)
    ids = random_ids(1, 32, seed=5).to(DEVICE)
    losses = {}
    for backend in ("reference", "triton"):
        name, indexer_fn, attn = select_backend(arch, torch.device("cuda"), backend)
        assert attn == (None if backend == "reference" else "sdpa")
        lw = LayerwiseModel(model, arch)
        with torch.no_grad(), index_sharing(model, arch, "SSSFSSSSSSSF", indexer_fn, attn), forced(backend):
            hidden, inputs = lw.embed(ids)
            hidden = lw.run_layers(hidden, inputs, 0, lw.num_layers)
            losses[backend] = lw.nll_sum(hidden, ids).item()
    assert losses["triton"] == pytest.approx(losses["reference"], rel=1e-5)


# ------------------------------------------------------------------------------------------ the CLI, end to end

CHECKPOINTS = {"glm5_next": glm5_next_model, "qwen4_exp_text": qwen4_exp_text_model, "qwen4_exp": qwen4_exp_model}
# What `apply` says: stock glm5_next cannot run an S layer after a linear layer; nothing reads qwen4_exp patterns.
NOTES = {"glm5_next": "cannot run this pattern", "qwen4_exp_text": "no reader", "qwen4_exp": "no reader"}
KEYS = {"glm5_next": {"index_topk_pattern", "indexer_types"}, "qwen4_exp_text": {"indexer_types"}}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("family", sorted(CHECKPOINTS))
def test_cli_round_trip(family, text_file, tmp_path):
    """search → eval → analyze → apply → bench (CPU smoke) on a tiny checkpoint; distill refuses in one line. The
    pattern keeps the first indexed layer F and every linear layer S; the applied config carries it."""
    arch = architecture_for(family)
    checkpoint = tmp_path / "ckpt"
    model = CHECKPOINTS[family](seed=0)
    model.save_pretrained(checkpoint)
    _tokenizer(checkpoint)
    pattern_path = tmp_path / "p.json"
    sizes = ["--num-samples", "2", "--seq-len", "40", "--device", "cpu"]
    ratio = ["--num-full", "2"]
    result = invoke("search", "--model", checkpoint, "--dataset", text_file, *sizes, *ratio, "-o", pattern_path)
    assert result.exit_code == 0, result.output
    data = json.loads(pattern_path.read_text())
    pattern = data["index_topk_pattern"]
    assert data["model"]["indexer_layers"] == INDEXED and data["model"]["index_topk"] == 11
    assert pattern[3] == "F" and pattern.count("F") == 2 and {i for i, c in enumerate(pattern) if c == "F"} < {3, 7, 11}
    assert len(data["trajectory"]) == 1 and data["calibration"]["positions_over_topk"] > 0

    result = invoke("eval", pattern_path)
    assert result.exit_code == 0 and "all-F" in result.stdout, result.output

    result = invoke("analyze", "--model", checkpoint, "--dataset", text_file, *sizes, "-o", tmp_path / "an")
    assert result.exit_code == 0, result.output
    overlap = json.loads((tmp_path / "an" / "analysis.json").read_text())["overlap"]
    assert [i for i in range(12) if overlap[i][i] is not None] == INDEXED and overlap[3][3] == 1.0
    assert 0 < overlap[3][7] < 1 and overlap[3][7] == pytest.approx(overlap[7][3])

    applied = tmp_path / "applied"
    result = invoke("apply", pattern_path, "--model", checkpoint, "--output", applied)
    assert result.exit_code == 0 and NOTES[family] in result.stderr, result.output
    config = json.loads((applied / "config.json").read_text())
    written = config.get("text_config", config)
    assert KEYS.get(family, KEYS["qwen4_exp_text"]) <= written.keys()
    assert written["indexer_types"] == ["full" if c == "F" else "shared" for c in pattern]
    if family == "glm5_next":  # the note's claim: stock transformers builds the pattern but cannot run it
        stock = getattr(transformers, arch.auto_class).from_pretrained(applied, attn_implementation="eager").eval()
        with pytest.raises(ValueError, match="require top-k indices from a previous full indexer layer"):
            stock_loss(stock, random_ids(1, SEQ))

    result = invoke("bench", pattern_path, "--device", "cpu", "--context", 24, "--layers", 2, "--reps", 1)
    assert result.exit_code == 0 and "rows count the 3 indexer layers" in result.stdout, result.output
    line = one_error_line(invoke("distill", pattern_path, "--steps", 1, "-o", tmp_path / "d", "--device", "cpu"))
    assert "distillation does not train yet" in line and not (tmp_path / "d").exists()


def test_windows_in_which_no_query_chooses_are_refused(text_file, tmp_path):
    """A query keeps up to budget + block − 1 = 11 tokens: 11-token windows would score every pattern alike."""
    checkpoint = tmp_path / "ckpt"
    qwen4_exp_text_model(seed=0).save_pretrained(checkpoint)
    _tokenizer(checkpoint)
    sizes = ["--num-samples", "2", "--seq-len", "11", "--device", "cpu"]
    line = one_error_line(invoke("search", "--model", checkpoint, "--dataset", text_file, *sizes, "-o", tmp_path / "p"))
    assert "index_topk (11)" in line and not (tmp_path / "p").exists()


def test_bench_builds_indexer_layers_of_the_released_config():
    """`indexcache bench` on GLM-5.3-Flash's own config: K indexed layers (the 34 KDA layers are not timed), every
    one with its indexer, and a padding id inside the stack's small vocabulary."""
    from indexcache.bench.prefill import stack_config, timed_layers

    config = transformers.Glm5NextConfig()
    assert timed_layers(config) == list(range(3, 45, 4))
    text = stack_config(config, 2, mlp="dense").get_text_config()
    assert text.layer_types == ["indexed_attention"] * 2 and text.indexer_types == ["full"] * 2
    assert text.pad_token_id is None and text.num_hidden_layers == 2
