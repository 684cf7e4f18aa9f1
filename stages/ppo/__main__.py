"""RLHF: optimise the SFT policy against the reward model, with a KL penalty to the SFT policy.

    python -m stages.ppo --run-dir runs/tiny
    accelerate launch --num_processes 8 -m stages.ppo --run-dir runs/big

Reads from the manifest the policy (the SFT output; the pretrained model when there is no SFT
stage), the reward model and its held-out reward statistics. The reference is a frozen copy of
the policy (or, with LoRA, the policy with its adapter disabled); the value model starts from the
reward model. `ppo.algorithm.estimator` picks PPO, RLOO or GRPO over the same rollout machinery.
Each rollout: `rollout_batch_size` responses over all processes (stages/ppo/rollout.py), then
`ppo_epochs` passes of `num_mini_batches` optimiser steps (stages/ppo/trainer.py). Held-out
prompts are scored before training (the SFT policy) and every `eval_every` rollouts: by the reward
model PPO optimises and, with a judges stage, by judges it never sees, with the judges' win rate
against the SFT policy's replies raw and at equal length. The two curves side by side are Gao et
al.'s proxy-versus-gold picture: where the reward model's score keeps rising and the judges' stops,
PPO is over-optimising. `ppo.select_by` keeps the policy the judges liked best (and
`early_stop_patience` stops when they stop improving).
Output: RUN_DIR/ppo/final, the policy as a Hugging Face folder.
"""

from __future__ import annotations

import json
import shutil

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from data.held_out import write_held_out
from pipeline.errors import ConfigError
from pipeline.models.checkpoints import load_causal_lm, write_adapter_note
from pipeline.models.lora import add_lora_adapters
from pipeline.orchestration.stage import StageContext, StageResult, resolve_mixed_precision, run_stage
from pipeline.training.distributed import held_fraction, make_accelerator, prepare_frozen, replicas_in_sync, zero_stage
from pipeline.training.loop import Cadence, require_checkpointable, save_final_model, step_indices
from pipeline.evaluation.comparison import (
    length_controlled_win_rate,
    length_differences,
    outcomes,
    prompt_resamples,
    win_rate,
)
from pipeline.training.state import Checkpointer
from reward_model.functions import conservative_reward_function, ensemble_members, reward_model_function
from reward_model.judges import JudgePanel, judge_folders
from reward_model.model import TokenScorer, load_reward_model
from reward_model.statistics import ScoreStatistics
from stages.ppo.prompts import left_padded, load_prompts
from stages.ppo.trainer import PolicyEvaluation, RLTrainer, decode_samples, evaluate_policy

BEST_NAME = "best"  # RUN_DIR/ppo/best: the policy select_by prefers so far


def train(context: StageContext) -> StageResult:
    config, section = context.config, context.config.ppo
    policy_dir, reward_dir = context.inputs[config.policy_stage], context.inputs["reward"]
    reward_stats = ScoreStatistics.read(reward_dir)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)

    # ---------------------------------------------------------------------------------- setup
    accelerator = make_accelerator(resolve_mixed_precision(section.launch.mixed_precision))
    set_seed(config.seed)
    world = accelerator.num_processes
    if section.sampling.rollout_batch_size % (world * section.sampling.samples_per_prompt):
        raise ConfigError(
            f"ppo.sampling.rollout_batch_size={section.sampling.rollout_batch_size} must split evenly over {world} process(es) "
            f"x samples_per_prompt={section.sampling.samples_per_prompt}"
        )
    local_episodes = section.sampling.rollout_batch_size // world
    local_prompts = local_episodes // section.sampling.samples_per_prompt
    rollouts = max(1, section.sampling.total_episodes // section.sampling.rollout_batch_size)
    cadence = Cadence(rollouts, log_every=1, eval_every=section.eval_every, save_every=section.save_every)

    # ----------------------------------------------------------------------------------- data
    with accelerator.main_process_first():  # rendered once, by the main process on all cores
        prompts = load_prompts(
            section.data, tokenizer, context.run_dir / "cache" / "datasets", config.seed,
            token_cache=context.run_dir / "cache" / "chat_tokens",
        )
    train_prompts, held_out = prompts.train, prompts.held_out[: section.eval_prompts]
    # An equal share per process: under sharding engines scoring is a collective, so every process
    # scores the same number of batches (at most world - 1 prompts are left out).
    held_out = held_out[: len(held_out) - len(held_out) % world]
    mine = held_out[accelerator.process_index :: world]
    eval_batches = [left_padded(mine[i : i + local_episodes], tokenizer.pad_token_id) for i in range(0, len(mine), local_episodes)]

    def queries_for(rollout: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's prompts for a rollout, each repeated samples_per_prompt times in a row."""
        [indices] = step_indices(rollout, accelerator, accumulation=1, size=local_prompts, examples=len(train_prompts), seed=config.seed)
        chosen = [train_prompts[i] for i in indices for _ in range(section.sampling.samples_per_prompt)]
        return left_padded(chosen, tokenizer.pad_token_id)

    # --------------------------------------------------------------------------------- models
    policy = load_causal_lm(policy_dir)
    reference, reference_context = None, None
    if section.lora is not None:
        policy = add_lora_adapters(policy, section.lora, dropout=0.0)  # PPO runs with every dropout off
        reference_context = policy.disable_adapter  # one copy of the weights: adapter off = SFT policy
    else:
        reference = load_causal_lm(policy_dir)
    value = TokenScorer(load_reward_model(reward_dir)) if section.algorithm.estimator == "ppo" else None
    reward_model = TokenScorer(load_reward_model(reward_dir))
    reward_fn, members = reward_model_function(reward_model), []
    if section.reward.ensemble_penalty is not None:  # the ensemble's mean less its disagreement
        folders = ensemble_members(reward_dir)
        if not folders:
            raise ConfigError(f"ppo.reward.ensemble_penalty is set but {reward_dir} holds no ensemble; rerun the reward stage "
                              "with reward.ensemble of at least 2 (chatpipe run CONFIG --from reward)")
        members = [TokenScorer(load_reward_model(folder)) for folder in folders]
        reward_fn = conservative_reward_function(
            [reward_model, *members], [reward_stats, *(ScoreStatistics.read(folder) for folder in folders)],
            section.reward.ensemble_penalty,
        )
    trainer = RLTrainer(
        policy, reference, value, reward_fn, tokenizer, section, accelerator,
        score_mean=reward_stats.mean, score_std=reward_stats.std,
        length_trend=(reward_stats.length_slope, reward_stats.length_mean),
        total_updates=rollouts * section.algorithm.ppo_epochs * section.algorithm.num_mini_batches,
        seed=config.seed, reference_context=reference_context, reward_model=reward_model,
    )
    # Judges score the held-out replies at each evaluation, placed like the reward model (sharded
    # under ZeRO-3 and FSDP2); the policy never trains against them.
    for member in members:  # placed like the reward model (the reward function holds the modules)
        prepare_frozen(accelerator, member)
    panel = None
    if "judges" in context.inputs:
        panel = JudgePanel.load(judge_folders(context.inputs["judges"]))
        for judge in panel.judges:
            prepare_frozen(accelerator, judge.scorer)
    if value is not None and zero_stage(accelerator) is not None:
        accelerator.print("ppo: DeepSpeed clips the policy's and the value model's gradients together "
                          f"(one norm, at most {section.algorithm.max_grad_norm}), not apart as other engines do")
    # What each process holds of each model: 1.0 whole, about 1/N under ZeRO-3 and FSDP2 on N processes.
    held = {"held/trained": held_fraction(trainer.model), "held/reward": held_fraction(reward_model)}
    if reference is not None:
        held["held/reference"] = held_fraction(reference)
    if panel is not None:
        held["held/judges"] = sum(held_fraction(judge.scorer) for judge in panel.judges) / len(panel.judges)

    # The policy and value model travel in one prepared module; each keeps its own folder.
    require_checkpointable(accelerator, cadence, "ppo", trainer.model)
    checkpointer = Checkpointer(
        context.stage_dir / "checkpoints", accelerator, section.keep_checkpoints,
        parts={"policy": "policy", "value": "value.pretrained_model"}, generators={"generator": trainer.generator},
    )
    start, resumed_from, initial_eval, selection = 0, None, None, Selection()
    baseline = None  # the SFT policy's per-prompt judges' scores and lengths, which later evaluations are compared with
    restored = checkpointer.restore(trainer.model, trainer.optimizer, trainer.scheduler)
    if restored is not None:
        start = resumed_from = restored.step
        initial_eval = restored.extra.get("initial_eval")
        baseline = restored.extra.get("baseline")
        selection = Selection(**restored.extra.get("selection", {}))
        trainer.episode = restored.state["episode"]
        trainer.kl_controller.load_state_dict(restored.state["kl_controller"])
        accelerator.print(f"ppo: resuming from {restored.path} (rollout {start} of {rollouts}, episode {trainer.episode})")

    def log_eval(step: int) -> dict[str, float]:
        nonlocal baseline
        evaluation = evaluate_policy(trainer, eval_batches, config.seed, panel)
        metrics = dict(evaluation.metrics)
        if reward_stats.std > 0:  # the proxy in its own standard units, beside the judges' (already standardised)
            metrics["score_standardized"] = (metrics["score"] - reward_stats.mean) / reward_stats.std
        if evaluation.judges is not None:
            if baseline is None:  # step 0: the SFT policy itself
                baseline = {"judges": evaluation.judges.tolist(), "lengths": evaluation.lengths.tolist()}
            metrics.update(judged_against_baseline(evaluation, baseline, config.seed))
        context.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        return metrics

    def keep_if_best(step: int, metrics: dict[str, float]) -> None:
        """Collective: save the policy as RUN_DIR/ppo/best when select_by's figure beats every earlier one."""
        if section.select_by == "last" or not selection.improves(metrics[SELECTION_KEYS[section.select_by]]):
            return
        selection.record(step, metrics[SELECTION_KEYS[section.select_by]], metrics)
        staging = context.stage_dir / f"{BEST_NAME}.tmp"
        save_final_model(accelerator, trainer.model, staging, tokenizer, part="policy", lora_save=lora_save)
        if accelerator.is_main_process:  # renamed into place whole: a kill leaves the previous best intact
            best = context.stage_dir / BEST_NAME
            if best.exists():
                shutil.rmtree(best)
            staging.rename(best)
        accelerator.wait_for_everyone()

    # ----------------------------------------------------------------------------------- loop
    lora_save = section.lora.save if section.lora is not None else None
    if start == 0:
        initial_eval = log_eval(0)  # the SFT policy: the baseline RLHF has to beat
        keep_if_best(0, initial_eval)
    last_eval = initial_eval
    progress = tqdm(total=rollouts, initial=start, desc=f"{section.algorithm.estimator}", disable=not accelerator.is_main_process)
    stopped_early_at = None
    for rollout in range(start, rollouts):
        metrics, experience = trainer.step(*queries_for(rollout))
        done = rollout + 1
        context.tracker.log(metrics, step=done)
        progress.update(1)
        progress.set_postfix(score=f"{metrics['objective/raw_scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}")
        if done % section.sample_table_every == 0 or done == rollouts:
            log_samples(context, decode_samples(tokenizer, experience, experience.raw_scores)[:8], done)
        if cadence.evaluate(done):
            last_eval = log_eval(done)
            keep_if_best(done, last_eval)
            patience = section.early_stop_patience
            if patience is not None and done < rollouts and selection.evaluations_since(done, section.eval_every) >= patience:
                stopped_early_at = done
                accelerator.print(f"ppo: stopping early at rollout {done}: {section.select_by} has not improved on rollout "
                                  f"{selection.step} for {patience} evaluations")
                break
        if cadence.save(done):
            checkpointer.save(done, model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler, state={
                "episode": trainer.episode, "kl_controller": trainer.kl_controller.state_dict(),
                "extra": {"initial_eval": initial_eval, "baseline": baseline, "selection": selection.state_dict()},
            })
    progress.close()

    # ----------------------------------------------------------------------------------- save
    if section.select_by == "last":
        save_final_model(accelerator, trainer.model, context.output_dir, tokenizer, part="policy", lora_save=lora_save)
    else:  # the policy the judges preferred
        if accelerator.is_main_process:
            shutil.copytree(context.stage_dir / BEST_NAME, context.output_dir)
        accelerator.wait_for_everyone()
        last_eval = selection.metrics
    if accelerator.is_main_process:
        write_held_out(context.output_dir, prompts.held_out_conversations)  # eval's prompts, never trained on
    if accelerator.is_main_process and lora_save == "adapter":
        write_adapter_note(context.output_dir, policy_dir, context.input_digests[config.policy_stage])
    return StageResult(context.output_dir, {
        "estimator": section.algorithm.estimator,
        "world_size": world,
        "replicas_in_sync": replicas_in_sync(trainer.model, accelerator.device),
        "rollouts": rollouts,
        "episodes": trainer.episode,
        "initial_score": initial_eval["score"],
        "score": last_eval["score"],
        "score_gain": last_eval["score"] - initial_eval["score"],
        "kl": last_eval["kl"],
        "eos_fraction": last_eval["eos_fraction"],
        "response_length": last_eval["response_length"],
        "kl_coef": trainer.kl_controller.value,
        **{key: last_eval[key] for key in JUDGED_KEYS if key in last_eval},
        "selected_rollout": selection.step if section.select_by != "last" else rollouts,
        "stopped_early_at": stopped_early_at,
        "eval_prompts": len(held_out),
        **prompts.counts,
        **held,
        "resumed_from_step": resumed_from,
    })


# What select_by maximises, as logged at each evaluation.
SELECTION_KEYS = {"judges": "judges_score", "judges_length_controlled": "judges_lc_win_rate"}
JUDGED_KEYS = ("judges_score", "judges_win_rate", "judges_lc_win_rate", "score_standardized")


class Selection:
    """The best evaluation so far by select_by's figure (a strict improvement replaces it)."""

    def __init__(self, step: int | None = None, value: float | None = None, metrics: dict | None = None):
        self.step, self.value, self.metrics = step, value, metrics

    def improves(self, value: float) -> bool:
        return self.value is None or value > self.value

    def record(self, step: int, value: float, metrics: dict) -> None:
        self.step, self.value, self.metrics = step, value, dict(metrics)

    def evaluations_since(self, step: int, eval_every: int) -> int:
        return 0 if self.step is None else (step - self.step) // eval_every

    def state_dict(self) -> dict:
        return {"step": self.step, "value": self.value, "metrics": self.metrics}


def judged_against_baseline(evaluation: PolicyEvaluation, baseline: dict, seed: int) -> dict[str, float]:
    """The judges' win rate of this evaluation's replies against the SFT policy's, raw and at equal length.

    One reply per held-out prompt on each side, compared prompt by prompt (the same prompts, in the
    same order, at every evaluation). At step 0 the policy is the SFT policy and every comparison a tie.
    """
    current = evaluation.judges.double().unsqueeze(1)
    reference = torch.tensor(baseline["judges"], dtype=torch.float64).unsqueeze(1)
    outcome = outcomes(current, reference)
    differences = length_differences(evaluation.lengths.unsqueeze(1), torch.tensor(baseline["lengths"]).unsqueeze(1))
    resamples = prompt_resamples(len(outcome), samples=100, seed=seed)  # only the point estimates are used
    return {
        "judges_win_rate": win_rate(outcome, resamples).value,
        "judges_lc_win_rate": length_controlled_win_rate(outcome, differences, resamples).value,
    }


def log_samples(context: StageContext, samples: list[dict], step: int) -> None:
    """A table of responses with their scores: W&B when on, and RUN_DIR/ppo/samples.jsonl."""
    if not context.is_main:
        return
    with open(context.stage_dir / "samples.jsonl", "a") as handle:
        for sample in samples:
            handle.write(json.dumps({"step": step, **sample}) + "\n")
    context.tracker.log_table(
        "samples", ["query", "response", "score"], [[s["query"], s["response"], s["score"]] for s in samples], step=step
    )


if __name__ == "__main__":
    run_stage("ppo", train)
