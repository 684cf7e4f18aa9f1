"""`chatpipe chat`: which checkpoint it picks, how replies are sampled, and the terminal chat."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pipeline.apps.chat as chat
from pipeline.apps.chat import (
    SamplingSettings,
    chat_command,
    load_chat_model,
    prompt_ids,
    reply,
    resolve_policy,
    run_repl,
    start_reply,
    stream_reply,
)
from pipeline.cli import main
from pipeline.errors import ConfigError, ManifestError
from pipeline.orchestration.manifest import new_manifest, output_record, update_stage, write_manifest
from tests.conftest import REPO_ROOT, tiny_causal_lm

GREEDY = SamplingSettings(temperature=0, max_new_tokens=12)


def write_run(run_dir: Path, statuses: dict[str, str]) -> Path:
    """A run dir whose manifest records each stage with a status; completed ones get an output folder."""
    write_manifest(run_dir, new_manifest("tiny", {}, "test"))
    for stage, status in statuses.items():
        fields = {"status": status}
        if status == "completed":
            (run_dir / stage / "final").mkdir(parents=True, exist_ok=True)
            fields["output"] = {"path": f"{stage}/final", "files": {}, "digest": "x"}
        update_stage(run_dir, stage, **fields)
    return run_dir


def save_tiny_run(run_dir: Path, tokenizer, stage: str = "sft") -> Path:
    """A run dir with a real tiny model and tokenizer saved as `stage`'s completed output."""
    write_run(run_dir, {stage: "completed"})
    folder = run_dir / stage / "final"
    tiny_causal_lm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return run_dir


def damaged_copy(run_dir: Path, into: Path, damage: str) -> Path:
    """A copy of a tiny run whose manifest records its checkpoint's hashes, then the weights
    truncated to half their size ("truncated") or deleted ("missing")."""
    copy = into / "damaged_run"
    shutil.copytree(run_dir, copy)
    update_stage(copy, "sft", output=output_record(copy, copy / "sft" / "final"))
    weights = copy / "sft" / "final" / "model.safetensors"
    if damage == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    else:
        weights.unlink()
    return copy


def end_of_turn_model(tokenizer):
    """A tiny model whose every next token is EOS: its replies are empty and end by 'stop'."""
    model = tiny_causal_lm(tokenizer)
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 10.0
    model.lm_head = head
    return model.eval()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, bpe_tokenizer) -> Path:
    return save_tiny_run(tmp_path_factory.mktemp("run"), bpe_tokenizer)


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return load_chat_model(resolve_policy(tiny_run))


# ---------------------------------------------------------------------------------------------
# Which checkpoint


def test_resolve_policy_prefers_ppo_then_sft_then_pretrain(tmp_path):
    write_run(tmp_path, {"pretrain": "completed"})
    assert resolve_policy(tmp_path) == (tmp_path / "pretrain" / "final").resolve()
    write_run(tmp_path, {"pretrain": "completed", "sft": "completed", "ppo": "failed"})
    assert resolve_policy(tmp_path) == (tmp_path / "sft" / "final").resolve()
    write_run(tmp_path, {"pretrain": "completed", "sft": "completed", "reward": "completed", "ppo": "completed"})
    assert resolve_policy(tmp_path) == (tmp_path / "ppo" / "final").resolve()


def test_resolve_policy_takes_a_named_completed_stage(tmp_path):
    write_run(tmp_path, {"pretrain": "completed", "sft": "completed", "dpo": "completed", "ppo": "completed"})
    assert resolve_policy(tmp_path, "pretrain") == (tmp_path / "pretrain" / "final").resolve()
    assert resolve_policy(tmp_path, "sft") == (tmp_path / "sft" / "final").resolve()
    assert resolve_policy(tmp_path, "dpo") == (tmp_path / "dpo" / "final").resolve()


def test_resolve_policy_takes_dpo_after_ppo_and_before_sft(tmp_path):
    write_run(tmp_path, {"pretrain": "completed", "sft": "completed", "dpo": "completed"})
    assert resolve_policy(tmp_path) == (tmp_path / "dpo" / "final").resolve()
    write_run(tmp_path, {"pretrain": "completed", "sft": "completed", "dpo": "completed", "reward": "completed", "ppo": "completed"})
    assert resolve_policy(tmp_path) == (tmp_path / "ppo" / "final").resolve()


def test_resolve_policy_names_the_stage_and_what_is_completed(tmp_path):
    write_run(tmp_path, {"pretrain": "completed", "sft": "completed", "ppo": "failed"})
    with pytest.raises(ManifestError) as raised:
        resolve_policy(tmp_path, "ppo")
    message = str(raised.value)
    assert str(tmp_path) in message and "'ppo'" in message and "failed" in message
    assert "completed: sft, pretrain" in message and "chatpipe stage ppo" in message


def test_resolve_policy_refuses_a_run_without_a_policy(tmp_path):
    write_run(tmp_path, {"tokenizer": "completed", "pretrain": "running"})
    with pytest.raises(ManifestError, match=r"no policy stage .* is completed \(pretrain running\)"):
        resolve_policy(tmp_path)


def test_resolve_policy_refuses_a_stage_that_is_not_a_policy(tmp_path):
    write_run(tmp_path, {"sft": "completed", "reward": "completed"})
    with pytest.raises(ManifestError, match="'reward' is not a policy.*ppo, dpo, sft, pretrain"):
        resolve_policy(tmp_path, "reward")


def test_resolve_policy_refuses_a_missing_manifest_or_checkpoint(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        resolve_policy(tmp_path / "nowhere")
    write_run(tmp_path, {"sft": "completed"})
    (tmp_path / "sft" / "final").rmdir()
    with pytest.raises(ManifestError, match="checkpoint .* is missing; rerun stage 'sft'"):
        resolve_policy(tmp_path)


# ---------------------------------------------------------------------------------------------
# Replies


def test_greedy_reply_is_a_deterministic_string(loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "Good morrow, how fares the king?"}]
    first = reply(model, tokenizer, messages, GREEDY)
    assert isinstance(first, str) and first
    assert reply(model, tokenizer, messages, GREEDY) == first
    assert "".join(stream_reply(model, tokenizer, messages, GREEDY)) == first


def test_seeded_sampling_is_reproducible(loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "Speak."}]
    settings = SamplingSettings(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=12)
    assert reply(model, tokenizer, messages, settings, seed=3) == reply(model, tokenizer, messages, settings, seed=3)


def test_reply_counts_tokens_and_stops_at_max_new_tokens(loaded):
    model, tokenizer = loaded
    stream = start_reply(model, tokenizer, [{"role": "user", "content": "Speak."}], SamplingSettings(temperature=0, max_new_tokens=5))
    "".join(stream)
    assert stream.completion_tokens == 5 and stream.finish_reason == "length"
    assert stream.prompt_tokens == len(prompt_ids(tokenizer, [{"role": "user", "content": "Speak."}], None))


def test_reply_stops_at_the_end_of_turn_token(bpe_tokenizer):
    stream = start_reply(end_of_turn_model(bpe_tokenizer), bpe_tokenizer, [{"role": "user", "content": "hi"}], GREEDY)
    assert "".join(stream) == ""
    assert stream.finish_reason == "stop" and stream.completion_tokens == 1


def test_closing_a_stream_stops_generation(loaded):
    model, tokenizer = loaded
    stream = start_reply(model, tokenizer, [{"role": "user", "content": "Speak."}], SamplingSettings(temperature=0, max_new_tokens=200))
    next(iter(stream))
    stream.close()
    assert 0 < stream.completion_tokens < 200


def test_long_conversation_is_left_truncated_to_fit_the_context(loaded):
    model, tokenizer = loaded
    context = model.config.max_position_embeddings
    messages = [{"role": "system", "content": "Be brief."}]
    for turn in range(40):
        messages += [{"role": "user", "content": f"question {turn} " * 5}, {"role": "assistant", "content": "answer " * 5}]
    messages.append({"role": "user", "content": "last question"})
    settings = SamplingSettings(temperature=0, max_new_tokens=16)
    stream = start_reply(model, tokenizer, messages, settings)
    assert len(prompt_ids(tokenizer, messages, None)) > context
    assert stream.prompt_tokens <= context - 16
    text = tokenizer.decode(stream.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")  # whole early turns went first
    assert text.endswith("<|im_start|>user\nlast question<|im_end|>\n<|im_start|>assistant\n")
    assert "question 0 " not in text
    "".join(stream)
    assert stream.prompt_tokens + stream.completion_tokens <= context


def test_a_too_long_single_message_is_cut_from_the_left(bpe_tokenizer):
    ids = prompt_ids(bpe_tokenizer, [{"role": "user", "content": "word " * 500}], 50)
    assert len(ids) == 50
    assert bpe_tokenizer.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_typed_control_tokens_stay_text(bpe_tokenizer):
    ids = prompt_ids(bpe_tokenizer, [{"role": "user", "content": "a<|im_end|>b"}], None)
    assert ids.count(bpe_tokenizer.eos_token_id) == 1  # only the template's own end of turn


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", 0)])
def test_sampling_settings_refuse_nonsense(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingSettings(**{field: value})


# ---------------------------------------------------------------------------------------------
# Terminal


def test_repl_keeps_history_resets_and_exits(loaded, monkeypatch):
    model, tokenizer = loaded
    seen = []

    def recording_stream_reply(model, tokenizer, messages, settings=None, seed=None):
        seen.append([dict(message) for message in messages])
        yield from stream_reply(model, tokenizer, messages, settings, seed)

    monkeypatch.setattr(chat, "stream_reply", recording_stream_reply)
    stdin = io.StringIO("Hail, good sir\n\nWhat news?\n/reset\nAgain\n/exit\nnever read\n")
    stdout = io.StringIO()
    run_repl(model, tokenizer, GREEDY, input_stream=stdin, output_stream=stdout)

    assert [[m["role"] for m in messages] for messages in seen] == [["user"], ["user", "assistant", "user"], ["user"]]
    first_reply = reply(model, tokenizer, [{"role": "user", "content": "Hail, good sir"}], GREEDY)
    assert seen[1][1]["content"] == first_reply  # the second turn saw the first exchange
    assert seen[2][0]["content"] == "Again"  # /reset forgot it
    output = stdout.getvalue()
    assert "/reset" in output.splitlines()[0] and "/exit" in output.splitlines()[0]  # the banner says how
    assert f"assistant> {first_reply}\n" in output
    assert f"assistant> {reply(model, tokenizer, seen[1], GREEDY)}\n" in output
    assert "(conversation cleared)" in output
    assert output.count("you> ") == 6  # one prompt per line read, the blank one and /exit included


def test_repl_ends_at_end_of_input(loaded):
    model, tokenizer = loaded
    stdout = io.StringIO()
    run_repl(model, tokenizer, GREEDY, input_stream=io.StringIO("Hello"), output_stream=stdout)
    assert stdout.getvalue().count("assistant> ") == 1


def test_repl_in_a_real_process_over_a_pipe(tiny_run, loaded):
    model, tokenizer = loaded
    folder = resolve_policy(tiny_run)
    script = (
        "import sys\n"
        "from pipeline.apps.chat import SamplingSettings, load_chat_model, run_repl\n"
        "model, tokenizer = load_chat_model(sys.argv[1], device='cpu')\n"
        "run_repl(model, tokenizer, SamplingSettings(temperature=0, max_new_tokens=12))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder)], input="Hail, good sir\n/exit\n",
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    expected = reply(model, tokenizer, [{"role": "user", "content": "Hail, good sir"}], GREEDY)
    assert result.stdout.startswith("Chatting with")
    assert f"assistant> {expected}\n" in result.stdout


def test_chat_command_one_shot_prints_only_the_reply(tiny_run, loaded, capsys):
    model, tokenizer = loaded
    assert chat_command(tiny_run, prompt="Good morrow", settings=GREEDY) == 0
    expected = reply(model, tokenizer, [{"role": "user", "content": "Good morrow"}], GREEDY)
    assert capsys.readouterr().out == expected + "\n"


def test_truncating_a_long_conversation_is_fast_and_drops_the_fewest_turns(bpe_tokenizer):
    """Dropping one turn at a time re-rendered the chat per turn: 1,000 messages took 13.8 s."""
    import time

    conversation = [{"role": "system", "content": "Be brief."}] + [
        {"role": ("user", "assistant")[i % 2], "content": f"message {i}: hi there"} for i in range(1000)
    ]
    started = time.perf_counter()
    ids = prompt_ids(bpe_tokenizer, conversation, 120)
    assert time.perf_counter() - started < 5
    assert len(ids) <= 120
    # The fewest turns dropped: the same as dropping one at a time, checked on the answer's neighbours.
    render = lambda kept: prompt_ids(bpe_tokenizer, conversation[:1] + kept, None)  # noqa: E731
    kept = next(k for k in range(1, 1001) if render(conversation[-k:]) == ids)
    assert len(render(conversation[-(kept + 1):])) > 120
    assert render(conversation[-kept:])[:3] == prompt_ids(bpe_tokenizer, conversation[:1], None)[:3]


# ---------------------------------------------------------------------------------------------
# The command's flags and a damaged checkpoint: a message and exit code 2, never a traceback


@pytest.mark.parametrize("temperature", ["1e-300", "5e-324"])
def test_chat_command_takes_a_tiny_temperature_as_greedy(tiny_run, loaded, capsys, temperature):
    """`chatpipe chat --temperature 1e-300` ended in an IndexError: the draw overflowed to NaN."""
    model, tokenizer = loaded
    assert main(["chat", str(tiny_run), "--prompt", "Good morrow", "--temperature", temperature,
                 "--max-new-tokens", "12"]) == 0
    expected = reply(model, tokenizer, [{"role": "user", "content": "Good morrow"}], GREEDY)
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("flag, value, named", [
    ("--temperature", "nan", "temperature"), ("--temperature", "inf", "temperature"),
    ("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"), ("--top-p", "nan", "top_p"),
    ("--top-k", "-1", "top_k"), ("--max-new-tokens", "0", "max_new_tokens"), ("--seed", "-1", "seed"),
    ("--seed", str(2**64), "seed"),
])
def test_chat_command_refuses_bad_flags_by_name(tiny_run, capsys, flag, value, named):
    assert main(["chat", str(tiny_run), "--prompt", "hi", f"{flag}={value}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("chatpipe: ") and named in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, value", [("--top-k", "1.5"), ("--temperature", "warm"), ("--max-new-tokens", "x")])
def test_chat_command_refuses_flags_of_the_wrong_type(tiny_run, capsys, flag, value):
    with pytest.raises(SystemExit) as exit:
        main(["chat", str(tiny_run), "--prompt", "hi", f"{flag}={value}"])
    assert exit.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_chat_command_stops_on_a_damaged_checkpoint_with_one_message(tiny_run, tmp_path, capsys, damage):
    """A truncated or deleted model.safetensors warned, then crashed in transformers with a traceback."""
    run_dir = damaged_copy(tiny_run, tmp_path, damage)
    assert main(["chat", str(run_dir), "--prompt", "hi"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith("chatpipe: ") and "model.safetensors" in line
    assert f"--run-dir {run_dir}" in line  # what to do: rebuild the stage
