import numpy as np
import pytest

from data.packing import batch_indices, block_order, pack_documents
from data.token_store import validation_count

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
    assert validation_count(20, 0.1) == 2
    assert validation_count(20, 0.001) == 1
    assert validation_count(2, 0.9) == 1
    with pytest.raises(ValueError, match="need at least 2"):
        validation_count(1, 0.1)


def test_each_epoch_visits_every_block_once_in_a_seeded_order():
    first_epoch = batch_indices(0, 10, n_blocks=10, seed=3)
    second_epoch = batch_indices(10, 10, n_blocks=10, seed=3)
    assert sorted(first_epoch.tolist()) == list(range(10)) == sorted(second_epoch.tolist())
    assert first_epoch.tolist() != second_epoch.tolist()
    assert first_epoch.tolist() == block_order(10, 3, 0).tolist()
    # Any window of the stream is the same whoever asks: processes and resumed runs agree.
    assert batch_indices(7, 6, n_blocks=10, seed=3).tolist() == [*first_epoch[7:], *second_epoch[:3]]
