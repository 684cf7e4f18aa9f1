import numpy as np
import pytest

from data.packing import batch_indices, block_order, cached_blocks, pack_documents, split_blocks

EOS = 99


def test_documents_are_joined_with_eos_and_cut_into_full_blocks():
    blocks = pack_documents([[1, 2, 3], [4, 5], [], [6, 7, 8, 9]], eos_id=EOS, block_size=4)
    # stream: 1 2 3 EOS 4 5 EOS 6 7 8 9 EOS -> three full blocks, nothing padded, nothing left over
    assert blocks.tolist() == [[1, 2, 3, EOS], [4, 5, EOS, 6], [7, 8, 9, EOS]]
    assert blocks.dtype == np.int32


def test_the_trailing_partial_block_is_dropped_not_padded():
    blocks = pack_documents([[1, 2, 3, 4, 5]], eos_id=EOS, block_size=4)
    assert blocks.tolist() == [[1, 2, 3, 4]]
    assert pack_documents([], eos_id=EOS, block_size=4).shape == (0, 4)


def test_validation_is_a_disjoint_tail_of_at_least_one_block():
    blocks = np.arange(40).reshape(20, 2)
    train, validation = split_blocks(blocks, 0.1)
    assert len(train) == 18 and len(validation) == 2
    assert validation.tolist() == blocks[-2:].tolist()
    assert len(split_blocks(blocks, 0.001)[1]) == 1
    with pytest.raises(ValueError, match="need at least 2"):
        split_blocks(blocks[:1], 0.1)


def test_each_epoch_visits_every_block_once_in_a_seeded_order():
    first_epoch = batch_indices(0, 10, n_blocks=10, seed=3)
    second_epoch = batch_indices(10, 10, n_blocks=10, seed=3)
    assert sorted(first_epoch.tolist()) == list(range(10)) == sorted(second_epoch.tolist())
    assert first_epoch.tolist() != second_epoch.tolist()
    assert first_epoch.tolist() == block_order(10, 3, 0).tolist()
    # Any window of the stream is the same whoever asks: processes and resumed runs agree.
    assert batch_indices(7, 6, n_blocks=10, seed=3).tolist() == [*first_epoch[7:], *second_epoch[:3]]


def test_packed_blocks_are_built_once_and_then_read_from_the_cache(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return np.ones((3, 4), dtype=np.int32), np.zeros((1, 4), dtype=np.int32)

    key = {"data": "corpus.txt", "block_size": 4}
    first = cached_blocks(tmp_path, key, build)
    second = cached_blocks(tmp_path, key, build)
    assert len(calls) == 1
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    cached_blocks(tmp_path, {**key, "block_size": 8}, build)
    assert len(calls) == 2
