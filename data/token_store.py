"""A corpus tokenized once into memory-mapped shards of token ids: the pretraining data at any size.

    store = build_token_store(folder, text_batches, tokenizer.backend_tokenizer, eos_id, vocab_size)
    train, validation = store.blocks(block_size=1024, validation_fraction=0.005)
    train[np.array([7, 3])]            # (2, 1024) int64 token ids, read from the mapped shards

The store is one token stream: every document's ids followed by EOS, end to end (empty documents
are skipped), cut into shards of about `shard_bytes` of text each. A shard is a raw little-endian
array of uint16 ids (uint32 when the vocabulary exceeds 65,536), `shard-00000.bin`, and a small
JSON header beside it, `shard-00000.json` (tokens, documents, text bytes, and the sha256 of the ids,
taken as they are written), written after the ids and renamed into place: a shard with a header is
complete, so a crash mid-tokenization loses at most the shards in flight. `store.json` lists them
all with their digests and is written last; its presence means the store is whole. On disk that
is 2 bytes per token (4 above 65,536 ids) plus a few hundred bytes per shard, and nothing else: no
Arrow cache of the text, no second copy.

Opening a store checks every shard against its digest (one read of each; a store written before
digests were recorded is checked by size only). A damaged store (a shard changed by a single bit,
a truncated one, an unreadable `store.json` or header) is repaired by the next build that finds
it, with a warning naming the damaged files: only the damaged shards are tokenized again.

Training reads blocks straight out of the shards through `np.memmap`: a process holds only the
pages it touches, so its memory does not grow with the corpus, and the processes of a launch (all
mapping the same files) share one copy in the page cache. Block `i` is tokens
`[i * block_size, (i + 1) * block_size)` of the stream, the same packing (concatenate and cut, the
trailing partial block dropped, the last blocks held out) as when the corpus lived in memory, so
the data order, and a resumed run, are unchanged.

Tokenizing runs on every core: the `tokenizers` library encodes each batch of documents on all
threads in Rust (RAYON_NUM_THREADS of them), and in a multi-process launch each process of a
machine takes every n-th shard, its share of the cores, and writes its shards into the one folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from pipeline.digests import file_sha256
from pipeline.errors import DataError
from pipeline.faults import fault_point

STORE_FILE = "store.json"
FORMAT_VERSION = 1
ENCODE_BATCH = 1024  # documents per call into the Rust tokenizer (threads split each batch)
WAIT_POLL_SECONDS = 0.5

logger = logging.getLogger(__name__)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for ids below 65,536, uint32 above: 2 bytes per token on disk wherever it fits."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def validation_count(n_blocks: int, validation_fraction: float) -> int:
    """Blocks held out: ceil(fraction * n), at least one, leaving at least one to train on."""
    if n_blocks < 2:
        raise ValueError(f"only {n_blocks} block(s) of text: need at least 2 (one to train, one to validate)")
    return min(n_blocks - 1, max(1, int(np.ceil(validation_fraction * n_blocks))))


# ------------------------------------------------------------------------------------- reading


class DamagedStore(DataError):
    """A finished store whose index or shards changed since they were written.

    `damaged`: the damaged files' paths with what is wrong with each; `shards`: the indices of
    the damaged shards; `index`: whether store.json itself is unreadable.
    """

    def __init__(self, folder: Path, damaged: list[str], shards: list[int] = (), index: bool = False):
        super().__init__(
            f"{'; '.join(damaged)}: the token store is damaged; delete {folder} and rerun to tokenize the corpus again"
        )
        self.damaged, self.shards, self.index = damaged, list(shards), index


class TokenStore:
    """A finished store: the token stream of all its shards, memory-mapped on first read.

    Opening it checks every shard's size and sha256 against the index (one read of each); a
    damaged store is a DamagedStore naming the damaged files (build_token_store rebuilds them).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            index = json.loads((self.folder / STORE_FILE).read_text())
            self.dtype = np.dtype(index["dtype"])
            shards = index["shards"]
            self.shard_tokens = [int(shard["tokens"]) for shard in shards]
            self.documents = index["documents"]
            self.text_bytes = index["text_bytes"]
            self.eos_id = index["eos_id"]
        except (FileNotFoundError, ValueError, KeyError, TypeError) as error:  # gone mid-repair, not JSON, or not the index's keys
            problem = f"{self.folder / STORE_FILE} cannot be read ({type(error).__name__}: {error})"
            raise DamagedStore(self.folder, [problem], index=True) from None
        # starts[k] = position of shard k's first token in the stream; starts[-1] = the total
        self.starts = np.concatenate([[0], np.cumsum(self.shard_tokens, dtype=np.int64)])
        self._maps: dict[int, np.ndarray] = {}
        damaged = {}
        for index, (tokens, shard) in enumerate(zip(self.shard_tokens, shards)):
            path = self.folder / f"{shard_name(index)}.bin"
            try:  # a shard may vanish between the two reads while worker 0 repairs the store
                size = path.stat().st_size
                changed = size == tokens * self.dtype.itemsize and shard.get("sha256") not in (None, file_sha256(path))
            except FileNotFoundError:
                size, changed = None, False
            if size != tokens * self.dtype.itemsize:
                found = "is missing" if size is None else f"has {size} bytes"
                damaged[index] = f"{path} {found}, not the {tokens * self.dtype.itemsize} its index records"
            elif changed:
                damaged[index] = f"{path} was changed after it was written (its sha256 differs from the one recorded)"
        if damaged:
            raise DamagedStore(self.folder, list(damaged.values()), shards=sorted(damaged))

    @property
    def tokens(self) -> int:
        return int(self.starts[-1])

    @property
    def disk_bytes(self) -> int:
        """Bytes of every file in the store folder (shards, headers and index)."""
        return sum(path.stat().st_size for path in self.folder.iterdir() if path.is_file())

    def shard(self, index: int) -> np.ndarray:
        if index not in self._maps:
            if self.shard_tokens[index] == 0:  # a shard of empty documents: nothing to map
                return np.zeros(0, dtype=self.dtype)
            path = self.folder / f"{shard_name(index)}.bin"
            self._maps[index] = np.memmap(path, dtype=self.dtype, mode="r", shape=(self.shard_tokens[index],))
        return self._maps[index]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream (a view into one shard, or a copy across shards)."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[first])
        if stop <= self.starts[first + 1]:
            return self.shard(first)[offset : offset + stop - start]
        pieces, position, shard = [], start, first
        while position < stop:
            local = position - int(self.starts[shard])
            take = min(stop, int(self.starts[shard + 1])) - position
            pieces.append(self.shard(shard)[local : local + take])
            position += take
            shard += 1
        return np.concatenate(pieces)

    def blocks(self, block_size: int, validation_fraction: float) -> tuple["Blocks", "Blocks"]:
        """(train, validation) views of the stream cut into blocks; validation is the last blocks."""
        n_blocks = self.tokens // block_size
        n_validation = validation_count(n_blocks, validation_fraction)
        return Blocks(self, block_size, 0, n_blocks - n_validation), Blocks(self, block_size, n_blocks - n_validation, n_blocks)


@dataclass
class Blocks:
    """Blocks `first` .. `stop - 1` of a store's stream: `len()`, and rows by an array of indices."""

    store: TokenStore
    block_size: int
    first: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.first

    def __getitem__(self, indices) -> np.ndarray:
        """(len(indices), block_size) int64 ids; `indices` count from this view's first block."""
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"block index out of range 0..{len(self) - 1}")
        rows = np.empty((len(indices), self.block_size), dtype=np.int64)
        for row, index in enumerate(indices):
            start = (self.first + int(index)) * self.block_size
            rows[row] = self.store.read(start, start + self.block_size)
        return rows


# ------------------------------------------------------------------------------------- writing


def utf8_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def runs_by_shard(batches: Iterable[list[str]], shard_bytes: int) -> Iterator[tuple[int, list[str], int, bool]]:
    """(shard index, a run of at most ENCODE_BATCH documents, its UTF-8 bytes, whether the run ends the shard).

    A shard closes after the document that takes it to `shard_bytes` of UTF-8 text, so the
    boundaries depend only on the documents: every process and every resume cuts the stream in
    the same places.
    """
    index, size, run, run_bytes = 0, 0, [], 0
    for batch in batches:
        for text in batch:
            length = utf8_bytes(text)
            run.append(text)
            size, run_bytes = size + length, run_bytes + length
            if size >= shard_bytes:
                yield index, run, run_bytes, True
                index, size, run, run_bytes = index + 1, 0, [], 0
            elif len(run) == ENCODE_BATCH:
                yield index, run, run_bytes, False
                run, run_bytes = [], 0
    if run or size:
        yield index, run, run_bytes, True


class ShardWriter:
    """One shard, appended run by run to a temporary file, then renamed into place with its header."""

    def __init__(self, folder: Path, index: int, worker: int):
        self.folder, self.name, self.worker = folder, shard_name(index), worker
        self.temporary = folder / f"{self.name}.bin.{socket.gethostname()}.{os.getpid()}.tmp"
        self.handle = open(self.temporary, "wb")
        self.tokens = self.documents = self.text_bytes = 0
        self.dtype: np.dtype | None = None
        self.digest = hashlib.sha256()  # of the bytes written, as they are written: no second read

    def append(self, ids: np.ndarray, documents: int, text_bytes: int) -> None:
        ids = np.ascontiguousarray(ids)
        ids.tofile(self.handle)
        self.digest.update(memoryview(ids).cast("B"))
        self.dtype = ids.dtype
        self.tokens += len(ids)
        self.documents += documents
        self.text_bytes += text_bytes

    def finish(self) -> None:
        self.handle.close()
        header_path = self.folder / f"{self.name}.json"
        try:
            os.replace(self.temporary, self.folder / f"{self.name}.bin")
            fault_point("token-store:shard-written")
            header = {
                "tokens": self.tokens, "documents": self.documents, "text_bytes": self.text_bytes, "worker": self.worker,
                "sha256": self.digest.hexdigest(),
            }
            write_atomically(header_path, lambda path: path.write_text(json.dumps(header)))
        except FileNotFoundError:
            # Machines sharing the run dir each tokenize every shard; the first to finish the store
            # clears the others' temporaries. The shard is on disk, identical: nothing is lost.
            if not header_path.exists():
                raise


def read_header(folder: Path, index: int, repair: bool = False) -> dict | None:
    """Shard `index`'s header if it is there and readable, else None.

    With `repair` (the shard's own worker, which writes it again) an unreadable header is
    reported and removed; a worker waiting for another's shard leaves that to its owner.
    """
    path = folder / f"{shard_name(index)}.json"
    try:
        header = json.loads(path.read_text())
        int(header["tokens"]), int(header["documents"]), int(header["text_bytes"])
        return header
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:
        if repair:
            logger.warning(f"{path} is damaged ({type(error).__name__}: {error}); tokenizing that shard again")
            path.unlink(missing_ok=True)
        return None


def shard_indices(folder: Path) -> list[int]:
    """The indices of the shards with a header or ids in `folder`."""
    names = {path.name.split(".")[0] for pattern in ("shard-*.json", "shard-*.bin") for path in folder.glob(pattern)}
    return sorted(int(name[len("shard-"):]) for name in names if name[len("shard-"):].isdigit())


def shard_is_intact(folder: Path, index: int) -> bool:
    """Whether shard `index` has a readable header and ids of its recorded sha256 (one read), or
    (written before digests) of a size its token count allows."""
    header = read_header(folder, index)
    path = folder / f"{shard_name(index)}.bin"
    if header is None or not path.exists():
        return False
    if header.get("sha256") is None:
        return path.stat().st_size in (2 * int(header["tokens"]), 4 * int(header["tokens"]))
    return file_sha256(path) == header["sha256"]


def remove_damaged(folder: Path, damage: DamagedStore) -> None:
    """Clear what the repair of a damaged store writes again: its index and its damaged shards.

    An unreadable index lists no digests: every shard is then checked against its own header.
    """
    shards = damage.shards
    if damage.index:
        shards = [index for index in shard_indices(folder) if not shard_is_intact(folder, index)]
    for index in shards:
        (folder / f"{shard_name(index)}.json").unlink(missing_ok=True)
        (folder / f"{shard_name(index)}.bin").unlink(missing_ok=True)
    (folder / STORE_FILE).unlink(missing_ok=True)


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` then rename onto `path`: readers see the whole file or none."""
    temporary = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def build_token_store(
    folder: str | Path,
    batches: Iterable[list[str]],
    tokenizer,
    eos_id: int,
    vocab_size: int,
    *,
    shard_bytes: int = 64 << 20,
    worker: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> TokenStore:
    """The store in `folder`: opened if finished, else built (or finished) from `batches` of documents.

    `tokenizer` is a `tokenizers.Tokenizer` (a fast tokenizer's `backend_tokenizer`). `worker` of
    `workers` (the processes of one machine) encodes shards worker, worker + workers, ...; shards
    already on disk are skipped, so a crashed build resumes at the first unfinished shard. Every
    worker reads the whole stream (to find its shards' documents) and returns once all the
    shards are on disk; worker 0 then writes `store.json`. Memory holds one run of documents.

    A finished store found damaged (see TokenStore) is repaired by worker 0 alone, with a warning
    naming the damaged files: they are removed and tokenized again while the other workers wait.
    """
    folder = Path(folder)
    if (folder / STORE_FILE).exists():
        try:
            return TokenStore(folder)
        except DamagedStore as damage:
            if worker != 0:
                return wait_for_store(folder)
            logger.warning(f"{'; '.join(damage.damaged)}: the token store {folder} is damaged; tokenizing the damaged part again")
            remove_damaged(folder, damage)
            workers = 1  # this process repairs alone; the others wait for its index
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    eos = np.array([eos_id], dtype=dtype)
    bar = tqdm(desc="tokenizing", unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, mininterval=1.0)
    writer, tokens_done, n_shards = None, 0, 0
    for index, run, text_bytes, closes in runs_by_shard(batches, shard_bytes):
        n_shards = index + 1
        if index % workers != worker or read_header(folder, index, repair=True) is not None:
            continue
        writer = writer or ShardWriter(folder, index, worker)
        pieces = []
        for encoding in tokenizer.encode_batch_fast(run, add_special_tokens=False):  # no character offsets
            if len(encoding.ids):  # an empty document adds nothing, not even its EOS
                pieces += [np.array(encoding.ids, dtype=dtype), eos]
        ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
        writer.append(ids, len(run), text_bytes)
        tokens_done += len(ids)
        bar.update(text_bytes)
        bar.set_postfix(tokens=f"{tokens_done:,}", shard=index, refresh=False)
        if closes:
            writer.finish()
            writer = None
    bar.close()
    if n_shards == 0:
        raise DataError("the corpus has no documents; point pretrain.data at text")
    headers = wait_for_shards(folder, n_shards)
    if worker == 0:
        index = {
            "version": FORMAT_VERSION,
            "dtype": dtype.str,
            "eos_id": eos_id,
            "documents": sum(header["documents"] for header in headers),
            "text_bytes": sum(header["text_bytes"] for header in headers),
            "shards": [
                {"file": f"{shard_name(i)}.bin", "tokens": header["tokens"], "sha256": header.get("sha256")}
                for i, header in enumerate(headers)
            ],
        }
        write_atomically(folder / STORE_FILE, lambda path: path.write_text(json.dumps(index, indent=1)))
        for leftover in folder.glob("shard-*.tmp"):  # shards a crashed build left half-written
            leftover.unlink(missing_ok=True)
        return TokenStore(folder)
    return wait_for_store(folder)  # the other workers wait for worker 0's index


def wait_for_store(folder: str | Path) -> TokenStore:
    """The store in `folder` once its index is written (by another process) and opens intact.

    A damaged store found here is being repaired by worker 0 (see build_token_store): this waits
    for the index it writes next (each index is checked once).
    """
    index_file = Path(folder) / STORE_FILE
    checked = None
    while True:
        try:
            found = index_file.stat()
        except FileNotFoundError:
            found = None
        identity = found and (found.st_ino, found.st_mtime_ns, found.st_size)
        if identity is not None and identity != checked:
            try:
                return TokenStore(folder)
            except DamagedStore:
                checked = identity  # still the damaged index, or one mid-repair
        time.sleep(WAIT_POLL_SECONDS)


def wait_for_shards(folder: Path, n_shards: int) -> list[dict]:
    """The headers of shards 0 .. n_shards - 1, once the other workers have written theirs.

    A filesystem wait, not a collective: tokenizing a large corpus can outlast any process-group
    timeout, and a worker that dies takes the launch down with it.
    """
    headers: list[dict | None] = [None] * n_shards
    while True:
        for index in range(n_shards):
            if headers[index] is None:
                headers[index] = read_header(folder, index)
        if all(header is not None for header in headers):
            return headers  # type: ignore[return-value]
        time.sleep(WAIT_POLL_SECONDS)


def cores_per_process(processes: int) -> int:
    """This process's share of the cores it may run on, when `processes` of one machine split them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes))
