"""Preference data: ranked completions of one prompt, normalised for reward-model training.

    groups, report = normalize_preferences(load_source(source), source=source.path)
    groups[0].completions   # K full conversations (prompt + one reply each)
    groups[0].pairs         # [(better, worse), ...] indices into completions

Accepted rows:

- pairwise: `{"prompt"?, "chosen", "rejected"}`, each side a string or a messages list. Anthropic
  HH text (`"\\n\\nHuman: ...\\n\\nAssistant: ..."`) carries the prompt inside both sides; the
  shared prefix is the prompt (the shipped sample is this). A messages list may be in ShareGPT
  form (from/value) or hold OpenAI text parts, as in `data.conversations`. An optional `margin` column gives
  how much better `chosen` is.
- ranked: `{"prompt", "completions": [c1..cK], "ranking": [...]}` with 2 <= K <= 9, where
  `ranking` is a best-to-worst order of completion indices, or (with `scores` instead, or
  `ranking_is: scores`) one score per completion, higher is better.

A ranking of K completions yields every ordered pair (better, worse): K*(K-1)/2 when all are
distinct; tied completions yield no pair. As in InstructGPT, a prompt's pairs are kept together
so its loss can be averaged over its own pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from data.conversations import normalize_message, parse_hh, validate_messages
from data.rows import BadRows, RowError, RowReport

MIN_COMPLETIONS, MAX_COMPLETIONS = 2, 9


@dataclass
class PreferenceGroup:
    """One prompt's ranked completions."""

    prompt: list[dict]
    completions: list[list[dict]]  # each: the prompt followed by one assistant reply
    pairs: list[tuple[int, int]]  # (better, worse) indices into completions
    margins: list[float] = field(default_factory=list)  # per pair, 0.0 unless the data gives one


def pairs_from_order(order: list[int]) -> list[tuple[int, int]]:
    """Best-to-worst order of indices -> every (better, worse) pair."""
    return [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]


def pairs_from_scores(scores: list[float]) -> list[tuple[int, int]]:
    """One score per completion (higher is better) -> every (better, worse) pair; ties give none."""
    return [
        (i, j)
        for i in range(len(scores))
        for j in range(len(scores))
        if scores[i] > scores[j]
    ]


def as_messages(value: object, what: str) -> list[dict]:
    """A side of a preference row as messages: a messages list, HH text, or plain reply text."""
    if isinstance(value, list):
        return validate_messages(value)
    if isinstance(value, str):
        if value.lstrip().startswith("Human:"):
            return validate_messages(parse_hh(value))
        return [{"role": "assistant", "content": value}]
    raise RowError(f"{what} is {type(value).__name__}, not text or a messages list")


def prompt_messages(value: object) -> list[dict]:
    """A prompt as messages: plain text is one user turn; HH text may end in an empty "Assistant:"."""
    if isinstance(value, str):
        if value.lstrip().startswith("Human:"):
            return without_trailing_assistant(parse_hh(value))
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return [normalize_message(message) for message in value]
    raise RowError(f"prompt is {type(value).__name__}, not text or a messages list")


def complete(prompt: list[dict], side: list[dict], what: str) -> list[dict]:
    """The full conversation for one side: the side itself when it holds the prompt, else prompt + side."""
    conversation = side if side[0]["role"] != "assistant" else prompt + side
    if not conversation or conversation[-1]["role"] != "assistant":
        raise RowError(f"{what} does not end with an assistant reply")
    if not conversation[-1]["content"].strip():
        raise RowError(f"empty {what} reply")
    return conversation


def without_trailing_assistant(messages: list[dict]) -> list[dict]:
    messages = list(messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def shared_prefix(first: list[dict], second: list[dict]) -> list[dict]:
    """The messages both conversations start with, up to their last shared user turn."""
    prefix = []
    for a, b in zip(first, second):
        if a != b:
            break
        prefix.append(a)
    return without_trailing_assistant(prefix)


def pairwise_group(row: dict) -> PreferenceGroup:
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise RowError(f"missing field {key!r}")
    prompt = prompt_messages(row["prompt"]) if row.get("prompt") is not None else []
    chosen = complete(prompt, as_messages(row["chosen"], "chosen"), "chosen")
    rejected = complete(prompt, as_messages(row["rejected"], "rejected"), "rejected")
    if chosen == rejected:
        raise RowError("chosen and rejected are the same conversation")
    if not prompt:
        prompt = shared_prefix(chosen, rejected)
    margin = float(row["margin"]) if row.get("margin") is not None else 0.0
    return PreferenceGroup(prompt=prompt, completions=[chosen, rejected], pairs=[(0, 1)], margins=[margin])


def ranked_group(row: dict, ranking_is: str = "order") -> PreferenceGroup:
    for key in ("prompt", "completions"):
        if key not in row or row[key] is None:
            raise RowError(f"missing field {key!r}")
    completions = row["completions"]
    if not isinstance(completions, list) or not MIN_COMPLETIONS <= len(completions) <= MAX_COMPLETIONS:
        count = len(completions) if isinstance(completions, list) else type(completions).__name__
        raise RowError(f"completions must be a list of {MIN_COMPLETIONS} to {MAX_COMPLETIONS} replies, got {count}")
    prompt = prompt_messages(row["prompt"])
    conversations = [complete(prompt, as_messages(c, "completion"), "completion") for c in completions]
    if row.get("scores") is not None:
        ranking, kind = row["scores"], "scores"
    elif row.get("ranking") is not None:
        ranking, kind = row["ranking"], ranking_is
    else:
        raise RowError("missing field 'ranking' (a best-to-worst order) or 'scores' (one per completion)")
    if not isinstance(ranking, list) or len(ranking) != len(completions):
        raise RowError(f"{kind} must list one entry per completion ({len(completions)})")
    if kind == "order":
        if sorted(ranking) != list(range(len(completions))):
            raise RowError(f"ranking {ranking} is not an order of completion indices 0..{len(completions) - 1}")
        pairs = pairs_from_order(ranking)
    else:
        if not all(isinstance(s, (int, float)) for s in ranking):
            raise RowError(f"scores {ranking} are not all numbers")
        pairs = pairs_from_scores([float(s) for s in ranking])
        if not pairs:
            raise RowError("all completions are tied: no preference to learn")
    return PreferenceGroup(prompt=prompt, completions=conversations, pairs=pairs, margins=[0.0] * len(pairs))


def to_group(row: dict, ranking_is: str = "order") -> PreferenceGroup:
    """One row of either layout as a PreferenceGroup (RowError says why a row is unusable)."""
    if row.get("completions") is not None:  # files mixing both layouts load with None in the other columns
        return ranked_group(row, ranking_is)
    return pairwise_group(row)


def normalize_preferences(
    rows: Iterable[dict],
    *,
    ranking_is: str = "order",
    on_bad_row: str = "drop",
    max_bad_fraction: float = 0.1,
    source: str = "<data>",
    config_section: str = "reward",
) -> tuple[list[PreferenceGroup], RowReport]:
    """Every usable row as a PreferenceGroup, with the bad-row policy of `data.rows` applied."""
    bad_rows = BadRows(
        on_bad_row=on_bad_row, max_bad_fraction=max_bad_fraction, source=source, config_section=config_section
    )
    groups = bad_rows.read(rows, lambda row: to_group(row, ranking_is))
    report = bad_rows.check(
        kind="preference", kinds="preferences", look_at="the format (pairwise chosen/rejected, or ranked completions)"
    )
    return groups, report
