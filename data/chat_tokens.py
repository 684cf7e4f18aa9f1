"""Chat data as tokens: conversations -> token ids with an assistant mask, split into train and validation.

The mask is exactly the chat template's `{% generation %}` span (`return_assistant_tokens_mask`),
and overlong conversations follow the configured policy with counts. SFT trains on it (labels
are -100 everywhere but the assistant's tokens, stages/sft/batching.py); eval measures
perplexity on it; PPO reads its prompts through `load_conversations`.

Rendered ids are cached under RUN_DIR/cache/chat_tokens/<key>/ as three .npy files (never
pickled) and `sha256.json`, their digests taken as they are written. Reading them back checks
each against its digest (one read of each); a damaged cache (a flipped bit, a truncated or
unreadable file) is reported by a warning naming the file and rendered again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from data.conversations import RowReport, normalize_rows, prompt_of
from data.sources import load_source
from data.token_store import cores_per_process
from pipeline.config import BadRowPolicy, ConversationData, config_hash
from pipeline.errors import DataError

logger = logging.getLogger(__name__)
CACHE_FORMAT = 2  # in the cache key: folders of format 1 (no digests) are not read
DIGESTS_FILE = "sha256.json"
RAGGED_FILES = ("offsets", "masks", "ids")


@dataclass
class LengthReport:
    """What the `max_length` policy did."""

    total: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_reply_left: int = 0  # truncation cut away every assistant token
    lengths: list[int] = field(default_factory=list)

    def as_metrics(self, prefix: str) -> dict[str, int]:
        return {
            f"{prefix}_conversations": self.total - self.dropped_overlong - self.dropped_no_reply_left,
            f"{prefix}_truncated": self.truncated,
            f"{prefix}_dropped_overlong": self.dropped_overlong + self.dropped_no_reply_left,
        }


def load_conversations(
    source: ConversationData, section: BadRowPolicy, cache_dir: Path | None = None, config_section: str = "sft"
) -> tuple[list[list[dict]], RowReport]:
    """Normalised conversations from a source, with the bad-row policy applied."""
    rows = load_source(source, cache_dir=cache_dir)
    return normalize_rows(
        rows,
        fmt=source.conversation_format,
        columns=source.columns or None,
        on_bad_row=section.on_bad_row,
        max_bad_fraction=section.max_bad_fraction,
        source=source.hub or source.path,
        config_section=config_section,
    )


def chat_ids(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    *,
    assistant_masks: bool = False,
    generation_prompt: bool = False,
    cache_dir: Path | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, assistant_mask) of each conversation through the chat template, on all cores, once.

    The mask is 1 on assistant reply tokens (end-of-turn included) with `assistant_masks`, else
    empty. With `generation_prompt` the ids end in the assistant-turn opener (a PPO query). The
    template is rendered by a pool of forked processes, a share of the machine's cores each
    (rendering is Python: threads would take turns). With a `cache_dir` the ids are kept there
    under a key made of the conversations, the tokenizer and the options, so a resumed or
    repeated stage reads them back instead of rendering them again (checked against the digests
    recorded when they were written; damaged ones are rendered again, with a warning).
    """
    options = {"assistant_masks": assistant_masks, "generation_prompt": generation_prompt}
    folder = None
    if cache_dir is not None:
        key = {"conversations": conversations, "tokenizer": tokenizer_fingerprint(tokenizer), **options, "format": CACHE_FORMAT}
        folder = Path(cache_dir) / config_hash(key)
        if folder.is_dir():
            try:
                return read_ragged(folder)
            except DamagedCache as damage:
                logger.warning(f"{damage}; the chat-token cache {folder} is damaged: rendering its conversations again")
                remove_folder(folder)
    work = functools.partial(render_chunk, tokenizer, options)
    chunks = [conversations[start : start + RENDER_CHUNK] for start in range(0, len(conversations), RENDER_CHUNK)]
    workers = min(cores_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", 1))), len(chunks))
    if workers > 1:
        with forked_pool(workers) as pool:
            rendered = [pair for chunk in pool.imap(work, chunks) for pair in chunk]
    else:
        rendered = [pair for chunk in map(work, chunks) for pair in chunk]
    if folder is not None:
        write_ragged(folder, rendered)
    return rendered


def query_ids(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]], cache_dir: Path | None = None) -> list[list[int]]:
    """Each conversation cut before its final reply, rendered up to the assistant-turn opener: a query to answer."""
    rendered = chat_ids(tokenizer, [prompt_of(c) for c in conversations], generation_prompt=True, cache_dir=cache_dir)
    return [ids for ids, _ in rendered]


RENDER_CHUNK = 256  # conversations per task handed to a worker


def render_chunk(tokenizer: PreTrainedTokenizerBase, options: dict, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    rendered = []
    for messages in conversations:
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=options["assistant_masks"], add_generation_prompt=options["generation_prompt"],
        )
        mask = list(encoded["assistant_masks"]) if options["assistant_masks"] else []
        rendered.append((list(encoded["input_ids"]), mask))
    return rendered


@contextlib.contextmanager
def forked_pool(workers: int):
    """A fork pool (workers inherit the tokenizer, nothing is pickled but conversations and ids).

    The Rust tokenizer disables its own threads in a forked child and warns about it unless told;
    TOKENIZERS_PARALLELISM=false is set for the fork only, so this process keeps its threads.
    """
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(workers)
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    with pool:
        yield pool


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """What decides a tokenizer's output: its model, special tokens and chat template."""
    backend = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer.get_vocab())
    return config_hash([backend, tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token])


class DamagedCache(DataError):
    """A cached file that is missing, unreadable, or no longer matches its recorded sha256."""


class HashingWriter:
    """A file handle that takes the sha256 of what is written through it: a digest without a second read."""

    def __init__(self, handle):
        self.handle, self.digest = handle, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)


def remove_folder(folder: Path) -> None:
    """Remove a cache folder: renamed aside first, so no reader sees it half deleted."""
    aside = folder.with_name(f"{folder.name}.{os.getpid()}.damaged")
    try:
        folder.rename(aside)
    except FileNotFoundError:  # another process removed it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def write_ragged(folder: Path, rows: list[tuple[list[int], list[int]]]) -> None:
    """Rows of (ids, mask) as flat int32 ids, uint8 masks and int64 offsets: .npy files, no pickles,
    with their sha256 in `sha256.json`."""
    lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.concatenate([np.asarray(row, dtype=np.int32) for row, _ in rows] or [np.zeros(0, np.int32)])
    masks = np.concatenate([np.asarray(mask, dtype=np.uint8) for _, mask in rows] or [np.zeros(0, np.uint8)])
    partial = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    partial.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, array in zip(RAGGED_FILES, (offsets, masks, ids)):
        with open(partial / f"{name}.npy", "wb") as handle:
            writer = HashingWriter(handle)
            np.save(writer, array, allow_pickle=False)
        digests[f"{name}.npy"] = writer.digest.hexdigest()
    (partial / DIGESTS_FILE).write_text(json.dumps(digests))
    try:
        partial.rename(folder)
    except OSError:  # another process wrote the same rows first
        shutil.rmtree(partial, ignore_errors=True)


def read_ragged(folder: Path) -> list[tuple[list[int], list[int]]]:
    """The rows write_ragged wrote, each file checked against its sha256 (read once); DamagedCache if not."""
    path = folder / DIGESTS_FILE
    try:
        digests = json.loads(path.read_text())
        arrays = {}
        for name in RAGGED_FILES:
            path = folder / f"{name}.npy"
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != digests[path.name]:
                raise DamagedCache(f"{path} was changed after it was written (its sha256 differs from the one recorded)")
            arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as error:  # missing, not JSON, not .npy (numpy: "pickled data")
        raise DamagedCache(f"{path} cannot be read ({type(error).__name__}: {error})") from None
    offsets, ids, masks = arrays["offsets"], arrays["ids"], arrays["masks"]
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[-1] != len(ids) or len(masks) not in (0, len(ids)):
        raise DamagedCache(f"{folder}: its offsets, ids and masks do not fit together")
    ids, has_masks = ids.tolist(), len(masks) > 0
    masks = masks.tolist()
    return [
        (ids[start:stop], masks[start:stop] if has_masks else [])
        for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist())
    ]


def tokenize_conversations(
    conversations: list[list[dict]], tokenizer: PreTrainedTokenizerBase, max_length: int, overlong: str,
    cache_dir: Path | None = None,
) -> tuple[datasets.Dataset, LengthReport]:
    """A dataset of `input_ids` and `assistant_masks`, with `max_length` enforced per `overlong`.

    The ids come from `chat_ids` (all cores; kept in `cache_dir` when given); the length policy
    is applied after, so changing `max_length` reuses them.
    """
    report = LengthReport(total=len(conversations))
    rows = {"input_ids": [], "assistant_masks": []}
    for input_ids, mask in chat_ids(tokenizer, conversations, assistant_masks=True, cache_dir=cache_dir):
        if not any(mask):
            raise DataError(
                "the tokenizer's chat template marks no assistant tokens (it has no {% generation %} markers), "
                "so SFT would train on nothing; rerun the tokenizer stage, which installs chatpipe's template"
            )
        if len(input_ids) > max_length:
            if overlong == "drop":
                report.dropped_overlong += 1
                continue
            input_ids, mask = input_ids[:max_length], mask[:max_length]
            if not any(mask):
                report.dropped_no_reply_left += 1
                continue
            report.truncated += 1
        rows["input_ids"].append(input_ids)
        rows["assistant_masks"].append(mask)
        report.lengths.append(len(input_ids))
    if not rows["input_ids"]:
        raise DataError(
            f"no conversation fits in sft.max_length={max_length} tokens with an assistant reply left; raise max_length"
        )
    return datasets.Dataset.from_dict(rows), report
