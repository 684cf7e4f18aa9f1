"""What a policy's replies look like: the statistics that show a policy learning to stop early,
refuse, or repeat itself, whatever a reward model makes of it.

    stats = reply_statistics(lengths, has_eos, token_ids, texts, limit=48)
    stats["eos_share"], stats["distinct_2"], stats["top_replies"]
"""

from __future__ import annotations

import re
from collections import Counter

import torch


def normalized_reply(text: str) -> str:
    """A reply reduced to its words, for spotting the same reply in other words' clothes
    ("I'm sorry." and "i’m sorry!" are one reply)."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'")))


def distinct_n(token_ids: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of all replies (Li et al., 2016): 1 when nothing repeats."""
    grams = [tuple(ids[i : i + n]) for ids in token_ids for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def reply_statistics(
    lengths: torch.Tensor, has_eos: torch.Tensor, token_ids: list[list[int]], texts: list[str], *, limit: int, top: int = 5
) -> dict:
    """Length distribution, how replies end, diversity and the most repeated replies.

    lengths: (replies,) tokens per reply, EOS included; has_eos: (replies,) bool; token_ids: each
    reply's tokens without its EOS (for distinct-n); texts: the decoded replies; limit: the
    response length the sampler stopped at. A reply without EOS was cut at `limit`.

    Returns length_mean / median / p10 / p90, eos_share, cut_share (no EOS: stopped by the limit,
    not by the policy), distinct_1 / distinct_2, repeated_share (replies whose words another reply
    repeats exactly) and top_replies: [[text, share], ...] for the `top` most common replies said
    more than once.
    """
    lengths = lengths.double()
    counts = Counter(normalized_reply(text) for text in texts)
    repeated = sum(count for count in counts.values() if count > 1)
    total = max(len(texts), 1)
    return {
        "length_mean": lengths.mean().item(),
        "length_median": lengths.median().item(),
        "length_p10": torch.quantile(lengths, 0.1).item(),
        "length_p90": torch.quantile(lengths, 0.9).item(),
        "eos_share": has_eos.double().mean().item(),
        "cut_share": ((~has_eos.bool()) & (lengths >= limit)).double().mean().item(),
        "distinct_1": distinct_n(token_ids, 1),
        "distinct_2": distinct_n(token_ids, 2),
        "repeated_share": repeated / total,
        "top_replies": [[text, count / total] for text, count in counts.most_common(top) if count > 1],
    }
