"""`indexcache distill` on tiny random glm_moe_dsa models (CPU): the target, the training, the checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import error_line, invoke
from transformers import AutoModelForCausalLM, GlmMoeDsaForCausalLM

from indexcache.distill.checkpoint import state_path
from indexcache.distill.train import GroupDistiller, distill, distill_context, served_layers
from indexcache.models import LoadedModel, architecture_for, load_model
from indexcache.patterns.layout import full_layers
from indexcache.runtime.forward import LayerwiseModel
from indexcache.runtime.patch import index_sharing

from tiny_models import deepseek_model, glm_config, glm_model, random_ids

PATTERN = "FSSFSS"  # two groups: layer 0 serves 0-2, layer 3 serves 3-5
SEQ = 40  # index_topk 8 ≪ 40: selection matters


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _pattern_file(folder: Path, checkpoint: Path, pattern: str = PATTERN, num_layers: int = 6) -> Path:
    path = folder / "pattern.json"
    data = {
        "schema_version": 1,
        "index_topk_pattern": pattern,
        "num_layers": num_layers,
        "model": {"name": str(checkpoint), "model_type": "glm_moe_dsa"},
    }
    path.write_text(json.dumps(data))
    return path


def _token_rows(folder: Path, num: int, length: int = SEQ, seed: int = 0) -> Path:
    """Pre-tokenised rows: used as-is, one window each."""
    path = folder / f"rows{num}-{seed}.jsonl"
    rows = random_ids(num, length, seed=seed).tolist()
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return path


def _run(tmp: Path, checkpoint: Path, name: str, **kwargs) -> Path:
    from indexcache.calib import DataSpec

    rows = _token_rows(tmp, 4)
    spec = DataSpec(dataset=str(rows), num_samples=4, seq_len=SEQ)
    options = dict(steps=4, lr=1e-2, batch_size=2, save_every=2, device="cpu", log=lambda m: None) | kwargs
    distill(_pattern_file(tmp, checkpoint), tmp / name, data=spec, **options)
    return tmp / name


@pytest.fixture(scope="module")
def distilled(glm_checkpoint, tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("distill"), glm_checkpoint, "out")


class _Recording(GroupDistiller):
    """Keeps each group's finished target and selection, before the KL is taken."""

    def close(self):
        if self.open is not None:
            group = self.open
            self.targets[group.layer] = (group.target_sum / group.layers, group.indices.long())
        super().close()


@pytest.mark.parametrize(
    "family,pattern,objective",
    [
        pytest.param("glm_moe_dsa", PATTERN, "multi", id="glm-FSSFSS-multi"),
        pytest.param("glm_moe_dsa", PATTERN, "single", id="glm-FSSFSS-single"),
        # Stock deepseek_v32 ignores patterns, so its oracle is all-F; its indexer RoPE is the "half" layout.
        pytest.param("deepseek_v32", "FFFF", "multi", id="dsv32-FFFF"),
    ],
)
def test_group_target_equals_dense_bruteforce(family, pattern, objective):
    """Streamed target over the selected keys == the dense average of the served layers' head-mean attention."""
    ids = random_ids(2, SEQ, seed=3)
    if family == "glm_moe_dsa":
        model = glm_model(seed=3)
        config = glm_config(index_topk_pattern=pattern)
        config._attn_implementation = "eager"
        stock = GlmMoeDsaForCausalLM(config).eval()
        stock.load_state_dict(model.state_dict(), strict=False)
    else:
        model = stock = deepseek_model(seed=3)
    with torch.no_grad():
        attentions = stock(ids, output_attentions=True).attentions  # per layer [B, H, S, T], zero off-selection

    arch = architecture_for(family)
    stack = arch.layers(model)
    full = full_layers(pattern)
    distiller = _Recording(arch, objective, {id(stack[f].self_attn.indexer): f for f in full})
    distiller.targets = {}
    loaded = LoadedModel(model, arch, None, "test", "", list(range(len(pattern))))
    lw = LayerwiseModel(model, arch)
    for name, param in model.named_parameters():
        param.requires_grad_(".indexer." in name)
    with distill_context(loaded, pattern, distiller), torch.no_grad():
        hidden, inputs = lw.embed(ids)
        lw.run_layers(hidden, inputs, 0, lw.num_layers)
        distiller.close()

    assert sorted(distiller.targets) == full
    for f, layers in served_layers(pattern).items():
        used = layers if objective == "multi" else [f]
        dense = torch.stack([attentions[layer].float().mean(1) for layer in used]).mean(0)  # [B, S, T]
        target, indices = distiller.targets[f]
        ours = torch.zeros_like(dense).scatter_add_(-1, indices.clamp(min=0), target)
        assert (dense > 0).sum() == (ours > 0).sum()  # the same selected keys carry mass
        torch.testing.assert_close(ours, dense, atol=2e-5, rtol=1e-4)
        assert distiller.losses[f] > 0


def test_only_f_indexers_change(distilled, glm_checkpoint):
    before, after = _weights(glm_checkpoint), _weights(distilled)
    arch = architecture_for("glm_moe_dsa")
    f_prefix = tuple(arch.indexer_weight_prefix(f) for f in full_layers(PATTERN))
    s_prefix = tuple(arch.indexer_weight_prefix(i) for i, c in enumerate(PATTERN) if c == "S")
    assert not [k for k in after if k.startswith(s_prefix)]
    assert set(after) == {k for k in before if not k.startswith(s_prefix)}
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {k for k in after if k.startswith(f_prefix)}
    assert all(after[k].dtype == before[k].dtype for k in after)
    config = json.loads((distilled / "config.json").read_text())
    assert config["index_topk_pattern"] == PATTERN
    assert config["indexer_types"] == ["full", "shared", "shared", "full", "shared", "shared"]
    record = json.loads((distilled / "indexcache_distill.json").read_text())
    assert record["steps"] == len(record["losses"]) == 4 and record["tokens"] == 4 * 2 * SEQ
    assert set(record["losses"][0]["kl"]) == {"0", "3"}
    assert not state_path(distilled).exists()


def test_steps_lower_the_loss_on_a_fixed_batch(glm_checkpoint, tmp_path):
    from indexcache.calib import DataSpec

    spec = DataSpec(dataset=str(_token_rows(tmp_path, 1, seed=5)), num_samples=1, seq_len=SEQ)
    record = distill(
        _pattern_file(tmp_path, glm_checkpoint), tmp_path / "o", 12, data=spec, lr=1e-2, device="cpu", log=print
    )
    first, last = (sum(step["kl"].values()) for step in (record["losses"][0], record["losses"][-1]))
    assert last < 0.7 * first, (first, last)


def _patched_loss(loaded: LoadedModel, ids: torch.Tensor) -> float:
    lw = LayerwiseModel(loaded.model, loaded.arch)
    with torch.no_grad(), index_sharing(loaded.model, loaded.arch, PATTERN):
        hidden, inputs = lw.embed(ids)
        hidden = lw.run_layers(hidden, inputs, 0, lw.num_layers)
        return lw.nll_sum(hidden, ids).sum().item() / (ids.shape[0] * (ids.shape[1] - 1))


def test_output_loads_in_stock_transformers_and_reproduces_the_patched_loss(distilled, glm_checkpoint):
    ids = random_ids(2, SEQ, seed=9)
    stock = AutoModelForCausalLM.from_pretrained(distilled, dtype=torch.float32, attn_implementation="eager").eval()
    assert [layer.self_attn.indexer is None for layer in stock.model.layers] == [c == "S" for c in PATTERN]
    with torch.no_grad():
        stock_loss = stock(ids, labels=ids).loss.item()

    # Ours: the source checkpoint with every indexer, the distilled F weights put in, the pattern patched on.
    loaded = load_model(str(glm_checkpoint), device="cpu")
    before = _patched_loss(loaded, ids)
    trained = {k: v for k, v in _weights(distilled).items() if ".indexer." in k}
    unexpected = loaded.model.load_state_dict(trained, strict=False).unexpected_keys
    assert not unexpected
    ours = _patched_loss(loaded, ids)
    assert ours == pytest.approx(stock_loss, rel=1e-4)
    assert before != pytest.approx(ours, rel=1e-6)  # the trained indexers do select differently


def test_eval_of_the_output_compares_with_the_source(distilled, glm_checkpoint, tmp_path):
    """`eval OUT/indexcache_pattern.json`: the distilled pattern, the same pattern on the source checkpoint and the
    source's all-F, on the same windows — the rows a plain eval of the input pattern gives on the source."""
    rows = _token_rows(tmp_path, 2, seed=7)
    options = ("--dataset", rows, "--num-samples", 2, "--seq-len", SEQ, "--device", "cpu")
    result = invoke("eval", distilled / "indexcache_pattern.json", *options, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    assert "differs" not in result.output  # the pattern file names the output folder, its config and its source
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["model"] == str(distilled.resolve())
    assert evaluated["source_model"] == str(glm_checkpoint.resolve())
    got = {r["name"]: r for r in evaluated["results"]}
    assert list(got) == ["distilled", "undistilled", "source all-F"]
    assert got["distilled"]["pattern"] == got["undistilled"]["pattern"] == PATTERN
    assert got["source all-F"]["pattern"] == "F" * len(PATTERN)
    for name in got:
        assert name in result.output
        assert got[name]["delta_vs_all_full"] == got[name]["loss"] - got["source all-F"]["loss"]

    plain = invoke("eval", distilled.parent / "pattern.json", *options, "--json", tmp_path / "source.json")
    assert plain.exit_code == 0, plain.output
    source = {r["name"]: r["loss"] for r in json.loads((tmp_path / "source.json").read_text())["results"]}
    assert got["undistilled"]["loss"] == source["pattern"]
    assert got["source all-F"]["loss"] == source["all-F"]
    assert got["distilled"]["loss"] != pytest.approx(got["undistilled"]["loss"], rel=1e-6)  # trained indexers


def test_resume_gives_the_weights_of_an_uninterrupted_run(distilled, glm_checkpoint, tmp_path):
    def stop_after_3(step, total, kl):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, glm_checkpoint, "resumed", observer=stop_after_3)
    assert state_path(tmp_path / "resumed").exists() and not (tmp_path / "resumed").exists()
    _run(tmp_path, glm_checkpoint, "resumed", resume=True)
    a, b = _weights(distilled), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "resumed" / "indexcache_distill.json").read_text())
    assert [s["step"] for s in record["losses"]] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "case",
    ["pattern-model-mismatch", "zero-steps", "unwritable-output", "f-layer-without-indexer"],
)
def test_bad_inputs_get_one_line(case, glm_checkpoint, tmp_path):
    rows = _token_rows(tmp_path, 2)
    pattern = _pattern_file(tmp_path, glm_checkpoint)
    model, output, steps = glm_checkpoint, tmp_path / "out", 2
    if case == "pattern-model-mismatch":
        pattern = _pattern_file(tmp_path, glm_checkpoint, "FSSFSSSF", num_layers=8)
        fragment = "8 layers"
    elif case == "zero-steps":
        steps, fragment = 0, "--steps 0"
    elif case == "unwritable-output":
        (tmp_path / "file").write_text("x")
        output, fragment = tmp_path / "file" / "out", "not a writable folder"
    else:
        model = tmp_path / "copy"  # the checkpoint without layer 3's indexer, which the pattern keeps F
        shutil.copytree(glm_checkpoint, model)
        for shard in model.glob("*.safetensors"):
            save_file({k: v for k, v in load_file(shard).items() if ".layers.3.self_attn.indexer." not in k}, shard)
        fragment = "no indexer weights"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke(
        "distill", pattern, "--model", model, "--dataset", rows, "--num-samples", 2, "--seq-len", SEQ,
        "--steps", steps, "--device", "cpu", "-o", output,
    )  # fmt: skip
    assert fragment in error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bf16_weights_train_through_fp32_masters():
    """Updates below bf16's resolution accumulate in the fp32 master and reach the bf16 weight once they add up."""
    from indexcache.distill.train import optimizer_step

    param = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    master = param.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.SGD([master], lr=1e-3)
    for step in range(20):
        param.grad = torch.ones_like(param)
        optimizer_step({"w": param}, {"w": master}, optimizer)
        if step == 0:
            assert torch.equal(param, torch.ones_like(param)) and master[0].item() < 1.0  # 1 - 5e-4 rounds to 1
    assert master[0].item() == pytest.approx(1 - 20 * 1e-3 * 0.5, rel=1e-4)  # grad-norm clip 1.0 over 4 values
    assert param[0].item() < 1.0 and param.grad is None
