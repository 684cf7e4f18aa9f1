"""LoRA adapters through peft: the one way a stage wraps a model it fine-tunes with `lora:` set.

    model = add_lora_adapters(load_causal_lm(folder), section.lora)

SFT and PPO adapt a causal LM; the reward stage adapts a reward model, whose freshly initialised
`score` head is trained whole beside the adapters. Saving (merged or adapter alone) is
`save_final_model`'s business, loading `load_causal_lm`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from pipeline.config import LoraSettings


def add_lora_adapters(
    model: PreTrainedModel,
    settings: LoraSettings,
    *,
    task_type: Literal["CAUSAL_LM", "SEQ_CLS"] = "CAUSAL_LM",
    trained_whole: list[str] | None = None,
    dropout: float | None = None,
) -> PeftModel:
    """`model` with trainable LoRA adapters as `settings` (rank, alpha, dropout, target modules) say.

    task_type: peft's task, CAUSAL_LM for a policy, SEQ_CLS for a reward model.
    trained_whole: module names trained in full beside the adapters (peft's `modules_to_save`),
    e.g. a reward model's new `score` head, which no pretrained weights stand behind.
    dropout: the adapter dropout when it must differ from `settings.dropout` (PPO runs with every
    dropout off, so that its rollout and training log-probs agree).
    """
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout if dropout is None else dropout,
        target_modules=settings.target_modules,
        task_type=task_type,
        modules_to_save=trained_whole,
    ))
