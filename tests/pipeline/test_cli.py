"""`chatpipe run` says what each stage will do, and the stage then does exactly that.

The stages here are stand-ins run in this process (through the real `execute_stage`), so a test
takes a fraction of a second: each records whether it was told to resume and whether the folder
of its previous attempt was still there.
"""

import pytest

import pipeline.cli as cli
from pipeline.orchestration.manifest import read_manifest
from pipeline.orchestration.stage import StageResult, execute_stage


class StandInStages:
    """Replaces `launch_stage`: runs each stage in process with a train function that only records."""

    def __init__(self):
        self.seen: dict[str, dict] = {}
        self.fail: set[str] = set()
        self.output = {"tokenizer": "vocab v1"}

    def launch(self, spec, config, run_dir):
        def train(context):
            marker = context.stage_dir / "checkpoints" / "attempt"
            self.seen[spec.name] = {"resuming": context.resuming, "previous_attempt_kept": marker.exists()}
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("a checkpoint of this attempt")
            if spec.name in self.fail:
                raise RuntimeError("out of memory")
            context.output_dir.mkdir(parents=True, exist_ok=True)
            (context.output_dir / "weights.txt").write_text(self.output.get(spec.name, spec.name))
            return StageResult(context.output_dir, {"steps": 1})

        try:
            execute_stage(spec.name, run_dir, train)
        except RuntimeError:
            return 1
        return 0


@pytest.fixture
def stages(monkeypatch):
    stand_in = StandInStages()
    monkeypatch.setattr(cli, "launch_stage", stand_in.launch)
    return stand_in


def run(capsys, config, run_dir, *overrides, only=None):
    code = cli.command_run(str(config), str(run_dir), list(overrides), only=only)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("chatpipe: ")]
    return code, lines


def test_a_new_run_starts_every_stage_from_scratch(stages, write_config, tmp_path, capsys):
    code, lines = run(capsys, write_config(), tmp_path / "run")
    assert code == 0
    assert lines[:2] == ["chatpipe: tokenizer: not run yet; running from scratch",
                         "chatpipe: pretrain: not run yet; running from scratch"]
    assert stages.seen["pretrain"] == {"resuming": False, "previous_attempt_kept": False}
    code, lines = run(capsys, write_config(), tmp_path / "run")
    assert lines[:2] == ["chatpipe: tokenizer: up to date, skipped", "chatpipe: pretrain: up to date, skipped"]


def test_a_failed_stage_is_announced_as_resuming_and_resumes(stages, write_config, tmp_path, capsys):
    stages.fail = {"pretrain"}
    assert run(capsys, write_config(), tmp_path / "run")[0] == 1
    assert read_manifest(tmp_path / "run").stages["pretrain"].status == "failed"

    stages.fail = set()
    code, lines = run(capsys, write_config(), tmp_path / "run")
    assert code == 0
    assert "chatpipe: tokenizer: up to date, skipped" in lines
    assert "chatpipe: pretrain: resuming from the last checkpoint (it failed)" in lines
    assert stages.seen["pretrain"] == {"resuming": True, "previous_attempt_kept": True}


def test_a_failed_stage_whose_config_changed_is_announced_and_run_from_scratch(stages, write_config, tmp_path, capsys):
    stages.fail = {"pretrain"}
    run(capsys, write_config(), tmp_path / "run")

    stages.fail = set()
    code, lines = run(capsys, write_config(), tmp_path / "run", "pretrain.max_steps=20")
    assert code == 0
    assert "chatpipe: pretrain: config changed; running from scratch" in lines
    assert stages.seen["pretrain"] == {"resuming": False, "previous_attempt_kept": False}


def test_a_failed_stage_whose_input_changed_is_announced_and_run_from_scratch(stages, write_config, tmp_path, capsys):
    stages.fail = {"pretrain"}
    run(capsys, write_config(), tmp_path / "run")
    stages.fail, stages.output["tokenizer"] = set(), "vocab v2"
    assert run(capsys, write_config(), tmp_path / "run", only="tokenizer")[1][0] == (
        "chatpipe: tokenizer: requested; running from scratch"
    )

    code, lines = run(capsys, write_config(), tmp_path / "run")
    assert code == 0
    assert "chatpipe: pretrain: its input 'tokenizer' changed; running from scratch" in lines
    assert stages.seen["pretrain"] == {"resuming": False, "previous_attempt_kept": False}


def test_status_shows_how_long_each_finished_stage_took(stages, write_config, tmp_path, capsys):
    run(capsys, write_config(), tmp_path / "run")
    cli.command_status(tmp_path / "run")
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["pretrain"][1] == "completed"
    assert any(cell.endswith("s") and cell[0].isdigit() for cell in rows["pretrain"][2:])


def status_rows(capsys, run_dir):
    cli.command_status(run_dir)
    return {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[2:]}


def test_a_failed_rerun_of_a_completed_stage_puts_its_output_and_record_back(stages, write_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run(capsys, write_config(), run_dir)
    before = read_manifest(run_dir).stages["tokenizer"]
    stages.fail = {"tokenizer"}
    assert run(capsys, write_config(), run_dir, only="tokenizer")[0] == 1

    after = read_manifest(run_dir).stages["tokenizer"]
    assert (after.status, after.output, after.config_hash) == ("completed", before.output, before.config_hash)
    assert after.error == "a rerun failed (RuntimeError: out of memory); the previous output was kept"
    assert (run_dir / "tokenizer" / "final" / "weights.txt").read_text() == "vocab v1"
    assert not (run_dir / "tokenizer.previous").exists()
    assert status_rows(capsys, run_dir) == {"tokenizer": "completed", "pretrain": "completed"}


def test_a_successful_rerun_replaces_the_output_and_marks_later_stages_stale(stages, write_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run(capsys, write_config(), run_dir)
    stages.output["tokenizer"] = "vocab v2"
    assert run(capsys, write_config(), run_dir, only="tokenizer")[0] == 0
    assert (run_dir / "tokenizer" / "final" / "weights.txt").read_text() == "vocab v2"
    assert not (run_dir / "tokenizer.previous").exists()
    assert "replacing" not in read_manifest(run_dir).stages["tokenizer"].to_json()
    assert status_rows(capsys, run_dir) == {"tokenizer": "completed", "pretrain": "stale"}

    code, lines = run(capsys, write_config(), run_dir)
    assert "chatpipe: pretrain: its input 'tokenizer' changed; running from scratch" in lines
    assert status_rows(capsys, run_dir) == {"tokenizer": "completed", "pretrain": "completed"}


WRONG_SHAPES = [
    (b"\xff\xfe\x00garbage\x80", "not valid JSON"),
    (b"[1, 2, 3]", "not a chatpipe manifest (format 'list'"),
    (b'{"format": 1, "stages": {}}', "records no run config"),
]


# `run` is left out for the empty manifest: it records its config there, which makes the run dir usable.
@pytest.mark.parametrize("command, content, problem", [
    (command, content, problem) for command in ("status", "stage", "run") for content, problem in WRONG_SHAPES
    if not (command == "run" and b"stages" in content)
])
def test_a_manifest_of_the_wrong_shape_is_one_message_naming_it(write_config, tmp_path, capsys, command, content, problem):
    from pipeline.orchestration.manifest import manifest_path

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    manifest_path(run_dir).write_bytes(content)
    argv = {"status": ["status", str(run_dir)], "stage": ["stage", "pretrain", "--run-dir", str(run_dir)],
            "run": ["run", str(write_config()), "--run-dir", str(run_dir), "--only", "pretrain"]}[command]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"chatpipe: {manifest_path(run_dir)}: ") and problem in err
    assert len(err.strip().splitlines()) == 1
    assert manifest_path(run_dir).read_bytes() == content


@pytest.mark.parametrize("content", [content for content, _ in WRONG_SHAPES])
def test_serve_refuses_a_manifest_of_the_wrong_shape_in_one_message_naming_it(tmp_path, capsys, content):
    from pipeline.orchestration.manifest import manifest_path

    manifest_path(tmp_path).write_bytes(content)
    assert cli.main(["serve", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"chatpipe: {manifest_path(tmp_path)}: ") and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Nothing the run dir holds is lost to a lost manifest, a new launch or a misused path


def test_a_lost_manifest_never_deletes_outputs_it_does_not_record(stages, write_config, tmp_path, capsys):
    from pipeline.orchestration.manifest import manifest_path, previous_manifest_path

    run_dir = tmp_path / "run"
    run(capsys, write_config(), run_dir)
    manifest_path(run_dir).unlink()
    previous_manifest_path(run_dir).unlink()

    assert cli.main(["run", str(write_config()), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"chatpipe: tokenizer: {run_dir / 'tokenizer'} holds a final output (final/) that the manifest does not record" in err
    assert "chatpipe does not delete what it did not record" in err
    assert (run_dir / "tokenizer" / "final" / "weights.txt").read_text() == "vocab v1"
    assert (run_dir / "pretrain" / "final" / "weights.txt").exists()


@pytest.mark.parametrize("damage", [b"\x00garbage", b'{"format": 1, "stages": {}}', None])
def test_a_damaged_or_missing_manifest_is_recovered_from_the_one_before_it(stages, write_config, tmp_path, capsys, damage):
    from pipeline.orchestration.manifest import manifest_path

    run_dir = tmp_path / "run"
    run(capsys, write_config(), run_dir)
    if damage is None:
        manifest_path(run_dir).unlink()
    else:
        manifest_path(run_dir).write_bytes(damage)

    code, lines = run(capsys, write_config(), run_dir)
    assert code == 0
    recovered = next(line for line in lines if "recovered the run from manifest.previous.json" in line)
    assert "completed and verified: tokenizer" in recovered
    kept = list(run_dir.glob("manifest.damaged-*.json"))
    if damage is None:
        assert kept == []
    else:
        assert [path.read_bytes() for path in kept] == [damage]
        assert f"the damaged file is kept as {kept[0].name}" in recovered
    # One write behind: pretrain's `completed` was the write lost, so it resumes from its checkpoint.
    assert "chatpipe: tokenizer: up to date, skipped" in lines
    assert "chatpipe: pretrain: resuming from the last checkpoint (it was interrupted)" in lines
    assert (run_dir / "tokenizer" / "final" / "weights.txt").read_text() == "vocab v1"
    assert status_rows(capsys, run_dir) == {"tokenizer": "completed", "pretrain": "completed"}


def test_status_shows_the_previous_manifest_when_the_current_one_is_damaged(stages, write_config, tmp_path, capsys):
    from pipeline.orchestration.manifest import manifest_path

    run_dir = tmp_path / "run"
    run(capsys, write_config(), run_dir)
    manifest_path(run_dir).write_bytes(b"\x00garbage")
    assert cli.main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "not valid JSON" in out and "`chatpipe run` recovers the run from it" in out
    assert manifest_path(run_dir).read_bytes() == b"\x00garbage"  # status only reads


def test_status_flags_an_output_altered_since_it_was_recorded(stages, write_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run(capsys, write_config(), run_dir)
    (run_dir / "tokenizer" / "final" / "weights.txt").write_text("vocab v1, edited")
    cli.command_status(run_dir)
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:4]}
    assert rows == {"tokenizer": "altered", "pretrain": "completed"}
    assert "chatpipe: tokenizer: its output changed since it was recorded (weights.txt); `chatpipe run` rebuilds it" in out


def test_a_new_launcher_changes_nothing_and_a_new_process_count_keeps_an_interrupted_stages_checkpoints(
    stages, write_config, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    run(capsys, write_config(), run_dir)
    code, lines = run(capsys, write_config(), run_dir, "pretrain.launch.launcher=torchrun")
    assert "chatpipe: pretrain: up to date, skipped" in lines

    # Interrupted with a checkpoint written by 2 processes, then rerun with 1: refused, nothing deleted.
    run_dir = tmp_path / "interrupted"
    stages.fail = {"pretrain"}
    run(capsys, write_config(), run_dir, "pretrain.launch.num_processes=2")
    checkpoint = run_dir / "pretrain" / "checkpoints" / "step-000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text('{"step": 10, "world_size": 2}')
    stages.fail = set()
    assert cli.main(["run", str(write_config()), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert (f"chatpipe: pretrain: its checkpoint {checkpoint} was written with launch.num_processes=2 (now 1)" in err
            and "resume it with --set pretrain.launch.num_processes=2" in err)
    assert (checkpoint / "state.json").exists() and (run_dir / "pretrain" / "checkpoints" / "attempt").exists()

    code, lines = run(capsys, write_config(), run_dir, "pretrain.launch.num_processes=2")
    assert "chatpipe: pretrain: resuming from the last checkpoint (it failed)" in lines
    # A completed stage under a new process count is a new result: rerun, the old output kept until replaced.
    code, lines = run(capsys, write_config(), run_dir)
    assert "chatpipe: pretrain: its launch changed (launch.num_processes 2 -> 1); running from scratch" in lines


def refuse_writes_under(folder, monkeypatch):
    """Make `folder` read-only: chmod, and (as root, whom chmod does not stop) the refusals the kernel gives others."""
    import builtins
    import errno
    import io
    import os
    import tempfile

    folder.chmod(0o555)
    if os.geteuid() != 0:
        return

    def inside(path) -> bool:
        path = os.path.abspath(path)
        return path == str(folder) or path.startswith(str(folder) + os.sep)

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    real_open, real_os_open, real_mkstemp, real_mkdir, real_access = (
        builtins.open, os.open, tempfile.mkstemp, os.mkdir, os.access)
    def guarded_open(path, mode="r", *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and inside(path) and set(mode) & set("wax+"):
            refuse(path)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)  # pathlib's
    monkeypatch.setattr(os, "open", lambda path, flags, *a, **k: refuse(path) if (
        inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)) else real_os_open(path, flags, *a, **k))
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, dir=None, **k: refuse(dir) if dir is not None and inside(dir)
                        else real_mkstemp(*a, dir=dir, **k))
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: refuse(path) if inside(path) else real_mkdir(path, *a, **k))
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if inside(path) and mode & os.W_OK
                        else real_access(path, mode, *a, **k))


@pytest.mark.parametrize("command", ["run", "stage", "report"])
def test_a_read_only_run_dir_is_one_message(stages, write_config, tmp_path, capsys, monkeypatch, command):
    run_dir = tmp_path / "run"
    run(capsys, write_config(), run_dir)
    refuse_writes_under(run_dir, monkeypatch)
    argv = {"run": ["run", str(write_config()), "--run-dir", str(run_dir)],
            "stage": ["stage", "pretrain", "--run-dir", str(run_dir)],
            "report": ["report", str(run_dir)]}[command]
    try:
        code = cli.main(argv)
    finally:
        run_dir.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"chatpipe: {run_dir}") and ("not writable" in err or "Permission denied" in err)
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("misuse", ["run dir is a file", "status of a file", "config is a folder"])
def test_a_path_of_the_wrong_kind_is_one_message_naming_it(write_config, tmp_path, capsys, misuse):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    argv = {"run dir is a file": ["run", str(write_config()), "--run-dir", str(a_file)],
            "status of a file": ["status", str(a_file)],
            "config is a folder": ["run", str(tmp_path), "--run-dir", str(tmp_path / "run")]}[misuse]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    named = tmp_path if misuse == "config is a folder" else a_file
    assert err.startswith(f"chatpipe: {named}") and len(err.strip().splitlines()) == 1
    assert a_file.read_text() == "x"


def test_from_and_only_together_are_one_message_saying_what_each_does(write_config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", str(write_config()), "--run-dir", str(tmp_path / "run"), "--from", "reward", "--only", "sft"])
    message = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in message
    assert "--from reward and --only sft" in message and "give one of them" in message
    assert not (tmp_path / "run").exists()


def test_status_leaves_out_a_stage_the_run_was_recorded_without(tmp_path, capsys):
    """A run recorded before a stage existed (its config has no section for it) does not list it as pending."""
    from pipeline.orchestration.manifest import new_manifest, write_manifest

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_manifest(run_dir, new_manifest("old", {"tokenizer": {}, "pretrain": {}, "sft": {}, "dpo": None}, "old.yaml"))
    assert cli.main(["status", str(run_dir)]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert listed == ["tokenizer", "pretrain", "sft"]
