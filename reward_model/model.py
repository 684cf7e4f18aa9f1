"""A reward model is `AutoModelForSequenceClassification` with one label on a causal-LM backbone.

    model = build_reward_model("runs/tiny/sft/final")     # backbone from the SFT policy, new head
    scores = per_token_scores(model, input_ids, attention_mask)   # (batch, seq_len)

We read the head's output at every position (`per_token_scores`) rather than letting the
model pick one: the reward is the output at the last real token, and the PPO value model (same
architecture) needs one value per token. Positions come from the attention mask, so left- and
right-padded batches score alike.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from pipeline.models.checkpoints import load_causal_lm
from pipeline.models.logprobs import position_ids_from


def build_reward_model(backbone: str | Path, pad_token_id: int | None = None, **kwargs) -> PreTrainedModel:
    """A reward model whose backbone is the causal LM at `backbone` (full or adapter) and whose head is new.

    The head gets the architecture's usual small random init, so untrained scores are near 0
    but not tied, and the untrained model's accuracy is chance, not zero.
    """
    language_model = load_causal_lm(backbone, **kwargs)
    config = language_model.config
    config.num_labels = 1
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    reward_model = AutoModelForSequenceClassification.from_config(config)
    prefix = reward_model.base_model_prefix
    getattr(reward_model, prefix).load_state_dict(getattr(language_model, prefix).state_dict())
    reward_model.to(language_model.dtype)
    return reward_model


def load_reward_model(folder: str | Path, **kwargs) -> PreTrainedModel:
    """A trained reward model (a plain `from_pretrained` folder)."""
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, **kwargs)


def score_head(model: PreTrainedModel) -> torch.nn.Linear:
    """The scalar head (`score` in Llama/Qwen/Mistral/GPT-2 classifiers)."""
    head = getattr(model, "score", None)
    if head is None:
        raise TypeError(f"{type(model).__name__} has no `score` head; use an architecture with a sequence-classification score layer")
    return head


def per_token_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at every position: (batch, seq_len) float32. `model` may carry peft adapters."""
    if hasattr(model, "get_base_model"):  # a PeftModel: its base has the adapters injected
        model = model.get_base_model()
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return score_head(model)(hidden).squeeze(-1).float()


class TokenScorer(torch.nn.Module):
    """A scalar-head model as a module whose forward returns per-token scores.

    This is what accelerate prepares (DDP, FSDP, DeepSpeed wrap it), so the forward that training
    differentiates goes through the wrapper, as distributed engines require. `pretrained_model`
    is the Hugging Face model inside, for saving and loading.
    """

    def __init__(self, pretrained_model: PreTrainedModel):
        super().__init__()
        self.pretrained_model = pretrained_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return per_token_scores(self.pretrained_model, input_ids, attention_mask)

    def save_pretrained(self, folder, state_dict=None, **kwargs) -> None:
        if state_dict is not None:
            state_dict = {key.removeprefix("pretrained_model."): value for key, value in state_dict.items()}
        self.pretrained_model.save_pretrained(folder, state_dict=state_dict, **kwargs)
