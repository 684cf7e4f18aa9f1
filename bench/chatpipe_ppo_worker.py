"""One chatpipe RL run for bench/ppo_vs_trl.py, in its own process (so its peak memory is its own).

    .venv/bin/python bench/chatpipe_ppo_worker.py CONFIG.json     # prints one JSON object

Runs stages.ppo.trainer.RLTrainer directly (no manifest, no tracker) on the models and prompts the
driver prepared, with the estimator (ppo, rloo, grpo) the config names and any `options` (flat
`ppo` keys, e.g. {"loss_aggregation": "sequence_mean"}) on top of the shared settings. Generation
time is read by wrapping the sampler the experience maker calls; chatpipe's code is not changed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

from ppo_bench_common import (  # noqa: E402
    GarbageCollectionTimer, current_rss_mb, emit, environment, first_and_last, held_out_score, left_pad, load_models,
    peak_rss_mb, profiled, read_config,
)


def main() -> None:
    config = read_config()
    sys.stdout = sys.stderr  # anything a library prints stays off the JSON answer
    import json

    import torch
    from accelerate import Accelerator

    from pipeline.config import PPOConfig, nest_ppo_keys
    from reward_model.model import TokenScorer
    from reward_model.functions import reward_model_function
    from stages.ppo import rollout as rollout_module
    from stages.ppo.trainer import RLTrainer

    folder, settings, estimator = Path(config["folder"]), config["settings"], config["estimator"]
    prompts = json.loads((folder / "prompts.json").read_text())
    k = settings["samples_per_prompt"] if estimator != "ppo" else 1

    # ------------------------------------------------------------------------------- models
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    torch.manual_seed(config["run_seed"])  # sampling and shuffling; the models and held-out samples use settings["seed"]
    tokenizer, policy, reference, value_model, reward_model = load_models(folder, value=estimator == "ppo")
    section = PPOConfig.model_validate(nest_ppo_keys({
        "prompts": {"path": "data/samples/hh_harmless_1000.jsonl"},  # unused here: prompts come prepared
        "estimator": estimator, "samples_per_prompt": k,
        "total_episodes": settings["episodes"], "rollout_batch_size": settings["rollout_batch_size"],
        "num_mini_batches": settings["num_mini_batches"], "micro_batch_size": settings["micro_batch_size"],
        "ppo_epochs": settings["ppo_epochs"], "response_length": settings["response_length"],
        "temperature": settings["temperature"], "kl_coef": settings["kl_coef"],
        "missing_eos_penalty": "subtract" if settings["missing_eos_penalty"] else "none",
        "missing_eos_value": settings["missing_eos_penalty"] or 0.0,
        "normalize_scores": False,  # TRL optimises the raw reward-model score
        "whiten_advantages": True, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95,
        "policy_learning_rate": settings["learning_rate"], "value_learning_rate": settings["learning_rate"],
        "lr_schedule": "linear", "max_grad_norm": settings["chatpipe_max_grad_norm"],
        **config.get("options", {}),
    })[0])
    rollouts = section.sampling.total_episodes // section.sampling.rollout_batch_size
    prompts_per_rollout = section.sampling.rollout_batch_size // k
    accelerator = Accelerator(cpu=True)
    value = TokenScorer(value_model) if value_model is not None else None
    trainer = RLTrainer(
        policy, reference, value, reward_model_function(TokenScorer(reward_model)), tokenizer, section, accelerator,
        total_updates=rollouts * section.algorithm.ppo_epochs * section.algorithm.num_mini_batches, seed=config["run_seed"],
    )
    optimizer_steps = [0]
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    inner.register_step_post_hook(lambda *_: optimizer_steps.__setitem__(0, optimizer_steps[0] + 1))
    generation_seconds = [0.0]
    generate = rollout_module.sample_responses

    def timed_generate(*args, **kwargs):
        started = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            generation_seconds[0] += time.perf_counter() - started

    rollout_module.sample_responses = timed_generate

    evaluation = dict(response_length=section.sampling.response_length, temperature=section.sampling.temperature, seed=settings["seed"] + 1,
                      samples_per_prompt=settings["eval_samples_per_prompt"])
    before = held_out_score(policy, reward_model, tokenizer, prompts["eval"], reference=reference, **evaluation)
    rss_before_training = current_rss_mb()

    # --------------------------------------------------------------------------------- loop
    history = []
    collector = GarbageCollectionTimer()
    cpu_started = time.process_time()
    started = time.perf_counter()
    with profiled(config.get("profile")):
        for rollout in range(rollouts):
            chosen = prompts["train"][rollout * prompts_per_rollout:(rollout + 1) * prompts_per_rollout]
            query_ids, query_mask = left_pad([ids for ids in chosen for _ in range(k)], tokenizer.pad_token_id)
            metrics, _ = trainer.step(query_ids, query_mask)
            history.append(metrics)
    wall = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    gc_seconds = collector.seconds
    after = held_out_score(policy, reward_model, tokenizer, prompts["eval"], reference=reference, **evaluation)
    first, last = first_and_last([h["objective/raw_scores"] for h in history])

    emit({
        "side": "chatpipe", "estimator": estimator, "samples_per_prompt": k, **environment(),
        "episodes": trainer.episode, "rollouts": rollouts, "optimizer_steps": optimizer_steps[0],
        "wall_seconds": wall, "cpu_seconds": cpu_seconds,
        "gc_seconds": gc_seconds, "gc_collections": collector.collections,
        "rollout_seconds": sum(h["time/rollout"] for h in history),
        "generation_seconds": generation_seconds[0],
        "update_seconds": sum(h["time/update"] for h in history),
        "generated_tokens": sum(h["val/response_length"] * section.sampling.rollout_batch_size for h in history),
        "train_score_first": first, "train_score_last": last,
        "kl_last": after["kl"], "options": config.get("options", {}),
        "policy_grad_norm": sum(h.get("policy/grad_norm", 0.0) for h in history) / len(history),
        "eval_before": before, "eval_after": after,
        "rss_before_training_mb": rss_before_training, "peak_rss_mb": peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
