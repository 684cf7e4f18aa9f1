"""`RUN_DIR/manifest.json`: the contract between stages.

The manifest holds the run's resolved config and one entry per stage (`StageEntry`):

    status         pending | running | completed | failed
    config         the part of the run config the stage depends on, and config_hash of it
    inputs         {upstream stage: {stage, path, digest}}: the checkpoints it consumed (lineage)
    output         {path, files: {name: sha256}, digest}: what it produced
    metrics        final metrics; started_at / finished_at; world_size; versions; git_commit;
                   wandb_run_id; error (why it failed); log; warnings
    replacing      while a fresh attempt reruns a completed stage: that stage's previous entry,
                   put back if the attempt fails (absent otherwise)

The pydantic models below are the manifest's one description: `read_manifest` validates the file
into them, so a wrong shape is one `ManifestError` naming the file and the key instead of a
`KeyError` deep in a stage. They write back the very JSON they read (keys a run never set stay
absent, keys this version does not know are kept), so runs of older and newer code share a run dir.

Only the main process writes it, always atomically (temp file, fsync, rename), so a crash never
leaves a torn manifest (CHATPIPE_FAULT=manifest:before-replace kills it just before the rename).
The manifest it replaces stays beside it as `manifest.previous.json` (a hard link to the old
file, so nothing is copied): when `manifest.json` is later lost or damaged, `recover_manifest`
brings the run back from it, one write behind, instead of stranding every completed stage.
A stage reads its inputs through `resolve_input`, which refuses an input
that is missing, unfinished or altered since it was recorded.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.digests import file_sha256 as hash_file
from pipeline.errors import ManifestError
from pipeline.faults import fault_point

MANIFEST_NAME = "manifest.json"
PREVIOUS_NAME = "manifest.previous.json"
FORMAT_VERSION = 1

Status = Literal["pending", "running", "completed", "failed"]


class _Record(BaseModel):
    # extra="allow": a key written by a newer (or older) chatpipe survives a read-modify-write.
    # validate_assignment: `entry.status = "done"` fails where it is made, not when read back.
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    def to_json(self) -> dict[str, Any]:
        """The JSON object as written: only the keys that were read or set."""
        return self.model_dump(exclude_unset=True)


class InputRecord(_Record):
    """An upstream checkpoint a stage consumed: `path` is absolute, `digest` its `OutputRecord.digest`."""

    stage: str | None = None
    path: str
    digest: str


class OutputRecord(_Record):
    """A stage's output folder: `path` relative to the run dir (absolute if outside it) and hashes."""

    path: str
    files: dict[str, str] = {}  # hand-written records may leave it out; nothing is then verified
    digest: str


class StageEntry(_Record):
    """One stage's record in the manifest; a field is None (or empty) until the stage sets it."""

    status: Status = "pending"
    config: dict[str, Any] | None = None
    config_hash: str | None = None
    inputs: dict[str, InputRecord] = {}
    output: OutputRecord | None = None
    metrics: dict[str, Any] = {}
    error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    world_size: int | None = None
    versions: dict[str, str] = {}
    git_commit: str | None = None
    wandb_run_id: str | None = None
    log: str | None = None
    warnings: list[str] = []
    # While a fresh attempt reruns a completed stage: the completed entry it replaces, whole, put
    # back if the attempt fails (`restore_previous_output`). Absent from the JSON otherwise.
    replacing: StageEntry | None = None

    def without_replacing(self) -> StageEntry:
        """This entry with no `replacing` record at all (the key left out of the JSON, not null)."""
        return StageEntry.model_validate(self.model_dump(exclude_unset=True, exclude={"replacing"}))

    @property
    def duration(self) -> str:
        """How long the stage ran, e.g. `4m05s`; `-` until it has finished."""
        return duration(self.started_at, self.finished_at)


class Manifest(_Record):
    """The whole `manifest.json`: the run's resolved config and its stages by name."""

    format: Literal[1]
    run_name: str = ""
    created_at: str | None = None
    updated_at: str | None = None
    config_source: str = ""
    config: dict[str, Any] = {}
    stages: dict[str, StageEntry]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def manifest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / MANIFEST_NAME


def previous_manifest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / PREVIOUS_NAME


def read_manifest(run_dir: str | Path) -> Manifest:
    """The run's manifest, validated; any unreadable file or wrong shape is a ManifestError naming it."""
    return _read_manifest_file(manifest_path(run_dir), run_dir)


def read_previous_manifest(run_dir: str | Path) -> Manifest:
    """`manifest.previous.json`: the manifest as it was before the last write (see `recover_manifest`)."""
    return _read_manifest_file(previous_manifest_path(run_dir), run_dir)


def _read_manifest_file(path: Path, run_dir: str | Path) -> Manifest:
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ManifestError(f"{run_dir}: not a run dir (it is a file); pass the folder holding manifest.json")
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ManifestError(
            f"{path}: no manifest; start the run with `chatpipe run CONFIG --run-dir {run_dir}`"
        ) from None
    except OSError as error:
        raise ManifestError(f"{path}: cannot be read ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path}: not valid JSON ({error}); restore it or start a new run dir") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION or "stages" not in raw:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ManifestError(
            f"{path}: not a chatpipe manifest (format {found!r}, expected {FORMAT_VERSION} with `stages`); "
            "restore it or start a new run dir"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        raise ManifestError(
            f"{path}: malformed manifest ({_problems(error)}); restore it or start a new run dir"
        ) from None


def require_run(run_dir: str | Path, manifest: Manifest) -> Manifest:
    """`manifest`, if it records a run config; a manifest without one (`{"format": 1, "stages": {}}`)
    describes no run, so a command that needs one refuses it naming the file."""
    if not manifest.config:
        raise ManifestError(
            f"{manifest_path(run_dir)}: records no run config (`config` is missing or empty), so it describes no run; "
            f"restore it, or record one with `chatpipe run CONFIG --run-dir {run_dir}`"
        )
    return manifest


def write_manifest(run_dir: str | Path, manifest: Manifest) -> None:
    """Replace the manifest atomically: readers see the old file or the new one, never a mix."""
    path = manifest_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest.updated_at = now()
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=False, default=str) + "\n"
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".manifest.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600 would hide the run from everyone else
        with os.fdopen(handle, "w") as temp:
            temp.write(text)
            temp.flush()
            os.fsync(temp.fileno())
        fault_point("manifest:before-replace")
        _keep_as_previous(path)
        os.replace(temp_name, path)
    except OSError as error:
        Path(temp_name).unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise ManifestError(
                f"{path}: the disk is full, so the manifest could not be updated (the previous one is intact); "
                "free some space and rerun"
            ) from None
        raise
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _keep_as_previous(path: Path) -> None:
    """Make the manifest about to be replaced `manifest.previous.json`, atomically (a hard link, renamed)."""
    if not path.is_file():
        return
    previous = path.with_name(PREVIOUS_NAME)
    temp = path.with_name(f".{PREVIOUS_NAME}.{os.getpid()}.tmp")
    temp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, temp)
        except OSError:  # a filesystem without hard links: copy it
            shutil.copyfile(path, temp)
        os.replace(temp, previous)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def recover_manifest(run_dir: str | Path) -> str | None:
    """Bring back a lost or damaged `manifest.json` from `manifest.previous.json`; says what it did.

    Returns None when the manifest reads and records a run (nothing to do), and a note for the
    user when it recovered one: the damaged file is kept beside it (`manifest.damaged-<time>.json`),
    and each completed stage's output is checked against its recorded hashes (an altered one is
    rebuilt by the next `chatpipe run`, as always). Raises the original ManifestError when there
    is nothing to recover from.
    """
    path, previous_path = manifest_path(run_dir), previous_manifest_path(run_dir)
    try:
        if read_manifest(run_dir).config:
            return None
        damage, failure = "records no run config", None
    except ManifestError as error:
        damage, failure = str(error).removeprefix(f"{path}: ").split(";")[0], error
    try:
        previous = _read_manifest_file(previous_path, run_dir) if previous_path.is_file() else None
    except ManifestError:
        previous = None
    if previous is None or not previous.config:  # nothing to recover from
        if failure is not None:
            raise failure
        return None
    kept = ""
    if path.exists():
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = path.with_name(f"manifest.damaged-{stamp}.json")
        os.replace(path, aside)
        kept = f"; the damaged file is kept as {aside.name}"
    write_manifest(run_dir, previous)
    verified, altered, unfinished = [], [], []
    for stage, entry in previous.stages.items():
        if entry.status != "completed" or entry.output is None:
            unfinished.append(f"{stage} ({entry.status})")
        elif not output_folder(run_dir, entry.output).is_dir() or altered_files(run_dir, entry.output):
            altered.append(stage)
        else:
            verified.append(stage)
    parts = [f"completed and verified: {', '.join(verified) or 'none'}"]
    if altered:
        parts.append(f"outputs altered since recorded, to be rebuilt: {', '.join(altered)}")
    if unfinished:
        parts.append(f"not completed: {', '.join(unfinished)}")
    return (
        f"{path}: {damage}; recovered the run from {PREVIOUS_NAME} (the manifest before the last write, "
        f"{previous.updated_at or 'time unknown'}): {'; '.join(parts)}{kept}"
    )


def _problems(error: ValidationError) -> str:
    """`stages.sft.status: Input should be ...; ...`: where each problem is, in the manifest's keys."""
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in error.errors()[:5]
    )


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_manifest(run_name: str, config: dict[str, Any], config_source: str) -> Manifest:
    return Manifest(
        format=FORMAT_VERSION,
        run_name=run_name,
        created_at=now(),
        updated_at=now(),
        config_source=config_source,
        config=config,
        stages={},
    )


def replace_stage(run_dir: str | Path, stage: str, entry: StageEntry) -> None:
    """Write `entry` as the stage's whole record (no merge): how a failed rerun puts the old one back."""
    manifest = read_manifest(run_dir)
    manifest.stages[stage] = entry
    write_manifest(run_dir, manifest)


def update_stage(run_dir: str | Path, stage: str, **fields: Any) -> StageEntry:
    """Merge `fields` into a stage's entry and write the manifest; returns the new entry."""
    manifest = read_manifest(run_dir)
    entry = manifest.stages.get(stage) or StageEntry(status="pending")
    try:
        # Validated as a whole, so a wrong field is refused before anything is written.
        manifest.stages[stage] = StageEntry.model_validate({**entry.to_json(), **fields})
    except ValidationError as error:
        raise ManifestError(f"{manifest_path(run_dir)}: cannot record stage {stage!r} ({_problems(error)})") from None
    write_manifest(run_dir, manifest)
    return manifest.stages[stage]


def duration(started: str | None, finished: str | None) -> str:
    """`1h02m03s` / `4m05s` / `7s` between two ISO-8601 times; `-` when either is missing."""
    start, end = parse_time(started), parse_time(finished)
    if start is None or end is None:
        return "-"
    seconds = max(0, int((end - start).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


def parse_time(value: str | None) -> dt.datetime | None:
    """A manifest timestamp as an aware datetime, or None when it is missing or unreadable."""
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    # A time without an offset is taken as UTC, so it can be subtracted from one with an offset.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


# ---------------------------------------------------------------------------------------------
# Checkpoint hashes


def hash_folder(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under a checkpoint folder, by path relative to it."""
    folder = Path(folder)
    return {
        str(path.relative_to(folder)): hash_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def digest_of(files: dict[str, str]) -> str:
    """One hash for a whole checkpoint, from its files' hashes."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def output_record(run_dir: str | Path, folder: str | Path) -> OutputRecord:
    """The manifest's record of a checkpoint folder: its path (relative to the run dir) and hashes."""
    run_dir, folder = Path(run_dir).resolve(), Path(folder).resolve()
    files = hash_folder(folder)
    try:
        path = str(folder.relative_to(run_dir))
    except ValueError:
        path = str(folder)
    return OutputRecord(path=path, files=files, digest=digest_of(files))


def output_folder(run_dir: str | Path, output: OutputRecord) -> Path:
    """Where a recorded output lives: its path is relative to the run dir unless it is absolute."""
    folder = Path(output.path)
    return folder if folder.is_absolute() else Path(run_dir) / folder


def altered_files(run_dir: str | Path, output: OutputRecord) -> list[str]:
    """The recorded files of a checkpoint that are now different or missing (sorted; empty if intact).

    Always a full sha256 of each file: on the demo's largest checkpoint (a few MB) that takes
    milliseconds, far less than starting the stage process it lets `chatpipe run` skip.
    """
    folder = output_folder(run_dir, output)
    changed = []
    for name, recorded in sorted(output.files.items()):
        path = folder / name
        if not path.is_file() or hash_file(path) != recorded:
            changed.append(name)
    return changed


def resolve_input(run_dir: str | Path, manifest: Manifest, stage: str, verify: bool = True) -> InputRecord:
    """The output of `stage` as an input for a later stage: checked complete and unaltered.

    Returns its record with an absolute path; raises ManifestError naming what is wrong.
    """
    entry = manifest.stages.get(stage)
    where = manifest_path(run_dir)
    if entry is None:
        raise ManifestError(f"{where}: stage {stage!r} has not run; run it first (chatpipe stage {stage})")
    if entry.status == "completed" and entry.output is None:
        raise ManifestError(
            f"{where}: stage {stage!r} is completed but records no output; "
            f"rerun it (chatpipe stage {stage} --run-dir {run_dir})"
        )
    if entry.status != "completed":
        raise ManifestError(
            f"{where}: stage {stage!r} is {entry.status!r}, not completed; "
            f"finish it first (chatpipe stage {stage} --run-dir {run_dir})"
        )
    folder = output_folder(run_dir, entry.output)
    if not folder.is_dir():
        raise ManifestError(f"{where}: the {stage!r} checkpoint {folder} is missing; rerun stage {stage!r}")
    if verify:
        changed = altered_files(run_dir, entry.output)
        if changed:
            raise ManifestError(
                f"{where}: the {stage!r} checkpoint {folder} was altered since it was recorded "
                f"(changed or missing: {', '.join(changed[:5])}); rerun stage {stage!r} to rebuild it"
            )
    return InputRecord(stage=stage, path=str(folder.resolve()), digest=entry.output.digest)
