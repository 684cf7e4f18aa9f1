"""The token store: the corpus tokenized once into shards, read back as the blocks in-memory packing gives."""

import json
import threading

import numpy as np
import pytest

from data.packing import pack_documents
from data.token_store import STORE_FILE, DamagedStore, TokenStore, build_token_store, runs_by_shard, token_dtype
from pipeline.errors import DataError

EOS = 3


class CountingTokenizer:
    """A `tokenizers.Tokenizer` stand-in: the real one, counting the documents it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.encoded = tokenizer, 0

    def encode_batch_fast(self, texts, add_special_tokens):
        self.encoded += len(texts)
        return self.tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens)


@pytest.fixture(scope="module")
def documents(shakespeare_excerpt):
    """About 100 kB of Shakespeare as 300-odd documents (speeches), one of them empty."""
    speeches = [speech for speech in shakespeare_excerpt.read_text().split("\n\n") if speech.strip()]
    return speeches[:150] + [""] + speeches[150:]


def batches_of(documents, size=64):
    return [documents[start : start + size] for start in range(0, len(documents), size)]


def in_memory_blocks(tokenizer, documents, block_size):
    ids = [encoding.ids for encoding in tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False)]
    return pack_documents(ids, EOS, block_size)


@pytest.mark.parametrize("shard_bytes", [1 << 30, 10_000, 997])
def test_the_store_holds_the_blocks_in_memory_packing_gives(bpe_tokenizer, documents, tmp_path, shard_bytes):
    store = build_token_store(
        tmp_path, batches_of(documents), bpe_tokenizer.backend_tokenizer, EOS, len(bpe_tokenizer),
        shard_bytes=shard_bytes, progress=False,
    )
    expected = in_memory_blocks(bpe_tokenizer, documents, 64)
    train, validation = store.blocks(64, 0.1)
    # Every block, the ones that straddle two shards included, is the in-memory block.
    assert len(train) + len(validation) == len(expected)
    assert np.array_equal(train[np.arange(len(train))], expected[: len(train)])
    assert np.array_equal(validation[np.arange(len(validation))], expected[len(train) :])
    assert len(validation) == int(np.ceil(0.1 * len(expected)))
    assert store.dtype == np.uint16 and store.documents == len(documents)
    assert store.tokens == sum(1 + len(e.ids) for e in bpe_tokenizer.backend_tokenizer.encode_batch(documents) if e.ids)
    if shard_bytes < 1 << 20:
        assert len(store.shard_tokens) > 5
    # Two bytes a token on disk, plus small headers: nothing else is kept.
    assert store.disk_bytes <= 2 * store.tokens + 300 * (len(store.shard_tokens) + 1)
    # Reopening reads the index; blocks come back as int64 for the model.
    reopened = TokenStore(tmp_path)
    assert reopened.tokens == store.tokens and reopened.blocks(64, 0.1)[0][[5]].dtype == np.int64


def test_ids_above_65535_are_stored_as_uint32():
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


def test_shards_are_cut_at_the_same_documents_whatever_the_batching(documents):
    def cuts(runs):
        shards: dict[int, list[str]] = {}
        for index, run, *_ in runs:
            shards.setdefault(index, []).extend(run)
        return shards

    assert cuts(runs_by_shard(batches_of(documents, 7), 5_000)) == cuts(runs_by_shard(batches_of(documents, 300), 5_000))


def test_a_build_that_dies_resumes_at_its_first_unfinished_shard(bpe_tokenizer, documents, tmp_path):
    class Crash(Exception):
        pass

    def dying(batches, after):
        for number, batch in enumerate(batches):
            if number == after:
                raise Crash
            yield batch

    tokenizer = CountingTokenizer(bpe_tokenizer.backend_tokenizer)
    folder = tmp_path / "store"
    with pytest.raises(Crash):
        build_token_store(folder, dying(batches_of(documents, 16), 10), tokenizer, EOS, 400, shard_bytes=3_000, progress=False)
    finished = sorted(path.name for path in folder.glob("shard-*.json"))
    assert finished and not (folder / STORE_FILE).exists()
    (folder / "shard-00099.bin.somehost.1.tmp").write_bytes(b"half a shard")  # what a killed writer leaves
    encoded_before = tokenizer.encoded

    store = build_token_store(folder, batches_of(documents, 16), tokenizer, EOS, 400, shard_bytes=3_000, progress=False)
    first_unfinished = len(finished)
    documents_finished = sum(json.loads((folder / name).read_text())["documents"] for name in finished)
    # Only the shards not yet on disk were encoded again.
    assert tokenizer.encoded - encoded_before == len(documents) - documents_finished
    assert len(store.shard_tokens) > first_unfinished and not list(folder.glob("*.tmp"))
    uninterrupted = build_token_store(tmp_path / "straight", batches_of(documents), bpe_tokenizer.backend_tokenizer, EOS, 400, shard_bytes=3_000, progress=False)
    assert np.array_equal(store.read(0, store.tokens), uninterrupted.read(0, uninterrupted.tokens))


def test_workers_share_the_shards_and_build_one_store(bpe_tokenizer, documents, tmp_path):
    tokenizers = [CountingTokenizer(bpe_tokenizer.backend_tokenizer) for _ in range(2)]
    stores = [None, None]

    def work(worker):
        stores[worker] = build_token_store(
            tmp_path, batches_of(documents), tokenizers[worker], EOS, 400, shard_bytes=4_000,
            worker=worker, workers=2, progress=False,
        )

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(store is not None for store in stores)
    # Each worker encoded its own half of the shards, no document twice.
    assert tokenizers[0].encoded > 0 and tokenizers[1].encoded > 0
    assert tokenizers[0].encoded + tokenizers[1].encoded == len(documents)
    headers = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("shard-*.json"))]
    assert {header["worker"] for header in headers} == {0, 1}
    expected = in_memory_blocks(bpe_tokenizer, documents, 32)
    train, validation = stores[1].blocks(32, 0.05)
    assert np.array_equal(np.concatenate([train[np.arange(len(train))], validation[np.arange(len(validation))]]), expected)


def test_out_of_range_blocks_are_an_index_error(bpe_tokenizer, documents, tmp_path):
    store = build_token_store(tmp_path, batches_of(documents), bpe_tokenizer.backend_tokenizer, EOS, 400, progress=False)
    train, _ = store.blocks(64, 0.1)
    with pytest.raises(IndexError, match="out of range"):
        train[[len(train)]]


def test_a_damaged_store_is_an_error_naming_the_shard_and_the_fix(bpe_tokenizer, documents, tmp_path):
    build_token_store(tmp_path, batches_of(documents), bpe_tokenizer.backend_tokenizer, EOS, 400, shard_bytes=20_000, progress=False)
    shard = tmp_path / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # a truncated copy
    with pytest.raises(DataError, match=rf"shard-00001.bin has \d+ bytes, not the \d+ its index records.*delete {tmp_path}"):
        TokenStore(tmp_path)


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def shards_and_tokenizer(bpe_tokenizer, documents, folder):
    """A finished store of several shards in `folder`, its token stream, and a counting tokenizer to rebuild with."""
    store = build_token_store(folder, batches_of(documents), bpe_tokenizer.backend_tokenizer, EOS, 400, shard_bytes=20_000, progress=False)
    return store.read(0, store.tokens).copy(), CountingTokenizer(bpe_tokenizer.backend_tokenizer)


def test_a_flipped_byte_in_a_shard_is_named_and_only_that_shard_is_tokenized_again(bpe_tokenizer, documents, tmp_path, caplog):
    stream, tokenizer = shards_and_tokenizer(bpe_tokenizer, documents, tmp_path)
    shard = tmp_path / "shard-00001.bin"
    flip_byte(shard, 100)  # the same size: only its digest tells
    with pytest.raises(DataError, match=rf"{shard} was changed after it was written.*delete {tmp_path}"):
        TokenStore(tmp_path)

    store = build_token_store(tmp_path, batches_of(documents), tokenizer, EOS, 400, shard_bytes=20_000, progress=False)
    assert np.array_equal(store.read(0, store.tokens), stream)
    assert tokenizer.encoded == json.loads((tmp_path / "shard-00001.json").read_text())["documents"]
    (warning,) = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert str(shard) in warning and "damaged" in warning and "tokenizing the damaged part again" in warning


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong keys"])
def test_an_unreadable_index_is_rebuilt_from_the_shard_headers(bpe_tokenizer, documents, tmp_path, caplog, damage):
    stream, tokenizer = shards_and_tokenizer(bpe_tokenizer, documents, tmp_path)
    index = tmp_path / STORE_FILE
    index.write_text({"garbage": "\x00\x17not json", "truncated": index.read_text()[:40], "wrong keys": '{"shards": 3}'}[damage])
    flip_byte(tmp_path / "shard-00002.bin", 10)  # damaged too: the index that recorded its digest is gone
    with pytest.raises(DataError, match=rf"{index} cannot be read"):
        TokenStore(tmp_path)

    store = build_token_store(tmp_path, batches_of(documents), tokenizer, EOS, 400, shard_bytes=20_000, progress=False)
    assert np.array_equal(store.read(0, store.tokens), stream)
    assert tokenizer.encoded == json.loads((tmp_path / "shard-00002.json").read_text())["documents"]
    assert any(str(index) in record.getMessage() and "damaged" in record.getMessage() for record in caplog.records)


def test_an_unreadable_shard_header_met_while_building_is_tokenized_again(bpe_tokenizer, documents, tmp_path, caplog):
    stream, tokenizer = shards_and_tokenizer(bpe_tokenizer, documents, tmp_path)
    (tmp_path / STORE_FILE).unlink()  # as if killed before the index was written
    header = tmp_path / "shard-00000.json"
    header.write_text("{\"tokens\": 12")

    store = build_token_store(tmp_path, batches_of(documents), tokenizer, EOS, 400, shard_bytes=20_000, progress=False)
    assert np.array_equal(store.read(0, store.tokens), stream)
    assert tokenizer.encoded == json.loads(header.read_text())["documents"]
    assert any(f"{header} is damaged" in record.getMessage() for record in caplog.records)


def test_a_store_written_before_digests_were_recorded_still_opens(bpe_tokenizer, documents, tmp_path):
    stream, tokenizer = shards_and_tokenizer(bpe_tokenizer, documents, tmp_path)
    index = json.loads((tmp_path / STORE_FILE).read_text())
    for shard in index["shards"]:
        del shard["sha256"]
    (tmp_path / STORE_FILE).write_text(json.dumps(index))
    store = build_token_store(tmp_path, batches_of(documents), tokenizer, EOS, 400, shard_bytes=20_000, progress=False)
    assert np.array_equal(store.read(0, store.tokens), stream) and tokenizer.encoded == 0


def test_the_first_worker_repairs_a_damaged_store_while_the_others_wait(bpe_tokenizer, documents, tmp_path):
    stream, _ = shards_and_tokenizer(bpe_tokenizer, documents, tmp_path)
    flip_byte(tmp_path / "shard-00000.bin", 7)
    tokenizers = [CountingTokenizer(bpe_tokenizer.backend_tokenizer) for _ in range(2)]
    stores = [None, None]

    def work(worker):
        stores[worker] = build_token_store(
            tmp_path, batches_of(documents), tokenizers[worker], EOS, 400, shard_bytes=20_000,
            worker=worker, workers=2, progress=False,
        )

    threads = [threading.Thread(target=work, args=(worker,)) for worker in (1, 0)]  # the waiter first
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(store is not None and np.array_equal(store.read(0, store.tokens), stream) for store in stores)
    assert tokenizers[1].encoded == 0 and tokenizers[0].encoded == json.loads((tmp_path / "shard-00000.json").read_text())["documents"]



def vanish_on_read(monkeypatch, module, name, path):
    """Patch module.name (a function of one path) to remove `path` first, then do its work."""
    original = getattr(module, name)

    def remove_then(*args, **kwargs):
        path.unlink(missing_ok=True)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, remove_then)


def test_a_shard_that_vanishes_mid_repair_reads_as_missing_not_a_traceback(bpe_tokenizer, documents, tmp_path, monkeypatch):
    """The other workers open the store while worker 0 removes its damaged shards, so a shard can
    vanish between its stat and its read. That is a damaged store to wait on; CI once saw a
    FileNotFoundError here, in the two-worker repair test above."""
    import data.token_store as token_store

    shards_and_tokenizer(bpe_tokenizer, documents, tmp_path)
    vanish_on_read(monkeypatch, token_store, "file_sha256", tmp_path / "shard-00000.bin")
    with pytest.raises(DamagedStore) as damage:
        TokenStore(tmp_path)
    assert damage.value.shards == [0] and "shard-00000.bin is missing" in damage.value.damaged[0]


def test_an_index_that_vanishes_mid_repair_reads_as_damaged(bpe_tokenizer, documents, tmp_path):
    shards_and_tokenizer(bpe_tokenizer, documents, tmp_path)
    (tmp_path / STORE_FILE).unlink()  # as worker 0's repair does, after a waiter saw it exist
    with pytest.raises(DamagedStore) as damage:
        TokenStore(tmp_path)
    assert damage.value.index and STORE_FILE in damage.value.damaged[0]
