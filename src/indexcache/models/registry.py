"""Per-architecture adapters, registered by `config.model_type`.

Adding a DSA family means adding one small file beside this one that calls `register(...)`; nothing in the
search, the layer loop, the prefix cache or the patch names a model family. An adapter is data: where the text
model, its layers and the indexer live, what shape the hidden state has between layers, which state crosses
layers, and which config keys carry a pattern for the family's readers. A family that cannot work says why in
`refusal`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import IndexCacheError


@dataclass(frozen=True)
class DsaArchitecture:
    """Where a DSA model keeps its layers, attention and indexer, and how it reads sharing patterns.

    Attributes:
        model_type: `config.model_type` this adapter serves.
        family: human-readable family name for messages.
        indexer_rope: RoPE layout of the indexer's rotary dims, "interleave" or "half" (for the fused kernel).
        layers_path / attention_attr / indexer_attr: attribute path from the loaded model to its decoder layers
            (through the language model of a vision-language checkpoint), the attention inside a layer, and the
            indexer inside the attention (inside its `indexer_parent` where that is set).
        indexer_parent: attribute of the attention that holds the indexer (deepseek_v4: "compressor", the CSA
            compressor), or None when the attention holds it itself.
        auto_class: the transformers auto class that loads a checkpoint of this type with its LM head.
        indexer_rope_at_end: the rotary dims are the *last* `qk_rope_head_dim` dims of the indexer head (hy_v4).
        indexer_query: "q_lora" (wq_b of the attention's q-LoRA residual) or "hidden" (wq_b of
            q_input_norm(hidden), then the per-position softmax scaling: mistral_large4, no q-LoRA).
        indexer_scale_in_weights: the indexer folds softmax_scale into the head weights (hy_v4), not the scores.
        indexer_scorer: attribute of the indexer that scores (q, keys, hidden_states); where set, the kernel path
            reads the projections at its inputs (`wiring.scorer_projections`; deepseek_v4: "scorer") instead of
            recomputing them from the indexer's weights.
        sparse_attention_kernel: our sparse-attention kernel may replace the family's attention (False where that
            attention does more than softmax over the selected keys, e.g. hy_v4's learned attention sinks).
        hidden_streams: config attribute n when layers carry hyper-connection streams: the hidden state between
            layers is [B, S, n, H], the embedding copied into each stream.
        streams_head: base-model submodule that collapses the streams to [B, S, H] before the final norm.
        shared_state: name of the layer argument through which layers share state (mistral_large4's
            `shared_kv_states`, a KVSharingDict filled by KV-source layers); a fresh one per forward, and the
            prefix cache keeps what it holds when each layer starts.
        inputs_by_layer_type: layers take their mask and rotary table by `config.layer_types` (dots3_note:
            "sliding_attention" layers a sliding-window mask), built once per type as the model's forward does.
        rotary_labels: every layer takes all these rotary tables as a {label: (cos, sin)} dict and picks its own
            (deepseek_v4: "main", "compress"); () for one table.
        token_id_inputs: names under which every layer also takes the window's token ids [B, S] (deepseek_v4's
            hash-routed MoE layers route by "input_ids"; qwen4_exp's per-layer embeddings read "ple_input_ids").
        fp32_rotary_layer_types: layer types whose rotary table the model computes from fp32 embeddings.
        logit_softcap: attribute of the loaded model with the final logit soft-capping value (tanh), if any.
        pattern_keys: the config keys `apply` writes: those the family's readers (transformers, serving engines)
            take a pattern from (`indexer_types` for every family whose transformers code has it);
            `use_index_cache` (true) is vLLM's switch for IndexCache on DSA models (docs.vllm.ai,
            features/index_cache).
        honours_pattern: stock transformers builds S layers from these keys (else only engines and our patch do).
        dsa_layers: (config attribute, value) marking the layers with sparse attention where only some have it
            (minimax_m3_vl: `layer_types` == "minimax_m3_sparse"); the patch leaves the other layers alone.
            None: every layer is a DSA layer, and one built without an indexer is an S layer.
        indexer_kernel: the Triton indexer computes what this family's indexer selects (False: block-level or
            other selections; the reference path runs, also on CUDA).
        checkpoint_indexer_keys: the indexer's weight prefixes in checkpoints whose tensor names differ from the
            module path (transformers renames them on load), as format strings of `layer`; () when they agree.
        entry_tokens: (config attribute, key) of the number of tokens one selectable entry pools, where the
            indexer selects compressed entries rather than tokens (deepseek_v4: `compress_rates`
            ["compressed_sparse_attention"], 4); query t then sees entries j < (t + 1) // ratio. None: tokens.
        index_bytes: bytes of one selected index in the buffer S layers reuse (int32 4; deepseek_v4's int64 8).
        pattern_per_indexer_layer: the readers take `index_topk_pattern` with one letter per indexer layer
            (vLLM's and SGLang's DeepSeek-V4 schema), and `index_topk_freq` for a uniform pattern.
        distill_refusal: why `indexcache distill` cannot train this family's indexers (one line), or None.
        rotary: the base model has a `rotary_emb` whose table layers take (False: NoPE, glm5_next; layers get None).
        rotary_position_axes: n when the rotary embedding takes [n, B, S] position ids (qwen4_exp's mRoPE; a text
            window gives every axis the same positions); None for [1, S].
        layer_mask: the mask layers take: "causal" (the model's causal mask), "sliding" (the sliding-window causal
            mask: deepseek_v4) or "token_valid" (a bool [B, S] of real tokens, all True for unpadded windows:
            glm5_next, whose indexer and attention apply causality).
        flat_streams: the hyper-connection streams lie side by side, [B, S, n·H] (qwen4_exp), not [B, S, n, H].
        final_norm: base-model submodule applied after `streams_head` (None: the head is the last step, qwen4_exp).
        selection: what an F layer's indexer selects: "tokens" (top-k keys), "kpool" (glm5_next: top pools of
            `index_kpool` tokens plus the query's incomplete pool) or "qsa_blocks" (qwen4_exp: top compressed blocks
            plus the tail, returned by the indexer as a [B, 1, S, T] mask). See `runtime/pooled.py`.
        topk_attr / pool_attr: text-config attributes of the tokens a query keeps from whole pools (or keys) and
            of the pool size; a query keeps at most topk + pool − 1 tokens (`keys_kept`).
        stock_reuses_previous_layer_only: stock transformers hands a shared layer only the top-k of the decoder
            layer right before it (glm5_next), so it cannot load an S indexer layer after any other layer.
        reader_note: the line `apply` prints when no reader honours the pattern, where the default one (serving
            engines read it) is not true.
        kernel_attention: attention implementation set under `--kernels triton` where our sparse kernel cannot
            replace the family's attention and its eager one would form per-head S×T scores ("sdpa").
        refusal: why indexcache cannot serve this model type (one line), or None.
    """

    model_type: str
    family: str
    indexer_rope: str = "interleave"
    layers_path: tuple[str, ...] = ("model", "layers")
    attention_attr: str = "self_attn"
    indexer_attr: str = "indexer"
    indexer_parent: str | None = None
    auto_class: str = "AutoModelForCausalLM"
    indexer_rope_at_end: bool = False
    indexer_query: str = "q_lora"
    indexer_scale_in_weights: bool = False
    indexer_scorer: str | None = None
    sparse_attention_kernel: bool = True
    hidden_streams: str | None = None
    streams_head: str | None = None
    shared_state: str | None = None
    inputs_by_layer_type: bool = False
    fp32_rotary_layer_types: tuple[str, ...] = ()
    rotary_labels: tuple[str, ...] = ()
    token_id_inputs: tuple[str, ...] = ()
    logit_softcap: str | None = None
    pattern_keys: tuple[str, ...] = ("index_topk_pattern", "indexer_types")
    honours_pattern: bool = False
    dsa_layers: tuple[str, str] | None = None
    indexer_kernel: bool = True
    checkpoint_indexer_keys: tuple[str, ...] = ()
    entry_tokens: tuple[str, str] | None = None
    index_bytes: int = 4
    pattern_per_indexer_layer: bool = False
    distill_refusal: str | None = None
    rotary: bool = True
    rotary_position_axes: int | None = None
    layer_mask: str = "causal"
    flat_streams: bool = False
    final_norm: str | None = "norm"
    selection: str = "tokens"
    topk_attr: str = "index_topk"
    pool_attr: str | None = None
    stock_reuses_previous_layer_only: bool = False
    reader_note: str | None = None
    kernel_attention: str | None = None
    refusal: str | None = None

    def base_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (`model.model`): embeddings, rotary embedding, layers and final norm."""
        module = model
        for name in self.layers_path[:-1]:
            module = getattr(module, name)
        return module

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.base_model(model), self.layers_path[-1])

    def attention(self, layer: nn.Module) -> nn.Module | None:
        """The layer's attention (None on a linear-attention layer that has none: qwen4_exp)."""
        return getattr(layer, self.attention_attr, None)

    def keys_kept(self, text_config) -> int | None:
        """The most tokens one query's selection holds (`index_topk`; + pool − 1 for pooled indexers): windows
        must be longer for the selection to matter, and a query chooses once it sees more tokens than this."""
        topk = getattr(text_config, self.topk_attr, None)
        if topk is None or self.pool_attr is None:
            return topk
        return topk + getattr(text_config, self.pool_attr) - 1

    def indexer_owner(self, layer: nn.Module) -> nn.Module | None:
        """The module whose `indexer_attr` holds the layer's indexer (None where the layer has no such parent,
        e.g. deepseek_v4's sliding-window layers, whose compressor is None)."""
        attention = self.attention(layer)
        return attention if self.indexer_parent is None else getattr(attention, self.indexer_parent, None)

    def indexer(self, layer: nn.Module) -> nn.Module | None:
        """The layer's indexer module, or None where it has none."""
        owner = self.indexer_owner(layer)
        return None if owner is None else getattr(owner, self.indexer_attr, None)

    def tokens_per_entry(self, text_config) -> int:
        """Tokens pooled into one selectable entry (1 where the indexer selects tokens)."""
        if self.entry_tokens is None:
            return 1
        attribute, key = self.entry_tokens
        return int(getattr(text_config, attribute)[key])

    def dsa_layer_ids(self, text_config) -> list[int]:
        """The indexer layers: those built with an indexer in this architecture (read from the text config, so
        known before any weight loads). Patterns are made over them: the first is always F, `--ratio` counts them,
        the uniform interleave spaces their ordinals; every other layer is S. A layer whose checkpoint lacks the
        indexer weights is still one of them (it is S by necessity, see `LoadedModel.indexer_layers`)."""
        if self.dsa_layers is None:
            return list(range(text_config.num_hidden_layers))
        attribute, value = self.dsa_layers
        return [i for i, kind in enumerate(getattr(text_config, attribute)) if kind == value]

    def is_dsa_layer(self, model: nn.Module, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has sparse attention (and so takes part in the pattern)."""
        return layer_idx in self.dsa_layer_ids(self.base_model(model).config)

    def indexer_weight_prefix(self, layer_idx: int) -> str:
        """State-dict prefix of one layer's indexer weights, e.g. `model.layers.3.self_attn.indexer.`."""
        parent = () if self.indexer_parent is None else (self.indexer_parent,)
        return ".".join((*self.layers_path, str(layer_idx), self.attention_attr, *parent, self.indexer_attr)) + "."

    def checkpoint_indexer_prefixes(self, layer_idx: int) -> tuple[str, ...]:
        """Tensor-name prefixes under which a checkpoint may store one layer's indexer weights."""
        native = tuple(key.format(layer=layer_idx) for key in self.checkpoint_indexer_keys)
        return (self.indexer_weight_prefix(layer_idx), *native)

    def pattern_note(self, pattern: str, indexer_layers: list[int]) -> str | None:
        """One line for `apply` when stock transformers does not honour `pattern` for this family."""
        if self.stock_reuses_previous_layer_only:
            stranded = [i for i in indexer_layers if pattern[i] == "S" and (i == 0 or pattern[i - 1] != "F")]
            if stranded:
                return (
                    f"note: stock transformers' {self.model_type} code cannot run this pattern: it hands a shared "
                    f"layer only the previous decoder layer's top-k, and layers {stranded} follow a layer that "
                    "passes none; indexcache's patch evaluates it"
                )
            return None
        if self.honours_pattern:
            return None
        return self.reader_note or (
            f"note: stock transformers' {self.model_type} code runs every indexer and ignores the pattern; "
            "serving engines that read index_topk_pattern apply it (indexcache evaluates it with its own patch)"
        )


_ARCHITECTURES: dict[str, DsaArchitecture] = {}


def register(arch: DsaArchitecture) -> DsaArchitecture:
    _ARCHITECTURES[arch.model_type] = arch
    return arch


def supported_families() -> str:
    """The model types indexcache serves, comma-separated (short enough for a one-line error)."""
    return ", ".join(a.model_type for a in _ARCHITECTURES.values() if a.refusal is None)


def architecture_for(model_type: str | None) -> DsaArchitecture:
    """The adapter for a `model_type`, or a clear error naming the supported families (or why it is refused)."""
    arch = _ARCHITECTURES.get(model_type)
    if arch is None:
        raise IndexCacheError(
            f"model type '{model_type}' has no DSA lightning indexer that indexcache knows; "
            f"supported model types: {supported_families()}"
        )
    if arch.refusal is not None:
        raise IndexCacheError(f"model type '{model_type}' ({arch.family}) is not supported: {arch.refusal}")
    return arch
