"""The one generation engine: chat, serve, SFT samples, PPO rollouts and eval all sample through it.

    sampling = Sampling(temperature=0.7, top_p=0.9)
    responses = generate(model, query_ids, query_mask, max_new_tokens=64, sampling=sampling,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         generator=seeded_generator(seed, model.device))

A fixed loop over a KV cache (`DynamicCache`): one forward of the (left-padded) prompts, then
one token per step. Why not `model.generate`: RLHF needs the plain distribution
softmax(logits / temperature) that its logprobs are computed from, and on a 2-core CPU this loop
took 0.54 s where `generate` took 0.86 s for 16 rollouts (bench/ppo_vs_trl.py settings: 16
queries, 32 new tokens, a 213k-parameter Llama):

- `torch.multinomial` was 30% of `generate`'s time: it draws an exponential variate per
  vocabulary entry. Inverse-CDF sampling (one uniform per row, a cumulative sum, a binary
  search) draws from the same distribution for a fraction of that.
- `generate`'s per-token bookkeeping (logits processors, stopping criteria, input preparation,
  config look-ups) was another ~15%, which a fixed loop does not need.

Top-k and top-p (for chat) only set the logits they exclude to -inf before the same draw, so
with both off the draw is exactly RL's. Temperature 0 is greedy, and so is any temperature below
`GREEDY_BELOW` (1e-5, vLLM's threshold): dividing float32 logits by 1e-300 overflows to inf and
the softmax to NaN, which drew an id past the vocabulary, while at 1e-5 a token 0.001 below the
best already has e^-100 of its odds. Ordinary temperatures take exactly the ops they always did.

Seeding: with `generator=None` draws come from torch's global generator on the model's device,
which is what PPO wants (its RNG state is checkpointed, so a resumed run draws the same
tokens). Anything else that wants reproducible replies passes its own `torch.Generator`
(`seeded_generator`) and leaves every global RNG state as it was.

Positions count real tokens only (left padding does not shift them), as in every scoring and
training pass, and the loop stops as soon as every row has produced its EOS, or when the
`on_tokens` callback (streaming) returns True.

Serving batches unrelated requests into one call, so it may also give each row its own
`row_sampling` and `row_generators` (a seeded row draws one uniform per step from its own
generator, exactly as it would alone), finish single rows (stop sequences, each row's own
length, a client gone) by returning a (batch,) bool mask from `on_tokens`, and read each step's
raw logits through `on_logits` (for the logprobs it reports). Left unset, nothing changes.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from pipeline.config import GREEDY_BELOW
from pipeline.errors import ConfigError
from pipeline.models.logprobs import position_ids_from



def is_real(value) -> bool:
    """A plain number: int or float (numpy's too), not a bool, a string or None."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Sampling:
    """How each token is drawn. The defaults are RL's: the model's own distribution, unfiltered."""

    temperature: float = 1.0  # 0 = greedy: always the likeliest token
    top_p: float = 1.0  # nucleus sampling: keep the likeliest tokens covering this much probability; 1 = off
    top_k: int = 0  # keep only the k likeliest tokens; 0 = off

    def __post_init__(self) -> None:
        if not is_real(self.temperature) or not math.isfinite(self.temperature):
            raise ConfigError(f"temperature {self.temperature!r} is not a finite number; use 0 (greedy) or more")
        if self.temperature < 0:
            raise ConfigError(f"temperature {self.temperature} is negative; use 0 (greedy) or more")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p {self.top_p!r} is outside (0, 1]; use 1 to turn nucleus sampling off")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise ConfigError(f"top_k {self.top_k!r} is not a whole number; use 0 to turn it off, or k >= 1")
        if self.top_k < 0:
            raise ConfigError(f"top_k {self.top_k} is negative; use 0 to turn it off")


def seeded_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A private random stream on `device`: reproducible draws that leave the global RNG alone."""
    return torch.Generator(device=device).manual_seed(seed)


def filtered_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """logits / temperature in float32, with the tokens top-k and top-p exclude set to -inf. (batch, vocab)."""
    scaled = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.shape[-1]:
        kth_largest = scaled.topk(sampling.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = scaled.sort(dim=-1, descending=True)
        probabilities = ordered.softmax(dim=-1)
        # A token goes when the likelier ones already cover top_p; the likeliest always stays.
        excluded = probabilities.cumsum(dim=-1) - probabilities >= sampling.top_p
        scaled = scaled.masked_fill(excluded.scatter(-1, order, excluded), float("-inf"))
    return scaled


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row: (batch, vocab) logits -> (batch,) ids, drawn by inverse-CDF sampling.

    A uniform u in (0, total] picks the first token whose cumulative probability reaches u. A
    token of probability 0 (excluded by top-k/top-p, or underflowed) is never picked: it has the
    same cumulative value as the token before it, so the search stops at that token or passes
    both (and u > 0 rules out a first token of probability 0).
    """
    if sampling.temperature < GREEDY_BELOW:  # 0, or so small that logits / temperature overflows
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(filtered_logits(logits, sampling), dim=-1)
    cumulative = probabilities.cumsum(dim=-1)
    # 1 - U[0, 1) lies in (0, 1]; times the total it never exceeds the last cumulative value.
    uniform = 1.0 - torch.rand(len(logits), 1, device=logits.device, generator=generator)
    return torch.searchsorted(cumulative, uniform * cumulative[:, -1:]).squeeze(1)


def sample_rows(
    logits: torch.Tensor, row_sampling: Sequence[Sampling], row_generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """`sample_next` with each row's own settings and generator: (batch, vocab) -> (batch,).

    Rows sharing settings and the global RNG are drawn together; a row with its own generator is
    drawn alone, so its tokens do not depend on which other rows share the batch.
    """
    tokens = torch.empty(len(logits), dtype=torch.long, device=logits.device)
    shared: dict[Sampling, list[int]] = {}
    for row, (sampling, generator) in enumerate(zip(row_sampling, row_generators)):
        if generator is None:
            shared.setdefault(sampling, []).append(row)
        else:
            tokens[row] = sample_next(logits[row:row + 1], sampling, generator)[0]
    for sampling, rows in shared.items():
        index = torch.tensor(rows, device=logits.device)
        tokens[index] = sample_next(logits[index], sampling)
    return tokens


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    on_tokens: Callable[[torch.Tensor], bool | torch.Tensor | None] | None = None,
    row_sampling: Sequence[Sampling] | None = None,
    row_generators: Sequence[torch.Generator | None] | None = None,
    on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sampled continuations: (batch, max_new_tokens), pad after each row's EOS and after an early stop.

    input_ids, attention_mask: (batch, prompt_len), left-padded. `on_tokens` gets each step's
    tokens, (batch,), as they are drawn (rows already finished hold pad); returning True stops,
    returning a (batch,) bool tensor finishes the rows it marks. `row_sampling` and
    `row_generators` (one per row) replace `sampling` and `generator`. `on_logits` gets each
    step's raw logits (batch, vocab) and tokens (batch,) before `on_tokens`.
    """
    batch = len(input_ids)
    responses = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    attention_mask = attention_mask.long()
    position_ids = position_ids_from(attention_mask)
    cache = DynamicCache(config=model.config)
    step_ids = input_ids
    for step in range(max_new_tokens):
        logits = model(
            input_ids=step_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        ).logits[:, -1]
        if row_sampling is None:
            drawn = sample_next(logits, sampling, generator)
        else:
            drawn = sample_rows(logits, row_sampling, row_generators or [None] * batch)
        tokens = drawn.masked_fill(finished, pad_token_id)
        responses[:, step] = tokens
        finished |= tokens == eos_token_id
        if on_logits is not None:
            on_logits(logits, tokens)
        stop = on_tokens(tokens) if on_tokens is not None else False
        if isinstance(stop, torch.Tensor):  # rows the caller is done with
            finished |= stop.to(finished.device)
            stop = False
        if stop or step + 1 == max_new_tokens or bool(finished.all()):
            break
        # Rows already finished keep going on pad tokens; nothing after their EOS is read.
        step_ids = tokens.unsqueeze(1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return responses
