"""`mlp_in_chunks`: a long window's MLP (dense or MoE) on chunks of positions gives the whole window's result, and
every module gets its own forward back."""

from __future__ import annotations

import torch

from indexcache.runtime.chunked import mlp_in_chunks

from tiny_models import glm_model


def test_mlp_in_chunks_equals_the_whole_window_and_restores():
    model = glm_model(num_layers=3)  # two dense layers, then a MoE layer
    layers = model.model.layers
    hidden = torch.randn(2, 13, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    calls = []
    with torch.no_grad():
        whole = [layer.mlp(hidden) for layer in layers]
        for layer in layers:  # an instance-level forward that records the positions of each call
            layer.mlp.forward = lambda h, real=layer.mlp.forward: calls.append(h.shape[1]) or real(h)
        spies = [layer.mlp.forward for layer in layers]
        with mlp_in_chunks(layers, chunk_tokens=5):
            chunked = [layer.mlp(hidden) for layer in layers]
            short = layers[2].mlp(hidden[:, :5].contiguous())
    assert calls == [5, 5, 3] * 3 + [5]
    assert [layer.mlp.forward for layer in layers] == spies
    for got, want in zip(chunked, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(short, whole[2][:, :5], rtol=1e-5, atol=1e-6)


def test_kernels_installed_chunks_every_mlp_and_restores():
    """The product's forward (search, eval, bench) takes long windows' MLPs in chunks: `kernels_installed` installs
    the chunking on every layer and takes it off on exit."""
    from indexcache.models import architecture_for
    from indexcache.runtime.backends import kernels_installed

    model = glm_model(num_layers=3)
    arch = architecture_for("glm_moe_dsa")
    with kernels_installed(model, arch, torch.device("cpu"), "reference"):
        assert all(layer.mlp.forward.__name__ == "chunked_forward" for layer in arch.layers(model))
    assert not any("forward" in vars(layer.mlp) for layer in arch.layers(model))
