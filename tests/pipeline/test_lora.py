"""`add_lora_adapters`: the one LoRA wrapping SFT, PPO and the reward stage share."""

from pipeline.config import LoraSettings
from pipeline.models.lora import add_lora_adapters
from tests.conftest import tiny_causal_lm, tiny_token_scorer


def trainable(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_a_policy_gets_adapters_as_its_settings_say_and_nothing_else_trains(bpe_tokenizer):
    settings = LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])
    model = add_lora_adapters(tiny_causal_lm(bpe_tokenizer), settings)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.task_type == "CAUSAL_LM"
    names = trainable(model)
    assert names and all(".lora_" in name for name in names)
    assert {name.split(".")[-4] for name in names} == {"q_proj", "v_proj"}
    # PPO's: the same adapters with dropout off
    assert add_lora_adapters(tiny_causal_lm(bpe_tokenizer), settings, dropout=0.0).peft_config["default"].lora_dropout == 0.0


def test_a_reward_model_trains_its_new_head_whole_beside_the_adapters(bpe_tokenizer):
    backbone = tiny_token_scorer(bpe_tokenizer).pretrained_model
    model = add_lora_adapters(backbone, LoraSettings(r=4, alpha=8), task_type="SEQ_CLS", trained_whole=["score"])
    assert model.peft_config["default"].task_type == "SEQ_CLS"
    names = trainable(model)
    assert any("score" in name and ".lora_" not in name for name in names)
    assert all(".lora_" in name or "score" in name for name in names)
