"""`RUN_DIR/manifest.json`: the contract between stages.

The manifest holds the run's resolved config and one entry per stage:

    status         pending | running | completed | failed
    config         the part of the run config the stage depends on, and config_hash of it
    inputs         {upstream stage: {path, digest}}: the checkpoints it consumed (lineage)
    output         {path, files: {name: sha256}, digest}: what it produced
    metrics        final metrics; started_at / finished_at; world_size; versions; git_commit;
                   wandb_run_id; error (why it failed); log

Only the main process writes it, always atomically (temp file, fsync, rename), so a crash never
leaves a torn manifest. A stage reads its inputs through `resolve_input`, which refuses an input
that is missing, unfinished or altered since it was recorded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import ManifestError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
STATUSES = ("pending", "running", "completed", "failed")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def manifest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / MANIFEST_NAME


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = manifest_path(run_dir)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(
            f"{path}: no manifest; start the run with `chatpipe run CONFIG --run-dir {run_dir}`"
        ) from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}: not valid JSON ({error}); restore it or start a new run dir") from None
    if manifest.get("format") != FORMAT_VERSION or "stages" not in manifest:
        raise ManifestError(f"{path}: not a chatpipe manifest (format {manifest.get('format')!r})")
    return manifest


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically: readers see the old file or the new one, never a mix."""
    path = manifest_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest["updated_at"] = now()
    text = json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n"
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".manifest.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as temp:
            temp.write(text)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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


def new_manifest(run_name: str, config: dict[str, Any], config_source: str) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "run_name": run_name,
        "created_at": now(),
        "updated_at": now(),
        "config_source": config_source,
        "config": config,
        "stages": {},
    }


def update_stage(run_dir: str | Path, stage: str, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into a stage's entry and write the manifest; returns the new entry."""
    manifest = read_manifest(run_dir)
    entry = manifest["stages"].setdefault(stage, {"status": "pending"})
    entry.update(fields)
    write_manifest(run_dir, manifest)
    return entry


# ---------------------------------------------------------------------------------------------
# Checkpoint hashes


def hash_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


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


def output_record(run_dir: str | Path, folder: str | Path) -> dict[str, Any]:
    """The manifest's record of a checkpoint folder: its path (relative to the run dir) and hashes."""
    run_dir, folder = Path(run_dir).resolve(), Path(folder).resolve()
    files = hash_folder(folder)
    try:
        path = str(folder.relative_to(run_dir))
    except ValueError:
        path = str(folder)
    return {"path": path, "files": files, "digest": digest_of(files)}


def resolve_input(run_dir: str | Path, manifest: dict[str, Any], stage: str, verify: bool = True) -> dict[str, Any]:
    """The output of `stage` as an input for a later stage: checked complete and unaltered.

    Returns {"stage", "path" (absolute), "digest"}; raises ManifestError naming what is wrong.
    """
    entry = manifest["stages"].get(stage)
    where = manifest_path(run_dir)
    if entry is None:
        raise ManifestError(f"{where}: stage {stage!r} has not run; run it first (chatpipe stage {stage})")
    if entry.get("status") != "completed" or not entry.get("output"):
        raise ManifestError(
            f"{where}: stage {stage!r} is {entry.get('status')!r}, not completed; "
            f"finish it first (chatpipe stage {stage} --run-dir {run_dir})"
        )
    output = entry["output"]
    folder = Path(output["path"])
    if not folder.is_absolute():
        folder = Path(run_dir) / folder
    if not folder.is_dir():
        raise ManifestError(f"{where}: the {stage!r} checkpoint {folder} is missing; rerun stage {stage!r}")
    if verify:
        found = hash_folder(folder)
        recorded = output["files"]
        changed = sorted(name for name in recorded if found.get(name) != recorded[name])
        if changed:
            raise ManifestError(
                f"{where}: the {stage!r} checkpoint {folder} was altered since it was recorded "
                f"(changed or missing: {', '.join(changed[:5])}); rerun stage {stage!r} to rebuild it"
            )
    return {"stage": stage, "path": str(folder.resolve()), "digest": output["digest"]}
