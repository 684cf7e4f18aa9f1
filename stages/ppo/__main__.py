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
from dataclasses import dataclass

import torch
from accelerate.utils import set_seed
from transformers import AutoTokenizer

from data.held_out import write_held_out
from pipeline.errors import ConfigError
from pipeline.models.checkpoints import load_causal_lm, write_adapter_note
from pipeline.models.lora import add_lora_adapters
from pipeline.orchestration.stage import StageContext, StageResult, resolve_mixed_precision, run_stage
from pipeline.training.distributed import engine_of, make_accelerator
from pipeline.training.loop import Cadence, fit, save_final_model, step_indices
from pipeline.evaluation.comparison import (
    length_controlled_win_rate,
    length_differences,
    outcomes,
    prompt_resamples,
    win_rate,
)
from pipeline.training.state import Checkpointer
from reward_model.functions import (
    conservative_reward_function,
    ensemble_members,
    programmable_reward_function,
    reward_model_function,
)
from reward_model.judges import JudgePanel, judge_folders
from reward_model.model import TokenScorer, load_reward_model
from reward_model.statistics import ScoreStatistics
from stages.ppo.prompts import left_padded, load_prompts
from stages.ppo.trainer import PolicyEvaluation, RLTrainer, decode_samples, evaluate_policy

BEST_NAME = "best"  # RUN_DIR/ppo/best: the policy select_by prefers so far


def train(context: StageContext) -> StageResult:
    config, section = context.config, context.config.ppo
    policy_dir = context.inputs[config.policy_stage]
    reward_stats = reward_statistics(context)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)

    # ---------------------------------------------------------------------------------- setup
    accelerator = make_accelerator(resolve_mixed_precision(section.launch.mixed_precision))
    engine = engine_of(accelerator)
    set_seed(config.seed)
    shape = RolloutShape.of(section, accelerator.num_processes)
    cadence = Cadence(shape.rollouts, log_every=1, eval_every=section.eval_every, save_every=section.save_every,
                      samples_every=section.sample_table_every)

    # ----------------------------------------------------------------------------------- data
    with accelerator.main_process_first():  # rendered once, by the main process on all cores
        prompts = load_prompts(
            section.data, tokenizer, context.run_dir / "cache" / "datasets", config.seed,
            token_cache=context.run_dir / "cache" / "chat_tokens",
        )
    held_out, eval_batches = held_out_batches(prompts.held_out[: section.eval_prompts], accelerator, tokenizer, shape)

    # --------------------------------------------------------------------------------- models
    trainer, frozen = build_trainer(context, tokenizer, accelerator, shape, reward_stats)
    panel = JudgePanel.load(judge_folders(context.inputs["judges"])) if "judges" in context.inputs else None
    for judge in panel.judges if panel is not None else []:  # never trained against; placed like the reward model
        engine.place_frozen(judge.scorer)
    if section.algorithm.estimator == "ppo" and not engine.clips_groups_apart:  # a value model beside the policy
        accelerator.print(f"ppo: {engine.name} clips the policy's and the value model's gradients together "
                          f"(one norm, at most {section.algorithm.max_grad_norm}), not apart as other engines do")
    held = held_fractions(engine, trainer, frozen, panel)

    # ----------------------------------------------------------------------------------- loop
    lora_save = section.lora.save if section.lora is not None else None
    curve = EvaluationCurve(context, trainer, eval_batches, panel, lora_save, shape.rollouts, reward_stats)
    # The policy and value model travel in one prepared module; each keeps its own folder.
    checkpointer = Checkpointer(
        context.stage_dir / "checkpoints", accelerator, section.keep_checkpoints,
        parts={"policy": "policy", "value": "value.pretrained_model"}, components={"trainer": trainer, "evaluations": curve},
    )
    step = RolloutStep(context, trainer, cadence, prompts.train, shape)
    result = fit("ppo", accelerator, step, checkpointer, context.tracker, cadence,
                 evaluate=curve.evaluate, on_evaluated=curve.after_evaluation)

    # ----------------------------------------------------------------------------------- save
    last_eval = curve.save_policy(result.last_eval)
    if accelerator.is_main_process:
        write_held_out(context.output_dir, prompts.held_out_conversations)  # eval's prompts, never trained on
    if accelerator.is_main_process and lora_save == "adapter":
        write_adapter_note(context.output_dir, policy_dir, context.input_digests[config.policy_stage])
    return StageResult(context.output_dir, {
        "estimator": section.algorithm.estimator,
        "world_size": accelerator.num_processes,
        "replicas_in_sync": engine.replicas_in_sync(trainer.model),
        "rollouts": shape.rollouts,
        "episodes": trainer.episode,
        **outcome_metrics(result.first_eval, last_eval, trainer),
        "selected_rollout": curve.selection.step if section.select_by != "last" else shape.rollouts,
        "stopped_early_at": result.stopped_early_at,
        "eval_prompts": len(held_out),
        **prompts.counts,
        **held,
        "resumed_from_step": result.resumed_from,
    })


@dataclass(frozen=True)
class RolloutShape:
    """How many rollouts, and each process's share of a rollout's episodes and prompts."""

    rollouts: int
    local_episodes: int
    local_prompts: int
    samples_per_prompt: int

    @classmethod
    def of(cls, section, world: int) -> RolloutShape:
        sampling = section.sampling
        if sampling.rollout_batch_size % (world * sampling.samples_per_prompt):
            raise ConfigError(
                f"ppo.sampling.rollout_batch_size={sampling.rollout_batch_size} must split evenly over {world} process(es) "
                f"x samples_per_prompt={sampling.samples_per_prompt}"
            )
        local_episodes = sampling.rollout_batch_size // world
        return cls(max(1, sampling.total_episodes // sampling.rollout_batch_size), local_episodes,
                   local_episodes // sampling.samples_per_prompt, sampling.samples_per_prompt)


def held_out_batches(held_out: list, accelerator, tokenizer, shape: RolloutShape) -> tuple[list, list]:
    """(the held-out prompts every process scores together, this process's batches of them).

    An equal share per process: under sharding engines scoring is a collective, so every process
    scores the same number of batches (at most world - 1 prompts are left out).
    """
    world = accelerator.num_processes
    held_out = held_out[: len(held_out) - len(held_out) % world]
    mine = held_out[accelerator.process_index :: world]
    size = shape.local_episodes
    return held_out, [left_padded(mine[i : i + size], tokenizer.pad_token_id) for i in range(0, len(mine), size)]


def build_trainer(context: StageContext, tokenizer, accelerator, shape: RolloutShape,
                  reward_stats: ScoreStatistics) -> tuple[RLTrainer, dict]:
    """The trainer over the policy (with LoRA if set), its reference, the value model and the
    reward function; and {name: frozen model} of the reward model, reference and ensemble members."""
    config, section = context.config, context.config.ppo
    policy_dir, reward_dir = context.inputs[config.policy_stage], context.inputs.get("reward")
    policy = load_causal_lm(policy_dir)
    reference, reference_context = None, None
    if section.lora is not None:
        policy = add_lora_adapters(policy, section.lora, dropout=0.0)  # PPO runs with every dropout off
        reference_context = policy.disable_adapter  # one copy of the weights: adapter off = SFT policy
    else:
        reference = load_causal_lm(policy_dir)
    value = TokenScorer(load_reward_model(reward_dir)) if section.algorithm.estimator == "ppo" else None
    reward_model = TokenScorer(load_reward_model(reward_dir)) if section.reward.model else None
    reward_fn, members = reward_model_function(reward_model) if reward_model is not None else None, []
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
    if section.reward.functions:  # the programmable rewards, weighed with the model's standardised score
        normalised = section.reward.normalize_scores and reward_stats.std > 0  # the units the rollout normalises with
        reward_fn = programmable_reward_function(
            section.reward.functions, tokenizer, reward_fn, section.reward.model_weight,
            score_mean=reward_stats.mean if normalised else 0.0, score_std=reward_stats.std if normalised else 1.0,
        )
    trainer = RLTrainer(
        policy, reference, value, reward_fn, tokenizer, section, accelerator,
        score_mean=reward_stats.mean, score_std=reward_stats.std,
        length_trend=(reward_stats.length_slope, reward_stats.length_mean),
        total_updates=shape.rollouts * section.algorithm.ppo_epochs * section.algorithm.num_mini_batches,
        seed=config.seed, reference_context=reference_context, reward_model=reward_model,
    )
    for member in members:  # placed like the reward model (the reward function holds the modules)
        engine_of(accelerator).place_frozen(member)
    return trainer, {"reward": reward_model, "reference": reference}


def reward_statistics(context: StageContext) -> ScoreStatistics:
    """The reward model's held-out score statistics; mean 0 and std 1 (the functions' own units) without one."""
    if "reward" in context.inputs:
        return ScoreStatistics.read(context.inputs["reward"])
    return ScoreStatistics(mean=0.0, std=1.0)


def held_fractions(engine, trainer: RLTrainer, frozen: dict, panel: JudgePanel | None) -> dict[str, float]:
    """What each process holds of each model: 1.0 whole, about 1/N sharded over N processes."""
    held = {"held/trained": engine.held_fraction(trainer.model)}
    held.update({f"held/{name}": engine.held_fraction(model) for name, model in frozen.items() if model is not None})
    if panel is not None:
        held["held/judges"] = sum(engine.held_fraction(judge.scorer) for judge in panel.judges) / len(panel.judges)
    return held


def outcome_metrics(initial_eval: dict, last_eval: dict, trainer: RLTrainer) -> dict:
    """The stage's verdict in the manifest: the SFT policy's score, the final one, KL and the judges'."""
    return {
        "initial_score": initial_eval["score"],
        "score": last_eval["score"],
        "score_gain": last_eval["score"] - initial_eval["score"],
        "kl": last_eval["kl"],
        "eos_fraction": last_eval["eos_fraction"],
        "response_length": last_eval["response_length"],
        "kl_coef": trainer.kl_controller.value,
        **{key: last_eval[key] for key in JUDGED_KEYS if key in last_eval},
    }


class RolloutStep:
    """fit's step for RL: one rollout over this process's prompts and its PPO (RLOO, GRPO) updates."""

    def __init__(self, context: StageContext, trainer: RLTrainer, cadence: Cadence, train_prompts: list, shape: RolloutShape):
        self.context, self.trainer, self.cadence, self.train_prompts, self.shape = context, trainer, cadence, train_prompts, shape
        self.model, self.optimizer, self.scheduler = trainer.model, trainer.optimizer, trainer.scheduler

    def start(self) -> None:
        pass  # the trainer puts the model in eval mode to sample and train mode to update

    def queries(self, rollout: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's prompts for a rollout, each repeated samples_per_prompt times in a row."""
        accelerator, seed = self.trainer.accelerator, self.context.config.seed
        [indices] = step_indices(rollout, accelerator, accumulation=1, size=self.shape.local_prompts,
                                 examples=len(self.train_prompts), seed=seed)
        chosen = [self.train_prompts[i] for i in indices for _ in range(self.shape.samples_per_prompt)]
        return left_padded(chosen, self.trainer.tokenizer.pad_token_id)

    def step(self, index: int, log: bool) -> dict[str, float]:
        metrics, experience = self.trainer.step(*self.queries(index))
        if self.cadence.samples(index + 1):
            log_samples(self.context, decode_samples(self.trainer.tokenizer, experience, experience.raw_scores)[:8], index + 1)
        return metrics

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"score": f"{metrics['objective/raw_scores']:.3f}", "kl": f"{metrics['objective/kl']:.2f}"}


class EvaluationCurve:
    """The held-out evaluations: the reward model's and the judges' curve, the SFT policy's replies
    they are compared with, and the policy select_by keeps (RUN_DIR/ppo/best). A checkpoint component."""

    def __init__(self, context: StageContext, trainer: RLTrainer, eval_batches: list, panel: JudgePanel | None,
                 lora_save: str | None, rollouts: int, reward_stats: ScoreStatistics):
        self.context, self.trainer, self.eval_batches, self.panel, self.lora_save = context, trainer, eval_batches, panel, lora_save
        self.rollouts = rollouts
        self.section, self.seed = context.config.ppo, context.config.seed
        self.reward_stats = reward_stats
        self.baseline = None  # the SFT policy's per-prompt judges' scores and lengths, which later evaluations are compared with
        self.selection = Selection()

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "selection": self.selection.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.baseline, self.selection = state["baseline"], Selection(**state["selection"])

    def evaluate(self) -> dict[str, float]:
        evaluation = evaluate_policy(self.trainer, self.eval_batches, self.seed, self.panel)
        metrics = dict(evaluation.metrics)
        if self.reward_stats.std > 0:  # the proxy in its own standard units, beside the judges' (already standardised)
            metrics["score_standardized"] = (metrics["score"] - self.reward_stats.mean) / self.reward_stats.std
        if evaluation.judges is not None:
            if self.baseline is None:  # step 0: the SFT policy itself
                self.baseline = {"judges": evaluation.judges.tolist(), "lengths": evaluation.lengths.tolist()}
            metrics.update(judged_against_baseline(evaluation, self.baseline, self.seed))
        return metrics

    def after_evaluation(self, step: int, metrics: dict[str, float]) -> bool:
        """Keep the policy if select_by prefers it; True (stop) when it has not improved for early_stop_patience evaluations."""
        self.keep_if_best(step, metrics)
        patience = self.section.early_stop_patience
        stop = patience is not None and self.selection.evaluations_since(step, self.section.eval_every) >= patience
        if stop and step < self.rollouts:
            self.trainer.accelerator.print(
                f"ppo: stopping early at rollout {step}: {self.section.select_by} has not improved on rollout "
                f"{self.selection.step} for {patience} evaluations"
            )
        return stop

    def keep_if_best(self, step: int, metrics: dict[str, float]) -> None:
        """Collective: save the policy as RUN_DIR/ppo/best when select_by's figure beats every earlier one."""
        section, accelerator = self.section, self.trainer.accelerator
        if section.select_by == "last" or not self.selection.improves(metrics[SELECTION_KEYS[section.select_by]]):
            return
        self.selection.record(step, metrics[SELECTION_KEYS[section.select_by]], metrics)
        staging = self.context.stage_dir / f"{BEST_NAME}.tmp"
        save_final_model(accelerator, self.trainer.model, staging, self.trainer.tokenizer, part="policy", lora_save=self.lora_save)
        if accelerator.is_main_process:  # renamed into place whole: a kill leaves the previous best intact
            best = self.context.stage_dir / BEST_NAME
            if best.exists():
                shutil.rmtree(best)
            staging.rename(best)
        accelerator.wait_for_everyone()

    def save_policy(self, last_eval: dict[str, float]) -> dict[str, float]:
        """Collective: the final policy (the last, or the one select_by kept) as the stage's output; its evaluation."""
        accelerator, output_dir = self.trainer.accelerator, self.context.output_dir
        if self.section.select_by == "last":
            save_final_model(accelerator, self.trainer.model, output_dir, self.trainer.tokenizer, part="policy", lora_save=self.lora_save)
            return last_eval
        if accelerator.is_main_process:  # the policy the judges preferred
            shutil.copytree(self.context.stage_dir / BEST_NAME, output_dir)
        accelerator.wait_for_everyone()
        return self.selection.metrics


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
