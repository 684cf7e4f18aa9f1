"""The generation engine (pipeline/models/generation.py): the right distribution, the right tokens, the
right stop, filters that only remove, and seeds that leave the global RNG alone."""

import math

import pytest
import torch

from data.padding import pad_batch
from pipeline.errors import ConfigError
from pipeline.models.generation import Sampling, filtered_logits, generate, sample_next, seeded_generator
from tests.conftest import tiny_causal_lm


def test_samples_follow_the_tempered_softmax():
    logits = torch.tensor([[2.0, 0.0, math.log(3.0), -1e4]]).repeat(40_000, 1)
    torch.manual_seed(0)
    counts = torch.bincount(sample_next(logits, Sampling(temperature=2.0)), minlength=4).double()
    expected = torch.softmax(logits[0].double() / 2.0, dim=0) * len(logits)
    assert counts[3] == 0  # probability 0 (underflows in float32): never drawn
    # Within 4 standard deviations of the binomial count for each token.
    assert ((counts[:3] - expected[:3]).abs() <= 4 * (expected[:3] * (1 - expected[:3] / len(logits))).sqrt()).all()


def test_sampling_is_seeded_by_torchs_generator():
    logits = torch.randn(8, 50)
    torch.manual_seed(1)
    first = sample_next(logits, Sampling(0.7))
    torch.manual_seed(1)
    assert torch.equal(sample_next(logits, Sampling(0.7)), first)


def test_near_zero_temperature_gives_generates_greedy_tokens_on_left_padded_queries(bpe_tokenizer):
    """The KV-cache loop (positions over real tokens, growing mask) decodes what `generate` does."""
    model = tiny_causal_lm(bpe_tokenizer).eval()
    queries = [list(range(11, 20)), [21, 22, 23], [31, 32, 33, 34, 35]]
    ids, mask = pad_batch(queries, bpe_tokenizer.pad_token_id, side="left")
    ours = generate(model, ids, mask, max_new_tokens=8, sampling=Sampling(temperature=1e-4),
                    eos_token_id=bpe_tokenizer.eos_token_id, pad_token_id=bpe_tokenizer.pad_token_id)
    greedy_ours = generate(model, ids, mask, max_new_tokens=8, sampling=Sampling(temperature=0),
                           eos_token_id=bpe_tokenizer.eos_token_id, pad_token_id=bpe_tokenizer.pad_token_id)
    assert torch.equal(greedy_ours, ours)  # temperature 0 is argmax, with no random draw
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
    responses = generate(model, ids, mask, max_new_tokens=30, sampling=Sampling(1.0), eos_token_id=eos, pad_token_id=pad)
    assert responses.shape == (2, 30)
    for row in responses.tolist():
        end = row.index(eos)
        assert all(token == pad for token in row[end + 1:])
    assert len(calls) == max(row.index(eos) for row in responses.tolist()) + 1 < 30


def test_the_draw_is_the_one_rl_was_tuned_with():
    """Unfiltered, the engine draws bit for bit what PPO's sampler drew: inverse CDF on the global generator."""
    logits = torch.randn(16, 300)
    torch.manual_seed(3)
    probabilities = torch.softmax(logits.float() / 0.7, dim=-1)
    cumulative = probabilities.cumsum(dim=-1)
    uniform = 1.0 - torch.rand(len(logits), 1)
    expected = torch.searchsorted(cumulative, uniform * cumulative[:, -1:]).squeeze(1)
    torch.manual_seed(3)
    assert torch.equal(sample_next(logits, Sampling(0.7)), expected)


def test_top_k_and_top_p_only_remove_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isinf(filtered_logits(logits, Sampling(top_k=2))).tolist() == [[False, False, True, True, True]]
    # 0.5 + 0.2 < 0.8, so the third token is needed to cover 0.8; the rest go.
    assert torch.isinf(filtered_logits(logits, Sampling(top_p=0.8))).tolist() == [[False, False, False, True, True]]
    assert torch.isinf(filtered_logits(logits, Sampling(top_p=0.1))).tolist() == [[False, True, True, True, True]]
    draws = sample_next(logits.repeat(2000, 1), Sampling(top_k=2, top_p=1.0), seeded_generator(0, "cpu"))
    assert set(draws.tolist()) == {0, 1}
    # Unfiltered, every token turns up; the kept ones keep their relative odds (0.5 : 0.2).
    draws = sample_next(logits.repeat(20_000, 1), Sampling(top_k=2), seeded_generator(0, "cpu"))
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.7) < 0.02


def test_a_seeded_generator_reproduces_and_leaves_the_global_rng_alone(bpe_tokenizer):
    model = tiny_causal_lm(bpe_tokenizer).eval()
    ids, mask = pad_batch([[11, 12, 13], [21, 22]], bpe_tokenizer.pad_token_id, side="left")
    kwargs = dict(max_new_tokens=6, sampling=Sampling(temperature=1.0), eos_token_id=bpe_tokenizer.eos_token_id,
                  pad_token_id=bpe_tokenizer.pad_token_id)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate(model, ids, mask, generator=seeded_generator(5, "cpu"), **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(generate(model, ids, mask, generator=seeded_generator(5, "cpu"), **kwargs), first)
    # The same stream as the global generator seeded alike: switching PPO's eval to it moved nothing.
    torch.manual_seed(5)
    assert torch.equal(generate(model, ids, mask, **kwargs), first)


def test_the_streaming_callback_sees_every_step_and_can_stop(bpe_tokenizer):
    model = tiny_causal_lm(bpe_tokenizer).eval()
    ids = torch.tensor([[11, 12, 13]])
    seen = []

    def on_tokens(tokens):
        seen.append(int(tokens[0]))
        return len(seen) == 3

    out = generate(model, ids, torch.ones_like(ids), max_new_tokens=10, sampling=Sampling(temperature=0),
                   eos_token_id=-1, pad_token_id=bpe_tokenizer.pad_token_id, on_tokens=on_tokens)
    assert len(seen) == 3 and out[0, :3].tolist() == seen
    assert out[0, 3:].eq(bpe_tokenizer.pad_token_id).all()


def test_sampling_settings_are_checked():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(ConfigError):
            Sampling(**bad)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_a_temperature_too_small_to_divide_by_is_greedy(bpe_tokenizer, temperature):
    """logits / 1e-300 overflowed to inf, softmax gave NaN and the draw an id past the vocabulary (IndexError)."""
    logits = torch.randn(64, 50) * 10
    assert torch.equal(sample_next(logits, Sampling(temperature), seeded_generator(0, "cpu")), logits.argmax(dim=-1))
    model = tiny_causal_lm(bpe_tokenizer).eval()
    ids = torch.tensor([[11, 12, 13]])
    kwargs = dict(max_new_tokens=6, eos_token_id=bpe_tokenizer.eos_token_id, pad_token_id=bpe_tokenizer.pad_token_id)
    assert torch.equal(generate(model, ids, torch.ones_like(ids), sampling=Sampling(temperature), **kwargs),
                       generate(model, ids, torch.ones_like(ids), sampling=Sampling(0), **kwargs))


@pytest.mark.parametrize("field, value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "hot"), ("temperature", True),
    ("temperature", None), ("top_p", float("nan")), ("top_p", "0.9"), ("top_p", True), ("top_k", 1.5),
    ("top_k", "5"), ("top_k", True), ("top_k", float("nan")),
])
def test_sampling_settings_refuse_non_finite_numbers_and_wrong_types(field, value):
    """A NaN temperature passed every check and crashed the draw; a string raised a bare TypeError."""
    with pytest.raises(ConfigError, match=field):
        Sampling(**{field: value})
