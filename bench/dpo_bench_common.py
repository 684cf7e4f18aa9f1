"""What both DPO benchmark sides are measured with: held-out preference accuracy, by one code path.

    from dpo_bench_common import held_out_accuracy, reply_logps, wilson_interval

Used by bench/dpo_vs_trl.py on each side's saved policy, after its worker process has exited (so
the scoring costs neither side memory or time). It uses torch and transformers only, never
chatpipe's DPO code or TRL's: a pair's implicit reward margin is

    beta * (log pi(chosen) - log pi_ref(chosen)) - beta * (log pi(rejected) - log pi_ref(rejected))

with each log-probability summed over the reply's tokens (every token after the prefix the two
completions share, EOS included) and pi_ref the SFT policy both sides started from. The held-out
preference accuracy is the share of pairs whose margin is above 0 (a tie counts half).
"""

from __future__ import annotations

import math
from pathlib import Path


def reply_logps(model, sequences: list[list[int]], starts: list[int], pad_token_id: int, batch_size: int = 16) -> list[float]:
    """Each sequence's summed log-probability of its tokens from position `starts[i]` on, in fp32, no grad.

    Sequences are right-padded per batch (sorted by length so a batch pads little), scored with an
    attention mask; a token's log-probability comes from the logits at the position before it.
    """
    import torch

    order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))
    values = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for offset in range(0, len(order), batch_size):
            chosen = order[offset : offset + batch_size]
            width = max(len(sequences[index]) for index in chosen)
            ids = torch.full((len(chosen), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chosen), width), dtype=torch.long)
            scored = torch.zeros((len(chosen), width), dtype=torch.bool)
            for row, index in enumerate(chosen):
                sequence = sequences[index]
                ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
                scored[row, max(starts[index], 1) : len(sequence)] = True
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            sums = (token_logps * scored[:, 1:]).sum(-1)
            for row, index in enumerate(chosen):
                values[index] = float(sums[row])
    model.train(was_training)
    return values


def load_policy(folder: str | Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def pair_logps(model, pairs: list[dict], pad_token_id: int) -> tuple[list[float], list[float]]:
    """(chosen, rejected) summed reply log-probs of every pair: dicts with chosen_ids, rejected_ids, prefix."""
    sequences = [pair["chosen_ids"] for pair in pairs] + [pair["rejected_ids"] for pair in pairs]
    starts = [pair["prefix"] for pair in pairs] * 2
    values = reply_logps(model, sequences, starts, pad_token_id)
    return values[: len(pairs)], values[len(pairs) :]


def wilson_interval(successes: float, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (successes may hold halves, from ties)."""
    if total == 0:
        return 0.0, 1.0
    share = successes / total
    denominator = 1 + z * z / total
    centre = (share + z * z / (2 * total)) / denominator
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def held_out_accuracy(policy, reference: tuple[list[float], list[float]], pairs: list[dict], pad_token_id: int, beta: float) -> dict:
    """The policy's implicit-reward accuracy on `pairs` against the reference's log-probs `reference`
    ((chosen, rejected) from `pair_logps` on the SFT policy): share of margins above 0 with its 95%
    interval, the mean margin, and `correct`, each pair's 1 / 0.5 / 0 (for paired comparisons)."""
    chosen, rejected = pair_logps(policy, pairs, pad_token_id)
    margins = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, *reference)]
    correct = [1.0 if margin > 0 else 0.5 if margin == 0 else 0.0 for margin in margins]
    low, high = wilson_interval(sum(correct), len(correct))
    return {"accuracy": sum(correct) / max(len(correct), 1), "interval": [low, high], "pairs": len(correct),
            "margin": sum(margins) / max(len(margins), 1), "correct": correct}


def paired_difference(first: list[float], second: list[float], z: float = 1.959964) -> dict:
    """Accuracy of `first` minus `second` on the same pairs, with a 95% interval from the paired
    per-pair differences (normal approximation; the pairs they agree on cancel, as in McNemar's test)."""
    differences = [a - b for a, b in zip(first, second)]
    count = len(differences)
    mean = sum(differences) / count
    variance = sum((d - mean) ** 2 for d in differences) / max(count - 1, 1)
    half = z * math.sqrt(variance / count)
    return {"difference": mean, "interval": [mean - half, mean + half],
            "disagreements": sum(1 for d in differences if d != 0)}
