"""A finished run dir on tiny real runs (tokenizer + pretrain): it moves, it notices corruption,
and a failing rerun does not destroy what it was replacing.

One real run (a few optimiser steps) is shared by the module; each test works on its own copy.
"""

import shutil

import pytest
import yaml

from pipeline.apps.chat import checkpoint_warning
from pipeline.config import validate_config
from pipeline.orchestration.manifest import altered_files, read_manifest
from pipeline.orchestration.registry import get_stage
from tests.conftest import REPO_ROOT, chatpipe, tiny_config

TINY_PRETRAIN = {"max_steps": 2, "eval_every": 2, "eval_batches": 1, "save_every": 2, "log_every": 1}


def write_run_config(path, corpus):
    config = tiny_config(corpus, pretrain=TINY_PRETRAIN)
    config["pretrain"] = {**config["pretrain"], "data": {"path": str(corpus)}}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shakespeare_excerpt):
    """(config, run dir, data folder) of a completed tokenizer + pretrain run with its data in folder X."""
    root = tmp_path_factory.mktemp("finished")
    data = root / "X"
    data.mkdir()
    shutil.copy(shakespeare_excerpt, data / "corpus.txt")
    config = write_run_config(root / "run.yaml", data / "corpus.txt")
    chatpipe("run", str(config), "--run-dir", str(root / "A"))
    return config, root / "A", data


@pytest.fixture
def copied_run(finished_run, tmp_path):
    """The finished run dir copied to B and its data to Y, nothing rewritten; a config naming Y's data."""
    _, run_dir, data = finished_run
    shutil.copytree(data, tmp_path / "Y")
    shutil.copytree(run_dir, tmp_path / "B")
    config = write_run_config(tmp_path / "run.yaml", tmp_path / "Y" / "corpus.txt")
    return config, tmp_path / "B"


def stage_lines(result):
    return [line for line in result.stdout.splitlines() if line.startswith("chatpipe: ")]


def test_a_run_dir_copied_elsewhere_with_its_data_moved_is_still_up_to_date(copied_run):
    config, run_dir = copied_run
    lines = stage_lines(chatpipe("run", str(config), "--run-dir", str(run_dir)))
    assert lines[:2] == ["chatpipe: tokenizer: up to date, skipped", "chatpipe: pretrain: up to date, skipped"]


def test_edited_data_is_a_changed_config_even_at_the_same_path(copied_run):
    config, run_dir = copied_run
    corpus = run_dir.parent / "Y" / "corpus.txt"
    corpus.write_text(corpus.read_text()[:60_000])
    lines = stage_lines(chatpipe("run", str(config), "--run-dir", str(run_dir)))
    assert lines[0] == "chatpipe: tokenizer: config changed; running from scratch"


def test_a_corrupted_output_is_rebuilt_not_trusted_and_chat_warns(copied_run):
    config, run_dir = copied_run
    weights = run_dir / "pretrain" / "final" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    warning = checkpoint_warning(run_dir, "pretrain")
    assert warning is not None and "model.safetensors" in warning and "altered" in warning

    lines = stage_lines(chatpipe("run", str(config), "--run-dir", str(run_dir)))
    assert "chatpipe: tokenizer: up to date, skipped" in lines
    assert ("chatpipe: pretrain: its output was altered since it was recorded (model.safetensors); "
            "running from scratch") in lines
    manifest = read_manifest(run_dir)
    assert manifest.stages["pretrain"].status == "completed"
    assert altered_files(run_dir, manifest.stages["pretrain"].output) == []
    assert checkpoint_warning(run_dir, "pretrain") is None


def test_a_failing_rerun_keeps_the_completed_output_and_its_record(copied_run):
    config, run_dir = copied_run
    empty = run_dir.parent / "empty.txt"
    empty.write_text("")
    before = read_manifest(run_dir).stages["pretrain"]

    result = chatpipe("run", str(config), "--run-dir", str(run_dir), "--only", "pretrain",
                      "--set", f"pretrain.data.path={empty}", check=False)
    assert result.returncode != 0
    assert "its previous output was kept" in result.stderr

    after = read_manifest(run_dir).stages["pretrain"]
    assert after.status == "completed"
    assert after.output == before.output and after.config_hash == before.config_hash
    assert "a rerun failed" in after.error
    assert altered_files(run_dir, after.output) == []
    assert not (run_dir / "pretrain.previous").exists()
    # The original config finds everything as it was.
    lines = stage_lines(chatpipe("run", str(config), "--run-dir", str(run_dir)))
    assert lines[:2] == ["chatpipe: tokenizer: up to date, skipped", "chatpipe: pretrain: up to date, skipped"]


def test_an_accelerate_config_is_identified_by_its_content_not_its_path(tmp_path, shakespeare_excerpt):
    def digest(folder, content):
        folder.mkdir(exist_ok=True)
        (folder / "layout.yaml").write_text(content)
        raw = tiny_config(shakespeare_excerpt, pretrain={"launch": {"accelerate_config": str(folder / "layout.yaml")}})
        return get_stage("pretrain").config_digest(validate_config(raw))

    ddp = (REPO_ROOT / "configs" / "accelerate" / "ddp.yaml").read_text()
    assert digest(tmp_path / "A", ddp) == digest(tmp_path / "B", ddp)
    assert digest(tmp_path / "C", ddp.replace("num_processes: 8", "num_processes: 4")) != digest(tmp_path / "A", ddp)


def test_pretrain_compile_off_leaves_the_stage_hash_as_it_was_and_on_reruns_it(shakespeare_excerpt):
    """`pretrain.compile` came after runs were recorded: off (the default) its slice is the one
    those runs hashed, so they stay up to date; on, compiled kernels round differently, a new result."""
    spec = get_stage("pretrain")
    off = validate_config(tiny_config(shakespeare_excerpt))
    on = validate_config(tiny_config(shakespeare_excerpt, pretrain={"compile": True}))
    assert off.pretrain.compile is False
    assert "compile" not in spec.config_slice(off)["pretrain"]
    assert spec.config_slice(on)["pretrain"]["compile"] is True
    assert spec.config_digest(on) != spec.config_digest(off)
