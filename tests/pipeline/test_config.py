import warnings
from pathlib import Path

import pytest
import yaml

from pipeline.config import apply_override, config_hash, load_config, nest_ppo_keys, validate_config
from pipeline.errors import ConfigError
from tests.conftest import REPO_ROOT, tiny_config


def test_embedded_demo_config_validates_with_absolute_data_paths():
    config = load_config(REPO_ROOT / "configs" / "tiny.yaml")
    assert config.name == "tiny"
    paths = [Path(source.path) for source in config.pretrain.data]
    assert all(path.is_absolute() and path.exists() for path in paths)
    assert [path.name for path in paths][-1] == "tinyshakespeare.txt"  # the validation blocks come from the last source
    assert Path(config.judges.data.path).name == "hh_harmless_heldout.jsonl"


def test_a_corpus_is_one_source_or_several(write_config, shakespeare_excerpt):
    one = load_config(write_config())
    several = load_config(write_config(pretrain={"data": [{"path": str(shakespeare_excerpt)}, {"path": str(shakespeare_excerpt), "max_rows": 1}]}))
    assert len(one.tokenizer_corpus) == 1 and len(several.tokenizer_corpus) == 2
    with pytest.raises(ConfigError) as error:
        load_config(write_config(pretrain={"data": [{"path": str(shakespeare_excerpt)}, {"path": "no/such.txt"}]}))
    problems = str(error.value).splitlines()[1:]  # one line, about the item at fault (no union-branch noise)
    assert len(problems) == 1 and problems[0].startswith("  pretrain.data.1.path: data file not found: 'no/such.txt'")
    with pytest.raises(ConfigError, match=r"pretrain\.data\.0\.txt_field: unknown key; allowed here: .*text_field"):
        load_config(write_config(pretrain={"data": [{"path": str(shakespeare_excerpt), "txt_field": "x"}]}))


def test_dpo_is_optional_and_its_loss_options_are_checked(write_config, shakespeare_excerpt):
    assert load_config(write_config()).dpo is None
    data = {"data": {"path": str(shakespeare_excerpt)}}
    dpo = load_config(write_config(dpo=data)).dpo
    assert (dpo.loss, dpo.beta, dpo.label_smoothing, dpo.learning_rate, dpo.validation_fraction) == ("sigmoid", 0.1, 0.0, 1e-6, 0.1)
    assert load_config(write_config(dpo={**data, "loss": "simpo", "beta": 2.0, "simpo_gamma": 1.0})).dpo.simpo_gamma == 1.0
    with pytest.raises(ConfigError, match="dpo: label_smoothing applies to loss sigmoid only, not ipo"):
        load_config(write_config(dpo={**data, "loss": "ipo", "label_smoothing": 0.1}))
    with pytest.raises(ConfigError, match="dpo: simpo_gamma applies to loss simpo only, not sigmoid"):
        load_config(write_config(dpo={**data, "simpo_gamma": 1.0}))
    with pytest.raises(ConfigError, match=r"dpo\.beta: Input should be greater than 0"):
        load_config(write_config(dpo={**data, "beta": 0}))
    with pytest.raises(ConfigError, match=r"dpo\.label_smoothing: Input should be less than 0\.5"):
        load_config(write_config(dpo={**data, "label_smoothing": 0.5}))
    with pytest.raises(ConfigError, match=r"dpo\.loss: Input should be 'sigmoid', 'ipo', 'hinge' or 'simpo'"):
        load_config(write_config(dpo={**data, "loss": "kto"}))
    with pytest.raises(ConfigError, match="dpo: lora.save: adapter is not offered for DPO yet"):
        load_config(write_config(dpo={**data, "lora": {"save": "adapter"}}))
    with pytest.raises(ConfigError, match=r"dpo\.max_length = 600 is more tokens than the model has positions"):
        load_config(write_config(dpo={**data, "max_length": 600}))


def test_judges_and_the_options_that_need_them_are_checked(write_config, shakespeare_excerpt):
    reward = {"data": {"path": str(shakespeare_excerpt)}, "init_from": "pretrain"}
    ppo = {"data": {"prompts": {"path": str(shakespeare_excerpt)}}}
    with pytest.raises(ConfigError, match="judges: set count .* or paths"):
        load_config(write_config(reward=reward, judges={"count": 0}))
    with pytest.raises(ConfigError, match="ppo.select_by: judges needs a judges section"):
        load_config(write_config(reward=reward, ppo={**ppo, "select_by": "judges"}))
    with pytest.raises(ConfigError, match="early_stop_patience needs select_by"):
        load_config(write_config(reward=reward, judges={}, ppo={**ppo, "early_stop_patience": 2}))
    with pytest.raises(ConfigError, match="judges.data is required when there is no reward section"):
        load_config(write_config(judges={}))
    config = load_config(write_config(reward=reward, judges={"paths": ["some/judge"], "count": 0}))
    assert config.judges.paths == ["some/judge"]


def test_unknown_key_names_the_key_and_the_allowed_ones(write_config):
    path = write_config(pretrain={"lerning_rate": 1e-3})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message
    assert "pretrain.lerning_rate: unknown key" in message
    assert "learning_rate" in message.split("allowed here:")[1]


def test_wrong_type_names_the_key_and_the_value(write_config):
    with pytest.raises(ConfigError, match=r"pretrain\.max_steps: .*'many'"):
        load_config(write_config(pretrain={"max_steps": "many"}))


def test_missing_data_file_is_named_before_anything_runs(write_config, tmp_path):
    path = write_config(pretrain={"data": {"path": "no/such/corpus.txt"}})
    with pytest.raises(ConfigError, match=r"pretrain\.data\.path: data file not found: 'no/such/corpus.txt'"):
        load_config(path)


def test_unknown_architecture_and_unknown_architecture_key(write_config):
    with pytest.raises(ConfigError, match="unknown architecture 'lama'"):
        load_config(write_config(model={"architecture": "lama", "config": {}}))
    with pytest.raises(ConfigError, match=r"\['hiden_size'\] are not llama config fields"):
        load_config(write_config(model={"architecture": "llama", "config": {"hiden_size": 32}}))


def test_set_overrides_parse_values_as_yaml(write_config):
    config = load_config(
        write_config(), overrides=["pretrain.max_steps=7", "pretrain.learning_rate=1e-4", "wandb.mode=offline"]
    )
    assert config.pretrain.max_steps == 7
    assert config.pretrain.learning_rate == pytest.approx(1e-4)
    assert config.wandb.mode == "offline"


def test_set_override_of_an_unknown_key_is_an_error(write_config):
    with pytest.raises(ConfigError, match="pretrain.max_stepz: unknown key"):
        load_config(write_config(), overrides=["pretrain.max_stepz=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_override({}, "pretrain.max_steps")


def test_base_model_runs_need_no_pretraining_data(shakespeare_excerpt):
    raw = tiny_config(shakespeare_excerpt)
    raw["pretrain"].pop("data")
    with pytest.raises(ConfigError, match="pretrain.data is required unless model.base_model"):
        validate_config(raw)
    raw["model"]["base_model"] = "some-org/some-model"
    assert validate_config(raw).model.base_model == "some-org/some-model"


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)


def test_a_config_extends_another_section_by_section(write_config, tmp_path, shakespeare_excerpt):
    base = write_config("base.yaml", sft={"data": {"path": str(shakespeare_excerpt)}, "max_length": 64, "max_steps": 5})
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nname: child\npretrain:\n  max_steps: 7\nsft: null\n")
    config, parent = load_config(child), load_config(base)
    assert config.name == "child" and config.pretrain.max_steps == 7 and config.sft is None
    # What the child leaves alone is the base's, down to the keys beside the one it sets.
    assert config.pretrain.model_dump(exclude={"max_steps"}) == parent.pretrain.model_dump(exclude={"max_steps"})
    assert config.model.model_dump() == parent.model.model_dump() and parent.sft is not None


def test_an_extends_chain_that_loops_or_names_no_file_is_an_error_naming_both_files(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: extends a.yaml, which extends it in turn"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone.yaml: config file not found \(extended by .*c.yaml\)"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"d.yaml: extends: expected the path of another config"):
        load_config(tmp_path / "d.yaml")


def test_tiny_dpo_is_the_demo_with_a_dpo_stage_that_leaves_the_demos_stages_up_to_date():
    from pipeline.orchestration.registry import STAGES

    demo, with_dpo = load_config(REPO_ROOT / "configs" / "tiny.yaml"), load_config(REPO_ROOT / "configs" / "tiny-dpo.yaml")
    assert demo.dpo is None and with_dpo.dpo is not None and with_dpo.dpo.data == demo.reward.data
    assert with_dpo.model_dump(exclude={"dpo"}) == demo.model_dump(exclude={"dpo"})
    for spec in STAGES:
        if spec.name != "dpo":  # a run dir where the demo ran runs dpo, then eval (its inputs gain dpo's policy)
            assert spec.config_digest(with_dpo) == spec.config_digest(demo), spec.name


def test_config_hash_ignores_key_order_but_not_values():
    assert config_hash({"a": 1, "b": {"c": 2}}) == config_hash({"b": {"c": 2}, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_relative_paths_resolve_against_the_config_folder(tmp_path, shakespeare_excerpt):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "corpus.txt").write_text(shakespeare_excerpt.read_text())
    raw = tiny_config(shakespeare_excerpt)
    raw["pretrain"]["data"]["path"] = "corpus.txt"
    (folder / "run.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(folder / "run.yaml")
    assert Path(config.pretrain.data.path) == (folder / "corpus.txt").resolve()


HH = str(REPO_ROOT / "data" / "samples" / "hh_harmless_1000.jsonl")
REWARD = {"data": {"path": HH}, "init_from": "pretrain"}
PPO_FLAT = {
    "prompts": {"path": HH, "conversation_format": "hh"},
    "max_prompt_length": 192, "on_bad_row": "error", "total_episodes": 64, "rollout_batch_size": 16,
    "temperature": 0.9, "kl_coef": 0.1, "estimator": "ppo", "micro_batch_size": 4, "eval_every": 3,
}


def test_ppo_settings_are_grouped_by_concern(write_config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the nested layout is the current one: no warning
        ppo = load_config(write_config(ppo=nest_ppo_keys(PPO_FLAT)[0], reward=REWARD)).ppo
    assert ppo.data.max_prompt_length == 192 and ppo.data.on_bad_row == "error"
    assert (ppo.sampling.total_episodes, ppo.sampling.temperature) == (64, 0.9)
    assert (ppo.reward.kl_coef, ppo.algorithm.micro_batch_size, ppo.eval_every) == (0.1, 4, 3)


def test_a_flat_ppo_section_still_loads_and_says_where_each_key_moved(write_config):
    nested = load_config(write_config("nested.yaml", ppo=nest_ppo_keys(PPO_FLAT)[0], reward=REWARD))
    with pytest.warns(FutureWarning, match=r"ppo: flat keys are the old layout") as caught:
        flat = load_config(write_config("flat.yaml", ppo=PPO_FLAT, reward=REWARD))
    message = str(caught[0].message)
    assert "temperature -> sampling.temperature" in message and "kl_coef -> reward.kl_coef" in message
    assert flat.ppo == nested.ppo


def test_a_ppo_key_set_both_flat_and_nested_is_an_error(write_config):
    section = {**nest_ppo_keys(PPO_FLAT)[0], "temperature": 0.5}
    with pytest.raises(ConfigError, match=r"ppo\.temperature and ppo\.sampling\.temperature are both set"):
        load_config(write_config(ppo=section, reward=REWARD))


def test_ppo_batch_arithmetic_errors_name_the_nested_keys(write_config):
    section = nest_ppo_keys({**PPO_FLAT, "rollout_batch_size": 15})[0]
    with pytest.raises(ConfigError, match=r"sampling\.rollout_batch_size must be a multiple of algorithm\.num_mini_batches"):
        load_config(write_config(ppo=section, reward=REWARD))


def test_the_kl_goes_where_each_estimator_puts_it_unless_told(write_config):
    """ppo and rloo subtract the KL from the reward (k1), grpo adds it to the loss (k3); either can be moved."""
    for estimator, samples, placed in (("ppo", 1, ("reward", "k1")), ("rloo", 4, ("reward", "k1")), ("grpo", 4, ("loss", "k3"))):
        section = nest_ppo_keys({**PPO_FLAT, "estimator": estimator, "samples_per_prompt": samples})[0]
        ppo = load_config(write_config(ppo=section, reward=REWARD)).ppo
        assert (ppo.reward.kl_penalty, ppo.reward.kl_estimator) == placed, estimator
    section = nest_ppo_keys({**PPO_FLAT, "estimator": "rloo", "samples_per_prompt": 4, "kl_penalty": "loss", "kl_estimator": "k2"})[0]
    ppo = load_config(write_config(ppo=section, reward=REWARD)).ppo
    assert (ppo.reward.kl_penalty, ppo.reward.kl_estimator) == ("loss", "k2")


def test_k1_as_a_loss_term_is_refused_with_the_reason(write_config):
    section = nest_ppo_keys({**PPO_FLAT, "estimator": "grpo", "samples_per_prompt": 4, "kl_estimator": "k1"})[0]
    with pytest.raises(ConfigError, match=r"kl_estimator k1 with kl_penalty loss: .*expected gradient is zero.*use k2 or k3"):
        load_config(write_config(ppo=section, reward=REWARD))


def test_a_model_config_value_of_the_wrong_type_is_named_at_config_time(write_config):
    # Before, `hidden_size=abc` passed validation and failed inside pretraining with a traceback.
    with pytest.raises(ConfigError, match=r"model\.config\.hidden_size = 'abc' is not a valid llama hidden_size: expected int"):
        load_config(write_config(), overrides=["model.config.hidden_size=abc"])
    with pytest.raises(ConfigError, match=r"model\.config\.rms_norm_eps = '1e-5' .* write it with a dot, e\.g\. 1\.0e-05"):
        load_config(write_config(), overrides=["model.config.rms_norm_eps=1e-5"])
    # What only transformers knows is checked by building the config object.
    with pytest.raises(ConfigError, match=r"model\.config does not build a llama config: .*head_dim"):
        load_config(write_config(), overrides=["model.config.num_attention_heads=4", "model.config.head_dim=7"])
    assert load_config(write_config(), overrides=["model.config.rms_norm_eps=0.00001"]).model.config["rms_norm_eps"] == 1e-5


def test_an_override_that_is_not_yaml_says_to_quote_it(write_config):
    with pytest.raises(ConfigError, match=r"--set 'pretrain.max_steps=\[1': the value '\[1' is not valid YAML .*quote it"):
        load_config(write_config(), overrides=["pretrain.max_steps=[1"])


def test_the_command_line_reports_a_bad_model_value_without_a_traceback(write_config, tmp_path):
    from tests.conftest import chatpipe

    result = chatpipe("run", str(write_config()), "--run-dir", str(tmp_path / "run"),
                      "--set", "model.config.hidden_size=abc", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.config.hidden_size = 'abc'" in result.stderr
    assert not (tmp_path / "run" / "pretrain").exists()


# ------------------------------------------------------------- what the model can take (issue 26)

GPT2_SMALL = {"architecture": "gpt2", "config": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}}


def test_a_block_size_beyond_the_models_positions_is_refused_at_load(write_config):
    # gpt2: the first forward pass failed with an IndexError in the position embedding.
    with pytest.raises(ConfigError, match=r"pretrain\.block_size = 128 is more tokens than the model has positions: "
                       r"model\.config\.n_positions = 64.*lower pretrain\.block_size to at most 64 or raise model\.config\.n_positions"):
        load_config(write_config(model=GPT2_SMALL), overrides=["pretrain.block_size=128"])
    # llama: the run started and stalled. The limit is the architecture's default when model.config does not set it.
    with pytest.raises(ConfigError, match=r"pretrain\.block_size = 256 .*model\.config\.max_position_embeddings = 128"):
        load_config(write_config(), overrides=["pretrain.block_size=256", "model.config.max_position_embeddings=128"])
    with pytest.raises(ConfigError, match=r"pretrain\.block_size = 2048 .*model\.config\.n_positions = 1024 \(the gpt2 default\)"):
        load_config(write_config(model={"architecture": "gpt2", "config": {"n_embd": 32, "n_layer": 2, "n_head": 2}}),
                    overrides=["pretrain.block_size=2048"])
    assert load_config(write_config(model=GPT2_SMALL), overrides=["pretrain.block_size=64"]).pretrain.block_size == 64


def test_every_sequence_a_stage_feeds_the_model_must_fit_its_positions(write_config):
    from tests.conftest import tiny_sft_section

    positions = ["model.config.max_position_embeddings=128"]
    with pytest.raises(ConfigError, match=r"sft\.max_length = 256 .*max_position_embeddings = 128;.*lower sft\.max_length to at most 128"):
        load_config(write_config(sft=tiny_sft_section(max_length=256)), overrides=positions)
    ppo = nest_ppo_keys({**PPO_FLAT, "max_prompt_length": 120})[0]  # + the default 64 response tokens
    with pytest.raises(ConfigError, match=r"ppo\.data\.max_prompt_length \+ ppo\.sampling\.response_length = 120 \+ 64 = 184 .*"
                       r"so that their sum is at most 128"):
        load_config(write_config(ppo=ppo, reward={**REWARD, "max_length": 64}), overrides=positions)
    with pytest.raises(ConfigError, match=r"reward\.max_length = 512 .*\n.*eval\.max_prompt_length \+ eval\.response_length = 256 \+ 64"):
        load_config(write_config(reward=REWARD, eval={"prompts": {"path": HH}}), overrides=positions)
    # A hub base model's positions are not known before it is loaded: the pretrain stage checks them.
    raw = {"model": {"architecture": "llama", "base_model": "some-org/some-model"}, "sft": tiny_sft_section(max_length=4096)}
    assert load_config(write_config(**raw)).sft.max_length == 4096


def test_the_stage_that_adopts_a_base_model_checks_the_lengths_against_it(write_config):
    from transformers import GPT2Config

    from pipeline.config import check_sequence_lengths
    from tests.conftest import tiny_sft_section

    config = load_config(write_config(model={"architecture": "gpt2", "config": {}, "base_model": "some-org/some-model"},
                                      sft=tiny_sft_section(max_length=100)))
    check_sequence_lengths(config, GPT2Config(n_positions=100))
    with pytest.raises(ConfigError, match=r"sft\.max_length = 100 is more tokens than the model has positions: "
                       r"model\.base_model 'some-org/some-model' has n_positions = 64.*lower sft\.max_length to at most 64"):
        check_sequence_lengths(config, GPT2Config(n_positions=64))


def test_a_hidden_size_the_heads_do_not_divide_names_both_keys(write_config):
    with pytest.raises(ConfigError, match=r"model\.config\.n_embd = 30 is not a multiple of model\.config\.n_head = 4 .*"
                       r"make n_embd a multiple of n_head \(e\.g\. 32\)"):
        load_config(write_config(model={**GPT2_SMALL, "config": {**GPT2_SMALL["config"], "n_embd": 30, "n_head": 4}}))
    with pytest.raises(ConfigError, match=r"model\.config\.hidden_size = 32 is not a multiple of model\.config\.num_attention_heads = 3"):
        load_config(write_config(), overrides=["model.config.num_attention_heads=3"])
    # An explicit head_dim decouples them (q/k/v project to heads x head_dim): nothing to refuse.
    load_config(write_config(model={"architecture": "qwen3", "config": {"hidden_size": 30, "num_attention_heads": 4,
                                                                         "num_key_value_heads": 2, "head_dim": 8}}))


def test_a_base_model_folder_that_does_not_exist_is_refused_at_load(write_config, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.base_model: 'models/absent/base' is neither a local folder.*no such folder .*absent"):
        load_config(write_config(model={"architecture": "llama", "base_model": "models/absent/base"}))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"model\.base_model: .*empty_model' is a folder without config\.json"):
        load_config(write_config(model={"architecture": "llama", "base_model": str(empty)}))


def test_an_unreachable_hub_model_is_one_clear_message(monkeypatch):
    import huggingface_hub.constants

    from pipeline.config import ModelConfig
    from stages.pretrain.model import adopt_base_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"model\.base_model = 'some-org/absent-model' could not be loaded .*"
                       r"a local folder with config\.json, or a hub id reachable from this machine.*HF_HUB_OFFLINE is set"):
        adopt_base_model(ModelConfig(base_model="some-org/absent-model"), tokenizer=None)


def test_the_command_line_reports_an_unreachable_base_model_without_a_traceback(write_config, tmp_path):
    from tests.conftest import chatpipe

    config = write_config(model={"architecture": "llama", "base_model": "some-org/absent-model"})
    result = chatpipe("run", str(config), "--run-dir", str(tmp_path / "run"), env={"HF_HUB_OFFLINE": "1"}, check=False)
    output = result.stdout + result.stderr  # the stage's own output is copied to the console
    assert result.returncode == 2 and "Traceback" not in output, output
    assert "chatpipe: tokenizer: model.base_model = 'some-org/absent-model' could not be loaded" in output


def test_a_key_given_twice_in_one_mapping_is_an_error(write_config):
    # Before, YAML kept the later value silently: a run trained for 400 steps that read as 40.
    path = write_config()
    text = path.read_text().replace("  max_steps: 40\n", "  max_steps: 40\n  max_steps: 400\n")
    path.write_text(text)
    line = text.splitlines().index("  max_steps: 400") + 1
    with pytest.raises(ConfigError, match=rf"run\.yaml, line {line}: key 'max_steps' is given twice in one mapping "
                       rf"\(first at line {line - 1}\).*delete one"):
        load_config(path)


def test_a_yaml_merge_key_overridden_on_purpose_is_not_a_duplicate():
    from pipeline.config import read_yaml

    assert read_yaml("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")["other"] == {"x": 3, "y": 2}


@pytest.mark.parametrize("key", ["ppo.sampling.temperature", "eval.temperature"])
def test_a_sampling_temperature_too_small_to_divide_by_is_refused_by_name(key):
    """Below 1e-5 the sampler turns greedy while the log-probs PPO and eval compute at that temperature overflow."""
    with pytest.raises(ConfigError, match=rf"{key}: Input should be greater than or equal to 0.00001 \(got '1e-300'\)"):
        load_config(REPO_ROOT / "configs" / "tiny.yaml", [f"{key}=1e-300"])
    assert load_config(REPO_ROOT / "configs" / "tiny.yaml", [f"{key}=1e-5"])


def test_eval_samples_at_ppos_temperature_unless_told_otherwise():
    """Eval's KL is the KL PPO constrained only when eval samples at PPO's temperature."""
    tiny = REPO_ROOT / "configs" / "tiny.yaml"
    assert load_config(tiny, ["ppo.sampling.temperature=0.9"]).eval.temperature == 0.9
    assert load_config(tiny, ["ppo.sampling.temperature=0.9", "eval.temperature=0.5"]).eval.temperature == 0.5
    without_ppo = yaml.safe_load(tiny.read_text())
    del without_ppo["ppo"]
    without_ppo["eval"]["prompts"] = {"path": "data/samples/hh_harmless_heldout.jsonl"}
    assert validate_config(without_ppo, base_dir=REPO_ROOT).eval.temperature == 0.7  # ppo.sampling's default


def test_every_training_stage_has_the_cadence_fields_with_its_own_defaults():
    """One declaration of eval_every, save_every, keep_checkpoints, log_every and launch; each stage keeps its defaults."""
    from pydantic import ValidationError

    from pipeline.config import (
        CheckpointedStage, DPOConfig, EvalConfig, JudgesConfig, LaunchConfig, PPOConfig, PretrainConfig, RewardConfig,
        SFTConfig,
    )

    defaults = {  # (eval_every, save_every, keep_checkpoints, log_every); PPO counts rollouts and logs each one
        PretrainConfig: (100, 200, 2, 10), SFTConfig: (50, 100, 2, 10), RewardConfig: (50, 100, 2, 10),
        JudgesConfig: (50, 100, 2, 10), DPOConfig: (50, 100, 2, 10), PPOConfig: (10, 10, 2, None),
    }
    for section, expected in defaults.items():
        fields = section.model_fields
        assert issubclass(section, CheckpointedStage)
        found = tuple(fields[name].default if name in fields else None
                      for name in ("eval_every", "save_every", "keep_checkpoints", "log_every"))
        assert found == expected, section.__name__
        assert fields["launch"].default_factory is LaunchConfig
        unit = "Rollouts" if section is PPOConfig else "Steps"
        assert fields["eval_every"].description == f"{unit} between evaluations."
        with pytest.raises(ValidationError, match="greater than or equal to 1"):
            section.__pydantic_validator__.validate_assignment(section.model_construct(), "save_every", 0)
    assert EvalConfig.model_fields["launch"].default_factory is LaunchConfig and "eval_every" not in EvalConfig.model_fields
