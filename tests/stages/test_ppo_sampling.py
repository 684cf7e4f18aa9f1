"""The RL sampler (stages/ppo/sampling.py): the right distribution, the right tokens, the right stop."""

import math

import torch

from data.padding import pad_batch
from stages.ppo.sampling import sample_from_logits, sample_responses
from tests.conftest import tiny_causal_lm


def test_samples_follow_the_tempered_softmax():
    logits = torch.tensor([[2.0, 0.0, math.log(3.0), -1e4]]).repeat(40_000, 1)
    torch.manual_seed(0)
    counts = torch.bincount(sample_from_logits(logits, temperature=2.0), minlength=4).double()
    expected = torch.softmax(logits[0].double() / 2.0, dim=0) * len(logits)
    assert counts[3] == 0  # probability 0 (underflows in float32): never drawn
    # Within 4 standard deviations of the binomial count for each token.
    assert ((counts[:3] - expected[:3]).abs() <= 4 * (expected[:3] * (1 - expected[:3] / len(logits))).sqrt()).all()


def test_sampling_is_seeded_by_torchs_generator():
    logits = torch.randn(8, 50)
    torch.manual_seed(1)
    first = sample_from_logits(logits, 0.7)
    torch.manual_seed(1)
    assert torch.equal(sample_from_logits(logits, 0.7), first)


def test_near_zero_temperature_gives_generates_greedy_tokens_on_left_padded_queries(bpe_tokenizer):
    """The KV-cache loop (positions over real tokens, growing mask) decodes what `generate` does."""
    model = tiny_causal_lm(bpe_tokenizer).eval()
    queries = [list(range(11, 20)), [21, 22, 23], [31, 32, 33, 34, 35]]
    ids, mask = pad_batch(queries, bpe_tokenizer.pad_token_id, side="left")
    ours = sample_responses(model, ids, mask, max_new_tokens=8, temperature=1e-4,
                            eos_token_id=bpe_tokenizer.eos_token_id, pad_token_id=bpe_tokenizer.pad_token_id)
    for row, query in enumerate(queries):  # each query alone, no padding at all
        greedy = model.generate(torch.tensor([query]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=bpe_tokenizer.pad_token_id)[0, len(query):]
        assert ours[row].tolist() == greedy.tolist()


def test_rows_end_at_their_eos_and_sampling_stops_when_all_have(bpe_tokenizer):
    model = tiny_causal_lm(bpe_tokenizer).eval()
    eos, pad = bpe_tokenizer.eos_token_id, bpe_tokenizer.pad_token_id
    with torch.no_grad():  # EOS very likely: every row ends within a few tokens
        model.lm_head.weight[eos] = 5.0 * model.model.embed_tokens.weight.mean(0) / model.model.embed_tokens.weight.mean(0).norm() ** 2
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    ids, mask = pad_batch([[11, 12, 13], [21, 22]], pad, side="left")
    torch.manual_seed(0)
    responses = sample_responses(model, ids, mask, max_new_tokens=30, temperature=1.0, eos_token_id=eos, pad_token_id=pad)
    assert responses.shape == (2, 30)
    for row in responses.tolist():
        end = row.index(eos)
        assert all(token == pad for token in row[end + 1:])
    assert len(calls) == max(row.index(eos) for row in responses.tolist()) + 1 < 30
