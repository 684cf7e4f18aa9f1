"""The held-out loss: a mean over predicted tokens, however the set is batched."""

import pytest
import torch
from accelerate import Accelerator

from data.padding import pad_batch
from pipeline.training.metrics import IGNORE_INDEX, held_out_loss
from tests.conftest import tiny_causal_lm

# Three rows of different lengths; 1 marks a token the loss covers (an assistant's).
ROWS = [
    ([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]),
    ([20, 21, 22, 23], [0, 0, 1, 1]),
    ([30, 31, 32, 33, 34, 35], [0, 0, 0, 0, 1, 1]),
]


def batches(sizes: list[int], pad_token_id: int):
    start = 0
    for size in sizes:
        rows = ROWS[start : start + size]
        start += size
        ids, mask = pad_batch([ids for ids, _ in rows], pad_token_id)
        covered, _ = pad_batch([labels for _, labels in rows], 0)
        yield {"input_ids": ids, "attention_mask": mask, "labels": torch.where(covered.bool(), ids, IGNORE_INDEX)}


def test_the_held_out_loss_weighs_every_predicted_token_alike(bpe_tokenizer):
    model = tiny_causal_lm(bpe_tokenizer)
    model.train()
    accelerator = Accelerator(cpu=True)
    nll = []  # every covered token's negative log-likelihood, row by row
    with torch.no_grad():
        for ids, covered in ROWS:
            logprobs = model.eval()(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            nll += [-logprobs[position - 1, ids[position]].item() for position in range(1, len(ids)) if covered[position]]
    model.train()
    expected = sum(nll) / len(nll)
    for sizes in ([3], [2, 1], [1, 1, 1], [1, 2]):
        result = held_out_loss(accelerator, model, batches(sizes, bpe_tokenizer.pad_token_id))
        assert result["loss"] == pytest.approx(expected, rel=1e-5), sizes
        assert result["perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    assert model.training  # left in the mode it was in
    # What the training stages reported before: batch means weighted by rows, which depend on the
    # batching (one row a batch: the 2-token row weighs as much as the 7-token one).
    with torch.no_grad():
        row_means = [model.eval()(**batch).loss.item() for batch in batches([1, 1, 1], bpe_tokenizer.pad_token_id)]
    assert sum(row_means) / len(row_means) != pytest.approx(expected, rel=1e-3)
