import json
import os

import pytest

from pipeline import manifest as manifest_module
from pipeline.errors import ManifestError
from pipeline.manifest import (
    manifest_path,
    new_manifest,
    output_record,
    read_manifest,
    resolve_input,
    update_stage,
    write_manifest,
)


@pytest.fixture
def run_dir(tmp_path):
    write_manifest(tmp_path, new_manifest("demo", {"name": "demo"}, "demo.yaml"))
    return tmp_path


def completed_stage(run_dir, name="pretrain"):
    folder = run_dir / name / "final"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "config.json").write_text('{"hidden_size": 32}')
    update_stage(run_dir, name, status="completed", output=output_record(run_dir, folder))
    return folder


def test_update_stage_merges_fields_and_round_trips(run_dir):
    update_stage(run_dir, "pretrain", status="running", world_size=2)
    update_stage(run_dir, "pretrain", status="completed", metrics={"eval_loss": 3.5})
    entry = read_manifest(run_dir).stages["pretrain"]
    assert entry.to_json() == {"status": "completed", "world_size": 2, "metrics": {"eval_loss": 3.5}}


def test_a_crash_while_writing_leaves_the_previous_manifest_intact(run_dir, monkeypatch):
    update_stage(run_dir, "tokenizer", status="completed")
    before = manifest_path(run_dir).read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(manifest_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        update_stage(run_dir, "pretrain", status="running")
    assert manifest_path(run_dir).read_text() == before
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".manifest")] == []


def test_a_torn_manifest_is_a_clear_error(run_dir):
    manifest_path(run_dir).write_text('{"format": 1, "stages": {')
    with pytest.raises(ManifestError, match="manifest.json: not valid JSON"):
        read_manifest(run_dir)


def test_a_missing_manifest_says_how_to_start_the_run(tmp_path):
    with pytest.raises(ManifestError, match="chatpipe run CONFIG"):
        read_manifest(tmp_path)


def test_output_record_hashes_every_file(run_dir):
    folder = completed_stage(run_dir)
    record = read_manifest(run_dir).stages["pretrain"].output
    assert record.path == "pretrain/final"
    assert set(record.files) == {"model.safetensors", "config.json"}
    assert record.files["config.json"] == manifest_module.hash_file(folder / "config.json")


def test_resolve_input_accepts_an_intact_completed_checkpoint(run_dir):
    folder = completed_stage(run_dir)
    manifest = read_manifest(run_dir)
    resolved = resolve_input(run_dir, manifest, "pretrain")
    assert resolved.path == str(folder.resolve())
    assert resolved.digest == manifest.stages["pretrain"].output.digest


def test_resolve_input_refuses_an_altered_checkpoint(run_dir):
    folder = completed_stage(run_dir)
    (folder / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match=r"altered since it was recorded \(changed or missing: model.safetensors\)"):
        resolve_input(run_dir, read_manifest(run_dir), "pretrain")


def test_resolve_input_refuses_a_deleted_weight_file(run_dir):
    folder = completed_stage(run_dir)
    os.remove(folder / "config.json")
    with pytest.raises(ManifestError, match="config.json"):
        resolve_input(run_dir, read_manifest(run_dir), "pretrain")


def test_resolve_input_refuses_missing_and_unfinished_stages(run_dir):
    with pytest.raises(ManifestError, match="stage 'sft' has not run"):
        resolve_input(run_dir, read_manifest(run_dir), "sft")
    update_stage(run_dir, "pretrain", status="running")
    with pytest.raises(ManifestError, match="stage 'pretrain' is 'running', not completed"):
        resolve_input(run_dir, read_manifest(run_dir), "pretrain")


def test_manifest_is_plain_json_with_the_run_config(run_dir):
    data = json.loads(manifest_path(run_dir).read_text())
    assert data["run_name"] == "demo" and data["config"] == {"name": "demo"} and data["format"] == 1
