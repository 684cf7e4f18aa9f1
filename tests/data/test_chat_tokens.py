"""The chat-token cache: rendered ids kept per run, checked against their digests, rendered again when damaged."""

import json

import numpy as np
import pytest

from data.chat_tokens import chat_ids, read_ragged, write_ragged
from data.conversations import parse_hh
from tests.conftest import SAMPLES


@pytest.fixture(scope="module")
def conversations() -> list[list[dict]]:
    lines = (SAMPLES / "hh_harmless_1000.jsonl").read_text().splitlines()[:12]
    return [parse_hh(json.loads(line)["chosen"]) for line in lines]


def cached(bpe_tokenizer, conversations, cache_dir):
    """(rendered rows, the cache folder they went to): rendered once into an empty `cache_dir`."""
    rows = chat_ids(bpe_tokenizer, conversations, assistant_masks=True, cache_dir=cache_dir)
    (folder,) = cache_dir.iterdir()
    return rows, folder


def test_the_cache_gives_back_what_was_rendered(bpe_tokenizer, conversations, tmp_path, monkeypatch):
    rows, folder = cached(bpe_tokenizer, conversations, tmp_path)
    assert sorted(path.name for path in folder.iterdir()) == ["ids.npy", "masks.npy", "offsets.npy", "sha256.json"]
    monkeypatch.setattr("data.chat_tokens.render_chunk", lambda *args: pytest.fail("rendered again"))
    assert chat_ids(bpe_tokenizer, conversations, assistant_masks=True, cache_dir=tmp_path) == rows


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    # a token id one off, mid-array: the file still loads, with other ids
    "flipped id": ("ids.npy", lambda path: flip_byte(path, path.stat().st_size - 4 * 50)),
    "flipped mask": ("masks.npy", lambda path: flip_byte(path, path.stat().st_size - 30)),
    "truncated ids": ("ids.npy", lambda path: path.write_bytes(path.read_bytes()[:-7])),
    "garbage masks": ("masks.npy", lambda path: path.write_bytes(b"\x80\x04garbage, as numpy says: pickled data")),
    "garbage offsets": ("offsets.npy", lambda path: path.write_bytes(b"")),
    "missing ids": ("ids.npy", lambda path: path.unlink()),
    "garbage digests": ("sha256.json", lambda path: path.write_text("{\"ids.npy")),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_is_named_and_rendered_again(bpe_tokenizer, conversations, tmp_path, caplog, damage):
    rows, folder = cached(bpe_tokenizer, conversations, tmp_path)
    name, damage_it = DAMAGE[damage]
    damage_it(folder / name)

    assert chat_ids(bpe_tokenizer, conversations, assistant_masks=True, cache_dir=tmp_path) == rows
    (warning,) = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert str(folder / name) in warning and f"the chat-token cache {folder} is damaged" in warning
    assert "rendering its conversations again" in warning
    assert read_ragged(folder) == rows and [path.name for path in tmp_path.iterdir()] == [folder.name]  # rewritten whole


def test_ragged_rows_round_trip_without_masks(tmp_path):
    rows = [([1, 2, 3], []), ([], []), ([7], [])]
    write_ragged(tmp_path / "rows", rows)
    assert read_ragged(tmp_path / "rows") == rows
    assert np.load(tmp_path / "rows" / "ids.npy", allow_pickle=False).dtype == np.int32
