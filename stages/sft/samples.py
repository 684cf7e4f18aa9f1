"""Replies to fixed held-out prompts: the quickest way to see what a policy has learned."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data.conversations import prompt_of


@torch.no_grad()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    max_new_tokens: int,
    seed: int,
    temperature: float = 0.7,
) -> list[str]:
    """One sampled reply per prompt (messages ending in a user turn), seeded so reruns agree."""
    model.eval()
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    replies = []
    for messages in prompts:
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(model.device)
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        replies.append(tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
    torch.set_rng_state(generator_state)
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
