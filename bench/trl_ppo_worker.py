"""One TRL 1.12 PPO run for bench/ppo_vs_trl.py, in the TRL venv and its own process.

    bench/.venv-trl112/bin/python bench/trl_ppo_worker.py CONFIG.json     # prints one JSON object

`trl.experimental.ppo.PPOTrainer` (the last TRL with a PPO trainer) on the models and prompts the
driver prepared. Its `train()` is one loop with no timers, so the rollout/update split comes from
wrapping three of its module-level helpers on the way in (nothing in TRL is edited):
`batch_generation` starts a rollout, the first `forward` on the policy+value wrapper (not the
reference) starts the update, and `on_step_end` ends it. `get_reward` on the reward model records
the raw training scores.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from ppo_bench_common import (  # noqa: E402
    GarbageCollectionTimer, current_rss_mb, emit, environment, first_and_last, held_out_score, load_models, peak_rss_mb,
    profiled, read_config, response_token_count,
)


def main() -> None:
    config = read_config()
    sys.stdout = sys.stderr  # TRL's printer callback and rich tables stay off the JSON answer
    import json

    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    folder, settings = Path(config["folder"]), config["settings"]
    prompts = json.loads((folder / "prompts.json").read_text())
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    torch.manual_seed(config["run_seed"])  # sampling and shuffling; the models and held-out samples use settings["seed"]
    tokenizer, policy, reference, value_model, reward_model = load_models(folder)
    tokenizer.padding_side = "left"  # DataCollatorWithPadding pads queries; TRL expects them left-padded

    micro = settings["micro_batch_size"]
    rollout_batch = settings["rollout_batch_size"]
    output_dir = tempfile.mkdtemp(prefix="trl-ppo-")
    args = PPOConfig(
        output_dir=output_dir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, seed=config["run_seed"],
        # a rollout is per_device_train_batch_size * gradient_accumulation_steps episodes (one process)
        per_device_train_batch_size=micro, gradient_accumulation_steps=rollout_batch // micro,
        num_mini_batches=settings["num_mini_batches"], num_ppo_epochs=settings["ppo_epochs"],
        total_episodes=settings["episodes"], response_length=settings["response_length"],
        local_rollout_forward_batch_size=settings["trl_rollout_forward_batch_size"],
        stop_token="eos", missing_eos_penalty=settings["missing_eos_penalty"], temperature=settings["temperature"],
        kl_coef=settings["kl_coef"], kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
        gamma=1.0, lam=0.95, whiten_rewards=False, learning_rate=settings["learning_rate"],
        lr_scheduler_type="linear", warmup_steps=0, num_sample_generations=0,
    )
    train = Dataset.from_dict({"input_ids": prompts["train"][: settings["episodes"]]})
    marks: list[tuple[str, float]] = []
    train_scores: list[float] = []
    generated = [0]

    # ---------------------------------------------------------------- instrumentation, by wrapping
    batch_generation, forward, get_reward = module.batch_generation, module.forward, module.get_reward

    def timed_batch_generation(model, queries, *rest, **kwargs):
        marks.append(("rollout", time.perf_counter()))
        query_responses, logits = batch_generation(model, queries, *rest, **kwargs)
        marks.append(("generated", time.perf_counter()))
        generated[0] += response_token_count(query_responses[:, queries.shape[1]:], tokenizer.eos_token_id)
        return query_responses, logits

    def timed_forward(model, *rest, **kwargs):
        if model is not trainer.ref_model and marks and marks[-1][0] == "generated":
            marks.append(("update", time.perf_counter()))
        return forward(model, *rest, **kwargs)

    def recording_get_reward(model, *rest, **kwargs):
        result = get_reward(model, *rest, **kwargs)
        if model is trainer.reward_model:
            train_scores.append(result[1].float())
        return result

    class StepEnd(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append(("end", time.perf_counter()))

    module.batch_generation, module.forward, module.get_reward = timed_batch_generation, timed_forward, recording_get_reward

    trainer = PPOTrainer(
        args=args, processing_class=tokenizer, model=policy, ref_model=reference, reward_model=reward_model,
        value_model=value_model, train_dataset=train, callbacks=[StepEnd()],
    )
    optimizer_steps = [0]
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    inner.register_step_post_hook(lambda *_: optimizer_steps.__setitem__(0, optimizer_steps[0] + 1))

    evaluation = dict(response_length=settings["response_length"], temperature=settings["temperature"], seed=settings["seed"] + 1,
                      samples_per_prompt=settings["eval_samples_per_prompt"])
    before = held_out_score(policy, reward_model, tokenizer, prompts["eval"], reference=reference, **evaluation)
    rss_before_training = current_rss_mb()

    # --------------------------------------------------------------------------------- train
    collector = GarbageCollectionTimer()
    cpu_started = time.process_time()
    started = time.perf_counter()
    with profiled(config.get("profile")):
        trainer.train()
    wall = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    gc_seconds = collector.seconds
    after = held_out_score(trainer.policy_model, reward_model, tokenizer, prompts["eval"], reference=reference, **evaluation)

    # rollout = batch_generation start -> first policy+value forward; update = that -> on_step_end
    rollout_seconds = generation_seconds = update_seconds = 0.0
    times = {}
    for name, moment in marks:
        times[name] = moment
        if name == "end":
            rollout_seconds += times["update"] - times["rollout"]
            generation_seconds += times["generated"] - times["rollout"]
            update_seconds += times["end"] - times["update"]
    rollouts = sum(1 for name, _ in marks if name == "end")
    chunks = max(1, len(train_scores) // max(rollouts, 1))  # reward-model calls per rollout
    per_rollout = [torch.cat(train_scores[i:i + chunks]).mean().item() for i in range(0, len(train_scores), chunks)]
    first, last = first_and_last(per_rollout)

    emit({
        "side": "trl", "estimator": "ppo", "samples_per_prompt": 1, **environment(), "trl": trl.__version__,
        "episodes": trainer.state.episode, "rollouts": rollouts, "optimizer_steps": optimizer_steps[0],
        "wall_seconds": wall, "cpu_seconds": cpu_seconds,
        "gc_seconds": gc_seconds, "gc_collections": collector.collections,
        "rollout_seconds": rollout_seconds, "generation_seconds": generation_seconds,
        "update_seconds": update_seconds, "generated_tokens": generated[0],
        "train_score_first": first, "train_score_last": last,
        "kl_last": next((entry["objective/kl"] for entry in reversed(trainer.state.log_history) if "objective/kl" in entry), None),
        "eval_before": before, "eval_after": after,
        "rss_before_training_mb": rss_before_training, "peak_rss_mb": peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
