"""One TRL GRPO or RLOO run for bench/ppo_vs_trl.py, in the main venv and its own process.

    .venv/bin/python bench/trl_rl_worker.py CONFIG.json     # prints one JSON object

`trl.GRPOTrainer` or `trl.RLOOTrainer` from the TRL the project installs, on the models and
prompts the driver prepared, at the settings chatpipe's GRPO and RLOO get:

- a rollout is `steps_per_generation` x `per_device_train_batch_size` completions (the driver's
  rollout batch, `num_generations` per prompt), reused for `num_iterations` passes (chatpipe's
  ppo_epochs), one optimiser step per minibatch: the same 128 steps for 256 episodes;
- the reward is the known one (target tokens in the completion), computed by a reward function
  that also runs the reward model's transformer on the prompt and completion ids, as chatpipe's
  reward function does;
- GRPO gets `loss_type` from the settings (`bnpo` by default: the token mean per minibatch);
  RLOO has one loss (the sequence's likelihood ratio, clipped per sequence).

Prompts are given as messages, so TRL renders them with the same chat template to the same ids.
Rollout time is the time inside `_generate_and_score_completions`; the update is the rest.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from ppo_bench_common import (  # noqa: E402
    GarbageCollectionTimer, current_rss_mb, emit, environment, first_and_last, held_out_score, left_pad, load_models,
    peak_rss_mb, profiled, read_config,
)


def main() -> None:
    config = read_config()
    sys.stdout = sys.stderr  # TRL's printer callback and rich tables stay off the JSON answer
    import json

    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    folder, settings, estimator = Path(config["folder"]), config["settings"], config["estimator"]
    prompts = json.loads((folder / "prompts.json").read_text())
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    torch.manual_seed(config["run_seed"])
    tokenizer, policy, reference, _, reward_model = load_models(folder, value=False)
    tokenizer.padding_side = "left"

    k = settings["samples_per_prompt"]
    micro = settings["rollout_batch_size"] // settings["num_mini_batches"]
    prompt_count = settings["episodes"] // k
    backbone = getattr(reward_model, reward_model.base_model_prefix)
    train_scores: list[float] = []

    def known_reward(prompts, completions, completion_ids, prompt_ids, **_):
        """Target tokens in each completion, read where a reward model is read (its last real token)."""
        sequences = [list(query) + list(reply) for query, reply in zip(prompt_ids, completion_ids)]
        ids, mask = left_pad(sequences, tokenizer.pad_token_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            scores = backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state[:, -1, 0]
        train_scores.append(float(scores.mean()))
        return scores.tolist()

    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"trl-{estimator}-"), report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, seed=config["run_seed"],
        per_device_train_batch_size=micro, gradient_accumulation_steps=1, steps_per_generation=settings["num_mini_batches"],
        num_generations=k, num_iterations=settings["ppo_epochs"], max_completion_length=settings["response_length"],
        temperature=settings["temperature"], top_k=0, top_p=1.0, beta=settings["kl_coef"], epsilon=0.2,
        learning_rate=settings["learning_rate"], lr_scheduler_type="linear", warmup_steps=0, num_train_epochs=1,
        max_grad_norm=settings["chatpipe_max_grad_norm"], log_completions=False,
    )
    if estimator == "grpo":
        args = trl.GRPOConfig(**common, loss_type=settings.get("trl_grpo_loss_type", "bnpo"))
        trainer_class = trl.GRPOTrainer
    else:
        args = trl.RLOOConfig(**common)
        trainer_class = trl.RLOOTrainer
    messages = prompts["train_messages"][:prompt_count]
    train = Dataset.from_dict({"prompt": messages, "prompt_ids": prompts["train"][:prompt_count]})
    trainer = trainer_class(model=policy, reward_funcs=known_reward, args=args, train_dataset=train, processing_class=tokenizer)

    rollout_seconds, generation_seconds, generated = [0.0], [0.0], [0]
    make_rollout, generate = trainer._generate_and_score_completions, trainer._generate

    def timed_rollout(*args, **kwargs):
        started = time.perf_counter()
        try:
            return make_rollout(*args, **kwargs)
        finally:
            rollout_seconds[0] += time.perf_counter() - started

    def timed_generate(*args, **kwargs):
        started = time.perf_counter()
        output = generate(*args, **kwargs)
        generation_seconds[0] += time.perf_counter() - started
        completion_ids = output[1]
        generated[0] += sum(len(ids) for ids in completion_ids)
        return output

    trainer._generate_and_score_completions, trainer._generate = timed_rollout, timed_generate

    evaluation = dict(response_length=settings["response_length"], temperature=settings["temperature"], seed=settings["seed"] + 1,
                      samples_per_prompt=settings["eval_samples_per_prompt"])
    before = held_out_score(policy, reward_model, tokenizer, prompts["eval"], reference=reference, **evaluation)
    rss_before_training = current_rss_mb()

    optimizer_steps = [0]

    class CountSteps(TrainerCallback):
        def on_optimizer_step(self, *_, **__):
            optimizer_steps[0] += 1

    trainer.add_callback(CountSteps())
    collector = GarbageCollectionTimer()
    cpu_started = time.process_time()
    started = time.perf_counter()
    with profiled(config.get("profile")):
        trainer.train()
    wall = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    after = held_out_score(trainer.model, reward_model, tokenizer, prompts["eval"], reference=reference, **evaluation)
    rollouts = settings["episodes"] // settings["rollout_batch_size"]
    first, last = first_and_last(train_scores)  # one reward call per rollout

    emit({
        "side": "trl", "estimator": estimator, "samples_per_prompt": k, **environment(), "trl": trl.__version__,
        "episodes": settings["episodes"], "rollouts": rollouts, "optimizer_steps": optimizer_steps[0],
        "wall_seconds": wall, "cpu_seconds": cpu_seconds,
        "gc_seconds": collector.seconds, "gc_collections": collector.collections,
        "rollout_seconds": rollout_seconds[0], "generation_seconds": generation_seconds[0],
        "update_seconds": wall - rollout_seconds[0], "generated_tokens": generated[0],
        "train_score_first": first, "train_score_last": last,
        "kl_last": after.get("kl"),
        "eval_before": before, "eval_after": after,
        "rss_before_training_mb": rss_before_training, "peak_rss_mb": peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
