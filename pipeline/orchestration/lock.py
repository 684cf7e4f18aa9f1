"""One writer per run dir: `RUN_DIR/.lock`, held by the command that writes its manifest.

    with hold_run_dir(run_dir, "chatpipe run") as notes: ...

Two `chatpipe run`s on one run dir would write one manifest and one set of checkpoints at
once. The lock is an `flock` on `RUN_DIR/.lock`, which the kernel releases when its holder
exits, however it exits: a lock left by a killed command is free, and the next command takes it
over and says so. The file records who holds it (pid, host, command, since when), so the
refusal a second command gets names the holder.

A launched stage runs under its launcher's lock: the launcher passes the run dir it holds in
CHATPIPE_LOCKED_RUN_DIR, and a stage started by hand (`python -m stages.sft --run-dir ...`) takes
the lock itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from pipeline.errors import ChatpipeError

LOCK_NAME = ".lock"
LOCKED_RUN_DIR_ENV = "CHATPIPE_LOCKED_RUN_DIR"

try:
    import fcntl
except ImportError:  # not POSIX: no lock, as before
    fcntl = None


class RunDirBusy(ChatpipeError):
    """Another chatpipe command is writing this run dir."""


class RunDirUnwritable(ChatpipeError):
    """The run dir cannot be created or written."""


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def require_writable_run_dir(run_dir: Path) -> None:
    """Create `run_dir` if needed; refuse a path that is a file or a folder that cannot be written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirUnwritable(f"{run_dir}: the run dir is a file, not a folder; choose another --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirUnwritable(
            f"{run_dir}: the run dir cannot be created ({error.strerror}); choose another --run-dir"
        ) from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunDirUnwritable(
            f"{run_dir}: the run dir is not writable: chatpipe writes its manifest, checkpoints and logs there; "
            "make it writable (chmod u+w) or choose another --run-dir"
        )


def describe_holder(record: dict) -> str:
    """`pid 123 on host (chatpipe run, since 2026-12-07 10:21:03 UTC)`."""
    since = str(record.get("since", "?"))[:19].replace("T", " ")
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')} ({record.get('command', '?')}, since {since} UTC)"


def _read_record(handle) -> dict:
    handle.seek(0)
    try:
        record = json.loads(handle.read() or "{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path, command: str) -> Iterator[list[str]]:
    """Hold the run dir's lock for the block; yields notes for the user (a stale lock taken over).

    Raises RunDirBusy naming the holder if another live process holds it, RunDirUnwritable if the
    run dir cannot be written. Inside a stage launched by a command that holds it, does nothing.
    """
    run_dir = Path(run_dir).resolve()
    require_writable_run_dir(run_dir)
    if fcntl is None or os.environ.get(LOCKED_RUN_DIR_ENV) == str(run_dir):
        yield []
        return
    path = lock_path(run_dir)
    try:
        handle = open(path, "a+")
    except OSError as error:
        raise RunDirUnwritable(f"{path}: cannot open the run dir's lock ({error.strerror}); make the run dir writable") from None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a filesystem without locks
                yield [f"{run_dir}'s filesystem does not support locks ({error.strerror}): "
                       "make sure no other chatpipe command writes this run dir meanwhile"]
                return
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_record(handle)
            raise RunDirBusy(
                f"{run_dir} is in use by {describe_holder(holder)}; wait for it to finish, or stop it "
                f"(kill {holder.get('pid', 'PID')}) and run again: it resumes where it stopped"
            ) from None
        notes = []
        stale = _read_record(handle)
        if stale:  # the lock was free, but its last holder never cleared it: it was killed
            notes.append(f"took over the run dir's lock from {describe_holder(stale)}, which is no longer running")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        previous = os.environ.get(LOCKED_RUN_DIR_ENV)
        os.environ[LOCKED_RUN_DIR_ENV] = str(run_dir)  # inherited by the stages this command launches
        try:
            yield notes
        finally:
            if previous is None:
                os.environ.pop(LOCKED_RUN_DIR_ENV, None)
            else:
                os.environ[LOCKED_RUN_DIR_ENV] = previous
            handle.seek(0)
            handle.truncate()  # released cleanly: the next holder has nothing to take over
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def lock_holder(run_dir: str | Path) -> dict | None:
    """Who holds the run dir's lock now (their record), or None when it is free; takes nothing."""
    path = lock_path(run_dir)
    if fcntl is None or not path.is_file():
        return None
    try:
        handle = open(path)
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_record(handle) or {}
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return None
