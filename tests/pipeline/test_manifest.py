import json
import os

import pytest

from pipeline.errors import ManifestError
from pipeline.orchestration import manifest as manifest_module
from pipeline.orchestration.manifest import (
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


# A manifest as the dict-based code wrote it (format 1), with a key this version does not know.
OLD_MANIFEST = {
    "format": 1,
    "run_name": "tiny",
    "created_at": "2026-01-02T10:00:00+00:00",
    "updated_at": "2026-01-02T10:05:00+00:00",
    "config_source": "configs/tiny.yaml",
    "config": {"name": "tiny", "seed": 0},
    "stages": {
        "tokenizer": {
            "status": "completed",
            "config": {"tokenizer": {"vocab_size": 400}},
            "config_hash": "0123456789abcdef",
            "inputs": {},
            "output": {"path": "tokenizer/final", "files": {"tokenizer.json": "ab" * 32}, "digest": "5d46f60e83c4f783"},
            "metrics": {"vocab_size": 400, "source": "trained"},
            "error": None,
            "started_at": "2026-01-02T10:00:00+00:00",
            "finished_at": "2026-01-02T10:00:03+00:00",
            "world_size": 1,
            "versions": {"python": "3.12.3", "torch": "2.9.0"},
            "git_commit": "abc123-dirty",
            "wandb_run_id": "tok-abc",
            "log": "/runs/tiny/logs/tokenizer.log",
            "warnings": [],
            "a_key_from_another_version": {"kept": True},
        },
        "pretrain": {
            "status": "failed",
            "inputs": {"tokenizer": {"stage": "tokenizer", "path": "/runs/tiny/tokenizer/final", "digest": "5d46f60e83c4f783"}},
            "output": None,
            "error": "RuntimeError: out of memory",
        },
    },
}


def test_a_manifest_written_by_earlier_code_loads_and_is_written_back_unchanged(tmp_path):
    manifest_path(tmp_path).write_text(json.dumps(OLD_MANIFEST, indent=2))
    manifest = read_manifest(tmp_path)
    tokenizer, pretrain = manifest.stages["tokenizer"], manifest.stages["pretrain"]
    assert tokenizer.output.digest == "5d46f60e83c4f783" and tokenizer.metrics["vocab_size"] == 400
    assert pretrain.status == "failed" and pretrain.inputs["tokenizer"].path == "/runs/tiny/tokenizer/final"
    assert pretrain.output is None and pretrain.metrics == {} and pretrain.config_hash is None
    assert tokenizer.duration == "3s" and pretrain.duration == "-"

    write_manifest(tmp_path, manifest)
    written = json.loads(manifest_path(tmp_path).read_text())
    assert written["updated_at"] != OLD_MANIFEST["updated_at"]
    assert {**written, "updated_at": None} == {**OLD_MANIFEST, "updated_at": None}


def test_a_rerun_s_replacing_record_is_a_typed_entry_written_back_unchanged(tmp_path):
    """`replacing` (the completed entry a rerun replaces) reads as a StageEntry, as earlier code wrote it."""
    rerun = {
        "status": "running",
        "output": None,
        "finished_at": None,
        "replacing": {**OLD_MANIFEST["stages"]["tokenizer"], "a_key_from_another_version": 1},
    }
    manifest_path(tmp_path).write_text(json.dumps({**OLD_MANIFEST, "stages": {"tokenizer": rerun}}))
    entry = read_manifest(tmp_path).stages["tokenizer"]
    assert entry.replacing.status == "completed" and entry.replacing.output.digest == "5d46f60e83c4f783"
    assert entry.to_json() == rerun
    assert entry.without_replacing().to_json() == {"status": "running", "output": None, "finished_at": None}
    update_stage(tmp_path, "tokenizer", status="failed")
    written = json.loads(manifest_path(tmp_path).read_text())["stages"]["tokenizer"]
    assert written == {**rerun, "status": "failed"}


def test_update_stage_keeps_keys_it_does_not_know(tmp_path):
    manifest_path(tmp_path).write_text(json.dumps(OLD_MANIFEST))
    update_stage(tmp_path, "tokenizer", status="running")
    entry = json.loads(manifest_path(tmp_path).read_text())["stages"]["tokenizer"]
    assert entry["status"] == "running" and entry["a_key_from_another_version"] == {"kept": True}


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"\xff\xfe\x00garbage\x80", "not valid JSON"),
        (b"[1, 2, 3]", r"not a chatpipe manifest \(format 'list'"),
        (b'{"format": 2, "stages": {}}', r"not a chatpipe manifest \(format 2"),
        (b'{"format": 1, "config": {}}', "not a chatpipe manifest"),
        (b'{"format": 1, "stages": []}', r"malformed manifest \(stages: "),
        (b'{"format": 1, "stages": {"sft": "completed"}}', r"malformed manifest \(stages\.sft: "),
        (b'{"format": 1, "stages": {"sft": {"status": "done"}}}', r"stages\.sft\.status: Input should be 'pending'"),
        (b'{"format": 1, "stages": {"sft": {"status": "completed", "output": {"files": {}}}}}', r"stages\.sft\.output\.path"),
        (b'{"format": 1, "stages": {"sft": {"inputs": {"pretrain": {"path": "x"}}}}}', r"stages\.sft\.inputs\.pretrain\.digest"),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_one_clear_error_naming_the_file(tmp_path, content, problem):
    manifest_path(tmp_path).write_bytes(content)
    with pytest.raises(ManifestError, match=problem) as error:
        read_manifest(tmp_path)
    assert str(error.value).startswith(f"{manifest_path(tmp_path)}: ")
    assert "start a new run dir" in str(error.value)


def test_update_stage_refuses_a_field_of_the_wrong_shape_and_writes_nothing(run_dir):
    before = manifest_path(run_dir).read_text()
    with pytest.raises(ManifestError, match=r"cannot record stage 'sft' \(status: Input should be"):
        update_stage(run_dir, "sft", status="done")
    assert manifest_path(run_dir).read_text() == before


def test_a_completed_entry_without_an_output_is_not_a_usable_input(run_dir):
    update_stage(run_dir, "pretrain", status="completed")
    with pytest.raises(ManifestError, match="stage 'pretrain' is completed but records no output; rerun it"):
        resolve_input(run_dir, read_manifest(run_dir), "pretrain")


def test_duration_reads_like_a_clock():
    assert manifest_module.duration("2026-01-02T10:00:00+00:00", "2026-01-02T11:02:03+00:00") == "1h02m03s"
    assert manifest_module.duration("2026-01-02T10:00:00+00:00", "2026-01-02T10:04:05+00:00") == "4m05s"
    assert manifest_module.duration("2026-01-02T10:00:00Z", "2026-01-02T10:00:07") == "7s"


def test_the_manifest_is_as_readable_as_any_file_the_user_writes(tmp_path):
    """mkstemp's 0600 hid a run's manifest from everyone but its owner (a shared run dir, `chatpipe report` by a teammate)."""
    import os

    from pipeline.orchestration.manifest import manifest_path, new_manifest, write_manifest

    old = os.umask(0o022)
    try:
        write_manifest(tmp_path, new_manifest("demo", {"name": "demo"}, "demo.yaml"))
    finally:
        os.umask(old)
    assert manifest_path(tmp_path).stat().st_mode & 0o777 == 0o644
