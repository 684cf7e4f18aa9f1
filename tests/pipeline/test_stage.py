"""`plan_stage`: the one decision to skip, resume or restart a stage, for each case a run meets."""

import pytest

from pipeline.orchestration.manifest import InputRecord, OutputRecord, StageEntry, new_manifest
from pipeline.orchestration.stage import Decision, plan_stage

HASH = "c0ffee0123456789"


@pytest.fixture
def manifest(tmp_path):
    """A run whose tokenizer completed with output digest `tok1`."""
    manifest = new_manifest("demo", {"name": "demo"}, "demo.yaml")
    (tmp_path / "tokenizer" / "final").mkdir(parents=True)
    manifest.stages["tokenizer"] = StageEntry(
        status="completed", config_hash="t", output=OutputRecord(path="tokenizer/final", files={}, digest="tok1")
    )
    return manifest


def record_pretrain(manifest, run_dir, status, config_hash=HASH, input_digest="tok1", output=True):
    fields = {}
    if output:
        (run_dir / "pretrain" / "final").mkdir(parents=True, exist_ok=True)
        fields["output"] = OutputRecord(path="pretrain/final", files={}, digest="pre1")
    manifest.stages["pretrain"] = StageEntry(
        status=status,
        config_hash=config_hash,
        inputs={"tokenizer": InputRecord(stage="tokenizer", path=str(run_dir / "tokenizer" / "final"), digest=input_digest)},
        **fields,
    )


def plan(manifest, run_dir, requested=False):
    return plan_stage(manifest, "pretrain", HASH, ("tokenizer",), run_dir, requested=requested)


def test_a_stage_never_run_starts_from_scratch(manifest, tmp_path):
    assert plan(manifest, tmp_path) == Decision("restart", "not run yet")
    manifest.stages["pretrain"] = StageEntry(status="pending")
    assert plan(manifest, tmp_path) == Decision("restart", "not run yet")


def test_an_unchanged_completed_stage_is_skipped_unless_requested(manifest, tmp_path):
    record_pretrain(manifest, tmp_path, "completed")
    assert plan(manifest, tmp_path) == Decision("skip", "up to date")
    assert plan(manifest, tmp_path, requested=True) == Decision("restart", "requested")


def test_a_completed_stage_whose_output_folder_is_gone_runs_again(manifest, tmp_path):
    record_pretrain(manifest, tmp_path, "completed")
    (tmp_path / "pretrain" / "final").rmdir()
    assert plan(manifest, tmp_path) == Decision("restart", "its output folder is missing")


@pytest.mark.parametrize("status, reason", [("failed", "it failed"), ("running", "it was interrupted")])
def test_a_failed_or_interrupted_stage_resumes_under_the_same_config_and_inputs(manifest, tmp_path, status, reason):
    record_pretrain(manifest, tmp_path, status, output=False)
    assert plan(manifest, tmp_path) == Decision("resume", reason)
    # Asking for the stage by name does not throw its checkpoints away.
    assert plan(manifest, tmp_path, requested=True) == Decision("resume", reason)


@pytest.mark.parametrize("status", ["completed", "failed", "running"])
def test_a_changed_config_restarts_even_a_failed_stage(manifest, tmp_path, status):
    record_pretrain(manifest, tmp_path, status, config_hash="an older config", output=status == "completed")
    assert plan(manifest, tmp_path) == Decision("restart", "config changed")


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_a_changed_input_restarts_the_stage(manifest, tmp_path, status):
    record_pretrain(manifest, tmp_path, status, input_digest="tok0", output=status == "completed")
    assert plan(manifest, tmp_path) == Decision("restart", "its input 'tokenizer' changed")


def test_an_input_that_is_no_longer_completed_counts_as_changed(manifest, tmp_path):
    record_pretrain(manifest, tmp_path, "completed")
    manifest.stages["tokenizer"] = StageEntry(status="running")
    assert plan(manifest, tmp_path) == Decision("restart", "its input 'tokenizer' changed")


def test_each_decision_reads_as_a_line_of_the_command_line():
    assert Decision("skip", "up to date").describe() == "up to date, skipped"
    assert Decision("resume", "it failed").describe() == "resuming from the last checkpoint (it failed)"
    assert Decision("restart", "config changed").describe() == "config changed; running from scratch"


def test_a_completed_stage_whose_output_was_altered_runs_again(manifest, tmp_path):
    from pipeline.orchestration.manifest import output_record

    record_pretrain(manifest, tmp_path, "completed")
    (tmp_path / "pretrain" / "final" / "model.safetensors").write_bytes(b"weights" * 100)
    manifest.stages["pretrain"].output = output_record(tmp_path, tmp_path / "pretrain" / "final")
    assert plan(manifest, tmp_path) == Decision("skip", "up to date")
    (tmp_path / "pretrain" / "final" / "model.safetensors").write_bytes(b"weightz" * 100)
    assert plan(manifest, tmp_path) == Decision(
        "restart", "its output was altered since it was recorded (model.safetensors)"
    )
