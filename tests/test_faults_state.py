"""A flipped byte in each kind of resumable state is named and mended, and the run ends as it would have.

Checkpoint files (model weights, optimiser state, RNG state), a token-store shard and the chat-token
cache each carry the sha256 recorded when they were written. One tiny tokenizer → pretrain → sft
run is shared by the module; each test damages one byte of one file in a copy of it and reruns the
stage, which must finish, say which file was damaged, and end with the uninterrupted run's weights
bit for bit: a damaged checkpoint is skipped for the one before, a damaged cache is rebuilt.

    pytest -m faults tests/test_faults_state.py
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from data.token_store import TokenStore
from pipeline.config import validate_config
from pipeline.orchestration.manifest import read_manifest
from pipeline.training.loop import step_indices
from tests.conftest import SAMPLES, chatpipe
from tests.test_faults import assert_same_weights, roll_back_pretrain, run_config, run_stage

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """One uninterrupted tokenizer → pretrain → sft run (the fault suite's settings): (config file, run dir)."""
    folder = tmp_path_factory.mktemp("faults_state")
    (folder / "corpus.txt").write_text((SAMPLES / "tinyshakespeare.txt").read_text()[:100_000])
    config = {key: value for key, value in run_config(folder).items() if key not in ("dpo", "reward", "judges", "ppo")}
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    run_dir = folder / "run"
    chatpipe("run", str(folder / "run.yaml"), "--run-dir", str(run_dir))
    return folder / "run.yaml", run_dir


def copy_of(upstream, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(upstream[1], copy)
    return copy


def flip_byte(path, offset: int) -> None:
    """One byte of `path` changed in place (its lowest bit): the file keeps its size and still loads."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def finished(stage: str, run_dir) -> str:
    """Rerun `stage` (a completed one starts over, an interrupted one resumes); its stdout and stderr."""
    result = run_stage(stage, run_dir)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert read_manifest(run_dir).stages[stage].status == "completed"
    return output


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng-rank0.safetensors"])
def test_a_flipped_byte_in_a_checkpoint_falls_back_to_the_one_before(upstream, tmp_path, name):
    run_dir = copy_of(upstream, tmp_path)
    roll_back_pretrain(run_dir)  # as if killed after its last checkpoint, step 20
    checkpoints = (run_dir / "pretrain" / "checkpoints").resolve()
    flip_byte(checkpoints / "step-000020" / name, -5)  # a byte of the last tensor's data, not the header

    output = finished("pretrain", run_dir)
    assert f"{checkpoints / 'step-000020' / name} was damaged after it was written" in output
    assert f"pretrain: resuming from {checkpoints / 'step-000010'}" in output
    assert read_manifest(run_dir).stages["pretrain"].metrics["resumed_from_step"] == 10
    assert_same_weights(run_dir / "pretrain" / "final", upstream[1] / "pretrain" / "final")


def first_trained_token(upstream, store: TokenStore) -> tuple[int, int]:
    """(shard, byte offset) of a token in the first block pretraining trains on: a change there changes the weights."""
    config = validate_config(yaml.safe_load(upstream[0].read_text()))
    section = config.pretrain
    train, _ = store.blocks(section.block_size, section.validation_fraction)
    one_process = SimpleNamespace(num_processes=1, process_index=0)
    (first, *_), *_ = step_indices(0, one_process, accumulation=section.gradient_accumulation_steps,
                                   size=section.per_device_batch_size, examples=len(train), seed=config.seed)
    position = int(first) * section.block_size + 3
    shard = int(np.searchsorted(store.starts, position, side="right")) - 1
    return shard, (position - int(store.starts[shard])) * store.dtype.itemsize


def test_a_flipped_byte_in_a_token_store_shard_is_tokenized_again(upstream, tmp_path):
    run_dir = copy_of(upstream, tmp_path)
    (folder,) = (run_dir / "cache" / "pretrain").resolve().iterdir()
    index, offset = first_trained_token(upstream, TokenStore(folder))
    shard = folder / f"shard-{index:05d}.bin"
    flip_byte(shard, offset)  # the low byte of a token id: still a valid id, another token

    output = finished("pretrain", run_dir)  # a completed stage rerun: every step reads the store
    assert f"{shard} was changed after it was written" in output and f"the token store {folder} is damaged" in output
    assert_same_weights(run_dir / "pretrain" / "final", upstream[1] / "pretrain" / "final")


def test_a_flipped_byte_in_the_chat_token_cache_is_rendered_again(upstream, tmp_path):
    run_dir = copy_of(upstream, tmp_path)
    folders = sorted((run_dir / "cache" / "chat_tokens").resolve().iterdir())
    assert folders
    for folder in folders:  # the training and validation conversations' ids
        ids = folder / "ids.npy"
        flip_byte(ids, ids.stat().st_size - 4 * (len(np.load(ids)) // 2))  # the low byte of the middle id

    output = finished("sft", run_dir)
    for folder in folders:
        assert f"{folder / 'ids.npy'} was changed after it was written" in output
        assert f"the chat-token cache {folder} is damaged: rendering its conversations again" in output
    assert_same_weights(run_dir / "sft" / "final", upstream[1] / "sft" / "final")
