"""Load a `DataSource` (local files or a hub dataset) as a `datasets.Dataset`, or stream its texts.

Local and hub data go through the same `datasets.load_dataset` path, so what the tests exercise
with local files is what runs against the hub. Errors name the file and the fix.

`datasets` reports a broken local file as `DatasetGenerationError` or `StopIteration` and accepts
bytes that are not UTF-8 (they fail later, on first access, with a traceback). So local text and
JSON files are checked here, in `check_local_file`, before loading: an empty file and bytes that
are not UTF-8 are a `DataError` naming the file, the line and the column. That check is a byte scan
(`bytes.decode` in C), a few milliseconds for the 1,000-row sample. JSON syntax is only checked
when `datasets` fails (`explain_json_failure`), so a good file is parsed once.

A malformed JSON line is a `DataError`, not a bad row under `on_bad_row`: `datasets` cannot load
the file past it, and a line that is not JSON means a damaged file (a torn write, two files
concatenated) more often than one odd row; skipping it quietly would hide that. Its message names
the line, so fixing or deleting it is one edit.

`load_source` keeps what `datasets` prepares (Arrow files) under the run's cache
(RUN_DIR/cache/datasets), which `datasets` reads back without checking it. So the sha256 of each
Arrow file goes beside it (`<file>.sha256`) the first time it is loaded and is checked on every
load after; an Arrow file that no longer matches, or that `datasets` cannot read, is reported by a
warning naming it and prepared again from the source.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

import datasets
import pyarrow

from pipeline.config import DataSource
from pipeline.digests import file_sha256
from pipeline.errors import DataError

try:  # huggingface_hub 1.x and later talk to the hub through httpx, whose errors are not OSErrors
    from httpx import HTTPError as HubHTTPError
except ImportError:  # older huggingface_hub uses requests, whose errors are OSErrors
    HubHTTPError = OSError

logger = logging.getLogger(__name__)

# What loading a source raises when the data (or the cache, or the network) is at fault, and
# nothing else: a file or hub repo that is missing or unreachable (OSError, which huggingface_hub's
# errors are, and httpx's), rows that do not parse or cast (ValueError, pyarrow's own errors,
# which are also TypeError or KeyError kinds), a build that `datasets` gave up on (its
# DatasetsError), or an empty file (`datasets` lets a StopIteration escape). A TypeError or
# AttributeError of our own is a bug, not bad data: it is left to surface with its traceback
# (and a DataError, already naming the file, passes through as it is).
LOAD_ERRORS = (
    OSError,
    ValueError,
    pyarrow.ArrowException,
    datasets.exceptions.DatasetsError,
    StopIteration,
    HubHTTPError,
)

FORMAT_BY_SUFFIX = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SCAN_BYTES = 8 << 20  # read size of the UTF-8 scan; a longer line is carried over whole


def check_local_file(path: str) -> None:
    """DataError unless `path` is non-empty UTF-8 text: names the line and byte column at fault (from 1).

    A NUL byte counts as binary, since no text or JSON file holds one.
    """
    lines_before, blank, carry = 0, True, b""
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(SCAN_BYTES)
            data = carry + chunk
            if not data:
                break
            end = len(data) if not chunk else data.rfind(b"\n") + 1  # whole lines only, until the last read
            if end == 0:  # no newline yet: a long line, keep reading
                carry = data
                continue
            block, carry = data[:end], data[end:]
            problem = first_bad_byte(block)
            if problem is not None:
                position, what = problem
                line = lines_before + block.count(b"\n", 0, position) + 1
                column = position - (block.rfind(b"\n", 0, position) + 1) + 1
                raise DataError(
                    f"{path}: line {line}: {what} at column {column}); is it a binary file, or saved in another "
                    f"encoding? Give UTF-8 text (e.g. `iconv -f latin1 -t utf-8 in > out`)"
                )
            blank = blank and not block.strip()
            lines_before += block.count(b"\n")
            if not chunk:
                break
    if blank:
        raise DataError(f"{path}: empty file: no rows; put one JSON object (or text document) per line, or remove the file")


def first_bad_byte(block: bytes) -> tuple[int, str] | None:
    """(offset, what) of the first NUL byte or byte that is not UTF-8 in `block`; None if it is clean text.

    `what` is an unclosed "not UTF-8 (byte 0xff" for the caller to end with the column.
    """
    nul = block.find(b"\0")
    try:
        block.decode("utf-8")
        bad = -1
    except UnicodeDecodeError as error:
        bad = error.start
    if nul >= 0 and (bad < 0 or nul < bad):
        return nul, "not text (NUL byte 0x00"
    if bad >= 0:
        return bad, f"not UTF-8 (byte 0x{block[bad]:02x}"
    return None


def explain_json_failure(path: str) -> str | None:
    """Why `datasets` could not read a JSON(-lines) file: "line 3: not valid JSON (...)"; None if no line is at fault."""
    with open(path, encoding="utf-8-sig") as handle:
        text_start = handle.read(4096).lstrip()
    if text_start.startswith("["):  # one JSON array of rows
        try:
            rows = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as error:
            return f"line {error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
        bad = next((n for n, row in enumerate(rows, start=1) if not isinstance(row, dict)), None)
        return None if bad is None else f"item {bad} of the array is not a JSON object; give one {{...}} object per row"
    with open(path, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {line_number}: not valid JSON ({error.msg} at column {error.colno})"
            if not isinstance(row, dict):
                return f"line {line_number}: a JSON {type(row).__name__}, not an object; give one {{...}} object per line"
    return None


def innermost(error: BaseException) -> BaseException:
    """The exception at the bottom of `error`'s cause chain (what `datasets` wrapped)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def local_format(source: DataSource) -> str:
    """The `datasets` builder for a local source: the configured format, or one from the file suffixes."""
    if source.format != "auto":
        return source.format
    files = source.files()
    formats = {FORMAT_BY_SUFFIX.get(Path(name).suffix.lower()) for name in files}
    if None in formats or len(formats) != 1:
        suffixes = sorted({Path(name).suffix or "(none)" for name in files})
        raise DataError(
            f"{source.path}: cannot tell the format from the suffixes {suffixes}; "
            f"use .txt/.jsonl/.json/.parquet files, or set `format:` to text, json or parquet"
        )
    return formats.pop()


def open_source(source: DataSource, cache_dir: str | Path | None = None, *, streaming: bool = False, prepare_again: bool = False):
    """`datasets.load_dataset` for a source: a Dataset, or with `streaming` an IterableDataset.

    Streaming reads rows as they are needed: from the hub without downloading the whole config,
    from local files without writing an Arrow copy of them. `prepare_again` writes the prepared
    Arrow files anew (what was downloaded is reused).
    """
    mode = datasets.DownloadMode.REUSE_CACHE_IF_EXISTS if prepare_again else None
    if source.hub is not None:
        return datasets.load_dataset(
            source.hub, source.hub_config, split=source.split, revision=source.revision, cache_dir=cache_dir,
            streaming=streaming, download_mode=mode,
        )
    builder = local_format(source)
    if builder in ("json", "text"):
        for path in source.files():
            check_local_file(path)
    options = {"sample_by": source.sample_by} if builder == "text" else {}
    return datasets.load_dataset(
        builder, data_files={"train": source.files()}, split="train", cache_dir=cache_dir, streaming=streaming,
        download_mode=mode, **options,
    )


def load_failure(source: DataSource, error: Exception) -> DataError:
    """A DataError saying which source failed and why (the bad line of a JSON file, if one is)."""
    origin = source.hub or source.path
    if source.hub is None and local_format(source) == "json":
        for path in source.files():
            reason = explain_json_failure(path)
            if reason is not None:
                return DataError(f"{path}: {reason}; fix or delete that line")
    cause = innermost(error)
    return DataError(
        f"{origin}: could not load dataset ({type(error).__name__}: {error}"
        + (f"; caused by {type(cause).__name__}: {cause}" if cause is not error else "")
        + ")"
    )


def check_cache_files(dataset: datasets.Dataset, record: bool = False) -> list[str]:
    """The Arrow files behind `dataset` that no longer match their recorded sha256 (one read of each).

    A file seen for the first time (or with `record`, one just prepared again) has its digest
    recorded beside it, in `<file>.sha256`.
    """
    damaged = []
    for entry in dataset.cache_files:
        path = Path(entry["filename"])
        digest_file = path.with_name(path.name + ".sha256")
        digest = file_sha256(path)
        try:
            recorded = digest_file.read_text().strip()
        except FileNotFoundError:
            recorded = None
        if record or recorded is None or len(recorded) != 64:  # new, or its record unreadable: record it
            partial = digest_file.with_name(f"{digest_file.name}.{os.getpid()}.tmp")
            partial.write_text(digest)
            os.replace(partial, digest_file)
        elif digest != recorded:
            damaged.append(str(path))
    return damaged


def open_checked(source: DataSource, cache_dir: str | Path | None) -> datasets.Dataset:
    """`open_source`, with the Arrow files `datasets` keeps in `cache_dir` checked; damaged ones prepared again."""
    if cache_dir is None:
        return open_source(source)
    origin = source.hub or source.path
    try:
        dataset = open_source(source, cache_dir)
    except LOAD_ERRORS as error:
        # Either the cache cannot be read or the source is bad: preparing again tells which (a bad
        # source fails again, and is reported as such by the caller).
        dataset = open_source(source, cache_dir, prepare_again=True)
        logger.warning(
            f"the datasets cache {cache_dir} could not be read for {origin} ({type(error).__name__}: {error}); "
            f"it was prepared again from the source"
        )
        check_cache_files(dataset, record=True)
        return dataset
    damaged = check_cache_files(dataset)
    if damaged:
        logger.warning(
            f"{', '.join(damaged)} changed after it was written (its sha256 differs from the one recorded): "
            f"the datasets cache is damaged; preparing {origin} again"
        )
        dataset = open_source(source, cache_dir, prepare_again=True)
        check_cache_files(dataset, record=True)
    return dataset


def load_source(source: DataSource, cache_dir: str | Path | None = None) -> datasets.Dataset:
    """The rows of a data source (all columns), limited to `max_rows` when set.

    With a `cache_dir`, the Arrow files `datasets` prepares there are checked against their
    digests, and prepared again (with a warning naming them) if they changed or cannot be read.
    """
    try:
        dataset = open_checked(source, cache_dir)
    except LOAD_ERRORS as error:  # datasets raises many kinds; say which source failed and why
        raise load_failure(source, error) from error
    if source.max_rows is not None and len(dataset) > source.max_rows:
        dataset = dataset.select(range(source.max_rows))
    return dataset


def stream_texts(
    source: DataSource, cache_dir: str | Path | None = None, *, max_chars: int | None = None, batch_size: int = 1000
) -> Iterator[list[str]]:
    """Batches of the source's documents (its `text_field`), streamed: never the whole corpus in memory.

    Stops after `max_rows` rows, or once `max_chars` characters are out (the last document cut to
    fit); documents that are empty strings or null are left out.
    """
    origin = source.hub or source.path
    try:
        dataset = open_source(source, cache_dir, streaming=True)
        if source.max_rows is not None:
            dataset = dataset.take(source.max_rows)
        seen = 0
        for batch in dataset.iter(batch_size=batch_size):
            if source.text_field not in batch:
                raise DataError(
                    f"{origin}: no column {source.text_field!r} (columns: {', '.join(batch)}); "
                    f"set `text_field:` to the column holding the text"
                )
            texts = [text for text in batch[source.text_field] if text]
            if max_chars is not None:
                texts, kept = [], texts
                for text in kept:
                    if seen >= max_chars:
                        break
                    texts.append(text[: max_chars - seen])
                    seen += len(texts[-1])
            if texts:
                yield texts
            if max_chars is not None and seen >= max_chars:
                return
    except LOAD_ERRORS as error:  # a bad row can surface mid-stream: name the source and the line
        raise load_failure(source, error) from error


def stream_corpus(
    sources: list[DataSource], cache_dir: str | Path | None = None, *, max_chars: int | None = None, batch_size: int = 1000
) -> Iterator[list[str]]:
    """`stream_texts` of several sources, one after the other, as one stream (`max_chars` over them all)."""
    remaining = max_chars
    for source in sources:
        for batch in stream_texts(source, cache_dir, max_chars=remaining, batch_size=batch_size):
            yield batch
            if remaining is not None:
                remaining -= sum(len(text) for text in batch)
        if remaining is not None and remaining <= 0:
            return
