"""The SFT stage: data preparation, assistant-only loss, and tiny real runs through the CLI."""

import json
import shutil

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.chat_tokens import load_conversations, tokenize_conversations
from data.conversations import parse_hh
from data.splits import held_out_split
from pipeline.config import SFTConfig
from pipeline.errors import DataError
from pipeline.models.checkpoints import is_adapter, load_causal_lm
from pipeline.orchestration.manifest import read_manifest
from pipeline.orchestration.tracking import read_metric_rows
from tests.conftest import SAMPLES, chatpipe, decoded_spans, resume_after_crash, tiny_config, tiny_sft_section


def hh_conversations(count: int) -> list[list[dict]]:
    lines = (SAMPLES / "hh_harmless_1000.jsonl").read_text().splitlines()[:count]
    return [parse_hh(json.loads(line)["chosen"]) for line in lines]


def test_only_assistant_replies_carry_loss(bpe_tokenizer):
    conversation = hh_conversations(1)[0]
    dataset, _ = tokenize_conversations([conversation], bpe_tokenizer, max_length=4096, overlong="truncate")
    ids, mask = dataset[0]["input_ids"], dataset[0]["assistant_masks"]
    replies = [m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant"]
    assert decoded_spans(bpe_tokenizer, ids, mask, keep=1) == replies
    unmasked = "".join(decoded_spans(bpe_tokenizer, ids, mask, keep=0))
    for message in conversation:
        if message["role"] == "user":
            assert message["content"] in unmasked
    assert "<|im_start|>assistant\n" in unmasked


def test_micro_batches_put_labels_on_assistant_tokens_only(bpe_tokenizer):
    """What SFT trains on: labels are the token ids on assistant tokens and -100 elsewhere, padding included."""
    from stages.sft.batching import IGNORE_INDEX, collate_conversations

    dataset, _ = tokenize_conversations(hh_conversations(4), bpe_tokenizer, max_length=96, overlong="truncate")
    rows = dataset.to_list()
    batch = collate_conversations(rows, bpe_tokenizer.pad_token_id)
    longest = max(len(row["input_ids"]) for row in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, longest)
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        expected = [t if m else IGNORE_INDEX for t, m in zip(row["input_ids"], row["assistant_masks"])]
        assert batch["labels"][index, :length].tolist() == expected
        assert any(label != IGNORE_INDEX for label in expected)
        assert (batch["labels"][index, length:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][index].tolist() == [1] * length + [0] * (longest - length)
        assert (batch["input_ids"][index, length:] == bpe_tokenizer.pad_token_id).all()
    assert batch["loss_tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_overlong_conversations_are_truncated_or_dropped_and_counted(bpe_tokenizer):
    conversations = hh_conversations(30)
    lengths = [len(tokenize_conversations([c], bpe_tokenizer, 10_000, "drop")[0][0]["input_ids"]) for c in conversations]
    limit = sorted(lengths)[len(lengths) // 2]
    over = sum(length > limit for length in lengths)
    kept, report = tokenize_conversations(conversations, bpe_tokenizer, limit, "drop")
    assert report.dropped_overlong == over and len(kept) == 30 - over
    truncated, report = tokenize_conversations(conversations, bpe_tokenizer, limit, "truncate")
    assert report.truncated + report.dropped_no_reply_left == over
    assert len(truncated) == 30 - report.dropped_no_reply_left
    assert max(len(ids) for ids in truncated["input_ids"]) <= limit
    assert all(any(mask) for mask in truncated["assistant_masks"])


def test_bad_rows_are_dropped_and_counted_or_rejected_with_file_and_row(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "Anyone there?"}]},
    ] + [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]} for i in range(20)]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    source = {"path": str(path)}
    section = SFTConfig.model_validate({"data": source, "max_bad_fraction": 0.2})
    conversations, report = load_conversations(section.data, section)
    assert len(conversations) == 21 and report.dropped == 3
    assert set(report.reasons) == {"empty assistant reply", "unknown role 'bot' (use system, user, assistant)", "no assistant turn"}

    strict = SFTConfig.model_validate({"data": source, "on_bad_row": "error"})
    with pytest.raises(DataError, match=r"chats.jsonl.*row 2.*empty assistant reply"):
        load_conversations(strict.data, strict)
    picky = SFTConfig.model_validate({"data": source, "max_bad_fraction": 0.05})
    with pytest.raises(DataError, match="chats.jsonl"):
        load_conversations(picky.data, picky)


def test_validation_split_is_seeded_and_disjoint():
    conversations = hh_conversations(40)
    train, validation = held_out_split(conversations, 0.1, seed=3)
    assert len(train) == 36 and len(validation) == 4
    assert held_out_split(conversations, 0.1, seed=3) == (train, validation)
    assert not any(v in train for v in validation)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, shakespeare_excerpt):
    folder = tmp_path_factory.mktemp("sft_run")
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(shakespeare_excerpt, sft=tiny_sft_section())))
    run_dir = folder / "run"
    chatpipe("run", str(config), "--run-dir", str(run_dir))
    return config, run_dir


def test_sft_eval_loss_on_assistant_tokens_falls(sft_run):
    _, run_dir = sft_run
    metrics = read_manifest(run_dir).stages["sft"].metrics
    assert metrics["steps"] == 30 and metrics["rows_read"] == 120 and metrics["rows_dropped"] == 0
    assert metrics["validation_conversations"] + metrics["validation_dropped_overlong"] == 12
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 0.5
    evals = [row["eval/loss"] for row in read_metric_rows(run_dir / "sft")[0] if "eval/loss" in row]
    assert len(evals) >= 4 and evals[-1] < evals[0]


def test_sft_records_lineage_and_writes_samples(sft_run):
    _, run_dir = sft_run
    stages = read_manifest(run_dir).stages
    assert stages["sft"].inputs["pretrain"].digest == stages["pretrain"].output.digest
    assert stages["sft"].output.path == "sft/final"
    samples = [json.loads(line) for line in (run_dir / "sft" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2
    assert all(s["prompt"][-1]["role"] == "user" and isinstance(s["reply"], str) and s["reference"] for s in samples)


def test_full_sft_checkpoint_loads_with_plain_transformers(sft_run):
    _, run_dir = sft_run
    folder = run_dir / "sft" / "final"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]
    checkpoints = list((run_dir / "sft" / "checkpoints").glob("step-*"))
    assert checkpoints and all((c / "optimizer.safetensors").exists() for c in checkpoints)
    assert not [p for c in checkpoints for p in c.iterdir() if p.suffix in (".pt", ".pth", ".bin")]


@pytest.mark.parametrize("save", ["adapter", "merged"])
def test_lora_checkpoints_of_either_kind_load_for_the_next_stage(sft_run, tmp_path, save):
    config, run_dir = sft_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    output = chatpipe(
        "run", str(config), "--run-dir", str(copy),
        "--set", f"sft.lora={{r: 4, alpha: 8, save: {save}}}", "--set", "sft.max_steps=10",
    ).stdout
    assert "pretrain: up to date, skipped" in output and "sft: config changed; running" in output
    entry = read_manifest(copy).stages["sft"]
    folder = copy / entry.output.path
    assert entry.metrics["checkpoint_kind"] == ("adapter" if save == "adapter" else "full")
    assert is_adapter(folder) == (save == "adapter")
    if save == "adapter":
        assert not (folder / "model.safetensors").exists()
        assert json.loads((folder / "chatpipe_adapter.json").read_text())["base_digest"] == entry.inputs["pretrain"].digest
    model = load_causal_lm(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("Hello", return_tensors="pt")
    assert model.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] > prompt["input_ids"].shape[1]
    # LoRA moved the weights away from the pretrained ones.
    base = AutoModelForCausalLM.from_pretrained(copy / "pretrain" / "final")
    changed = [name for name, p in model.named_parameters() if not p.detach().equal(base.get_parameter(name).detach())]
    assert changed


def test_crashed_sft_resumes_from_its_last_checkpoint(sft_run, tmp_path):
    config, run_dir = sft_run
    copy = tmp_path / "run"
    resume_after_crash(config, run_dir, copy, "sft", ["step-000010", "step-000020"], lost="step-000020",
                       resumes_from="step-000010", steps=30)
    metrics = read_manifest(copy).stages["sft"].metrics
    assert metrics["resumed_from_step"] == 10 and metrics["steps"] == 30
    original = read_manifest(run_dir).stages["sft"].metrics
    assert metrics["eval_loss"] == pytest.approx(original["eval_loss"], abs=1e-4)


def test_chat_one_shot_answers_from_the_sft_policy(sft_run):
    _, run_dir = sft_run
    first = chatpipe("chat", str(run_dir), "--prompt", "Hello, who are you?", "--temperature", "0", "--max-new-tokens", "8")
    again = chatpipe("chat", str(run_dir), "--stage", "sft", "--prompt", "Hello, who are you?", "--temperature", "0", "--max-new-tokens", "8")
    assert first.stdout == again.stdout and first.stdout.endswith("\n")
    missing = chatpipe("chat", str(run_dir), "--stage", "ppo", "--prompt", "Hi", check=False)
    assert missing.returncode == 2 and "ppo" in missing.stderr
