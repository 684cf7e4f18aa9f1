"""Does RLHF help? The SFT and PPO policies compared on held-out prompts.

    python -m stages.eval --run-dir runs/tiny        (or: chatpipe eval runs/tiny)

For each policy (the SFT output, and the PPO output when there is one): replies to held-out
prompts sampled with a fixed seed, their mean reward-model score, their KL to the SFT policy
(per reply, summed over tokens; exactly 0 for the SFT policy itself), reply lengths, and the
policy's perplexity on the held-out conversations' reference replies. Then the PPO-vs-SFT win
rate judged by the reward model, and by a second held-out reward model when one is configured
(a guard against reward hacking the training one), and the reward model's accuracy on a held-out
preference file. Samples side by side go to RUN_DIR/eval/final/samples.jsonl.
"""

from __future__ import annotations

import json

import torch
from accelerate.utils import set_seed
from transformers import AutoTokenizer

from data.chat_tokens import load_conversations, query_ids, tokenize_conversations
from data.conversations import prompt_of
from data.held_out import read_held_out
from data.padding import pad_batch
from data.preferences import normalize_preferences
from data.sources import load_source
from pipeline.errors import ConfigError
from pipeline.models.checkpoints import load_causal_lm
from pipeline.models.generation import Sampling, seeded_generator
from pipeline.models.logprobs import logprobs_from_logits, masked_sum, response_logits
from pipeline.models.responses import response_logprobs, sample_responses, score_in_micro_batches
from pipeline.orchestration.stage import StageContext, StageResult, run_stage
from pipeline.training.distributed import make_accelerator, whole_model_init
from pipeline.training.metrics import perplexity
from reward_model.batching import encode_groups
from reward_model.evaluation import evaluate_preferences
from reward_model.functions import reward_model_function
from reward_model.model import TokenScorer, load_reward_model
from reward_model.scoring import at_last_token
from stages.eval.metrics import length_stats, win_rate


def held_out_conversations(context: StageContext) -> list[list[dict]]:
    """Conversations never trained on: eval.prompts, or the held-out prompts the PPO stage saved with its output."""
    section = context.config.eval
    if section.prompts is not None:
        conversations, _ = load_conversations(section.prompts, section, context.run_dir / "cache" / "datasets", config_section="eval")
        return conversations
    if "ppo" not in context.inputs:
        raise ConfigError(
            "eval.prompts is not set and the run has no ppo stage whose held-out prompts eval could use; "
            "set eval.prompts to a conversation file the policies were not trained on"
        )
    return read_held_out(context.inputs["ppo"])


@torch.no_grad()
def answer(policy, reference, reward_fn, tokenizer, prompts, section, accelerator, seed) -> dict[str, torch.Tensor | list]:
    """Sampled replies with their scores, KL to the reference and lengths; the same seed for every policy."""
    generator = seeded_generator(seed, accelerator.device)
    sampling = Sampling(temperature=section.temperature)
    scores, kls, lengths, replies = [], [], [], []
    for start in range(0, len(prompts), section.batch_size):
        query_ids, query_mask = pad_batch(prompts[start : start + section.batch_size], tokenizer.pad_token_id, side="left")
        responses = sample_responses(
            policy, query_ids.to(accelerator.device), query_mask.to(accelerator.device), max_new_tokens=section.response_length,
            sampling=sampling, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, generator=generator,
        )
        logprobs = response_logprobs(policy, responses, section.temperature, section.batch_size)
        ref_logprobs = response_logprobs(reference, responses, section.temperature, section.batch_size)
        mask = responses.response_mask
        scores.append(score_in_micro_batches(responses, section.batch_size, reward_fn, per_token=False).cpu())
        kls.append(masked_sum(logprobs - ref_logprobs, mask, dim=1).cpu())
        lengths.append(mask.sum(1).cpu())
        replies += [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses.response_ids, mask)]
    return {"scores": torch.cat(scores), "kl": torch.cat(kls), "lengths": torch.cat(lengths), "replies": replies}


@torch.no_grad()
def held_out_perplexity(model, tokenizer, conversations, max_length: int, batch_size: int, device) -> float:
    """exp(mean NLL) over the assistant tokens of held-out conversations."""
    dataset, _ = tokenize_conversations(conversations, tokenizer, max_length, "truncate")
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        ids, mask = pad_batch(rows["input_ids"], tokenizer.pad_token_id, side="right")
        loss_mask, _ = pad_batch(rows["assistant_masks"], 0, side="right")
        ids, mask, loss_mask = ids.to(device), mask.to(device), loss_mask.to(device)
        logits = response_logits(model, ids, mask, ids.shape[1] - 1)  # predictions for tokens 1..n-1
        logprobs = logprobs_from_logits(logits, ids[:, 1:], 1.0)
        weights = loss_mask[:, 1:].float()
        total += -(logprobs * weights).sum().item()
        count += int(weights.sum().item())
    return perplexity(total / max(count, 1))


def train(context: StageContext) -> StageResult:
    config, section = context.config, context.config.eval
    accelerator = make_accelerator()
    set_seed(config.seed)
    device = accelerator.device
    reference_dir = context.inputs[config.policy_stage]
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    reward_dir = context.inputs["reward"]
    policies = {config.policy_stage: reference_dir}
    if "ppo" in context.inputs:
        policies["ppo"] = context.inputs["ppo"]

    conversations = held_out_conversations(context)
    token_cache = context.run_dir / "cache" / "chat_tokens"
    with accelerator.main_process_first():  # rendered once, by the main process on all cores
        queries = query_ids(tokenizer, conversations, token_cache)
    usable = [(conversation, ids) for conversation, ids in zip(conversations, queries) if len(ids) <= section.max_prompt_length]
    usable = usable[: section.num_prompts]
    conversations, prompts = [c for c, _ in usable], [ids for _, ids in usable]

    # Eval trains nothing, so under any engine each process holds whole models and runs them itself.
    with whole_model_init():
        judges = {"reward": TokenScorer(load_reward_model(reward_dir)).eval().to(device)}
        if section.judge_reward_model:
            judges["judge"] = TokenScorer(load_reward_model(section.judge_reward_model)).eval().to(device)
        reference = load_causal_lm(reference_dir).eval().to(device)

    results, metrics = {}, {"prompts": len(prompts)}
    for name, folder in policies.items():
        with whole_model_init():
            policy = reference if folder == reference_dir else load_causal_lm(folder).eval().to(device)
        out = answer(policy, reference, reward_model_function(judges["reward"]), tokenizer, prompts, section, accelerator, config.seed)
        if "judge" in judges:
            out["judge_scores"] = rescore(judges["judge"], tokenizer, prompts, out["replies"], device)
        results[name] = out
        metrics[f"{name}/score"] = out["scores"].mean().item()
        metrics[f"{name}/kl"] = out["kl"].mean().item()
        metrics.update({f"{name}/{k}": v for k, v in length_stats(out["lengths"]).items()})
        metrics[f"{name}/perplexity"] = held_out_perplexity(policy, tokenizer, conversations, section.max_prompt_length + section.response_length, section.batch_size, device)
        if "judge_scores" in out:
            metrics[f"{name}/judge_score"] = out["judge_scores"].mean().item()
    if "ppo" in results:
        baseline = results[config.policy_stage]
        metrics["win_rate"] = win_rate(results["ppo"]["scores"], baseline["scores"])
        if "judge" in judges:
            metrics["judge_win_rate"] = win_rate(results["ppo"]["judge_scores"], baseline["judge_scores"])
    if section.preferences is not None:
        groups, _ = normalize_preferences(load_source(section.preferences), ranking_is=section.preferences.ranking_is,
                                          on_bad_row=section.on_bad_row, max_bad_fraction=section.max_bad_fraction,
                                          source=section.preferences.path or section.preferences.hub, config_section="eval")
        reward_metrics = evaluate_preferences(judges["reward"], encode_groups(groups, tokenizer, section.max_prompt_length + section.response_length),
                                              tokenizer.pad_token_id, section.batch_size, accelerator)
        metrics["reward_accuracy"] = reward_metrics["accuracy"]
        metrics["reward_pairs"] = reward_metrics["pairs"]

    if context.is_main:
        context.output_dir.mkdir(parents=True, exist_ok=True)
        (context.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with open(context.output_dir / "samples.jsonl", "w") as handle:
            for index, conversation in enumerate(conversations):
                row = {"prompt": prompt_of(conversation)}
                for name, out in results.items():
                    row[f"{name}_reply"] = out["replies"][index]
                    row[f"{name}_score"] = float(out["scores"][index])
                handle.write(json.dumps(row) + "\n")
        context.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=0)
        print_table(metrics, list(results))
    return StageResult(context.output_dir, metrics)


@torch.no_grad()
def rescore(scorer, tokenizer, prompts, replies, device) -> torch.Tensor:
    """A judge's scores for (prompt, reply) pairs, each reply ending with EOS as in RL."""
    sequences = [p + list(tokenizer(r, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id] for p, r in zip(prompts, replies)]
    ids, mask = pad_batch(sequences, tokenizer.pad_token_id, side="right")
    return at_last_token(scorer(ids.to(device), mask.to(device)), mask.to(device)).cpu()


def print_table(metrics: dict, policies: list[str]) -> None:
    """The comparison as a table on the console (the stage's log)."""
    keys = sorted({key.split("/", 1)[1] for key in metrics if "/" in key})
    print("\n" + "metric".ljust(16) + "".join(name.rjust(12) for name in policies))
    for key in keys:
        print(key.ljust(16) + "".join(f"{metrics.get(f'{name}/{key}', float('nan')):12.4g}" for name in policies))
    for key in ("win_rate", "judge_win_rate", "reward_accuracy"):
        if key in metrics:
            print(f"{key}: {metrics[key]:.3f}")


if __name__ == "__main__":
    run_stage("eval", train)
