"""chatpipe's dpo stage against TRL's DPOTrainer on the CPU, at identical settings.

    .venv/bin/python bench/dpo_vs_trl.py                      # SFT built first (~3 min quiet), then 3 interleaved rounds (~20 min)
    .venv/bin/python bench/dpo_vs_trl.py --run-dir runs/tiny  # start from a finished run's SFT policy instead
    .venv/bin/python bench/dpo_vs_trl.py --rounds 1 --sides chatpipe,trl
    .venv/bin/python bench/dpo_vs_trl.py --profile            # also cProfile chatpipe's and TRL's training (round 1)

Per side: pairs/s, peak RSS, held-out preference accuracy after training; chatpipe / TRL ratios
measured in the same run. (Issue 28, item 4: target >= 1.5x the pairs/s at <= 1x the peak RSS,
held-out accuracy equal within noise.)

# ---------------------------------------------------------------------------------- setup
Prepared once per run, in a work folder both sides read from:
- the SFT policy: unless --run-dir names a run whose sft stage completed, configs/tiny.yaml's
  tokenizer, pretrain and sft stages run (`chatpipe run`, reward/judges/ppo/eval removed,
  pretrain cut to --pretrain-steps, SFT to --sft-epochs; --set overrides on top) into
  WORK/base: a Llama of hidden 128, 4 layers, vocab 2048 (1.1M parameters), fp32;
- the pairs: the demo's HH-RLHF harmless pairs (data/samples/hh_harmless_1000.jsonl, the reward
  stage's data), read by chatpipe's own parser (data.preferences.pairwise_group: the prompt is
  the conversation both sides share), rendered with the SFT checkpoint's chat template. Kept:
  pairs whose both conversations fit in --max-length tokens, so neither side truncates (TRL 1.16
  keeps a sequence's start, chatpipe its end: they would train on different tokens), and whose
  rendering TRL's way (`trl_texts`: prompt / chosen / rejected text) gives exactly the ids
  chatpipe's encode_groups gives (checked with TRL's own tokenizing function). Shuffled with --seed: --held-out pairs held out (the accuracy
  set), the next --train-pairs (default: all the rest, cut to a multiple of --batch) to train.
  chatpipe reads them as two JSONL files of the original rows (dpo.data and dpo.validation_data,
  the latter cut to --stage-eval-pairs: the stage evaluates at step 0 and at the end, which TRL
  here does not, so its held-out set is kept small and its time is reported apart); TRL gets
  the same rows as standard (text) prompt / chosen / rejected, rendered with the same template
  (as conversational messages TRL would keep the newline the template writes after each EOS,
  one token chatpipe does not score).

# ------------------------------------------------------------------------------- settings
chatpipe name = TRL name: loss sigmoid = loss_type ["sigmoid"]; beta; prompts_per_batch (one pair
per prompt here) = per_device_train_batch_size, gradient accumulation 1 on both; learning_rate;
epochs = num_train_epochs (the same number of optimiser steps: the pairs are a multiple of the
batch); warmup_ratio 0.1 with cosine decay to 0 = lr_scheduler_type cosine with warmup_steps
int(0.1 x steps); max_grad_norm 1.0; weight decay 0; fused AdamW with betas (0.9, 0.999) and eps
1e-8 on both; max_length; fp32; seed (round r: --seed + r on both sides, which orders the
batches; each side draws its own order). TRL also gets gradient_checkpointing off and bf16 off
(its DPOConfig defaults both on), report_to none, no saving during training, 0 dataloader
workers, use_cpu. Each side runs in its own process with --threads torch threads (1 by default:
on a shared 2-core machine a second OpenMP thread stalls behind other jobs, see
bench/README.md finding 7), so its peak RSS is that process's ru_maxrss.

Sides: `chatpipe` (the dpo stage, bench/chatpipe_dpo_worker.py, reference log-probs computed
once before training), `trl` (TRL's defaults: a reference model loaded beside the policy and run
on every batch), `trl-precompute` (precompute_ref_log_probs=True: the reference scored once in
the trainer's constructor, no reference model while training; what chatpipe does).

What is timed, per side:
- loop: the training loop alone (chatpipe: `fit` less its two evaluations; TRL: `trainer.train()`,
  which for `trl` includes the reference's forward pass on every batch);
- reference: the one-off reference pass (chatpipe: train + stage-eval pairs; trl-precompute: the
  train pairs; trl: none, it is inside the loop);
- train = loop + reference: the headline pairs/s, training including everything the reference
  costs, so the three sides pay for the same work;
- process: the worker process from start to exit (imports, loading, tokenizing, reference, loop,
  chatpipe's two evaluations, saving the policy), the end-to-end wall.
pairs/s = pairs trained (epochs x train pairs) / seconds. The table shows medians over rounds.

Held-out accuracy: after each worker exits, this script loads the policy it saved and scores the
held-out pairs with bench/dpo_bench_common.py (plain torch, neither side's code): the share of
pairs whose implicit reward margin beta((log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected))
is above 0, against the SFT policy, with its 95% Wilson interval; and chatpipe minus TRL on the
same pairs (per pair, paired over every round) with its 95% interval: "equal within noise" is
that interval containing 0.

# -------------------------------------------------------------------------------- results
2026-12-07 17:08-17:30 UTC (run 20261207T170800Z), 2-core shared AMD EPYC VM, load average 2.2-3.3
(other sessions' jobs), torch 2.13.0+cpu, transformers 5.25.0, accelerate 1.16.0, TRL 1.16.0, one
torch thread per side. SFT policy: configs/tiny.yaml's model (1,115,264 parameters) after 200
pretraining steps and 1 SFT epoch (`--run-dir` of a run built with the defaults above). Pairs: 825
of the 1,000 fit in 384 tokens, 0 rendered differently; 624 to train (78 steps of 8), 200 held
out; 159 tokens per conversation on average. beta 0.1, lr 2e-4, 1 epoch, warmup 7 steps. Medians
of 3 interleaved rounds (held-out accuracy: each round, with its 95% interval):

    side            pairs/s (train)  loop pairs/s  process pairs/s  loop s  reference s  process s  peak RSS MB  held-out accuracy by round
    chatpipe        13.2             17.1          11.4             36.5    11.0         54.8       914          0.575 [0.506, 0.641], 0.585 [0.516, 0.651], 0.625 [0.556, 0.689]
    trl             5.14             5.14          4.84             121     0            129        1,282        0.615 [0.546, 0.680], 0.580 [0.511, 0.646], 0.590 [0.521, 0.656]
    trl-precompute  4.87             6.59          4.56             94.7    33.5         137        1,270        0.615 [0.546, 0.680], 0.580 [0.511, 0.646], 0.590 [0.521, 0.656]

chatpipe / trl: pairs/s x2.57 (rounds 2.57, 2.50, 2.52; loop alone x3.32, whole process x2.35),
peak RSS x0.71; held-out accuracy chatpipe - TRL +0.000 [-0.035, +0.035] over the 600 paired
held-out scores of the three rounds (both sides 0.595 on average, from 0.5 at the SFT policy).
chatpipe / trl-precompute: x2.71 (2.62, 2.89, 2.53; loop x2.59, process x2.50), peak RSS x0.72.
The target (>= 1.5x the pairs/s at <= 1x the peak RSS, accuracy equal within noise) is met.

- TRL's two reference modes train the same model (same seed, same accuracy in every round);
  precomputing did not pay here: with one epoch the reference scores each pair once either way,
  and its precompute pass (33.5 s for 624 pairs) cost more than the on-the-fly passes it saved.
- Where TRL's time goes (cProfile of the same settings at --max-length 256, one round under
  load): its chunked log-prob kernel (`trl/kernels/chunked_logprob.py`, the `fused_lm_head`
  its loss always asks for) took 15.0 s forward and 15.0 s backward of a 72 s loop, and it runs
  the reference model's forward on every batch; every sequence of a batch is padded to the
  longest (45% of the positions, on these pairs).
- The same benchmark on the dpo stage before this change (commit 8be3055, run 20261207T173023Z,
  1 round, load 1.3-2.0): chatpipe 6.02 pairs/s (loop 79.3 s, reference 24.3 s), peak RSS 1,119
  MB; TRL 5.53, 1,287 MB: x1.09 at x0.87, short of the target. The stage then scored every
  position of a right-padded batch through the LM head and a full-vocabulary log-softmax: 45%
  of the positions were padding and two thirds of the rest prompt. Now (stages/dpo/reference.py
  `reply_logps`) a batch's rows go through the model in a few left-padded passes of similar
  length, with logits for the reply positions only, and the reference pass batches the pairs
  by length: x1.09 -> x2.57 TRL's pairs/s (chatpipe's own 6.02 -> 13.2, TRL 5.53 and 5.14 in the
  two runs), peak RSS 1,119 -> 914 MB, the same log-probs to ~1e-6 relative.
- Where chatpipe's time goes now (`--profile --sides chatpipe`, self time of the stage): backward
  44%, linear layers' forward 26%, attention 11%, log-softmax 4%: the model's own passes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]

from common import Reporter, table  # noqa: E402
from dpo_bench_common import held_out_accuracy, load_policy, pair_logps, paired_difference  # noqa: E402

SIDES = ("chatpipe", "trl", "trl-precompute")
WORKERS = {"chatpipe": "chatpipe_dpo_worker.py", "trl": "trl_dpo_worker.py", "trl-precompute": "trl_dpo_worker.py"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="a run whose sft stage completed: its policy is the SFT model")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml", help="without --run-dir: the config to build SFT from")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="without --run-dir: override the SFT-building config (after the script's own)")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--sft-epochs", type=float, default=1.0)
    parser.add_argument("--pairs-file", type=Path, default=ROOT / "data" / "samples" / "hh_harmless_1000.jsonl")
    parser.add_argument("--pair-rows", type=int, default=None, help="read only the first N rows of --pairs-file")
    parser.add_argument("--max-length", type=int, default=384, help="tokens per conversation; longer pairs are left out")
    parser.add_argument("--held-out", type=int, default=200, help="pairs held out for the accuracy")
    parser.add_argument("--train-pairs", type=int, default=None, help="default: every other pair that fits, cut to a multiple of --batch")
    parser.add_argument("--stage-eval-pairs", type=int, default=16, help="of the held-out pairs, the ones chatpipe's stage evaluates on")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimiser step")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="each runs every side once, the order reversed every other round")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"of {', '.join(SIDES)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker; 0: torch's default")
    parser.add_argument("--seed", type=int, default=0, help="the pairs' split; round r trains with seed + r")
    parser.add_argument("--profile", action="store_true", help="cProfile chatpipe's and TRL's (default) run in round 1; .prof kept")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder, deleted at the end")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines appended here (default bench/results/dpo_vs_trl.jsonl)")
    args = parser.parse_args(argv)
    args.sides = [side.strip() for side in args.sides.split(",") if side.strip()]
    unknown = set(args.sides) - set(SIDES)
    if unknown or not args.sides:
        parser.error(f"--sides {','.join(args.sides)}: choose from {', '.join(SIDES)}")
    return args


def environment() -> dict:
    """The workers' environment: this checkout first on the path (the venv's editable install may point elsewhere)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
            "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}


# ----------------------------------------------------------------------------------- setup
def build_sft(args: argparse.Namespace, work: Path) -> Path:
    """A run dir whose sft stage completed: --run-dir, or configs/tiny.yaml's first stages run into WORK/base."""
    if args.run_dir is not None:
        return args.run_dir.resolve()
    import yaml

    config = yaml.safe_load(args.config.read_text())
    for section in ("reward", "judges", "ppo", "eval", "dpo"):
        config.pop(section, None)
    config["wandb"] = {"mode": "disabled"}
    config["pretrain"].update(max_steps=args.pretrain_steps, warmup_steps=min(config["pretrain"].get("warmup_steps", 0), args.pretrain_steps // 4),
                              eval_every=args.pretrain_steps, save_every=args.pretrain_steps)
    config["sft"].update(epochs=args.sft_epochs, eval_every=100000, save_every=100000)
    config["sft"].pop("max_steps", None)
    absolute_paths(config)
    path = work / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = work / "base"
    command = [sys.executable, "-m", "pipeline.cli", "run", str(path), "--run-dir", str(run_dir)]
    for override in args.overrides:
        command += ["--set", override]
    started = time.perf_counter()
    print(f"building the SFT policy: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    done = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"building the SFT policy failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"SFT policy built in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return run_dir


def absolute_paths(config: dict) -> None:
    """Every data `path` in the config made absolute against the repository root (the configs' convention)."""
    def visit(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "path" and isinstance(value, str) and not Path(value).is_absolute():
                    node[key] = str(ROOT / value)
                else:
                    visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(config)


def sft_policy(run_dir: Path) -> Path:
    from pipeline.orchestration.manifest import read_manifest, resolve_input

    manifest = read_manifest(run_dir)
    return Path(resolve_input(run_dir, manifest, "sft").path)


def prepare_pairs(args: argparse.Namespace, policy: Path, work: Path) -> dict:
    """The train / held-out / stage-eval files and pairs.json (TRL's messages, the held-out token ids)."""
    from transformers import AutoTokenizer

    from data.preferences import pairwise_group
    from data.rows import RowError
    from reward_model.batching import encode_groups, shared_prefix_length
    from trl.data_utils import _tokenize  # how DPOTrainer tokenizes a text example

    tokenizer = AutoTokenizer.from_pretrained(policy)
    rows, groups = [], []
    for line in args.pairs_file.read_text().splitlines()[: args.pair_rows]:
        row = json.loads(line)
        try:
            groups.append(pairwise_group(row))
        except RowError:
            continue
        rows.append(row)
    encoded = encode_groups(groups, tokenizer, max_length=10**9)
    counts = {"rows": len(rows), "too_long": 0, "rendered_differently": 0}
    kept = []
    for row, group, codes in zip(rows, groups, encoded):
        if max(map(len, codes.completion_ids)) > args.max_length:
            counts["too_long"] += 1
            continue
        try:
            texts = trl_texts(tokenizer, group)
        except ValueError:
            counts["rendered_differently"] += 1
            continue
        trl_ids = [_tokenize(tokenizer, texts["prompt"] + texts[side])["input_ids"] for side in ("chosen", "rejected")]
        if [list(ids) for ids in trl_ids] != codes.completion_ids:
            counts["rendered_differently"] += 1
            continue
        kept.append({
            "row": row, "texts": texts,
            "chosen_ids": codes.completion_ids[0], "rejected_ids": codes.completion_ids[1],
            "prefix": shared_prefix_length(codes.completion_ids),
        })
    random.Random(args.seed).shuffle(kept)
    held_out, rest = kept[: args.held_out], kept[args.held_out :]
    size = min(args.train_pairs or len(rest), len(rest))
    train = rest[: size - size % args.batch]
    if not train or len(held_out) < args.held_out:
        raise SystemExit(f"{len(kept)} pairs fit in --max-length {args.max_length}: too few for --held-out {args.held_out} "
                         f"and a batch of {args.batch} to train on")
    stage_eval = held_out[: args.stage_eval_pairs]
    for name, chosen in (("train", train), ("held_out", held_out), ("stage_eval", stage_eval)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(pair["row"]) + "\n" for pair in chosen))
    (work / "pairs.json").write_text(json.dumps({
        "train_texts": [pair["texts"] for pair in train],
        "held_out": [{key: pair[key] for key in ("chosen_ids", "rejected_ids", "prefix")} for pair in held_out],
    }))
    tokens = [len(ids) for pair in train for ids in (pair["chosen_ids"], pair["rejected_ids"])]
    return {**counts, "fit": len(kept), "train": len(train), "held_out": len(held_out), "stage_eval": len(stage_eval),
            "mean_tokens": sum(tokens) / len(tokens), "max_tokens": max(tokens), "pad_token_id": tokenizer.pad_token_id,
            "held_out_pairs": [{key: pair[key] for key in ("chosen_ids", "rejected_ids", "prefix")} for pair in held_out]}


def trl_texts(tokenizer, group) -> dict[str, str]:
    """A pairwise group as TRL's standard (text) prompt / chosen / rejected, rendered with the chat template.

    The prompt ends in the assistant-turn opener (add_generation_prompt); each reply is the rest of
    its rendered conversation up to and including its final EOS. The template writes a newline
    after every EOS; chatpipe scores a conversation up to its final EOS (reward_model.scoring.scored_ids),
    and TRL's conversational format would keep that newline as one more token on both replies:
    as text, TRL tokenizes exactly the ids chatpipe trains on.
    """
    prompt = tokenizer.apply_chat_template(group.prompt, add_generation_prompt=True, tokenize=False)
    texts = {"prompt": prompt}
    for side, conversation in zip(("chosen", "rejected"), group.completions):
        full = tokenizer.apply_chat_template(conversation, tokenize=False)
        full = full[: full.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)]
        if not full.startswith(prompt):
            raise ValueError("the rendered conversation does not start with its rendered prompt")
        texts[side] = full[len(prompt):]
    return texts


def dpo_config(args: argparse.Namespace, base: Path, work: Path, seed: int) -> Path:
    """The base run's recorded config with the benchmark's `dpo:` section, as a YAML file."""
    import yaml

    from pipeline.orchestration.manifest import read_manifest

    config = json.loads(json.dumps(read_manifest(base).config))
    config["wandb"] = {"mode": "disabled"}
    config["seed"] = seed
    config["dpo"] = {
        "data": {"path": str(work / "train.jsonl")}, "validation_data": {"path": str(work / "stage_eval.jsonl")},
        "loss": "sigmoid", "beta": args.beta, "max_length": args.max_length, "epochs": args.epochs,
        "prompts_per_batch": args.batch, "gradient_accumulation_steps": 1, "learning_rate": args.learning_rate,
        "warmup_ratio": args.warmup_ratio, "min_lr_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": args.max_grad_norm,
        "log_every": 10, "eval_every": 10**6, "save_every": 10**6,
    }
    path = work / f"dpo-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def copy_run(base: Path, target: Path) -> None:
    """The run dir without its caches, checkpoints and trackers' files: what the dpo stage reads, cold."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(base, target, ignore=shutil.ignore_patterns("cache", "checkpoints", "wandb", "dpo", "*.lock"))


# ------------------------------------------------------------------------------------- runs
def run_worker(worker: str, config: dict, work: Path, name: str) -> dict:
    path = work / f"{name}.json"
    path.write_text(json.dumps(config))
    log = work / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w") as stderr:
        done = subprocess.run([sys.executable, str(BENCH / worker), str(path)], cwd=ROOT, env=environment(),
                              stdout=subprocess.PIPE, stderr=stderr, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"{name} failed (exit {done.returncode}); last of {log}:\n{log.read_text()[-4000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    answer["process_seconds"] = seconds
    return answer


def run_side(side: str, round_index: int, args, base: Path, policy: Path, work: Path, warmup_steps: int, settings: dict) -> dict:
    seed = args.seed + round_index
    name = f"{side}-{round_index + 1}"
    config = {"threads": args.threads, "run_seed": seed, "settings": settings}
    if args.profile and round_index == 0 and side in ("chatpipe", "trl"):
        config["profile"] = str(work / f"{side}.prof")
    if side == "chatpipe":
        run_dir = work / "runs" / name
        copy_run(base, run_dir)
        config.update(run_dir=str(run_dir), config=str(dpo_config(args, base, work, seed)), prompts_per_batch=args.batch)
    else:
        config.update(policy=str(policy), pairs=str(work / "pairs.json"), output=str(work / "trl" / name),
                      warmup_steps=warmup_steps, precompute_ref_log_probs=side == "trl-precompute")
    result = run_worker(WORKERS[side], config, work, name)
    result.update(name=side, round=round_index + 1, run_seed=seed, profile=config.get("profile"))
    return result


def derived(result: dict) -> dict:
    """Rates from the raw seconds and counts, the same formulas for every side."""
    train_seconds = result["loop_seconds"] + result.get("reference_seconds", 0.0)
    return {
        "train_seconds": train_seconds,
        "pairs_per_second": result["pairs"] / train_seconds,
        "loop_pairs_per_second": result["pairs"] / result["loop_seconds"],
        "process_pairs_per_second": result["pairs"] / result["process_seconds"],
    }


def summarise(rows: list[dict]) -> list[dict]:
    summary = []
    for side in SIDES:
        group = [row for row in rows if row["name"] == side]
        if not group:
            continue
        entry = {"side": side, "runs": len(group), "pairs": group[0]["pairs"], "steps": group[0]["steps"],
                 "peak_rss_mb": max(row["peak_rss_mb"] for row in group),
                 "accuracy_mean": statistics.mean(row["held_out"]["accuracy"] for row in group),
                 "accuracies": [row["held_out"]["accuracy"] for row in group],
                 "intervals": [row["held_out"]["interval"] for row in group],
                 "margin_mean": statistics.mean(row["held_out"]["margin"] for row in group)}
        for key in ("pairs_per_second", "loop_pairs_per_second", "process_pairs_per_second", "loop_seconds",
                    "reference_seconds", "train_seconds", "process_seconds"):
            entry[key] = statistics.median(row.get(key, 0.0) for row in group)
        entry["stage_eval_seconds"] = statistics.median(row.get("stage_eval_seconds", 0.0) for row in group)
        summary.append(entry)
    return summary


def comparisons(rows: list[dict], summary: list[dict]) -> list[dict]:
    """chatpipe over each TRL side: ratios of the medians, per round, and the paired accuracy difference."""
    ours = next((entry for entry in summary if entry["side"] == "chatpipe"), None)
    found = []
    for theirs in (entry for entry in summary if entry["side"] != "chatpipe"):
        if ours is None:
            break
        per_round, first, second = [], [], []
        for row in (r for r in rows if r["name"] == "chatpipe"):
            other = next((r for r in rows if r["name"] == theirs["side"] and r["round"] == row["round"]), None)
            if other is not None:
                per_round.append(row["pairs_per_second"] / other["pairs_per_second"])
                first += row["held_out"]["correct"]
                second += other["held_out"]["correct"]
        found.append({
            "trl_side": theirs["side"],
            "pairs_per_second_ratio": ours["pairs_per_second"] / theirs["pairs_per_second"],
            "pairs_per_second_ratio_per_round": per_round,
            "loop_pairs_per_second_ratio": ours["loop_pairs_per_second"] / theirs["loop_pairs_per_second"],
            "process_pairs_per_second_ratio": ours["process_pairs_per_second"] / theirs["process_pairs_per_second"],
            "peak_rss_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
            "accuracy_difference": paired_difference(first, second),
        })
    return found


def print_summary(summary: list[dict], found: list[dict]) -> None:
    print()
    headers = ["side", "pairs/s (train)", "loop pairs/s", "process pairs/s", "loop s", "reference s", "process s",
               "peak RSS MB", "held-out accuracy [95% interval], by round"]
    lines = []
    for entry in summary:
        accuracy = ", ".join(f"{a:.3f} [{low:.3f}, {high:.3f}]" for a, (low, high) in zip(entry["accuracies"], entry["intervals"]))
        lines.append([entry["side"], entry["pairs_per_second"], entry["loop_pairs_per_second"], entry["process_pairs_per_second"],
                      entry["loop_seconds"], entry["reference_seconds"], entry["process_seconds"], entry["peak_rss_mb"],
                      accuracy])
    print(table(lines, headers))
    for c in found:
        difference = c["accuracy_difference"]
        rounds = ", ".join(f"{r:.2f}" for r in c["pairs_per_second_ratio_per_round"])
        print(f"chatpipe / {c['trl_side']}: pairs/s x{c['pairs_per_second_ratio']:.2f} (rounds {rounds}; loop alone "
              f"x{c['loop_pairs_per_second_ratio']:.2f}, whole process x{c['process_pairs_per_second_ratio']:.2f}), "
              f"peak RSS x{c['peak_rss_ratio']:.2f}; held-out accuracy chatpipe - TRL {difference['difference']:+.3f} "
              f"[{difference['interval'][0]:+.3f}, {difference['interval'][1]:+.3f}] over every round's pairs")


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    temporary = None
    if args.work_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="dpo-vs-trl-")
        work = Path(temporary.name)
    else:
        work = args.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        base = build_sft(args, work)
        policy = sft_policy(base)
        setup_seconds = time.perf_counter() - started
        data = prepare_pairs(args, policy, work)
        held_out = data.pop("held_out_pairs")
        steps = args.epochs * data["train"] // args.batch
        warmup_steps = int(args.warmup_ratio * steps)
        settings = {
            "sides": args.sides, "beta": args.beta, "batch": args.batch, "learning_rate": args.learning_rate, "epochs": args.epochs,
            "warmup_ratio": args.warmup_ratio, "warmup_steps": warmup_steps, "steps": steps, "max_grad_norm": args.max_grad_norm,
            "max_length": args.max_length, "train_pairs": data["train"], "held_out_pairs": data["held_out"],
            "stage_eval_pairs": data["stage_eval"], "rounds": args.rounds, "threads": args.threads, "seed": args.seed,
            "run_dir": str(args.run_dir) if args.run_dir else None, "pretrain_steps": None if args.run_dir else args.pretrain_steps,
            "sft_epochs": None if args.run_dir else args.sft_epochs, "overrides": args.overrides, "dtype": "float32",
        }
        reporter = Reporter("dpo_vs_trl", args.out, settings)
        reporter.header()
        reference_model = load_policy(policy)
        parameters = sum(p.numel() for p in reference_model.parameters())
        reference = pair_logps(reference_model, held_out, data["pad_token_id"])
        del reference_model
        reporter.emit("setup", sft_policy=str(policy), parameters=parameters, sft_seconds=setup_seconds,
                      **{key: value for key, value in data.items() if key != "pad_token_id"})
        print(f"SFT policy {policy} ({parameters:,} parameters); pairs: {data['rows']} rows, {data['fit']} fit in "
              f"{args.max_length} tokens ({data['too_long']} too long, {data['rendered_differently']} rendered differently), "
              f"{data['train']} to train ({steps} steps), {data['held_out']} held out; mean {data['mean_tokens']:.0f} tokens "
              f"per conversation", flush=True)

        rows = []
        for round_index in range(args.rounds):
            order = args.sides if round_index % 2 == 0 else list(reversed(args.sides))
            for side in order:
                print(f"round {round_index + 1}/{args.rounds}: {side} ...", end=" ", file=sys.stderr, flush=True)
                result = run_side(side, round_index, args, base, policy, work, warmup_steps, settings)
                result.update(derived(result), load_average_1m=round(os.getloadavg()[0], 2))
                result["held_out"] = held_out_accuracy(load_policy(result["policy"]), reference, held_out, data["pad_token_id"], args.beta)
                shutil.rmtree(Path(result["policy"]).parent if side == "chatpipe" else result["policy"], ignore_errors=True)
                if side == "chatpipe":
                    shutil.rmtree(work / "runs" / f"{side}-{round_index + 1}", ignore_errors=True)
                rows.append(result)
                reporter.emit("run", **{key: value for key, value in result.items() if key != "policy"})
                print(f"{result['pairs_per_second']:.2f} pairs/s, peak RSS {result['peak_rss_mb']:.0f} MB, held-out accuracy "
                      f"{result['held_out']['accuracy']:.3f}", file=sys.stderr, flush=True)

        summary = summarise(rows)
        found = comparisons(rows, summary)
        for entry in summary:
            reporter.emit("summary", **entry)
        for comparison in found:
            reporter.emit("ratio", **comparison)
        print_summary(summary, found)
        for row in rows:
            if row.get("profile"):
                import pstats

                print(f"\ncProfile of {row['name']} (round 1), top 30 by cumulative time:")
                pstats.Stats(row["profile"], stream=sys.stdout).sort_stats("cumulative").print_stats(30)
                kept = (args.out or BENCH / "results" / "x").parent / f"dpo_vs_trl_{row['name']}.prof"
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(row["profile"], kept)
        reporter.footer()
    finally:
        if temporary is not None:
            temporary.cleanup()


if __name__ == "__main__":
    main()
