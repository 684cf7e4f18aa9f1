"""Load a `DataSource` (local files or a hub dataset) as a `datasets.Dataset`.

Local and hub data go through the same `datasets.load_dataset` path, so what the tests exercise
with local files is what runs against the hub. Errors name the file and the fix.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from pipeline.config import DataSource
from pipeline.errors import DataError

FORMAT_BY_SUFFIX = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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


def load_source(source: DataSource, cache_dir: str | Path | None = None) -> datasets.Dataset:
    """The rows of a data source (all columns), limited to `max_rows` when set."""
    try:
        if source.hub is not None:
            dataset = datasets.load_dataset(
                source.hub, source.hub_config, split=source.split, revision=source.revision, cache_dir=cache_dir
            )
        else:
            builder = local_format(source)
            options = {"sample_by": source.sample_by} if builder == "text" else {}
            dataset = datasets.load_dataset(
                builder, data_files={"train": source.files()}, split="train", cache_dir=cache_dir, **options
            )
    except DataError:
        raise
    except Exception as error:  # datasets raises many kinds; say which source failed and why
        origin = source.hub or source.path
        raise DataError(f"{origin}: could not load dataset ({type(error).__name__}: {error})") from error
    if source.max_rows is not None and len(dataset) > source.max_rows:
        dataset = dataset.select(range(source.max_rows))
    return dataset


def load_texts(source: DataSource, cache_dir: str | Path | None = None) -> datasets.Dataset:
    """A dataset with one string column, `text`, from the source's `text_field`."""
    dataset = load_source(source, cache_dir=cache_dir)
    if source.text_field not in dataset.column_names:
        origin = source.hub or source.path
        raise DataError(
            f"{origin}: no column {source.text_field!r} (columns: {', '.join(dataset.column_names)}); "
            f"set `text_field:` to the column holding the text"
        )
    if source.text_field != "text" and "text" in dataset.column_names:
        dataset = dataset.remove_columns("text")
    dataset = dataset.select_columns([source.text_field])
    if source.text_field != "text":
        dataset = dataset.rename_column(source.text_field, "text")
    return dataset


def iter_text(dataset: datasets.Dataset, max_chars: int | None = None, batch_size: int = 1000):
    """Yield batches of strings from a `text` column, stopping after `max_chars` characters."""
    seen = 0
    for start in range(0, len(dataset), batch_size):
        batch = [text for text in dataset[start : start + batch_size]["text"] if text]
        if max_chars is not None:
            kept = []
            for text in batch:
                if seen >= max_chars:
                    break
                kept.append(text[: max_chars - seen])
                seen += len(kept[-1])
            batch = kept
        if batch:
            yield batch
        if max_chars is not None and seen >= max_chars:
            return
