"""One TRL DPO run for bench/dpo_vs_trl.py, in the main venv and its own process.

    .venv/bin/python bench/trl_dpo_worker.py CONFIG.json     # prints one JSON object

`trl.DPOTrainer` from the TRL the project installs, on the SFT checkpoint and the training pairs
the driver prepared, at chatpipe's settings: the pairs as TRL's standard prompt / chosen /
rejected text, rendered by the driver with the checkpoint's chat template (it checked, with TRL's
own tokenizing function, that TRL gets exactly the token ids chatpipe trains on), loss sigmoid, the same beta, batch, learning rate,
cosine schedule with the same warmup steps, max_grad_norm, epochs and max_length (no pair is
longer, so neither side truncates). The model is passed by path, as TRL's docs do, so TRL loads
its own reference copy; with `precompute_ref_log_probs` it scores the reference once in the
trainer's constructor instead and holds no reference model while training.

Settings TRL's DPOConfig defaults differently from chatpipe, set to chatpipe's here:
gradient_checkpointing off (TRL: on), bf16 off (TRL: on where supported; both sides fp32 on CPU).
Everything else is TRL's default: fused AdamW (eps 1e-8, as chatpipe's), logging every 10 steps
(chatpipe's log_every is 10 too), dropout disabled.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from ppo_bench_common import current_rss_mb, emit, environment, peak_rss_mb, profiled, read_config  # noqa: E402


def main() -> None:
    started_process = time.perf_counter()
    config = read_config()
    sys.stdout = sys.stderr  # TRL's printer callback stays off the JSON answer
    import json

    import torch

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    settings = config["settings"]
    pairs = json.loads(Path(config["pairs"]).read_text())["train_texts"]
    policy_dir = config["policy"]
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    train = Dataset.from_dict({key: [pair[key] for pair in pairs] for key in ("prompt", "chosen", "rejected")})

    args = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, seed=config["run_seed"],
        data_seed=config["run_seed"], dataloader_num_workers=0, model_init_kwargs={"dtype": torch.float32},
        per_device_train_batch_size=settings["batch"], gradient_accumulation_steps=1,
        learning_rate=settings["learning_rate"], num_train_epochs=settings["epochs"], lr_scheduler_type="cosine",
        warmup_steps=config["warmup_steps"], max_grad_norm=settings["max_grad_norm"], weight_decay=0.0,
        beta=settings["beta"], loss_type=["sigmoid"], max_length=settings["max_length"],
        precompute_ref_log_probs=config["precompute_ref_log_probs"],
    )
    reference_seconds = [0.0]
    precompute = trl.DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return precompute(self, *args, **kwargs)
        finally:
            reference_seconds[0] += time.perf_counter() - started

    trl.DPOTrainer._precompute_ref_logps = timed_precompute
    rss_before = current_rss_mb()
    started = time.perf_counter()
    trainer = trl.DPOTrainer(model=policy_dir, args=args, train_dataset=train, processing_class=tokenizer)
    setup_seconds = time.perf_counter() - started  # loading both models, tokenizing, and the precompute pass if set

    optimizer_steps = [0]

    class CountSteps(TrainerCallback):
        def on_optimizer_step(self, *_, **__):
            optimizer_steps[0] += 1

    trainer.add_callback(CountSteps())
    started = time.perf_counter()
    with profiled(config.get("profile")):
        output = trainer.train()
    loop_seconds = time.perf_counter() - started
    started = time.perf_counter()
    out = Path(config["output"])
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    save_seconds = time.perf_counter() - started
    emit({
        "side": "trl", **environment(), "trl": trl.__version__,
        "precompute_ref_log_probs": config["precompute_ref_log_probs"],
        "steps": optimizer_steps[0], "pairs": optimizer_steps[0] * settings["batch"], "train_pairs": len(train),
        "loop_seconds": loop_seconds, "setup_seconds": setup_seconds,
        "reference_seconds": reference_seconds[0], "save_seconds": save_seconds,
        "worker_seconds": time.perf_counter() - started_process,
        "train_loss_mean": output.training_loss,
        "rss_before_stage_mb": rss_before, "peak_rss_mb": peak_rss_mb(),
        "policy": str(out),
    })


if __name__ == "__main__":
    main()
