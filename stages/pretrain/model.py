"""Build the model the pretrain stage trains (from a config) or adopts (a base model)."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import ModelConfig, loading_model


def model_from_config(model: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A freshly initialised causal LM of `model.architecture`, sized to the tokenizer.

    The vocabulary size and the special-token ids always come from the tokenizer, so the config
    cannot disagree with it.
    """
    config = model.transformers_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def adopt_base_model(model: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The base model named in the config, its embeddings grown if the tokenizer gained tokens."""
    with loading_model("model.base_model", model.base_model):
        base = AutoModelForCausalLM.from_pretrained(
            model.base_model, revision=model.revision, trust_remote_code=model.trust_remote_code, dtype="auto"
        )
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    for config in (base.config, base.generation_config):
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
    return base
