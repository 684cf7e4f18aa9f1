"""The few plain lines a person reads first: did training help, by judges the policy never saw,
beside the baselines that would explain a win without help.

    lines = verdict_lines(metrics, baseline="sft", challengers=["dpo", "ppo"])

Built from eval's metrics alone (the keys `stages/eval` writes), so `chatpipe eval`, the manifest
and `chatpipe report` say the same thing. Each line states a figure, its interval, and what it is
measured against; the wording follows the interval, never the point estimate alone.
"""

from __future__ import annotations

import math
from typing import Any

POLICY_NAMES = {"sft": "SFT", "ppo": "PPO", "pretrain": "the pretrained model", "dpo": "DPO"}
LENGTH_MARGIN = 0.02  # accuracy within this of the length rule's counts as "no better than length"
CUT_WORTH_MENTIONING = 0.05  # a share of replies cut at the limit above this changes the reward model's verdict
TRAINED_AGAINST_REWARD_MODEL = {"ppo"}  # the policies whose reward-model win rate is a proxy they optimised
COLLAPSE = 0.25  # a policy repeating itself this often (and far more than its baseline) has found a stock reply


def policy_name(stage: str) -> str:
    return POLICY_NAMES.get(stage, stage)


def reply_name(text: str) -> str:
    """A fixed reply as a sentence names it."""
    return repr(text) if text else "an empty reply"


def interval(metrics: dict[str, Any], key: str) -> str | None:
    """`0.53 [0.49, 0.57]`, or None when the key is missing or not a number."""
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or math.isnan(value):
        return None
    low, high = metrics.get(f"{key}_low"), metrics.get(f"{key}_high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and not math.isnan(low):
        return f"{value:.2f} [{low:.2f}, {high:.2f}]"
    return f"{value:.2f}"


def outcome_word(metrics: dict[str, Any], key: str) -> str:
    """What an interval around a win rate says: a win, a loss, or no clear winner."""
    low, high = metrics.get(f"{key}_low", float("nan")), metrics.get(f"{key}_high", float("nan"))
    if low > 0.5:
        return "a win"
    if high < 0.5:
        return "a loss"
    return "no clear win"


def percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def comparison_line(metrics: dict[str, Any], challenger: str, baseline: str, judges: int) -> str:
    """The headline: the challenger against the baseline at equal length, by the judges when there are any."""
    prefix = f"{challenger}_vs_{baseline}"
    who, against = policy_name(challenger), policy_name(baseline)
    proxy = metrics.get(f"{prefix}/reward_sampled/win_rate")
    proxy_completed = metrics.get(f"{prefix}/reward/win_rate")
    cut = max(metrics.get(f"{baseline}/cut_share", 0.0), metrics.get(f"{challenger}/cut_share", 0.0))
    aside = []
    if isinstance(proxy, (int, float)):
        aside.append(f"{proxy:.2f} by {reward_model_phrase(challenger)}")
        if cut > CUT_WORTH_MENTIONING and isinstance(proxy_completed, (int, float)):
            aside.append(f"{proxy_completed:.2f} once replies cut at the length limit are scored complete")
    key = f"{prefix}/judges/lc_win_rate"
    figure = interval(metrics, key)
    if judges and figure is not None:
        raw = interval(metrics, f"{prefix}/judges/win_rate")
        agree = metrics.get(f"{prefix}/judges/all_agree")
        notes = [f"raw {raw}"] if raw else []
        if isinstance(agree, (int, float)) and not math.isnan(agree):
            notes.append(f"all {judges} judges agree on {percent(agree)} of comparisons")
        line = f"{who} vs {against} at equal length: {figure} by {judges} held-out judge{'s' * (judges != 1)} — {outcome_word(metrics, key)}"
        line += f" ({'; '.join(notes + aside)})." if notes or aside else "."
        return line + collapse_warning(metrics, challenger, baseline)
    key = f"{prefix}/reward/lc_win_rate"
    figure = interval(metrics, key) or "n/a"
    if challenger not in TRAINED_AGAINST_REWARD_MODEL:
        return f"{who} vs {against} at equal length: {figure} by {reward_model_phrase(challenger)} (add a `judges` section for held-out judges)."
    return (
        f"{who} vs {against} at equal length: {figure} by the reward model {who} was trained on — with no held-out "
        f"judges this cannot tell help from reward hacking (add a `judges` section)."
    )


def reward_model_phrase(policy: str) -> str:
    """The reward model as a sentence about `policy` names it: its training signal, or a model it never saw."""
    if policy in TRAINED_AGAINST_REWARD_MODEL:
        return "the reward model it was trained on"
    return f"the reward model, which {policy_name(policy)} never trained against"


def collapse_warning(metrics: dict[str, Any], challenger: str, baseline: str) -> str:
    """A sentence when the challenger has collapsed onto stock replies, which every model may reward alike."""
    repeated, before = metrics.get(f"{challenger}/repeated_share", 0.0), metrics.get(f"{baseline}/repeated_share", 0.0)
    top = metrics.get(f"{challenger}/top_replies") or []
    if repeated < COLLAPSE or repeated < 5 * before or not top:
        return ""
    return (f" Beware: {percent(repeated)} of {policy_name(challenger)}'s replies repeat another word for word (most often "
            f"{top[0][0]!r}): where the judges share the reward model's taste for a stock reply, they reward it too.")


def accuracy_line(metrics: dict[str, Any], judges: list[str]) -> str | None:
    """The reward model's held-out accuracy beside the length rule and chance (and the judges')."""
    figure = interval(metrics, "accuracy/reward")
    rule = metrics.get("accuracy/shorter_wins")
    if figure is None or not isinstance(rule, (int, float)):
        return None
    pairs = metrics.get("accuracy/pairs", 0)
    accuracy, low = metrics["accuracy/reward"], metrics.get("accuracy/reward_low", float("nan"))
    best_rule = max(rule, 1 - rule)
    line = f"The reward model's accuracy on {pairs} pairs no model here trained on: {figure}; 'the shorter reply wins' scores {rule:.2f}, chance 0.50"
    if low > best_rule:
        line += f" — it has learned more than length ({100 * (accuracy - best_rule):+.0f} points)."
    elif accuracy - best_rule < LENGTH_MARGIN:
        line += " — it has learned little beyond length."
    else:
        line += " — barely above length (the interval reaches it)."
    accuracies = [metrics[f"accuracy/{name}"] for name in judges if isinstance(metrics.get(f"accuracy/{name}"), (int, float))]
    if accuracies:
        together = metrics.get("accuracy/judges")
        line += f" Judges: {min(accuracies):.2f}–{max(accuracies):.2f}" + (f", together {together:.2f}." if isinstance(together, (int, float)) else ".")
    longer = metrics.get("accuracy/reward/longer_chosen")
    if isinstance(longer, (int, float)) and longer < 0.5:
        line += f" Where people chose the longer reply it is right {percent(longer)} of the time: below chance."
    return line


def null_line(metrics: dict[str, Any], policy: str, null_replies: list[tuple[str, str]], judges: int) -> str | None:
    """Whether a fixed reply (empty, "I don't know.", a refusal) outscores the policy's replies."""
    rated = []
    for slug, text in null_replies:
        proxy = metrics.get(f"null/{slug}/vs_{policy}/reward_sampled/win_rate")
        judged = metrics.get(f"null/{slug}/vs_{policy}/judges/win_rate")
        if isinstance(proxy, (int, float)):
            rated.append((proxy, judged, text))
    if not rated:
        return None
    proxy, judged, text = max(rated, key=lambda row: row[0])
    shown = reply_name(text)
    judged_known = judges and isinstance(judged, (int, float))
    worst_judged = max(((row[1], row[2]) for row in rated if isinstance(row[1], (int, float))), default=None)
    if proxy > 0.5:
        by_judges = f" ({percent(judged)} by the judges)" if judged_known else ""
        line = (f"A constant {shown} outscores {policy_name(policy)}'s replies {percent(proxy)} of the time by the reward "
                f"model{by_judges}: the reward model rewards evasion")
    else:
        by_judges = f"; {percent(judged)} by the judges" if judged_known else ""
        line = (f"No fixed reply beats {policy_name(policy)}'s replies more than half the time by the reward model "
                f"(best: {shown} at {percent(proxy)}{by_judges})")
    if judges and worst_judged is not None and worst_judged[0] > 0.5 and not (proxy > 0.5 and worst_judged[1] == text):
        line += (f"; by the judges {reply_name(worst_judged[1])} does ({percent(worst_judged[0])}): "
                 f"they reward such replies too, so read their equal-length figure, not their raw one")
    return line + "."


def shape_line(metrics: dict[str, Any], policies: list[str], limit: int | None) -> str | None:
    """How the replies changed: length, how they end, repetition."""
    parts = []
    for policy in policies:
        median, eos = metrics.get(f"{policy}/length_median"), metrics.get(f"{policy}/eos_share")
        if not isinstance(median, (int, float)) or not isinstance(eos, (int, float)):
            continue
        cut = metrics.get(f"{policy}/cut_share", 0.0)
        repeated = metrics.get(f"{policy}/repeated_share", 0.0)
        part = f"{policy_name(policy)}: median {median:.0f} tokens, {percent(eos)} end with EOS"
        if cut >= 0.005 and limit:
            part += f" ({percent(cut)} cut at the {limit}-token limit)"
        part += f", {percent(repeated)} repeat another reply word for word"
        top = metrics.get(f"{policy}/top_replies") or []
        if top and repeated >= 0.1:
            part += f" (most often {top[0][0]!r}, {percent(top[0][1])})"
        parts.append(part)
    return "Replies — " + "; ".join(parts) + "." if parts else None


def head_to_head(challengers: list[str]) -> list[tuple[str, str]]:
    """Each later challenger against each earlier one: (PPO, DPO) for ["dpo", "ppo"]."""
    return [(later, earlier) for i, earlier in enumerate(challengers) for later in challengers[i + 1 :]]


def verdict_lines(metrics: dict[str, Any], baseline: str, challengers: list[str]) -> list[str]:
    """The verdict, a line per finding; see the module docstring."""
    judges = [name for name in metrics.get("judges", [])]
    null_replies = [tuple(pair) for pair in metrics.get("null_replies", [])]
    lines = [comparison_line(metrics, challenger, baseline, len(judges)) for challenger in challengers]
    lines += [  # trained policies head to head (PPO against DPO), where eval measured them
        comparison_line(metrics, later, earlier, len(judges))
        for later, earlier in head_to_head(challengers) if any(key.startswith(f"{later}_vs_{earlier}/") for key in metrics)
    ]
    lines.append(accuracy_line(metrics, judges))
    for policy in challengers or [baseline]:
        lines.append(null_line(metrics, policy, null_replies, len(judges)))
    lines.append(shape_line(metrics, [baseline, *challengers], metrics.get("response_length")))
    return [line for line in lines if line]
