"""Does RLHF help? The policies compared on held-out prompts, by judges they never saw, beside the
baselines that would explain a win without help.

    python -m stages.eval --run-dir runs/tiny        (or: chatpipe eval runs/tiny)

Each policy (the SFT output, and the DPO and PPO outputs where the run has them) answers every held-out prompt
`samples_per_prompt` times under one sampling seed, at `eval.temperature` (by default PPO's, so the
KL to the SFT policy is the one PPO constrained), through the policy evaluator PPO's eval curve
uses (reward_model/policy_evaluation.py). Every reply is scored by the reward model PPO trained
against, as sampled (what PPO saw) and completed (a reply the length limit cut gets its EOS), and
by each judge (reward models the policy never trained against; the `judges` stage) on the
completed reply's token ids. Then, for each trained policy against SFT and for PPO against DPO,
by the reward model, each judge and the judges' mean:

- the win rate over every pair of replies to a prompt, with a 95% bootstrap interval over prompts;
- the length-controlled win rate (AlpacaEval-LC's regression on the length difference) and the
  win rate among replies of about the same length;
- how often the judges agree.

Beside them: fixed replies (empty, "I don't know.", a refusal) scored like a policy's and their
win rate against each policy; each policy's reply lengths, EOS and cut shares, distinct-1/2 and
most repeated replies; each reward model's correlation with length; and every reward model's
accuracy on preference pairs none of them trained on, beside "the shorter reply wins" and chance.
The verdict (pipeline/evaluation/verdict.py) says it in a few lines. Output: RUN_DIR/eval/final
with metrics.json, verdict.txt and samples.jsonl (every reply with its scores).
"""

from __future__ import annotations

import json
import re

import torch
from accelerate.utils import set_seed
from transformers import AutoTokenizer

from data.chat_tokens import load_conversations, query_ids, tokenize_conversations
from data.conversations import prompt_of
from data.held_out import read_held_out
from data.padding import pad_batch
from pipeline.config import PreferenceData
from pipeline.errors import ConfigError
from pipeline.evaluation.comparison import (
    correlation,
    judge_agreement,
    length_controlled_win_rate,
    length_differences,
    matched_length_win_rate,
    outcomes,
    percentile_interval,
    prompt_resamples,
    win_rate,
)
from pipeline.evaluation.replies import reply_statistics
from pipeline.evaluation.verdict import head_to_head, verdict_lines
from pipeline.models.checkpoints import load_causal_lm
from pipeline.models.generation import seeded_generator
from pipeline.models.responses import Responses
from pipeline.orchestration.stage import StageContext, StageResult, run_stage
from pipeline.training.distributed import make_accelerator, whole_model_init
from pipeline.training.metrics import IGNORE_INDEX, held_out_loss
from reward_model.batching import encode_groups
from reward_model.data import load_preference_groups
from reward_model.evaluation import pair_length_gaps, preference_gaps
from reward_model.judges import TRAINING_MODEL, JudgePanel, judge_folders
from reward_model.policy_evaluation import evaluate_policy, reply_sampler
from reward_model.provenance import HELD_OUT_NAME, fingerprint, read_trained_on

SCORED_AS_SAMPLED = "reward_sampled"  # the reward model's score of replies as sampled: what PPO optimised
TRAINED_POLICIES = ("dpo", "ppo")  # the stages whose policies eval compares with the SFT policy, in this order


def pairings(baseline: str, challengers: list[str]) -> list[tuple[str, str]]:
    """Which policy is compared with which: each challenger with the baseline, then each later
    challenger with each earlier one (PPO with DPO), so every pair is measured once."""
    return [(name, baseline) for name in challengers] + head_to_head(challengers)


def held_out_conversations(context: StageContext) -> tuple[list[list[dict]], str]:
    """Conversations no policy trained on, and where they came from.

    eval.prompts when set; else the prompts of the preference pairs the judges held out from every
    model (no stage of the run saw those conversations); else the held-out prompts the PPO stage saved
    with its output (the SFT policy may have seen them, with their reference replies).
    """
    section = context.config.eval
    if section.prompts is not None:
        conversations, _ = load_conversations(section.prompts, section, context.run_dir / "cache" / "datasets", config_section="eval")
        return conversations, section.prompts.path or section.prompts.hub
    judges = context.inputs.get("judges")
    if judges is not None and (judges / HELD_OUT_NAME).exists():
        source = judges / HELD_OUT_NAME
        groups, _ = load_preference_groups(PreferenceData(path=str(source)), section, None, config_section="eval")
        return [group.completions[0] for group in groups], str(source)  # each cut before its final reply below
    if "ppo" not in context.inputs:
        raise ConfigError(
            "eval.prompts is not set and the run has no judges or ppo stage whose held-out prompts eval could use; "
            "set eval.prompts to a conversation file the policies were not trained on"
        )
    return read_held_out(context.inputs["ppo"]), str(context.inputs["ppo"] / "held_out.jsonl")


# ----------------------------------------------------------------------------------- replies
def answer(policy, reference, panel: JudgePanel, tokenizer, prompts, section, accelerator, seed) -> dict:
    """`samples_per_prompt` sampled replies per prompt (the same seed for every policy) with their
    scores, through the policy evaluator PPO's eval curve uses (reward_model/policy_evaluation.py).

    Returns `evaluation` (its `metrics` are PPO's: score, kl, response_length, eos_fraction,
    judges_score) and per reply (prompt-major: prompt p's replies are rows p*S .. p*S+S-1): `kl`
    to the reference (summed over tokens), `lengths`, `has_eos`, `tokens` (each reply's ids
    without EOS), `replies` (text), and `scores`: {model: (replies,)} with `reward_sampled` for the
    reward model on the replies as sampled, every model of the panel on the completed replies, and
    `judges`, the held-out judges' mean standardized score (when there are judges).
    """
    queries = [ids for ids in prompts for _ in range(section.samples_per_prompt)]
    batches = [pad_batch(queries[start : start + section.batch_size], tokenizer.pad_token_id, side="left")
               for start in range(0, len(queries), section.batch_size)]
    sample = reply_sampler(
        policy, reference, panel.reward_function(TRAINING_MODEL), tokenizer,
        temperature=section.temperature, response_length=section.response_length, micro_batch_size=section.batch_size,
    )
    evaluation = evaluate_policy(sample, batches, seeded_generator(seed, accelerator.device), panel, tokenizer,
                                 micro_batch_size=section.batch_size)
    ensemble = {"judges": evaluation.judges} if evaluation.judges is not None else {}
    return {
        "evaluation": evaluation, "kl": evaluation.kl, "lengths": evaluation.lengths, "has_eos": evaluation.has_eos,
        "tokens": evaluation.tokens, "replies": [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in evaluation.tokens],
        "scores": {SCORED_AS_SAMPLED: evaluation.scores, **evaluation.judged, **ensemble},
    }


@torch.no_grad()
def score_fixed_reply(panel: JudgePanel, tokenizer, prompts, text: str, batch_size: int, device) -> dict[str, torch.Tensor]:
    """Every model's score of the same reply to every prompt: {model: (prompts,)}."""
    reply = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    scores: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(prompts), batch_size):
        query_ids, query_mask = pad_batch(prompts[start : start + batch_size], tokenizer.pad_token_id, side="left")
        rows = len(query_ids)
        response_ids = torch.tensor([reply] * rows)
        responses = Responses(
            query_ids.to(device), query_mask.to(device), response_ids.to(device), torch.ones_like(response_ids).to(device),
            torch.ones(rows, dtype=torch.bool, device=device), torch.full((rows,), len(reply) - 1, device=device),
        )
        for name, values in panel.score(responses, batch_size).items():
            scores.setdefault(name, []).append(values.cpu())
    return {name: torch.cat(values) for name, values in scores.items()}


def held_out_perplexity(model, tokenizer, conversations, max_length: int, batch_size: int, accelerator) -> float:
    """exp(mean NLL) over the assistant tokens of held-out conversations: the token-weighted held-out
    loss (pipeline/training/metrics.py). Every process scores every conversation, like every reply:
    the figure is one process's under any engine."""
    dataset, _ = tokenize_conversations(conversations, tokenizer, max_length, "truncate")

    def batches():
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            ids, mask = pad_batch(rows["input_ids"], tokenizer.pad_token_id, side="right")
            assistant, _ = pad_batch(rows["assistant_masks"], 0, side="right")
            yield {"input_ids": ids, "attention_mask": mask, "labels": torch.where(assistant.bool(), ids, IGNORE_INDEX)}

    return held_out_loss(accelerator, model, batches(), across_processes=False)["perplexity"]


# ------------------------------------------------------------------------------- comparisons
def with_ensemble(panel: JudgePanel, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The scores plus `judges`, the held-out judges' mean standardized score (when there are judges)."""
    ensemble = panel.ensemble({name: scores[name] for name in panel.names})
    return {**scores, "judges": ensemble} if ensemble is not None else dict(scores)


def compare(challenger: dict, baseline: dict, panel: JudgePanel, samples: int, resamples: torch.Tensor) -> dict[str, float]:
    """Challenger vs baseline by every scorer: win rate, length-controlled and matched-length, with intervals."""
    prompts = len(challenger["lengths"]) // samples
    shape = (prompts, samples)
    lengths_a, lengths_b = challenger["lengths"].view(shape), baseline["lengths"].view(shape)
    differences = length_differences(lengths_a, lengths_b)
    metrics, by_judge = {}, []
    for name in challenger["scores"]:
        outcome = outcomes(challenger["scores"][name].view(shape), baseline["scores"][name].view(shape))
        metrics.update(win_rate(outcome, resamples).as_metrics(f"{name}/win_rate"))
        metrics.update(length_controlled_win_rate(outcome, differences, resamples).as_metrics(f"{name}/lc_win_rate"))
        metrics.update(matched_length_win_rate(outcome, lengths_a, lengths_b, resamples).as_metrics(f"{name}/matched_win_rate"))
        if name in panel.held_out_names:
            by_judge.append(outcome)
    agreement = judge_agreement(by_judge)
    metrics["judges/all_agree"], metrics["judges/pairwise_agreement"] = agreement["all_agree"], agreement["pairwise"]
    return metrics


def null_probe(fixed: dict[str, torch.Tensor], policy: dict, samples: int, resamples: torch.Tensor) -> dict[str, float]:
    """A fixed reply against a policy's replies: its win rate by the reward model (against the
    replies as sampled, and completed) and by the judges' mean."""
    prompts = len(policy["lengths"]) // samples
    metrics = {}
    for name, reference in ((SCORED_AS_SAMPLED, "reward"), ("reward", "reward"), ("judges", "judges")):
        if name not in policy["scores"] or reference not in fixed:
            continue
        outcome = outcomes(fixed[reference].view(prompts, 1), policy["scores"][name].view(prompts, samples))
        metrics.update(win_rate(outcome, resamples).as_metrics(f"{name}/win_rate"))
    return metrics


def slug(text: str) -> str:
    """A fixed reply as a metric key: "I don't know." -> "i_don_t_know"; "" -> "empty"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:32] or "empty"


# ---------------------------------------------------------------------------------- accuracy
def preference_accuracy(context: StageContext, panel: JudgePanel, tokenizer, device, resamples_count: int) -> dict:
    """Every reward model's accuracy on held-out pairs none of them trained on, beside the length rule."""
    config, section = context.config, context.config.eval
    cache = context.run_dir / "cache" / "datasets"
    if section.preferences is not None:
        groups, _ = load_preference_groups(section.preferences, section, cache, config_section="eval")
        source = section.preferences.path or section.preferences.hub
    else:  # what the judges held out from every judge, else what the reward model held out
        folder = context.inputs.get("judges") or context.inputs["reward"]
        held_out = folder / HELD_OUT_NAME
        if not held_out.exists():
            return {}
        groups, _ = load_preference_groups(PreferenceData(path=str(held_out)), section, cache, config_section="eval")
        source = str(held_out)
    trained_on = set().union(*(read_trained_on(folder) for folder in judge_folders_with_reward(context).values()))
    unseen = [group for group in groups if fingerprint(group) not in trained_on]
    metrics = {"accuracy/source": source, "accuracy/excluded_pairs": sum(len(g.pairs) for g in groups if fingerprint(g) in trained_on)}
    if not unseen:
        return metrics
    max_length = config.reward.max_length
    encoded = encode_groups(unseen, tokenizer, max_length, context.run_dir / "cache" / "chat_tokens")
    length_gap = pair_length_gaps(encoded)
    gaps = {judge.name: preference_gaps(judge.scorer, encoded, tokenizer.pad_token_id, section.batch_size, device) for judge in panel.judges}
    if panel.held_out_names:
        # The judges' mean standardized score: its gap is the mean of the gaps over each judge's std (the means cancel).
        stats = {judge.name: judge.statistics for judge in panel.judges}
        gaps["judges"] = torch.stack([gaps[name] / (stats[name].std or 1.0) for name in panel.held_out_names]).mean(0)
    pairs = len(length_gap)
    generator = torch.Generator().manual_seed(config.seed)
    boot = torch.randint(pairs, (resamples_count, pairs), generator=generator)
    metrics.update({
        "accuracy/pairs": pairs,
        "accuracy/chance": 0.5,
        "accuracy/shorter_wins": ((length_gap < 0).double() + 0.5 * (length_gap == 0).double()).mean().item(),
        "accuracy/longer_chosen_share": (length_gap > 0).double().mean().item(),
    })
    for name, gap in gaps.items():
        right = (gap > 0).double()
        low, high = percentile_interval(right[boot].mean(1))
        metrics.update({f"accuracy/{name}": right.mean().item(), f"accuracy/{name}_low": low, f"accuracy/{name}_high": high})
        longer = length_gap > 0
        if longer.any():
            metrics[f"accuracy/{name}/longer_chosen"] = right[longer].mean().item()
    return metrics


def judge_folders_with_reward(context: StageContext) -> dict:
    """Every reward model eval reports on: the training one first, then the judges."""
    extra = [context.config.eval.judge_reward_model] if context.config.eval.judge_reward_model else []
    return {TRAINING_MODEL: context.inputs["reward"], **judge_folders(context.inputs.get("judges"), extra)}


# ------------------------------------------------------------------------------------- stage
def evaluate(context: StageContext) -> StageResult:
    """The eval stage: every policy answers the held-out prompts, scored by the reward model and the judges."""
    config, section = context.config, context.config.eval
    accelerator = make_accelerator()
    set_seed(config.seed)
    device = accelerator.device
    reference_dir = context.inputs[config.policy_stage]
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    policies = {config.policy_stage: reference_dir}
    policies.update({name: context.inputs[name] for name in TRAINED_POLICIES if name in context.inputs})
    baseline_name, challengers = config.policy_stage, [name for name in policies if name != config.policy_stage]

    conversations, prompt_source = held_out_conversations(context)
    token_cache = context.run_dir / "cache" / "chat_tokens"
    with accelerator.main_process_first():  # rendered once, by the main process on all cores
        queries = query_ids(tokenizer, conversations, token_cache)
    usable = [(conversation, ids) for conversation, ids in zip(conversations, queries) if len(ids) <= section.max_prompt_length]
    usable = usable[: section.num_prompts]
    conversations, prompts = [c for c, _ in usable], [ids for _, ids in usable]

    # Eval trains nothing, so under any engine each process holds whole models and runs them itself.
    with whole_model_init():
        panel = JudgePanel.load(judge_folders_with_reward(context), device)
        reference = load_causal_lm(reference_dir).eval().to(device)

    # ------------------------------------------------------------------------- the policies
    samples = section.samples_per_prompt
    resamples = prompt_resamples(len(prompts), section.bootstrap_samples, seed=config.seed)
    results, metrics = {}, {
        "prompts": len(prompts), "samples_per_prompt": samples, "response_length": section.response_length,
        "judges": panel.held_out_names, "prompt_source": prompt_source,
    }
    for name, folder in policies.items():
        with whole_model_init():
            policy = reference if folder == reference_dir else load_causal_lm(folder).eval().to(device)
        results[name] = out = answer(policy, reference, panel, tokenizer, prompts, section, accelerator, config.seed)
        measured = out["evaluation"].metrics  # as PPO's eval curve measures them
        metrics[f"{name}/score"] = measured["score"]
        metrics[f"{name}/score_completed"] = out["scores"][TRAINING_MODEL].mean().item()
        if "judges_score" in measured:
            metrics[f"{name}/judges_score"] = measured["judges_score"]
        for judge in panel.held_out_names:
            metrics[f"{name}/scores/{judge}"] = out["scores"][judge].mean().item()
        metrics[f"{name}/kl"] = measured["kl"]
        stats = reply_statistics(out["lengths"], out["has_eos"], out["tokens"], out["replies"], limit=section.response_length)
        metrics.update({f"{name}/{key}": value for key, value in stats.items()})
        metrics[f"{name}/perplexity"] = held_out_perplexity(
            policy, tokenizer, conversations, section.max_prompt_length + section.response_length, section.batch_size, accelerator,
        )

    # ---------------------------------------------------------------------- the comparisons
    baseline = results[baseline_name]
    for challenger, against in pairings(baseline_name, challengers):
        compared = compare(results[challenger], results[against], panel, samples, resamples)
        metrics.update({f"{challenger}_vs_{against}/{key}": value for key, value in compared.items()})
    if challengers:  # the names earlier releases reported, and people's scripts read: the last policy (PPO's) against SFT
        metrics["win_rate"] = metrics[f"{challengers[-1]}_vs_{baseline_name}/{SCORED_AS_SAMPLED}/win_rate"]
        if "judges" in baseline["scores"]:
            metrics["judge_win_rate"] = metrics[f"{challengers[-1]}_vs_{baseline_name}/judges/win_rate"]
    for name, scores in baseline["scores"].items():
        if name != SCORED_AS_SAMPLED:
            metrics[f"length_correlation/{name}"] = correlation(scores, baseline["lengths"])

    # ----------------------------------------------------------------- fixed-reply baselines
    metrics["null_replies"] = [[slug(text), text] for text in section.null_replies]
    for text in section.null_replies:
        fixed = with_ensemble(panel, score_fixed_reply(panel, tokenizer, prompts, text, section.batch_size, device))
        for model, values in fixed.items():
            metrics[f"null/{slug(text)}/{model}/score"] = values.mean().item()
        for name, out in results.items():
            metrics.update({f"null/{slug(text)}/vs_{name}/{key}": value for key, value in null_probe(fixed, out, samples, resamples).items()})

    # ----------------------------------------------------------------------------- accuracy
    accuracy = preference_accuracy(context, panel, tokenizer, device, section.bootstrap_samples)
    metrics.update(accuracy)
    if "accuracy/reward" in accuracy:
        metrics["reward_accuracy"], metrics["reward_pairs"] = accuracy["accuracy/reward"], accuracy["accuracy/pairs"]

    verdict = verdict_lines(metrics, baseline_name, challengers)
    metrics["verdict"] = verdict
    if context.is_main:
        write_outputs(context, metrics, conversations, results, samples)
        scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        context.tracker.log(scalars, step=0)
        context.tracker.log_table("verdict", ["line"], [[line] for line in verdict], step=0)
        print_table(metrics, list(results))
        print("\n" + "\n".join(verdict))
    return StageResult(context.output_dir, metrics)


def write_outputs(context: StageContext, metrics: dict, conversations, results: dict, samples: int) -> None:
    context.output_dir.mkdir(parents=True, exist_ok=True)
    (context.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (context.output_dir / "verdict.txt").write_text("\n".join(metrics["verdict"]) + "\n")
    with open(context.output_dir / "samples.jsonl", "w") as handle:
        for index, conversation in enumerate(conversations):
            row = {"prompt": prompt_of(conversation)}
            rows = range(index * samples, (index + 1) * samples)
            for name, out in results.items():
                row[f"{name}_reply"] = out["replies"][rows[0]]
                row[f"{name}_score"] = float(out["scores"][SCORED_AS_SAMPLED][rows[0]])
                row[f"{name}_replies"] = [
                    {"reply": out["replies"][i], **{model: float(values[i]) for model, values in out["scores"].items()}}
                    for i in rows
                ]
            handle.write(json.dumps(row) + "\n")


def print_table(metrics: dict, policies: list[str]) -> None:
    """The per-policy figures as a table on the console (the stage's log)."""
    keys = [key.split("/", 1)[1] for key in metrics if key.startswith(f"{policies[0]}/") and isinstance(metrics[key], (int, float))]
    print("\n" + "metric".ljust(24) + "".join(name.rjust(12) for name in policies))
    for key in keys:
        print(key.ljust(24) + "".join(f"{metrics.get(f'{name}/{key}', float('nan')):12.4g}" for name in policies))
    for key in ("win_rate", "judge_win_rate", "reward_accuracy", "accuracy/shorter_wins"):
        if isinstance(metrics.get(key), float):
            print(f"{key}: {metrics[key]:.3f}")


if __name__ == "__main__":
    run_stage("eval", evaluate)
