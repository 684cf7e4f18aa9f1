"""The GPU check: what issue 29 asks of a lent GPU, in one command that fits one short lease.

    python3 bench/gpu_check.py --output $OUT/gpu_check.jsonl            # one GPU: about 6 min, budget 8
    .venv/bin/python bench/gpu_check.py --cpu-smoke --output /tmp/g.jsonl   # no GPU: the same code at tiny sizes (~1.5 min)
    bash scripts/gpu_check.sh                                            # on a lent machine: the wheels, then this

GPU machines are lent rarely and briefly, so this is prepared and tested here (tests/bench runs
`--cpu-smoke`, which drives every phase's own functions at tiny sizes) and needs one call there.
Phases, in this order; each records its figures or its error, and a failure never stops the next
(its GPU memory is freed first):

- peak: the best bf16 matmul FLOP/s (8192^3) this card gives now: the ceiling MFU is measured
  against, in the same run, not a datasheet figure.
- pretrain: the pretrain stage's optimiser step (bench/pretrain_throughput.py::ChatpipeLoop: the
  stage's OptimizerStep, accelerate, AdamW, schedule, bf16 autocast through `mixed_precision: auto`)
  at configs/gpt2-124m-8gpu.yaml's shape (n_embd 768, 12 layers, 12 heads, block 1024, vocab
  50,304) and per-GPU batch (32 blocks, 2 accumulation steps): tokens/s and MFU (PaLM's FLOPs).
- generation: chatpipe's sampler (pipeline/models/generation.py) against transformers' `generate`
  on the same bf16 model: 64 replies of 128 tokens (one GPU's share of that config's PPO rollout)
  at its temperature, interleaved rounds; tokens/s of each and their ratio.
- ppo: one RLTrainer step at that shape and that config's per-GPU PPO settings (64 responses of
  128 tokens, 4 minibatches of 16, 4 epochs; policy, reference and value model of 124M each,
  built in memory as bench/scaling.py builds its, a synthetic reward): rollout (sampling and
  scoring apart) and update.
- demo: `chatpipe run configs/tiny.yaml` (wandb off), bf16 by `mixed_precision: auto`: every
  stage's status, seconds and peak GPU memory (`peak_gpu_mib`, which each stage records in the
  manifest).
- pretrain_compiled: `pretrain` again with `pretrain.compile: true` (torch.compile, inductor), its
  compilation time apart. Last: compilation is the least predictable cost.

A phase starts only while `--budget` seconds remain (it is then `skipped`); the demo is also
killed when the budget runs out. One JSON object per record goes to stdout and `--output`, each
with the machine (`machine.gpu`), versions and settings (bench/common.py's Reporter); the last is
`summary`, against the issue's targets. Exit 0 when every phase ran, 1 when one failed or was
skipped, 2 without a GPU (and no --cpu-smoke).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO_ROOT, Reporter, device, median, peak_matmul_flops, synchronize, table  # noqa: E402

import torch  # noqa: E402

NAME = "gpu_check"
SHAPE_CONFIG = "configs/gpt2-124m-8gpu.yaml"
DEMO_CONFIG = "configs/tiny.yaml"
PHASES = ("peak", "pretrain", "generation", "ppo", "demo", "pretrain_compiled")
# The targets on a GPU.
TARGET_MFU = 0.45
TARGET_SAMPLER_OVER_HF = 1.0

# --cpu-smoke: the same phases at sizes a 2-core CPU runs in seconds. The 124M config shrunk to
# one layer of width 32 (positions stay 1024, so no sequence-length check changes), PPO to 4
# responses of 8 tokens (per "GPU": the config's rollout is over 8 processes).
SMOKE_SHAPE = [
    "model.config.n_embd=32", "model.config.n_layer=1", "model.config.n_head=2", "tokenizer.vocab_size=512",
    "pretrain.block_size=32", "pretrain.per_device_batch_size=2", "pretrain.gradient_accumulation_steps=1",
    "ppo.sampling.rollout_batch_size=32", "ppo.sampling.response_length=8", "ppo.algorithm.num_mini_batches=2",
    "ppo.algorithm.micro_batch_size=2", "ppo.algorithm.ppo_epochs=1",
]
# The demo's every stage at a few steps on a hidden-32 model (and the smallest data that still
# gives each stage a train and a held-out split).
SMOKE_DEMO = [
    "tokenizer.vocab_size=400", "tokenizer.max_chars=200000",
    "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2",
    "pretrain.data=[{path: data/samples/tinyshakespeare.txt, max_rows: 2000}]",
    "pretrain.block_size=32", "pretrain.per_device_batch_size=4", "pretrain.max_steps=2", "pretrain.warmup_steps=1",
    "pretrain.eval_every=2", "pretrain.eval_batches=1", "pretrain.save_every=2", "pretrain.log_every=1",
    "sft.data.max_rows=40", "sft.max_length=96", "sft.max_steps=2", "sft.per_device_batch_size=4", "sft.eval_every=2",
    "sft.save_every=2", "sft.log_every=1", "sft.sample_prompts=1", "sft.sample_max_new_tokens=4",
    "reward.data.max_rows=60", "reward.max_length=96", "reward.max_steps=2", "reward.prompts_per_batch=2",
    "reward.eval_every=2", "reward.save_every=2",
    "judges.data.max_rows=60", "judges.count=1", "judges.max_length=96", "judges.max_steps=2",
    "judges.prompts_per_batch=2", "judges.eval_every=2", "judges.save_every=2",
    "ppo.data.prompts.max_rows=60", "ppo.data.max_prompt_length=64", "ppo.sampling.total_episodes=8",
    "ppo.sampling.rollout_batch_size=4", "ppo.sampling.response_length=8", "ppo.algorithm.micro_batch_size=2",
    "ppo.algorithm.ppo_epochs=1", "ppo.eval_prompts=4", "ppo.eval_every=2", "ppo.save_every=2", "ppo.sample_table_every=2",
    "eval.num_prompts=4", "eval.samples_per_prompt=1", "eval.max_prompt_length=64", "eval.response_length=8",
    "eval.batch_size=4", "eval.bootstrap_samples=100",
]
# (flag: GPU default, --cpu-smoke default) for every size that is not in a config.
SIZES = {
    "peak_size": (8192, 128), "bpe_vocab": (2048, 300), "prompt_length": (128, 16),
    "pretrain_warmup": (3, 1), "pretrain_steps": (10, 2), "compile_warmup": (3, 1),
    "generation_rounds": (3, 1), "ppo_warmup": (1, 1), "ppo_steps": (2, 1),
}


# ------------------------------------------------------------------------------------ setup
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="No GPU needed: every phase at tiny sizes (what CI runs).")
    parser.add_argument("--output", help="JSON-lines file to append to (default bench/results/gpu_check.jsonl).")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"Comma-separated, run in this order: {', '.join(PHASES)}.")
    parser.add_argument("--budget", type=float, default=480, help="Seconds: no phase starts after them, the demo is killed at them.")
    parser.add_argument("--run-dir", help="The demo's run dir (default: a temporary folder, deleted afterwards).")
    parser.add_argument("--set", dest="shape_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"An override of {SHAPE_CONFIG}, the shape and settings of pretrain, generation and ppo.")
    parser.add_argument("--demo-set", dest="demo_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"An override of {DEMO_CONFIG} for the demo.")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; aot_eager with --cpu-smoke, "
                        "whose C++ build takes ~1 min on 2 cores even for one layer).")
    parser.add_argument("--seed", type=int, default=1234)
    for name, (gpu, smoke) in SIZES.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"Default {gpu} ({smoke} with --cpu-smoke).")
    args = parser.parse_args(argv)
    for name, (gpu, smoke) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.cpu_smoke else gpu)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.cpu_smoke else "inductor")
    args.phases = [phase.strip() for phase in args.phases.split(",") if phase.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s) {unknown}; the phases are {', '.join(PHASES)}")
    return args


def load_shape(args):
    """configs/gpt2-124m-8gpu.yaml (with --cpu-smoke's and --set overrides): the shape and settings measured."""
    from pipeline.config import load_config

    overrides = [*(SMOKE_SHAPE if args.cpu_smoke else []), *args.shape_overrides]
    return load_config(REPO_ROOT / SHAPE_CONFIG, overrides)


def gpt2_model(shape, tokenizer):
    """A freshly initialised model of the config's architecture and shape at its `tokenizer.vocab_size`.

    stages/pretrain/model.py::model_from_config's recipe, with the vocabulary from the config:
    the bench tokenizer (BPE on Tiny Shakespeare) has far fewer than 50,304 tokens, and its ids,
    special ones included, are a subset. Time per token depends on the vocabulary size, not on
    which ids the text uses.
    """
    from transformers import AutoModelForCausalLM

    if len(tokenizer) > shape.tokenizer.vocab_size:
        raise ValueError(f"--bpe-vocab {len(tokenizer)} is above the model's vocabulary {shape.tokenizer.vocab_size}")
    config = shape.model.transformers_config(
        vocab_size=shape.tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def ppo_section(shape):
    """The config's PPO section at one GPU's share of its rollout (it was written for 8 processes)."""
    from pipeline.config import PPOConfig

    section = shape.ppo.model_dump()
    processes = section["launch"]["num_processes"]
    section["sampling"]["rollout_batch_size"] //= processes
    section["launch"] = {}
    return PPOConfig.model_validate(section)


def settings_of(args, shape) -> dict[str, Any]:
    from pipeline.orchestration.stage import resolve_mixed_precision

    ppo = ppo_section(shape)
    gpt = shape.model.config
    return {
        "cpu_smoke": args.cpu_smoke, "phases": args.phases, "budget_seconds": args.budget,
        "mixed_precision": resolve_mixed_precision("auto"), "shape_config": SHAPE_CONFIG,
        "shape": {"architecture": shape.model.architecture, "n_embd": gpt.get("n_embd"), "n_layer": gpt.get("n_layer"),
                  "n_head": gpt.get("n_head"), "block_size": shape.pretrain.block_size, "vocab": shape.tokenizer.vocab_size},
        "shape_overrides": [*(SMOKE_SHAPE if args.cpu_smoke else []), *args.shape_overrides],
        "pretrain": {"per_device_batch_size": shape.pretrain.per_device_batch_size,
                     "gradient_accumulation_steps": shape.pretrain.gradient_accumulation_steps,
                     "warmup": args.pretrain_warmup, "steps": args.pretrain_steps, "compile_warmup": args.compile_warmup,
                     "compile_backend": args.compile_backend},
        "generation": {"batch": ppo.sampling.rollout_batch_size, "new_tokens": ppo.sampling.response_length,
                       "temperature": ppo.sampling.temperature, "rounds": args.generation_rounds},
        "ppo": {"rollout_batch_size": ppo.sampling.rollout_batch_size, "response_length": ppo.sampling.response_length,
                "num_mini_batches": ppo.algorithm.num_mini_batches, "micro_batch_size": ppo.algorithm.micro_batch_size,
                "ppo_epochs": ppo.algorithm.ppo_epochs, "warmup": args.ppo_warmup, "steps": args.ppo_steps},
        "prompt_length": args.prompt_length, "bpe_vocab": args.bpe_vocab, "peak_size": args.peak_size,
        "demo_config": DEMO_CONFIG, "demo_overrides": demo_overrides(args), "seed": args.seed,
    }


def demo_overrides(args) -> list[str]:
    return ["wandb.mode=disabled", *(SMOKE_DEMO if args.cpu_smoke else []), *args.demo_overrides]


# --------------------------------------------------------------------------------- phases
class Budget:
    """The seconds left of --budget, counted from the check's start."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)


def training_dtype() -> torch.dtype:
    """What `mixed_precision: auto` computes in: bf16 on a GPU that has it, fp32 elsewhere."""
    from pipeline.orchestration.stage import resolve_mixed_precision

    return torch.bfloat16 if resolve_mixed_precision("auto") == "bf16" else torch.float32


def peak_gpu_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def free_gpu_memory() -> None:
    """Drop what the last phase left (models, compiled graphs, cached blocks) and restart the peak count."""
    gc.collect()
    torch.compiler.reset()  # compiled graphs hold references to the modules they were traced from
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_phase(reporter: Reporter, budget: Budget, name: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one phase and record it: its figures, or the error that stopped it, with its time and peak GPU memory."""
    if budget.left() <= 0:
        return reporter.emit(name, status="skipped", error=f"the budget of {budget.seconds:.0f} s was spent before it began")
    free_gpu_memory()
    print(f"\n== {name} ({budget.left():.0f} s of the budget left)", flush=True)
    started = time.perf_counter()
    try:
        figures = measure()
    except Exception as error:  # one phase's failure must not cost the others their GPU time
        traceback.print_exc()
        figures = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000]}
    else:
        figures = {"status": "ok", **figures}
    seconds = time.perf_counter() - started
    record = reporter.emit(name, **figures, phase_seconds=seconds, peak_gpu_mib=peak_gpu_mib())
    free_gpu_memory()
    return record


def measure_peak(args) -> dict[str, Any]:
    dtype = training_dtype()
    # More repetitions than bench/common's default: an idle GPU's clocks take a moment to rise.
    flops = peak_matmul_flops(dtype, args.peak_size, reps=20)
    return {"peak_gflops": flops / 1e9, "dtype": str(dtype).removeprefix("torch."), "size": args.peak_size}


def measure_pretrain(args, shape, tokenizer, peak: float | None, compiled: bool) -> dict[str, Any]:
    """The pretrain stage's step at the shape, eager or compiled: tokens/s and MFU."""
    from data.packing import pack_documents
    from bench.pretrain_throughput import ChatpipeLoop, matmul_parameters, summarise, tokenized_documents
    from pipeline.config import LaunchConfig

    # One process, `mixed_precision: auto`: the config's launch section is for its 8 GPUs.
    section = shape.pretrain.model_copy(update={"launch": LaunchConfig(), "compile": compiled})
    blocks = pack_documents(tokenized_documents(tokenizer, "paragraph"), tokenizer.eos_token_id, section.block_size)
    torch.manual_seed(args.seed)
    loop = ChatpipeLoop(None, section, None, blocks, args.seed, model=gpt2_model(shape, tokenizer),
                        compile_backend=args.compile_backend)
    warmup_steps = args.compile_warmup if compiled else args.pretrain_warmup
    # Compilation happens in the first steps: timed apart, as a cost of its own.
    warmup_seconds = sum(loop.step().seconds for _ in range(warmup_steps))
    stats = [loop.step() for _ in range(args.pretrain_steps)]
    model = loop.unwrapped
    summary = summarise(stats, matmul_parameters(model), model.config.num_hidden_layers, model.config.hidden_size,
                        peak or math.nan)
    figures = {key: summary[key] for key in ("steps", "median_step_seconds", "tokens_per_second", "tokens_per_step",
                                             "achieved_gflops", "mfu")}
    if peak is None:
        figures["mfu"] = None  # the peak phase did not run or failed
    return {**figures, "compiled": compiled, "warmup_seconds": warmup_seconds, "parameters": sum(p.numel() for p in model.parameters()),
            "matmul_parameters": matmul_parameters(model), "attention": model.config._attn_implementation,
            "dtype": str(training_dtype()).removeprefix("torch.")}


def measure_generation(args, shape, tokenizer) -> dict[str, Any]:
    """chatpipe's sampler against transformers' generate: the same model, prompts and distribution."""
    from bench.scaling import ppo_prompts
    from pipeline.models.generation import Sampling, generate

    ppo = ppo_section(shape)
    batch, new_tokens, temperature = ppo.sampling.rollout_batch_size, ppo.sampling.response_length, ppo.sampling.temperature
    torch.manual_seed(args.seed)
    model = gpt2_model(shape, tokenizer).to(device(), training_dtype()).eval()
    query_ids, query_mask = (t.to(device()) for t in ppo_prompts(tokenizer, batch, args.prompt_length))
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}

    def chatpipe() -> int:
        steps = []  # both loops stop early only if every row drew EOS: count the steps each made
        generate(model, query_ids, query_mask, max_new_tokens=new_tokens, sampling=Sampling(temperature=temperature),
                 on_tokens=lambda tokens: steps.append(1), **ids)
        return len(steps)

    def transformers_generate() -> int:
        # top_k=0 and top_p=1: the plain softmax(logits / temperature) chatpipe draws from (generate's default top_k is 50).
        out = model.generate(input_ids=query_ids, attention_mask=query_mask, max_new_tokens=new_tokens, do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, **ids)
        return out.shape[1] - query_ids.shape[1]

    samplers = {"chatpipe": chatpipe, "hf_generate": transformers_generate}
    for sample in samplers.values():  # warm-up: kernels, allocator, cache
        sample()
    rates: dict[str, list[float]] = {name: [] for name in samplers}
    for round_index in range(args.generation_rounds):
        order = list(samplers) if round_index % 2 == 0 else list(reversed(samplers))
        for name in order:
            synchronize()
            started = time.perf_counter()
            steps = samplers[name]()
            synchronize()
            rates[name].append(batch * steps / (time.perf_counter() - started))
    ratios = [mine / theirs for mine, theirs in zip(rates["chatpipe"], rates["hf_generate"])]
    return {"chatpipe_tokens_per_second": median(rates["chatpipe"]), "hf_generate_tokens_per_second": median(rates["hf_generate"]),
            "chatpipe_over_hf_generate": median(ratios), "per_round": ratios, "batch": batch, "new_tokens": new_tokens,
            "prompt_tokens": query_ids.shape[1], "dtype": str(training_dtype()).removeprefix("torch.")}


def measure_ppo(args, shape, tokenizer) -> dict[str, Any]:
    """One RLTrainer step at the shape: rollout (sampling and scoring) and update, medians over --ppo-steps."""
    from transformers import AutoModelForSequenceClassification

    from bench.scaling import SamplingTimer, ppo_prompts, target_fraction_reward
    from pipeline.orchestration.stage import resolve_mixed_precision
    from pipeline.training.distributed import make_accelerator
    from reward_model.model import TokenScorer
    from stages.ppo.trainer import RLTrainer

    settings = ppo_section(shape)
    torch.manual_seed(args.seed)
    policy = gpt2_model(shape, tokenizer)
    reference = copy.deepcopy(policy)
    value_config = copy.deepcopy(policy.config)
    value_config.num_labels = 1
    value = TokenScorer(AutoModelForSequenceClassification.from_config(value_config))
    # A known reward (the share of response tokens in a fixed tenth of the vocabulary), as bench/scaling.py's.
    reward = target_fraction_reward(torch.arange(50, 50 + len(tokenizer) // 10))
    accelerator = make_accelerator(resolve_mixed_precision(settings.launch.mixed_precision))  # as the stage builds it
    trainer = RLTrainer(policy, reference, value, reward, tokenizer, settings, accelerator, total_updates=1000, seed=args.seed)
    query_ids, query_mask = ppo_prompts(tokenizer, settings.sampling.rollout_batch_size, args.prompt_length)
    sampling = SamplingTimer()
    for _ in range(args.ppo_warmup):
        trainer.step(query_ids, query_mask)
    steps, sampling_seconds = [], []
    for _ in range(args.ppo_steps):
        sampling.sink = sampling_seconds
        synchronize()
        started = time.perf_counter()
        metrics, _ = trainer.step(query_ids, query_mask)
        synchronize()
        steps.append({**metrics, "wall": time.perf_counter() - started})

    def med(key: str) -> float:
        return median([step[key] for step in steps])

    rollout, sampled = med("time/rollout"), median(sampling_seconds)
    return {"median_step_seconds": med("wall"), "median_rollout_seconds": rollout, "median_sampling_seconds": sampled,
            "median_scoring_seconds": rollout - sampled, "median_update_seconds": med("time/update"),
            "generated_tokens_per_second": med("throughput/generated_tokens_per_second"),
            "mean_response_tokens": med("val/response_length"), "prompt_tokens": query_ids.shape[1], "steps": len(steps),
            "parameters_per_model": sum(p.numel() for p in policy.parameters())}


def measure_demo(args, reporter: Reporter, budget: Budget) -> dict[str, Any]:
    """configs/tiny.yaml end to end in one `chatpipe run`; a record per stage from its manifest."""
    from bench.end_to_end import run_measured, stage_rows
    from pipeline.orchestration.manifest import read_manifest

    temporary = None if args.run_dir else tempfile.mkdtemp(prefix="gpu-check-demo-")
    run_dir = Path(args.run_dir or temporary).resolve()
    if (run_dir / "manifest.json").exists():
        shutil.rmtree(run_dir)  # a fresh run: every stage runs, the token caches are cold
    run_dir.mkdir(parents=True, exist_ok=True)
    sets = [part for override in demo_overrides(args) for part in ("--set", override)]
    command = [sys.executable, "-m", "pipeline.cli", "run", DEMO_CONFIG, "--run-dir", str(run_dir), *sets]
    try:
        with open(run_dir / "gpu_check_demo.log", "wb") as log:
            launched = run_measured(command, log, poll=0.5, timeout=max(budget.left(), 1.0))
        manifest = read_manifest(run_dir)
        stages = stage_rows(manifest, {})
        gpu_peaks = []
        for row in stages:
            entry = manifest.stages[row["stage"]]
            metrics = entry.metrics or {}
            gpu_peaks.append(metrics.get("peak_gpu_mib"))
            reporter.emit("demo_stage", stage=row["stage"], status=row["status"], seconds=row["seconds"],
                          peak_gpu_mib=metrics.get("peak_gpu_mib"), peak_rss_mib=metrics.get("peak_rss_mib"), error=entry.error)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    unfinished = [row["stage"] for row in stages if row["status"] != "completed"]
    if launched["timed_out"] or launched["exit_code"] != 0 or unfinished:
        where = f"its log: {run_dir}/logs" if temporary is None else "rerun with --run-dir DIR to keep its logs"
        raise RuntimeError(f"chatpipe run exited {launched['exit_code']}{' (killed at the budget)' if launched['timed_out'] else ''}; "
                           f"not completed: {', '.join(unfinished) or 'none recorded'}; {where}")
    return {"stages": [row["stage"] for row in stages], "all_completed": True, "run_seconds": launched["launch_seconds"],
            "stage_seconds": sum(row["seconds"] or 0 for row in stages),
            "max_stage_peak_gpu_mib": max((peak for peak in gpu_peaks if peak is not None), default=None)}


# ------------------------------------------------------------------------------------- main
def summarise_check(records: dict[str, dict], on_gpu: bool) -> dict[str, Any]:
    """The figures the issue sets targets for, and whether each is met (None where not measured,
    and everywhere off a GPU: the targets are a GPU's)."""
    def figure(phase: str, key: str):
        record = records.get(phase, {})
        return record.get(key) if record.get("status") == "ok" else None

    eager, compiled = figure("pretrain", "mfu"), figure("pretrain_compiled", "mfu")
    eager_rate, compiled_rate = figure("pretrain", "tokens_per_second"), figure("pretrain_compiled", "tokens_per_second")
    sampler = figure("generation", "chatpipe_over_hf_generate")
    best_mfu = max((value for value in (eager, compiled) if value is not None), default=None)
    met = {"pretrain_mfu": None if best_mfu is None else best_mfu >= TARGET_MFU,
           "sampler_over_hf_generate": None if sampler is None else sampler >= TARGET_SAMPLER_OVER_HF,
           "demo_completed": figure("demo", "all_completed")}
    return {
        "mfu_eager": eager, "mfu_compiled": compiled,
        "compiled_over_eager": compiled_rate / eager_rate if eager_rate and compiled_rate else None,
        "sampler_over_hf_generate": sampler, "demo_completed": figure("demo", "all_completed"),
        "targets": {"pretrain_mfu": TARGET_MFU, "sampler_over_hf_generate": TARGET_SAMPLER_OVER_HF, "demo_completed": True},
        "met": met if on_gpu else {key: None for key in met},
        "phases_ok": sorted(name for name, record in records.items() if record.get("status") == "ok"),
        "phases_not_ok": sorted(name for name, record in records.items() if record.get("status") != "ok"),
    }


def print_table(records: dict[str, dict]) -> None:
    headline = {
        "peak": lambda r: f"{r['peak_gflops'] / 1e3:,.1f} TFLOP/s {r['dtype']}",
        "pretrain": lambda r: f"{r['tokens_per_second']:,.0f} tokens/s, MFU {r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else f"{r['tokens_per_second']:,.0f} tokens/s",
        "pretrain_compiled": lambda r: f"{r['tokens_per_second']:,.0f} tokens/s, MFU {r['mfu'] * 100:.1f}%, compiling {r['warmup_seconds']:.0f} s" if r.get("mfu") is not None else f"{r['tokens_per_second']:,.0f} tokens/s",
        "generation": lambda r: f"chatpipe {r['chatpipe_tokens_per_second']:,.0f} vs generate {r['hf_generate_tokens_per_second']:,.0f} tokens/s: {r['chatpipe_over_hf_generate']:.2f}x",
        "ppo": lambda r: f"step {r['median_step_seconds']:.2f} s: rollout {r['median_rollout_seconds']:.2f} (sampling {r['median_sampling_seconds']:.2f}), update {r['median_update_seconds']:.2f}",
        "demo": lambda r: f"{len(r['stages'])} stages completed in {r['run_seconds']:.0f} s",
    }
    rows = []
    for name, record in records.items():
        what = headline[name](record) if record["status"] == "ok" else record.get("error", "")[:100]
        rows.append((name, record["status"], record.get("phase_seconds"), record.get("peak_gpu_mib"), what))
    print()
    print(table(rows, ("phase", "status", "seconds", "peak GPU MiB", "result")))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}, torch.cuda.is_available() is False). "
              "This check is for a GPU machine; `--cpu-smoke` runs the same code at tiny sizes on a CPU.", file=sys.stderr)
        return 2
    from bench.pretrain_throughput import train_tokenizer
    from pipeline.orchestration.stage import package_versions

    budget = Budget(args.budget)
    shape = load_shape(args)
    reporter = Reporter(NAME, args.output, settings_of(args, shape))
    reporter.header()
    reporter.emit("versions", **package_versions(), cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None)
    tokenizer = train_tokenizer(args.bpe_vocab)

    records: dict[str, dict] = {}
    peak = None
    for name in args.phases:
        if name == "peak":
            measure = lambda: measure_peak(args)  # noqa: E731
        elif name in ("pretrain", "pretrain_compiled"):
            measure = lambda compiled=name == "pretrain_compiled": measure_pretrain(args, shape, tokenizer, peak, compiled)  # noqa: E731
        elif name == "generation":
            measure = lambda: measure_generation(args, shape, tokenizer)  # noqa: E731
        elif name == "ppo":
            measure = lambda: measure_ppo(args, shape, tokenizer)  # noqa: E731
        else:
            measure = lambda: measure_demo(args, reporter, budget)  # noqa: E731
        records[name] = run_phase(reporter, budget, name, measure)
        if name == "peak" and records[name]["status"] == "ok":
            peak = records[name]["peak_gflops"] * 1e9
    reporter.emit("summary", **summarise_check(records, on_gpu=torch.cuda.is_available()))
    print_table(records)
    reporter.footer()
    return 0 if all(record["status"] == "ok" for record in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
