"""Mistral Large 4 (`mistral_large4`): a vision tower plus a DSA text model; transformers honours the pattern.

Checkpoints load as `MistralLarge4ForConditionalGeneration`; the search runs text-only windows through the language
model (`model.language_model`), exactly what the stock forward does when no image is given. The indexer has no
q-LoRA (its query is `wq_b(q_input_norm(hidden))` with a per-position softmax scaling), every 4th layer is NoPE
(its indexer skips RoPE too), layers share latent KV through a `shared_kv_states` dict (`kv_source_layers`), and
the logits are soft-capped. transformers saves the weights under Mistral's own tensor
names (`layers.N.attention.indexer.*`). `MistralLarge4TextConfig` turns `index_topk_pattern` (or `index_topk_freq` /
`index_skip_topk_offset`) into `indexer_types`; S layers have no indexer module.
"""

from .registry import DsaArchitecture, register

ARCHITECTURE = register(
    DsaArchitecture(
        model_type="mistral_large4",
        family="Mistral Large 4",
        indexer_rope="interleave",
        layers_path=("model", "language_model", "layers"),
        auto_class="AutoModelForImageTextToText",
        indexer_query="hidden",
        shared_state="shared_kv_states",
        logit_softcap="final_logit_softcapping",
        checkpoint_indexer_keys=("layers.{layer}.attention.indexer.",),  # transformers saves Mistral's own names
        honours_pattern=True,
    )
)

TEXT_ONLY = register(
    DsaArchitecture(
        model_type="mistral_large4_text",
        family="Mistral Large 4 (text config)",
        refusal=(
            "transformers has no causal-LM class for a bare mistral_large4_text config (no LM head); "
            "point --model at the mistral_large4 checkpoint (MistralLarge4ForConditionalGeneration)"
        ),
    )
)
