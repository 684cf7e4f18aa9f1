"""RL trainers on CPU at identical settings: chatpipe's PPO, RLOO and GRPO against TRL 1.12's PPOTrainer and the installed TRL's GRPOTrainer and RLOOTrainer.

    .venv/bin/python bench/ppo_vs_trl.py                 # every side, 3 rounds: about 10 minutes on 2 shared CPU cores
    .venv/bin/python bench/ppo_vs_trl.py --repeats 1     # one round
    .venv/bin/python bench/ppo_vs_trl.py --skip-trl      # chatpipe's PPO, RLOO and GRPO only
    .venv/bin/python bench/ppo_vs_trl.py --trl grpo,rloo # no TRL 1.12 (no venv to build)
    .venv/bin/python bench/ppo_vs_trl.py --variant tok=rloo:importance_ratio=token --estimators rloo --trl rloo
    .venv/bin/python bench/ppo_vs_trl.py --sweep learning_rate=3e-4,1e-3,3e-3,1e-2 --trl grpo,rloo --estimators grpo,rloo
    .venv/bin/python bench/ppo_vs_trl.py --profile       # also cProfile both PPO runs (round 1)

TRL's GRPO and RLOO run in the main venv (bench/trl_rl_worker.py), from the TRL the project
installs. TRL removed PPOTrainer in 1.13, so PPO is compared with `trl.experimental.ppo.PPOTrainer`
from trl 1.12.0, which cannot share chatpipe's environment. On the first run with `--trl` naming
ppo (the default) this script builds its own venv, bench/.venv-trl112: the local CPU torch wheel
(`pip install --no-deps --no-index torch==X`, then its dependencies; an unpinned `pip install
torch` would pull a multi-GB CUDA build), then trl==1.12.0 with the main venv's transformers
(trl 1.12 runs with transformers 5; were it not to import, the script pins transformers<5 there
and prints that the sides differ).

GRPO and RLOO settings, TRL name = chatpipe name: 64 prompts x num_generations 4 =
samples_per_prompt 4, 256 episodes; steps_per_generation 2 x per_device_train_batch_size 8 =
rollout_batch_size 16 in num_mini_batches 2; num_iterations 4 = ppo_epochs 4, one optimiser step
per minibatch (gradient_accumulation_steps 1): 128 steps on both sides; max_completion_length 32;
temperature 0.7, top_k 0, top_p 1; beta 0.05 = kl_coef; epsilon 0.2 = cliprange; learning rate
3e-3, linear decay; max_grad_norm 1.0 on both. TRL's GRPO gets loss_type bnpo (--trl-grpo-loss-type),
chatpipe's token_mean. Each side keeps its own defaults otherwise: TRL's GRPO the ratio per token
and the KL (k3) in the loss, its RLOO the ratio of the whole response and the KL (k1) in the
reward, no whitening; chatpipe's the ratio per response (GSPO), the KL where TRL puts it,
whitening on. The prompts go to TRL as messages, rendered with the same chat template to the
same ids; the known reward is a function that also runs the reward model's transformer.

# ---------------------------------------------------------------------------------- setup
Built once per run in a temp folder that both sides load from:
- a byte-level BPE tokenizer (stages.tokenizer.bpe.train_bpe, vocab 2048) on Tiny Shakespeare;
- a Llama policy (hidden 64, 2 layers, 2 heads, 213k parameters, fp32) and a reward model of the
  same shape (AutoModelForSequenceClassification, one label), random-init from configs, saved
  with save_pretrained, the reward head re-drawn with std 1/sqrt(hidden). The reference is a
  second load of the policy, the value model a second load of the reward model, on both sides;
- the reward both sides optimise is a known one: the number of target tokens in the response,
  the targets 10% of the vocabulary (205 tokens) drawn among tokens no prompt contains
  (bench/ppo_bench_common.py `target_count_reward`). It is served as a reward-model-shaped
  module that also runs the reward model's transformer on the same tokens, so each side pays
  for a reward-model forward pass exactly as it would with a trained one;
- prompts: HH-harmless conversations (data/samples/hh_harmless_1000.jsonl) cut before the final
  reply (data.conversations.parse_hh + prompt_of), rendered with the chat template and its
  generation prompt, at most 128 tokens, shuffled once: 256 train prompts (PPO sees each once;
  TRL's DataLoader picks its own order; RLOO/GRPO use the first 64, 4 samples each) and 64
  held-out ones.

# ------------------------------------------------------------------------------- settings
Each run is its own process (peak RSS = that process's ru_maxrss): TRL PPO in the TRL venv
(bench/trl_ppo_worker.py); chatpipe PPO, RLOO and GRPO (samples_per_prompt 4, same 256-episode
budget) in the main venv (bench/chatpipe_ppo_worker.py, RLTrainer directly). `--repeats` rounds
(default 3) run every side once each, interleaved, training seed = seed + round; the table shows
medians. TRL name = chatpipe name: total_episodes 256; per_device_train_batch_size 8 x
gradient_accumulation_steps 2 = rollout_batch_size 16, micro_batch_size 8; num_mini_batches 2;
num_ppo_epochs = ppo_epochs 4; response_length 32; temperature 0.7; kl_coef 0.05, k1;
missing_eos_penalty None = "none"; cliprange 0.2, cliprange_value 0.2, vf_coef 0.1, gamma 1,
lam 0.95; learning_rate 3e-3 = policy and value learning rate (high, as in
tests/stages/test_ppo_learning.py: random-init models and 16 rollouts), linear decay to 0;
normalize_scores false (TRL optimises the raw score); advantages whitened. TRL also gets
stop_token "eos", bf16/fp16 off, gradient_checkpointing off (its PPOConfig defaults it on),
report_to none, use_cpu, num_sample_generations 0, and local_rollout_forward_batch_size 16: one
`generate` call per rollout, as chatpipe makes (chatpipe's scoring passes then run in
micro-batches of 8, TRL's in one of 16).

One torch thread per process (--threads 1): at this size intra-op threads buy nothing, and on a
shared 2-core machine two OpenMP threads per process spin-wait on each other; with torch's
default (2) chatpipe's PPO ran ~10x slower under load (1.9 vs 17.5 episodes/s), which would
measure the neighbours, not the trainers.

Differences that remain because the trainers differ, not the settings:
- TRL 1.12 samples with `generate` and takes rollout logprobs from its scores; chatpipe samples
  with its own loop (stages/ppo/sampling.py) and recomputes the logprobs with one more policy
  forward pass (rollout and training logprobs then come from the same kind of pass).
- chatpipe's scoring and training passes skip columns that are padding in every row of their
  micro-batch (the rollout is scored sorted by length); TRL's run over the rollout's full width.
- TRL calls optimizer.step() per micro-batch inside `accelerator.accumulate` with
  gradient_accumulation_steps = micro-batches per rollout, so the optimizer steps once per PPO
  epoch, not per minibatch, except on the last batch of each pass over the DataLoader, where
  accelerate syncs every micro-batch: 68 steps for 256 episodes against chatpipe's 128.
- TRL's PPO loop never clips gradients (chatpipe clips policy and value each to 1.0,
  --chatpipe-max-grad-norm). Both use torch's fused AdamW, TRL with eps 1e-8, chatpipe 1e-5.
- TRL runs the LM head over every position in training; chatpipe over the response only.
- TRL calls gc.collect() twice per rollout (after the scoring passes and after the update).

Reward gain: each worker samples the 64 held-out prompts 4 times each (seeded, temperature 0.7,
HF generate on both sides) before and after training and scores them with the known reward
through the same code (bench/ppo_bench_common.py), so the score before is the same number for
every run; also the mean training score of the first and last 3 rollouts. (Until 2026-11-24 the
reward was the random reward model itself: its scores moved by a few hundredths in 256
episodes, below the 0.057 standard error of the held-out score, so gains could not be told
apart, in either direction.)

Held-out KL: after training, the same held-out samples are scored by the policy and the
reference at the sampling temperature; the mean of log p - log q over response tokens (k1 on
the policy's own samples, unbiased) is the KL per token, measured alike whatever each trainer logs.

# -------------------------------------------------------------------------------- results
2026-12-03 20:35 UTC, 2-core shared AMD EPYC VM (load 0.2 at start, 1.0 at the end), torch
2.13.0+cpu, transformers 5.24.0, accelerate 1.16.0, TRL 1.16.0 (GRPO, RLOO) and 1.12.0 (PPO),
medians of 3 rounds (gains and KL: means), held-out score before 3.14 (standard error 0.10):

    side           episodes/s  rollout s  update s  opt steps  peak RSS MB  held-out gain     KL/token after
    trl-ppo        12.45       6.7        10.6      68         601          +0.37 (sd 0.07)   0.084
    chatpipe-ppo   23.39       3.0        8.0       128        474          +2.18 (sd 1.22)   0.292
    trl-grpo       12.69       4.5        15.7      128        668          +1.47 (sd 0.34)   0.221
    chatpipe-grpo  30.03       3.3        5.2       128        473          +6.51 (sd 6.55)   1.049
    trl-rloo       11.42       5.2        17.0      128        666          +4.23 (sd 1.58)   0.628
    chatpipe-rloo  35.32       2.6        4.6       128        506          +15.76 (sd 3.00)  2.838

chatpipe / TRL, episodes/s (round by round) and peak RSS: PPO x1.88 (1.82, 1.83, 2.02) at x0.79;
GRPO x2.37 (2.67, 2.58, 2.12) at x0.71; RLOO x3.09 (2.23, 3.53, 3.24) at x0.76. chatpipe's GRPO
and RLOO runs do the same work and last 6-10 s, so the machine's drift moves them most: they ran
at 26.7-40.4 episodes/s here, and right after, in a run of their own, at 41.4-42.8 (GRPO with the
ratio per response) and 40.0-41.8 (per token): the ratio's level costs nothing, and 41.6 is 3.3x
this run's TRL GRPO. An earlier run the same day under load 2.0 (2 rounds) gave PPO x1.74, GRPO
x3.32, RLOO x2.41, with the same gains to within their spread.

Learning, with the options that explain the gap (run seeds 0, 1, 2 at the settings above, one
run each; gain @ KL per token):

    chatpipe rloo, ratio per token (the default before)      +0.52 @ 0.10, +0.90 @ 0.17, +1.29 @ 0.19
      ... whitening off                                      +1.03 @ 0.17, +2.11 @ 0.35 (seeds 1, 2)
      ... Adam eps 1e-8                                      +0.65 @ 0.10, +2.21 @ 0.34, +4.91 @ 0.75
      ... one minibatch order for all epochs (TRL's)         +0.62 @ 0.11, +1.33 @ 0.19 (seeds 1, 2)
      ... ratio of the whole response (sequence_sum)         +4.71 @ 0.60, +4.01 @ 0.54, +3.00 @ 0.53
      ... per response, geometric mean (GSPO, the default)   +18.85 @ 3.50, +12.86 @ 2.28, +15.57 @ 2.74
    trl rloo                                                 +6.04 @ 0.83, +3.49 @ 0.55, +3.15 @ 0.50
    chatpipe grpo, ratio per token (the default before)      +0.59 @ 0.10, +1.58 @ 0.20, +0.59 @ 0.11
      ... whitening off                                      +1.18 @ 0.18, +0.61 @ 0.10 (seeds 1, 2)
      ... per response (GSPO, the default)                   +1.31 @ 0.17, +13.87 @ 2.34, +4.36 @ 0.64
    trl grpo                                                 +1.15 @ 0.17, +1.83 @ 0.32, +1.43 @ 0.18

Every run of both trainers bought 5-10 target tokens per nat of KL per token (fewer at large
KL): the options moved how far a run went, not what each nat bought. The per-token clip was
what held chatpipe's group estimators back. Reward against KL over learning rates (seeds 0, 1;
3e-3 from the table above), where the two trainers' points lie on one curve:

    chatpipe grpo  3e-4: +0.15 @ 0.015, +0.13 @ 0.019   1e-3: +0.19 @ 0.025, +0.09 @ 0.025
    trl grpo       1e-3: +0.12 @ 0.020, +0.11 @ 0.025   1e-2: +3.50 @ 0.77, +4.20 @ 0.69
    chatpipe rloo  3e-4: +0.10 @ 0.017, +0.12 @ 0.012   1e-3: +0.31 @ 0.032, +0.24 @ 0.036
    trl rloo       1e-3: +0.61 @ 0.087, +0.50 @ 0.060   1e-2: +28.66 @ 5.72, +27.11 @ 4.90

At matched KL chatpipe's points sit on or above TRL's (GRPO at 0.6-0.8 nats: +4.36 @ 0.64
against +3.50 @ 0.77 and +4.20 @ 0.69; RLOO at 2.3-3.5 nats: 5.4-5.7 target tokens per nat
against 5.0-5.5 for TRL's at 4.9-5.7). The reward here is a count with nothing to overfit:
on a learned reward model, moving further is not by itself better, which is what the KL
penalty, the judges and `select_by` are for.

2-core shared AMD EPYC VM (load 0.6 at start), torch 2.13.0+cpu, transformers 5.23.0 on both
sides, accelerate 1.15.0, medians of 3 rounds, 256 episodes each (2026-11-24):

    side      estimator  episodes/s  tokens/s  rollout s (generate s)  update s  wall s  gc s  opt steps  peak RSS MB  RSS@start MB  held-out gain
    trl       ppo        19.69       1912      4.3 (0.9)               6.1       13.0    5.3   68         576          467           +0.42 (sd 0.08)
    chatpipe  ppo        43.58       7266      1.1 (0.5)               4.7       5.9     0.0   128        445          387           +2.07 (sd 0.72)
    chatpipe  rloo k=4   76.93       9422      0.9 (0.5)               2.4       3.3     0.0   128        427          393           +0.89 (sd 0.41)
    chatpipe  grpo k=4   78.65       9500      0.9 (0.5)               2.4       3.3     0.0   128        426          386           +0.99 (sd 0.62)

chatpipe PPO / TRL PPO: episodes/s x2.21, generated tokens/s x3.80 (tokens over the rollout
phase), rollout time x0.26, update time x0.78, CPU time x0.45, peak RSS x0.77 (RSS growth during
training x0.53). Held-out score before training 3.14 target tokens per response (standard error
0.10); training score over the first -> last 3 rollouts 3.26 -> 4.96 (chatpipe PPO) and
3.38 -> 3.43 (TRL).

The same code before this round of work (commit 0b93483, same day, same machine, quiet): x1.96
(TRL 19.37, chatpipe 38.05 episodes/s), and x1.79 the day before under load.

Where the time goes:
- TRL: gc.collect() is ~41% of its wall time (5.3 of 13.0 s: two full collections per rollout;
  both processes hold ~400k Python objects after importing transformers, so a full collection
  costs the same in either, but chatpipe never forces one). Its rollout is 0.9 s of generation,
  ~1 s of scoring passes over the full padded width, and one collection per rollout.
- chatpipe PPO (cProfile of one run, shares of the loop): rollout 20% (sampling 10.5%, scoring
  passes 10%), update 79%: backward 41%, forward passes of policy and value ~28%, gradient
  clipping 3.3%, fused AdamW 2%, the entropy metric 2.4%. The models' own forward and backward
  are what is left: at this size packing sequences into one row costs more than the padding it
  saves (CPU attention computes the whole block-diagonal mask: 22 ms against 17 ms for a padded
  micro-batch), so the update cuts all-padding columns instead.
  What moved it from x1.96 (cProfile and torch.profiler, then the fixes): 41% of the scoring
  and training positions were padding (now cut per micro-batch, the rollout scored sorted by
  length: rollout 1.6 -> 1.1 s); `torch.multinomial` was 30% of generate's time and its per-token
  bookkeeping another ~15% (own sampler: generation 0.9 -> 0.5 s); the entropy metric's second
  log-softmax; the single-tensor AdamW (fused: 0.62 -> 0.18 ms a step).
  The value model is half of the update: RLOO and GRPO, which drop it, update in half the time.
- Memory: TRL starts 80 MB higher (it imports pandas, pyarrow, datasets, rich) and grows 109 MB in
  training against chatpipe's 58 MB (full-vocabulary logits over every position in training,
  generate's scores kept for the rollout).
- Learning: on the known reward chatpipe's PPO raised the held-out count by 2.07 target tokens
  per response against TRL's 0.42 (means of 3 rounds). Round by round chatpipe gained 1.51 /
  1.82 / 2.88 and TRL 0.51 / 0.41 / 0.34: 1.0-2.5 tokens apart, 6 to 15 standard errors of the
  difference (each held-out score has a standard error of 0.10-0.14). chatpipe takes twice
  the optimizer steps at the same learning rate (see above), so read this as "learns at least as
  much", not as a property of the PPO math. At this size per-step overheads dominate; the
  ratios say nothing about GPU-sized models.

Output: machine, versions and settings, the table, the chatpipe/TRL ratios, and JSON lines
appended to bench/results/ppo_vs_trl.jsonl: one per run ("kind": "run"), one per side
("summary"), one "comparison".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TRL_VENV = BENCH / ".venv-trl112"
TRL_VERSION = "1.12.0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=256)
    parser.add_argument("--rollout-batch-size", type=int, default=16)
    parser.add_argument("--num-mini-batches", type=int, default=2)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="for RLOO and GRPO")
    parser.add_argument("--temperature", type=float, default=0.7, help="TRL's default")
    parser.add_argument("--kl-coef", type=float, default=0.05, help="TRL's default")
    parser.add_argument("--missing-eos-penalty", type=float, default=None, help="TRL's default: none")
    parser.add_argument("--learning-rate", type=float, default=3e-3,
                        help="policy and value (high: random-init models and 16 rollouts; the score must move)")
    parser.add_argument("--chatpipe-max-grad-norm", type=float, default=1.0)
    parser.add_argument("--trl-rollout-forward-batch-size", type=int, default=None, help="default: the rollout batch size")
    parser.add_argument("--target-share", type=float, default=0.1,
                        help="the known reward counts target tokens: this share of the vocabulary, drawn among tokens no prompt has")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts for the score before and after")
    parser.add_argument("--eval-samples-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="models, prompts and held-out sampling; round r trains with seed+r")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs every side once, interleaved")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker; 0 = torch's default (one per core). See the docstring for why 1")
    parser.add_argument("--estimators", default="ppo,rloo,grpo", help="chatpipe estimators to run")
    parser.add_argument("--trl", default="ppo,grpo,rloo",
                        help="TRL trainers to run: ppo (TRL 1.12's PPOTrainer, in its own venv), grpo and rloo (the installed TRL's)")
    parser.add_argument("--skip-trl", action="store_true", help="no TRL side at all")
    parser.add_argument("--trl-grpo-loss-type", default="bnpo", help="TRL GRPO's loss_type; bnpo is chatpipe's token_mean")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=ESTIMATOR:KEY=VALUE,...",
                        help="an extra chatpipe side with ppo options changed, e.g. 'seq=rloo:importance_ratio=sequence_sum'; "
                        "repeat for several")
    parser.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                        help="kl_coef or learning_rate: run every GRPO and RLOO side (both trainers) at each value, "
                        "for reward-vs-KL curves (e.g. learning_rate=1e-3,3e-3,1e-2)")
    parser.add_argument("--profile", action="store_true", help="cProfile both PPO runs; top functions printed, .prof files kept")
    parser.add_argument("--results", type=Path, default=BENCH / "results" / "ppo_vs_trl.jsonl")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------ TRL's venv
def main_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "accelerate", "trl")}


def trl_venv_python() -> Path:
    """bench/.venv-trl112/bin/python with trl 1.12 importable, built on first use."""
    python = TRL_VENV / "bin" / "python"
    check = [str(python), "-c", "from trl.experimental.ppo import PPOTrainer; import trl; assert trl.__version__ == '%s'" % TRL_VERSION]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    versions = main_versions()
    torch_version = versions["torch"].split("+")[0]
    print(f"building {TRL_VENV.relative_to(ROOT)} (trl=={TRL_VERSION}, torch=={torch_version}, transformers=={versions['transformers']})",
          file=sys.stderr)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    # The local CPU wheel first (no index: a CUDA build of the same version must not win), then its dependencies.
    if subprocess.run(pip + ["--no-deps", "--no-index", f"torch=={torch_version}"]).returncode != 0:
        subprocess.run(pip + [f"torch=={torch_version}", "--index-url", "https://download.pytorch.org/whl/cpu"], check=True)
    subprocess.run(pip + [f"torch=={torch_version}"], check=True)
    subprocess.run(pip + [f"trl=={TRL_VERSION}", f"transformers=={versions['transformers']}", "accelerate", "datasets"], check=True)
    if subprocess.run(check, capture_output=True).returncode != 0:
        print(f"trl {TRL_VERSION} does not import with transformers {versions['transformers']}; pinning transformers<5", file=sys.stderr)
        subprocess.run(pip + ["transformers<5"], check=True)
        subprocess.run(check, check=True)
    return python


# ----------------------------------------------------------------------------------- setup
def prepare(folder: Path, args: argparse.Namespace) -> dict:
    """Tokenizer, policy and reward model (saved), and prompts.json: what both sides load."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from data.conversations import parse_hh, prompt_of
    from stages.tokenizer.bpe import train_bpe

    tokenizer = train_bpe([[(ROOT / "data/samples/tinyshakespeare.txt").read_text()]], vocab_size=args.vocab_size)
    tokenizer.save_pretrained(folder / "tokenizer")
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    policy = AutoModelForCausalLM.from_config(config)
    policy.generation_config.pad_token_id, policy.generation_config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    policy.save_pretrained(folder / "policy")
    config.num_labels = 1
    torch.manual_seed(args.seed + 1)
    reward = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        reward.score.weight.normal_(0.0, args.hidden_size ** -0.5)
    reward.save_pretrained(folder / "reward")

    prompts, too_long = [], 0
    for line in (ROOT / "data/samples/hh_harmless_1000.jsonl").read_text().splitlines():
        messages = prompt_of(parse_hh(json.loads(line)["chosen"]))
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        if len(ids) <= args.max_prompt_length:
            prompts.append((list(ids), [{"role": m["role"], "content": m["content"]} for m in messages]))
        else:
            too_long += 1
    random.Random(args.seed).shuffle(prompts)
    needed = args.episodes + args.eval_prompts
    if len(prompts) < needed:
        raise SystemExit(f"only {len(prompts)} prompts fit in --max-prompt-length {args.max_prompt_length}; {needed} needed")
    train, held_out = [ids for ids, _ in prompts[: args.episodes]], [ids for ids, _ in prompts[args.episodes : needed]]
    # TRL's GRPO and RLOO take messages and render them with the same template to the same ids.
    train_messages = [messages for _, messages in prompts[: args.episodes]]
    (folder / "prompts.json").write_text(json.dumps({"train": train, "eval": held_out, "train_messages": train_messages}))
    # The known reward's targets: a share of the vocabulary that no prompt contains (and no special token).
    seen = {token for ids in train + held_out for token in ids} | set(tokenizer.all_special_ids)
    unseen = [token for token in range(len(tokenizer)) if token not in seen]
    targets = sorted(random.Random(args.seed).sample(unseen, min(len(unseen), round(args.target_share * len(tokenizer)))))
    (folder / "reward_targets.json").write_text(json.dumps(targets))
    parameters = sum(p.numel() for p in policy.parameters())
    return {"vocab_size": len(tokenizer), "policy_parameters": parameters, "prompts_too_long": too_long,
            "mean_prompt_tokens": sum(map(len, train)) / len(train), "max_prompt_tokens": max(map(len, train)),
            "target_tokens": len(targets)}


# ------------------------------------------------------------------------------------- runs
def run_worker(python: Path, worker: str, config: dict, folder: Path, name: str) -> dict:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    log = folder / f"{name}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    with open(log, "w") as stderr:
        result = subprocess.run([str(python), str(BENCH / worker), str(path)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{name} failed (exit {result.returncode}); last of {log}:\n{tail}")
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    answer["process_seconds"] = time.perf_counter() - started
    return answer


def derived(result: dict) -> dict:
    """Rates from the raw seconds and counts, the same formulas for both sides."""
    return {
        "episodes_per_second": result["episodes"] / result["wall_seconds"],
        "generated_tokens_per_second": result["generated_tokens"] / result["rollout_seconds"],
        "generation_tokens_per_second": result["generated_tokens"] / max(result["generation_seconds"], 1e-9),
        "score_gain": result["eval_after"]["score"] - result["eval_before"]["score"],
        "kl_after": result["eval_after"].get("kl"),
    }


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"host": platform.node(), "platform": platform.platform(), "cpu": model, "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2)}


def parse_variant(text: str) -> tuple[str, str, dict]:
    """'LABEL=ESTIMATOR:key=value,key=value' -> (label, estimator, options); values as JSON where they parse."""
    try:
        label, rest = text.split("=", 1)
        estimator, _, pairs = rest.partition(":")
        options = {}
        for pair in filter(None, pairs.split(",")):
            key, value = pair.split("=", 1)
            try:
                options[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                options[key.strip()] = value.strip()
    except ValueError:
        raise SystemExit(f"--variant {text!r}: expected LABEL=ESTIMATOR:KEY=VALUE,... (e.g. seq=rloo:importance_ratio=sequence)")
    if estimator not in ("ppo", "rloo", "grpo"):
        raise SystemExit(f"--variant {text!r}: estimator must be ppo, rloo or grpo, not {estimator!r}")
    return label.strip(), estimator, options


def summarise(rows: list[dict]) -> list[dict]:
    """One row per side: medians of the times and rates over rounds, mean and spread of the gains and KLs."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["name"], []).append(row)
    summary = []
    for name, group in groups.items():
        gains = [r["score_gain"] for r in group]
        kls = [r["kl_after"] for r in group if r.get("kl_after") is not None]
        entry = {"name": name, "side": group[0]["side"], "estimator": group[0]["estimator"], "variant": group[0].get("variant"),
                 "changed": group[0]["changed"], "samples_per_prompt": group[0]["samples_per_prompt"], "runs": len(group),
                 "transformers": group[0]["transformers"], "trl": group[0].get("trl"), "optimizer_steps": group[0]["optimizer_steps"],
                 "score_before": group[0]["eval_before"]["score"],
                 "score_after_mean": statistics.mean(r["eval_after"]["score"] for r in group),
                 "score_gain_mean": statistics.mean(gains), "score_gain_sd": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                 "kl_after_mean": statistics.mean(kls) if kls else None,
                 "kl_after_sd": statistics.stdev(kls) if len(kls) > 1 else 0.0,
                 "score_standard_error": group[0]["eval_before"]["score_standard_error"],
                 "train_score_first_mean": statistics.mean(r["train_score_first"] for r in group),
                 "train_score_last_mean": statistics.mean(r["train_score_last"] for r in group),
                 "peak_rss_mb": max(r["peak_rss_mb"] for r in group)}
        for key in ("episodes_per_second", "generated_tokens_per_second", "rollout_seconds", "generation_seconds",
                    "update_seconds", "wall_seconds", "cpu_seconds", "gc_seconds", "rss_before_training_mb"):
            entry[key] = statistics.median(r[key] for r in group)
        summary.append(entry)
    return summary


def print_table(summary: list[dict]) -> None:
    header = ["side", "episodes/s", "tokens/s", "rollout s", "(generate s)", "update s", "wall s", "cpu s",
              "gc s", "opt steps", "peak RSS MB", "RSS@start MB", "held-out gain", "KL/token after", "train score first3->last3"]
    lines = [header]
    for r in summary:
        kl = "-" if r["kl_after_mean"] is None else f"{r['kl_after_mean']:.3f} (sd {r['kl_after_sd']:.3f})"
        lines.append([
            r["name"],
            f"{r['episodes_per_second']:.2f}", f"{r['generated_tokens_per_second']:.0f}",
            f"{r['rollout_seconds']:.1f}", f"({r['generation_seconds']:.1f})", f"{r['update_seconds']:.1f}",
            f"{r['wall_seconds']:.1f}", f"{r['cpu_seconds']:.1f}", f"{r['gc_seconds']:.1f}", str(r["optimizer_steps"]),
            f"{r['peak_rss_mb']:.0f}", f"{r['rss_before_training_mb']:.0f}",
            f"{r['score_gain_mean']:+.3f} (sd {r['score_gain_sd']:.3f})", kl,
            f"{r['train_score_first_mean']:+.3f}->{r['train_score_last_mean']:+.3f}",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def comparisons(summary: list[dict]) -> list[dict]:
    """chatpipe's default side against TRL's, per estimator and beta: the ratios the README quotes."""
    found = []
    for trl in (r for r in summary if r["side"] == "trl"):
        ours = next((r for r in summary if r["side"] == "chatpipe" and r["variant"] is None
                     and r["estimator"] == trl["estimator"] and r["changed"] == trl["changed"]), None)
        if ours is None:
            continue
        found.append({
            "estimator": trl["estimator"], "changed": trl["changed"], "trl": trl["trl"],
            "episodes_per_second_ratio": ours["episodes_per_second"] / trl["episodes_per_second"],
            "generated_tokens_per_second_ratio": ours["generated_tokens_per_second"] / trl["generated_tokens_per_second"],
            "rollout_seconds_ratio": ours["rollout_seconds"] / trl["rollout_seconds"],
            "update_seconds_ratio": ours["update_seconds"] / trl["update_seconds"],
            "cpu_seconds_ratio": ours["cpu_seconds"] / trl["cpu_seconds"],
            "peak_rss_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"],
            "score_gain": [ours["score_gain_mean"], trl["score_gain_mean"]],
            "kl_after": [ours["kl_after_mean"], trl["kl_after_mean"]],
        })
    return found


def print_comparisons(found: list[dict]) -> None:
    for c in found:
        kl = "" if None in c["kl_after"] else f" at KL/token {c['kl_after'][0]:.3f} vs {c['kl_after'][1]:.3f}"
        at = "".join(f" ({key} {value:g})" for key, value in c["changed"].items())
        print(f"chatpipe {c['estimator']} / TRL {c['trl'] or TRL_VERSION} {c['estimator']}{at}: "
              f"episodes/s x{c['episodes_per_second_ratio']:.2f}, rollout time x{c['rollout_seconds_ratio']:.2f}, "
              f"update time x{c['update_seconds_ratio']:.2f}, peak RSS x{c['peak_rss_ratio']:.2f}; "
              f"held-out gain {c['score_gain'][0]:+.3f} vs {c['score_gain'][1]:+.3f}{kl}")


def print_curves(summary: list[dict], key: str) -> None:
    """Reward against KL, one line per side over the sweep: the fair comparison when one side drifts further."""
    by_side: dict[str, list[dict]] = {}
    for r in summary:
        if r["kl_after_mean"] is not None and r["changed"]:
            by_side.setdefault(r["name"].split("@")[0], []).append(r)
    print(f"\nheld-out gain against KL per token after training, over {key} (reward-vs-KL curves):")
    for name, points in by_side.items():
        points.sort(key=lambda r: r["kl_after_mean"])
        cells = ", ".join(f"{r['changed'][key]:g}: {r['score_gain_mean']:+.2f} @ {r['kl_after_mean']:.3f}" for r in points)
        print(f"  {name}: {cells}")


def print_profile(name: str, path: Path, limit: int = 40) -> None:
    import pstats

    print(f"\ncProfile of {name}'s training loop ({path}), top {limit} by cumulative time:")
    pstats.Stats(str(path), stream=sys.stdout).sort_stats("cumulative").print_stats(limit)


def sweep_values(args: argparse.Namespace) -> tuple[str, list[float]]:
    """(key, values) of --sweep; without one, the single value of --kl-coef."""
    if not args.sweep:
        return "kl_coef", [args.kl_coef]
    key, _, values = args.sweep.partition("=")
    if key not in ("kl_coef", "learning_rate") or not values:
        raise SystemExit(f"--sweep {args.sweep!r}: expected kl_coef=V1,V2,... or learning_rate=V1,V2,...")
    return key, [float(value) for value in values.split(",")]


def trl_trainers(args: argparse.Namespace) -> list[str]:
    """The TRL trainers --trl names (none with --skip-trl)."""
    return [] if args.skip_trl else [name.strip() for name in args.trl.split(",") if name.strip()]


def plan_sides(args: argparse.Namespace, trl_python: Path | None) -> list[dict]:
    """Every side to run each round: a name, the interpreter, the worker, and the settings it changes.

    PPO runs once, at the base settings; GRPO and RLOO at every value of --sweep (named side@value)."""
    key, values = sweep_values(args)
    swept = len(values) > 1
    trl = trl_trainers(args)
    estimators = [name.strip() for name in args.estimators.split(",") if name.strip()]
    variants = [parse_variant(text) for text in args.variant]
    here = Path(sys.executable)
    sides = []

    def add(name, python, worker, estimator, value=None, variant=None, options=None):
        changed = {} if value is None else {key: value}
        sides.append({"name": f"{name}@{value:g}" if swept and value is not None else name, "python": python,
                      "worker": worker, "estimator": estimator, "changed": changed, "variant": variant, "options": options or {}})

    if "ppo" in trl and trl_python is not None:
        add("trl-ppo", trl_python, "trl_ppo_worker.py", "ppo")
    if "ppo" in estimators:
        add("chatpipe-ppo", here, "chatpipe_ppo_worker.py", "ppo")
    for label, estimator, options in variants:
        if estimator == "ppo":
            add(f"chatpipe-ppo-{label}", here, "chatpipe_ppo_worker.py", "ppo", None, label, options)
    for value in values:
        value = value if swept else None
        for estimator in ("grpo", "rloo"):
            if estimator in trl:
                add(f"trl-{estimator}", here, "trl_rl_worker.py", estimator, value)
            if estimator in estimators:
                add(f"chatpipe-{estimator}", here, "chatpipe_ppo_worker.py", estimator, value)
        for label, estimator, options in variants:
            if estimator != "ppo":
                add(f"chatpipe-{estimator}-{label}", here, "chatpipe_ppo_worker.py", estimator, value, label, options)
    return sides


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trl_python = trl_venv_python() if "ppo" in trl_trainers(args) else None
    settings = {
        "episodes": args.episodes, "rollout_batch_size": args.rollout_batch_size, "num_mini_batches": args.num_mini_batches,
        "ppo_epochs": args.ppo_epochs, "micro_batch_size": args.micro_batch_size, "response_length": args.response_length,
        "samples_per_prompt": args.samples_per_prompt, "temperature": args.temperature, "kl_coef": args.kl_coef,
        "missing_eos_penalty": args.missing_eos_penalty, "learning_rate": args.learning_rate,
        "chatpipe_max_grad_norm": args.chatpipe_max_grad_norm,
        "trl_rollout_forward_batch_size": args.trl_rollout_forward_batch_size or args.rollout_batch_size,
        "trl_grpo_loss_type": args.trl_grpo_loss_type, "sweep": args.sweep,
        "target_share": args.target_share,
        "hidden_size": args.hidden_size, "layers": args.layers, "vocab_size": args.vocab_size,
        "max_prompt_length": args.max_prompt_length, "eval_prompts": args.eval_prompts,
        "eval_samples_per_prompt": args.eval_samples_per_prompt, "seed": args.seed, "repeats": args.repeats,
        "threads": args.threads, "dtype": "float32", "device": "cpu",
    }
    host = machine()
    rows, profiles = [], {}
    with tempfile.TemporaryDirectory(prefix="ppo-vs-trl-") as temp:
        folder = Path(temp)
        data = prepare(folder, args)
        print(f"machine: {host['cpu']}, {host['cpus']} CPUs, load {host['load_average_1m']:.2f}; {host['platform']}")
        print(f"main venv: {json.dumps(main_versions())}")
        print(f"models: Llama hidden {args.hidden_size}, {args.layers} layers, vocab {data['vocab_size']}, "
              f"{data['policy_parameters']:,} parameters each (policy, reference, value, reward), fp32 on CPU, "
              f"{args.threads or 'default'} torch thread(s) per process")
        print(f"prompts: HH-harmless, <= {args.max_prompt_length} tokens (mean {data['mean_prompt_tokens']:.0f}, "
              f"max {data['max_prompt_tokens']}), left-padded; {args.eval_prompts} held out x {args.eval_samples_per_prompt} samples")
        print(f"reward: the number of target tokens in the response ({data['target_tokens']} targets, tokens no prompt "
              f"contains), computed alongside the reward model's forward pass")
        print(f"settings: {json.dumps(settings)}")
        sys.stdout.flush()

        sides = plan_sides(args, trl_python)
        for round_index in range(args.repeats):
            for side in sides:
                name = side["name"]
                config = {"folder": str(folder), "settings": {**settings, **side["changed"]},
                          "run_seed": args.seed + round_index, "estimator": side["estimator"], "options": side["options"]}
                if args.profile and round_index == 0 and name in ("trl-ppo", "chatpipe-ppo"):
                    args.results.parent.mkdir(parents=True, exist_ok=True)
                    profiles[name] = config["profile"] = str(args.results.parent / f"ppo_vs_trl_{name}.prof")
                print(f"round {round_index + 1}/{args.repeats}: {name} ...", end=" ", file=sys.stderr, flush=True)
                result = run_worker(side["python"], side["worker"], config, folder, f"{name}-{round_index}")
                result.update(derived(result), name=name, variant=side["variant"], changed=side["changed"],
                              round=round_index, run_seed=config["run_seed"], profiled=bool(config.get("profile")),
                              load_average_1m=round(os.getloadavg()[0], 2))
                rows.append(result)
                print(f"{result['episodes_per_second']:.2f} episodes/s, wall {result['wall_seconds']:.1f}s, "
                      f"gain {result['score_gain']:+.2f}, peak RSS {result['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)

    # A profiled run is slower: the summary leaves it out where an unprofiled run of the same side exists.
    timed = [r for r in rows if not r["profiled"] or not any(o is not r and not o["profiled"] and o["name"] == r["name"] for o in rows)]
    summary = summarise(timed)
    print(f"\nmedians over {args.repeats} interleaved round(s); held-out score before training "
          f"{summary[0]['score_before']:+.3f} (standard error {summary[0]['score_standard_error']:.3f}), the same for every run")
    print_table(summary)
    versions = {r["name"]: r["transformers"] for r in summary}
    if len(set(versions.values())) > 1:
        print(f"\nNOTE: the sides ran different transformers versions: {versions}")
    found = comparisons(summary)
    if found:
        print()
        print_comparisons(found)
    if args.sweep:
        print_curves(summary, sweep_values(args)[0])
    for name, path in profiles.items():
        print_profile(name, Path(path))

    args.results.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    common = {"benchmark": "ppo_vs_trl", "time": stamp, "machine": host, "settings": settings}
    with open(args.results, "a") as out:
        for row in rows:
            out.write(json.dumps({**common, "kind": "run", **row}) + "\n")
        for entry in summary:
            out.write(json.dumps({**common, "kind": "summary", **entry}) + "\n")
        for comparison in found:
            out.write(json.dumps({**common, "kind": "comparison", "chatpipe_over_trl": comparison}) + "\n")
    shown = args.results.relative_to(ROOT) if args.results.resolve().is_relative_to(ROOT) else args.results
    print(f"\n{len(rows)} runs, {len(summary)} summary and {len(found)} comparison line(s) appended to {shown}")


if __name__ == "__main__":
    main()
