"""One writer per run dir: a second command is refused naming the holder; a killed holder's lock is taken over."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pipeline.orchestration.lock import RunDirBusy, RunDirUnwritable, hold_run_dir, lock_holder
from tests.conftest import REPO_ROOT


def hold_in_another_process(run_dir):
    """A process that takes the run dir's lock and waits; returns it once it holds the lock."""
    script = textwrap.dedent(f"""
        import sys, time
        from pipeline.orchestration.lock import hold_run_dir
        with hold_run_dir({str(run_dir)!r}, "chatpipe run"):
            print("held", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "CHATPIPE_LOCKED_RUN_DIR": ""})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_command_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.delenv("CHATPIPE_LOCKED_RUN_DIR", raising=False)
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(RunDirBusy, match=rf"in use by pid {holder.pid} on .*\(chatpipe run, since 20\d\d-.*kill {holder.pid}"):
            with hold_run_dir(tmp_path, "chatpipe stage sft"):
                pass
        assert lock_holder(tmp_path)["pid"] == holder.pid
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()

    assert lock_holder(tmp_path) is None  # the kernel released it with the process
    with hold_run_dir(tmp_path, "chatpipe run") as notes:
        assert notes == [f"took over the run dir's lock from pid {holder.pid} on {os.uname().nodename} "
                         f"(chatpipe run, since {notes[0].split('since ')[1]}"]
        assert lock_holder(tmp_path)["pid"] == os.getpid()
    with hold_run_dir(tmp_path, "chatpipe run") as notes:  # released cleanly: nothing to take over
        assert notes == []


def test_a_command_inside_a_launch_that_holds_the_lock_does_not_wait_for_it(tmp_path, monkeypatch):
    monkeypatch.delenv("CHATPIPE_LOCKED_RUN_DIR", raising=False)
    with hold_run_dir(tmp_path, "chatpipe run"):
        assert os.environ["CHATPIPE_LOCKED_RUN_DIR"] == str(tmp_path.resolve())
        with hold_run_dir(tmp_path, "python -m stages.sft") as notes:  # what the launched stage does
            assert notes == []
    assert "CHATPIPE_LOCKED_RUN_DIR" not in os.environ


def test_a_run_dir_that_is_a_file_is_refused_by_name(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(RunDirUnwritable, match=r"run: the run dir is a file, not a folder; choose another --run-dir"):
        with hold_run_dir(tmp_path / "run", "chatpipe run"):
            pass
