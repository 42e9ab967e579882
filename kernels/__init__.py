"""Triton kernels for DSA models, each op in its own folder beside its PyTorch reference.

* `indexer`: the lightning indexer's top-k selection (`lightning_indexer_topk`).
* `sparse_attention`: attention over the selected keys (`sparse_attention`, `sparse_mla_attention`).
* `wiring`: the seam to transformers (`indexer_topk`, `register_sparse_attention`).

Installed as `indexcache.kernels`; never import this folder as a top-level `kernels` module.
"""
