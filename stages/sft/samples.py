"""Replies to fixed held-out prompts: the quickest way to see what a policy has learned."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data.conversations import prompt_of
from pipeline.models.generation import Sampling, generate, seeded_generator


@torch.no_grad()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    max_new_tokens: int,
    seed: int,
    temperature: float = 0.7,
) -> list[str]:
    """One sampled reply per prompt (messages ending in a user turn), seeded so reruns agree.

    The draws come from a private generator: training's RNG state is not touched.
    """
    model.eval()
    generator = seeded_generator(seed, model.device)
    replies = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
        response = generate(
            model, input_ids, torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            sampling=Sampling(temperature=temperature), eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, generator=generator,
        )
        replies.append(tokenizer.decode(response[0], skip_special_tokens=True))
    return replies


def sample_rows(
    conversations: list[list[dict]], count: int, tokenizer: PreTrainedTokenizerBase, max_prompt_tokens: int
) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference reply) for the first `count` held-out conversations whose prompt fits."""
    rows = []
    for messages in conversations:
        if len(rows) == count:
            break
        prompt = prompt_of(messages)
        length = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        if length <= max_prompt_tokens:
            rows.append((prompt, messages[len(prompt)]["content"]))
    return rows
