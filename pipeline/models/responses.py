"""Sampled responses to prompts, and scoring them micro-batch by micro-batch with padding cut away.

    responses = sample_responses(policy, query_ids, query_mask, max_new_tokens=64, sampling=Sampling(0.7),
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    logprobs = response_logprobs(policy, responses, temperature=0.7, micro_batch_size=16)

PPO builds its experience from these, and the one policy evaluator (reward_model/policy_evaluation.py)
samples and scores held-out replies with them, for PPO's eval curve and the eval stage alike. A
response is cut after its first EOS (later tokens become pad).

Speed: no forward pass computes a column that is padding in every row of its batch. Scoring
passes run over the responses sorted by length, so each micro-batch holds sequences of similar
length, and each micro-batch is cut to its own widest prompt and longest response
(`real_columns`); the results go back to their rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.models.generation import Sampling, generate
from pipeline.models.logprobs import logprobs_from_logits, response_logits


@dataclass
class Responses:
    """Sampled responses with their prompts. Per-token tensors are (batch, len)."""

    query_ids: torch.Tensor  # left-padded
    query_mask: torch.Tensor
    response_ids: torch.Tensor  # cut after the first EOS, pad after it
    response_mask: torch.Tensor  # 1 on response tokens up to and including the EOS
    has_eos: torch.Tensor  # (batch,) bool
    last_index: torch.Tensor  # (batch,) position of the EOS, or response_len - 1 without one

    def __len__(self) -> int:
        return self.response_ids.shape[0]


@dataclass
class ScoredResponses:
    """Sampled responses and what the models say about them, before any RL shaping. (batch, response_len) float32."""

    responses: Responses
    logprobs: torch.Tensor  # the sampling policy's, at the sampling temperature
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None  # the value model's (PPO's rollouts only)
    raw_scores: torch.Tensor  # (batch,) the reward function's


def truncate_after_eos(
    responses: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first EOS.

    responses: (batch, response_len) -> (responses with pad after the first EOS, mask (1 up to and
    including the EOS, or everywhere when there is none), has_eos (batch,), last_index (batch,):
    the EOS position, or response_len - 1).
    """
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(dim=1)
    length = responses.shape[1]
    positions = torch.arange(length, device=responses.device).expand_as(responses)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length - 1, dtype=torch.long))
    mask = (positions <= first_eos.unsqueeze(1)).long()
    truncated = torch.where(mask.bool(), responses, torch.full_like(responses, pad_token_id))
    return truncated, mask, has_eos, first_eos


def sample_responses(
    model, query_ids: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int, sampling: Sampling,
    eos_token_id: int, pad_token_id: int, generator: torch.Generator | None = None,
) -> Responses:
    """One sampled response per (left-padded) query, cut after its EOS."""
    raw = generate(
        model, query_ids, query_mask, max_new_tokens=max_new_tokens, sampling=sampling,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator,
    )
    response_ids, response_mask, has_eos, last_index = truncate_after_eos(raw, eos_token_id, pad_token_id)
    return Responses(query_ids, query_mask, response_ids, response_mask, has_eos, last_index)


def real_columns(query_mask: torch.Tensor, response_mask: torch.Tensor) -> tuple[slice, slice]:
    """The query and response columns that hold a real token in at least one row.

    query_mask: (batch, query_len), left-padded; response_mask: (batch, response_len), right-padded.
    Dropping the other columns changes no real token's output: left padding is masked out of
    attention and positions count real tokens only, and causal attention never looks right.
    """
    first_query = int(query_mask.any(0).int().argmax()) if query_mask.any() else query_mask.shape[1]
    response_length = int(response_mask.sum(1).max()) if len(response_mask) else 0
    return slice(first_query, None), slice(0, response_length)


def length_sorted_micro_batches(query_mask: torch.Tensor, response_mask: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Row indices in micro-batches of `size`, longest sequences first, so each cuts away most padding."""
    lengths = query_mask.sum(1) + response_mask.sum(1)
    return list(torch.argsort(lengths, descending=True, stable=True).split(size))


# (query_ids, query_mask, response_ids, response_mask) of one micro-batch, cut to its own widest
# query and longest response -> (rows, response_width) per token, or (rows,) per sequence.
MicroBatchScore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def score_in_micro_batches(responses: Responses, micro_batch_size: int, score: MicroBatchScore, *, per_token: bool) -> torch.Tensor:
    """`score` of every row, computed in length-sorted micro-batches without padding columns; float32.

    Per token: (batch, response_len), 0 past each micro-batch's longest response (masked
    anyway). Per sequence: (batch,).
    """
    shape = responses.response_ids.shape if per_token else responses.response_ids.shape[:1]
    out = torch.zeros(shape, dtype=torch.float32, device=responses.response_ids.device)
    for rows in length_sorted_micro_batches(responses.query_mask, responses.response_mask, micro_batch_size):
        query_columns, response_columns = real_columns(responses.query_mask[rows], responses.response_mask[rows])
        queries, query_mask = responses.query_ids[rows, query_columns], responses.query_mask[rows, query_columns]
        tokens, token_mask = responses.response_ids[rows, response_columns], responses.response_mask[rows, response_columns]
        result = score(queries, query_mask, tokens, token_mask)
        if per_token:
            out[rows, : tokens.shape[1]] = result
        else:
            out[rows] = result.float()
    return out


def response_logprobs(model, responses: Responses, temperature: float, micro_batch_size: int) -> torch.Tensor:
    """log p(token) of every response token under `model` at `temperature`: (batch, response_len) float32."""

    def score(queries, query_mask, tokens, token_mask):
        ids, mask = torch.cat([queries, tokens], dim=1), torch.cat([query_mask, token_mask], dim=1)
        return logprobs_from_logits(response_logits(model, ids, mask, tokens.shape[1]), tokens, temperature)

    return score_in_micro_batches(responses, micro_batch_size, score, per_token=True)


def completed(responses: Responses, eos_token_id: int, pad_token_id: int) -> Responses:
    """The same responses with EOS appended to each one the length limit cut off.

    A reward model learned its scores on replies that end with EOS; a reply cut mid-sentence and
    scored at its last token is scored off that distribution (and PPO penalises it). Scoring both
    forms shows how much of a comparison is the cut, not the reply.
    """
    batch = len(responses)
    width = responses.response_ids.shape[1] + 1
    ids = torch.full((batch, width), pad_token_id, dtype=responses.response_ids.dtype, device=responses.response_ids.device)
    ids[:, :-1] = responses.response_ids
    mask = torch.zeros((batch, width), dtype=responses.response_mask.dtype, device=ids.device)
    mask[:, :-1] = responses.response_mask
    cut = ~responses.has_eos
    ids[cut, -1] = eos_token_id
    mask[cut, -1] = 1
    last_index = torch.where(cut, torch.full_like(responses.last_index, width - 1), responses.last_index)
    return Responses(responses.query_ids, responses.query_mask, ids, mask, torch.ones_like(responses.has_eos), last_index)
