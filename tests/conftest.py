"""Shared fixtures: tiny real configs, data and tokenizers that build in milliseconds to seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES = REPO_ROOT / "data" / "samples"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed on CPU compiles its shared-memory op on first use, behind a lock file in the torch
# extensions folder; a run killed mid-build leaves the lock and every later launch waits on it for
# ever. The tests build it under the virtual environment, which a clean checkout makes anew.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture(scope="session")
def shakespeare_excerpt(tmp_path_factory) -> Path:
    """The first 100 kB of Tiny Shakespeare: enough text to learn from in a few dozen steps."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text((SAMPLES / "tinyshakespeare.txt").read_text()[:100_000])
    return path


@pytest.fixture(scope="session")
def bpe_tokenizer(shakespeare_excerpt):
    from stages.tokenizer.bpe import train_bpe

    return train_bpe([[shakespeare_excerpt.read_text()]], vocab_size=400)


def tiny_config(corpus: Path, **sections) -> dict:
    """A raw run config for a model with hidden size 32 and 2 layers; `sections` update it."""
    config = {
        "name": "test",
        "seed": 7,
        "model": {
            "architecture": "llama",
            "config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "max_position_embeddings": 512,  # every stage's default sequence length fits
            },
        },
        "wandb": {"mode": "disabled"},
        "tokenizer": {"vocab_size": 400},
        "pretrain": {
            "data": {"path": str(corpus)},
            "block_size": 32,
            "per_device_batch_size": 8,
            "max_steps": 40,
            "learning_rate": 3e-3,
            "warmup_steps": 5,
            "eval_every": 20,
            "eval_batches": 4,
            "save_every": 20,
            "log_every": 10,
        },
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **values}
        else:
            config[name] = values
    return config


@pytest.fixture
def write_config(tmp_path, shakespeare_excerpt):
    """Write a tiny config (with section updates) to a YAML file and return its path."""

    def write(name: str = "run.yaml", **sections) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tiny_config(shakespeare_excerpt, **sections)))
        return path

    return write


def chatpipe(*args: str, check: bool = True, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `chatpipe` command line in a fresh process, as a user would.

    `env` adds variables to the environment; a value of None removes that variable.
    """
    environment = {**os.environ, **(env or {})}
    environment = {key: value for key, value in environment.items() if value is not None}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"chatpipe {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def resume_after_crash(config: Path, run_dir: Path, copy: Path, stage: str, checkpoints: list[str], *, lost: str, resumes_from: str, steps: int) -> str:
    """Copy a completed run to `copy` as a crash in `stage` would leave it (its final model and
    checkpoint `lost` gone, the stage marked running; `checkpoints` is what it kept), run it
    again, check that it said it resumed from checkpoint `resumes_from` of `steps`, and return
    what it printed."""
    import shutil

    from pipeline.orchestration.manifest import update_stage

    shutil.copytree(run_dir, copy)
    folder = copy / stage / "checkpoints"
    assert sorted(p.name for p in folder.glob("step-*")) == checkpoints
    shutil.rmtree(folder / lost)
    shutil.rmtree(copy / stage / "final")
    update_stage(copy, stage, status="running", output=None)
    output = chatpipe("run", str(config), "--run-dir", str(copy)).stdout
    assert f"{stage}: resuming from the last checkpoint (it was interrupted)" in output
    step = int(resumes_from.removeprefix("step-"))
    assert f"{stage}: resuming from {(folder / resumes_from).resolve()} (step {step} of {steps})" in output
    return output


def tiny_sft_section(**updates) -> dict:
    """An `sft:` section on the first 120 HH conversations, sized to run in seconds."""
    section = {
        "data": {"path": str(SAMPLES / "hh_harmless_1000.jsonl"), "conversation_format": "hh", "max_rows": 120},
        "validation_fraction": 0.1,
        "max_length": 192,
        "max_steps": 30,
        "per_device_batch_size": 8,
        "learning_rate": 3e-3,
        "eval_every": 10,
        "save_every": 10,
        "log_every": 5,
        "sample_prompts": 2,
        "sample_max_new_tokens": 8,
    }
    section.update(updates)
    return section


def tiny_causal_lm(tokenizer, seed: int = 0, **overrides):
    """A 2-layer, hidden-32 Llama sized to `tokenizer`, built from its config in milliseconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **overrides,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def tiny_token_scorer(tokenizer, seed: int = 1):
    """A tiny scalar-head model wrapped as a TokenScorer (a value or reward model)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from reward_model.model import TokenScorer

    config = tiny_causal_lm(tokenizer).config
    config.num_labels = 1
    torch.manual_seed(seed)
    return TokenScorer(AutoModelForSequenceClassification.from_config(config))


def decoded_spans(tokenizer, ids: list[int], mask: list[int], keep: int = 1) -> list[str]:
    """Decoded runs of consecutive tokens whose mask bit equals `keep`."""
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit == keep:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs
