"""How step cost grows: pretraining with sequence length, PPO with response length.

    .venv/bin/python bench/scaling.py                        # both parts: ~1 min on a quiet 2-core CPU
    .venv/bin/python bench/scaling.py --only ppo --response-lengths 16,32,64,128

Pretraining: chatpipe's pretraining step (`bench/pretrain_throughput.py::ChatpipeLoop`, which
runs the stage's own `OptimizerStep`) at several block sizes with the tokens per
batch held fixed (4096 = 32 x 128 = 16 x 256 = 8 x 512), so the only thing that grows is the
attention span. Each point's step time is divided by the smallest point's, next to the ratio the
FLOPs model predicts (PaLM: 6N + 12 * layers * hidden * seq per token).

PPO: `stages.ppo.trainer.RLTrainer.step` (one rollout, then ppo_epochs passes of clipped
updates) with the demo's PPO settings (configs/tiny.yaml: 32 responses a rollout, 2 minibatches,
micro-batches of 16, 4 epochs) on in-memory models of the demo's size built the way
tests/conftest.py builds its tiny ones (a Llama policy, a frozen copy as reference, a Llama
scalar-head TokenScorer as value), against a synthetic reward (the fraction of response tokens in
a fixed token set, as tests/stages/test_ppo_learning.py). The trainer's own `time/rollout` and
`time/update` metrics split each step; rollout is split again into sampling and the scoring
forward passes (logprobs, reference, value, reward) by timing the experience maker's sampling call
(`stages.ppo.rollout.sample_responses`, wrapped in this process only).

Points are timed round-robin (one step of each point per round) so drift on a shared machine
spreads over all of them; every figure is also given as a ratio to the smallest point (the median,
over rounds, of the ratio between steps timed in the same round).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO_ROOT, Reporter, device, median, synchronize, table  # noqa: E402
from bench.pretrain_throughput import (  # noqa: E402
    ChatpipeLoop,
    add_model_args,
    flops_per_token,
    matmul_parameters,
    model_config,
    pretrain_section,
    tokenized_documents,
    train_tokenizer,
)

import torch  # noqa: E402

NAME = "scaling"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("pretrain", "ppo"), help="Run one part.")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", help="JSON-lines file to append to (default bench/results/scaling.jsonl).")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice, one per core).")
    pretrain = parser.add_argument_group("pretraining (model flags as bench/pretrain_throughput.py)")
    add_model_args(pretrain)
    pretrain.add_argument("--seq-lens", default="128,256,512", help="Block sizes, comma separated.")
    pretrain.add_argument("--tokens-per-batch", type=int, default=4096, help="Held fixed: batch = this / block size.")
    pretrain.add_argument("--pretrain-warmup", type=int, default=1)
    pretrain.add_argument("--pretrain-steps", type=int, default=8, help="Timed steps per point.")
    ppo = parser.add_argument_group("PPO (defaults: configs/tiny.yaml's model and ppo section)")
    ppo.add_argument("--response-lengths", default="16,32,64", help="Response lengths, comma separated.")
    ppo.add_argument("--ppo-hidden", type=int, default=128)
    ppo.add_argument("--ppo-layers", type=int, default=4)
    ppo.add_argument("--ppo-heads", type=int, default=4)
    ppo.add_argument("--ppo-intermediate", type=int, default=384)
    ppo.add_argument("--rollout-batch", type=int, default=32)
    ppo.add_argument("--mini-batches", type=int, default=2)
    ppo.add_argument("--micro-batch", type=int, default=16)
    ppo.add_argument("--ppo-epochs", type=int, default=4)
    ppo.add_argument("--query-length", type=int, default=64, help="Prompts are Shakespeare paragraphs cut to at most this many tokens.")
    ppo.add_argument("--ppo-warmup", type=int, default=1)
    ppo.add_argument("--ppo-steps", type=int, default=4, help="Timed trainer steps per point.")
    return parser.parse_args(argv)


def ints(text: str) -> list[int]:
    return sorted(int(part) for part in text.split(",") if part.strip())


def round_ratio(values: list[float], base_values: list[float]) -> float:
    """Median over rounds of value / base value, each pair timed in the same round (drift cancels)."""
    return median([value / base for value, base in zip(values, base_values)])


# ----------------------------------------------------------------------------- pretraining
def pretrain_scaling(args, tokenizer, reporter: Reporter) -> None:
    from data.packing import pack_documents

    seq_lens = ints(args.seq_lens)
    raw = tokenized_documents(tokenizer, "paragraph")
    loops = {}
    for seq in seq_lens:
        if args.tokens_per_batch % seq:
            raise SystemExit(f"--tokens-per-batch {args.tokens_per_batch} is not a multiple of block size {seq}")
        blocks = pack_documents(raw, tokenizer.eos_token_id, seq)
        section = pretrain_section(seq, args.tokens_per_batch // seq)
        loops[seq] = ChatpipeLoop(model_config(args, max(seq_lens)), section, tokenizer, blocks, args.seed)
    first = loops[seq_lens[0]].unwrapped
    n_matmul = matmul_parameters(first)

    for loop in loops.values():
        for _ in range(args.pretrain_warmup):
            loop.step()
    seconds = {seq: [] for seq in seq_lens}
    for _ in range(args.pretrain_steps):
        for seq, loop in loops.items():
            seconds[seq].append(loop.step().seconds)

    base_seq = seq_lens[0]
    base_flops = flops_per_token(n_matmul, args.layers, args.hidden, base_seq)
    rows = []
    for seq in seq_lens:
        step = median(seconds[seq])
        predicted = flops_per_token(n_matmul, args.layers, args.hidden, seq) / base_flops
        record = reporter.emit(
            "pretrain_seq_len", seq_len=seq, batch=args.tokens_per_batch // seq, tokens_per_step=args.tokens_per_batch,
            median_step_seconds=step, step_seconds=seconds[seq], tokens_per_second=args.tokens_per_batch / step,
            ratio_to_smallest=round_ratio(seconds[seq], seconds[base_seq]), flops_ratio_to_smallest=predicted,
            attention_share_of_flops=12 * args.layers * args.hidden * seq / flops_per_token(n_matmul, args.layers, args.hidden, seq),
        )
        rows.append((seq, record["batch"], step, args.tokens_per_batch / step, f"{record['ratio_to_smallest']:.2f}x", f"{predicted:.2f}x",
                     f"{100 * record['attention_share_of_flops']:.0f}%"))
    print(f"\npretraining step vs sequence length, {args.tokens_per_batch} tokens per step "
          f"(model hidden {args.hidden}, {args.layers} layers, N = {n_matmul:,} matmul weights)")
    print(table(rows, ("seq len", "batch", "median step s", "tokens/s", "time ratio", "FLOPs ratio", "attention FLOPs")))
    print()


# ------------------------------------------------------------------------------------- PPO
def llama_policy(tokenizer, args, seed: int):
    """A Llama causal LM sized to the tokenizer, built from a config as tests/conftest.py::tiny_causal_lm."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=args.ppo_hidden, intermediate_size=args.ppo_intermediate,
        num_hidden_layers=args.ppo_layers, num_attention_heads=args.ppo_heads, num_key_value_heads=args.ppo_heads,
        max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def llama_scorer(tokenizer, args, seed: int):
    """A scalar-head Llama as a TokenScorer (the value model), as tests/conftest.py::tiny_token_scorer."""
    from transformers import AutoModelForSequenceClassification

    from reward_model.model import TokenScorer

    config = llama_policy(tokenizer, args, seed).config
    config.num_labels = 1
    torch.manual_seed(seed)
    return TokenScorer(AutoModelForSequenceClassification.from_config(config))


def target_fraction_reward(target_ids: torch.Tensor):
    """Reward = fraction of response tokens in `target_ids` (tests/stages/test_ppo_learning.py)."""

    def score(query_ids, query_mask, response_ids, response_mask):
        mask = response_mask.float()
        hits = torch.isin(response_ids, target_ids.to(response_ids.device)).float() * mask
        return hits.sum(1) / mask.sum(1).clamp(min=1)

    return score


def ppo_prompts(tokenizer, count: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` Shakespeare paragraphs of at least 8 tokens, cut to `max_length`, left-padded."""
    from data.padding import pad_batch

    prompts = [ids[:max_length] for ids in tokenized_documents(tokenizer, "paragraph") if len(ids) >= 8][:count]
    return pad_batch(prompts, tokenizer.pad_token_id, side="left")


class SamplingTimer:
    """Times every call of the experience maker's sampling function into `sink`.

    The maker samples through `stages.ppo.rollout.sample_responses`; that module attribute is
    wrapped in this process only (nothing in the stage changes). Point `sink` at the list of the
    trainer about to step: one wrapper serves every trainer, and they step one at a time.
    """

    def __init__(self):
        from stages.ppo import rollout

        self.sink: list[float] = []
        original = rollout.sample_responses

        def sample_responses(*args, **kwargs):
            synchronize()
            started = time.perf_counter()
            result = original(*args, **kwargs)
            synchronize()
            self.sink.append(time.perf_counter() - started)
            return result

        rollout.sample_responses = sample_responses


def ppo_scaling(args, tokenizer, reporter: Reporter) -> None:
    from accelerate import Accelerator

    from pipeline.config import PPOConfig, nest_ppo_keys
    from stages.ppo.trainer import RLTrainer

    lengths = ints(args.response_lengths)
    query_ids, query_mask = ppo_prompts(tokenizer, args.rollout_batch, args.query_length)
    target_ids = torch.arange(50, 50 + len(tokenizer) // 10)  # a 10% base rate for an untrained policy
    trainers, generate_seconds = {}, {}
    for length in lengths:
        settings = PPOConfig.model_validate(nest_ppo_keys({
            "prompts": {"path": str(REPO_ROOT / "data" / "samples" / "hh_harmless_1000.jsonl")},  # unused here
            "estimator": "ppo", "rollout_batch_size": args.rollout_batch, "num_mini_batches": args.mini_batches,
            "micro_batch_size": args.micro_batch, "ppo_epochs": args.ppo_epochs, "response_length": length,
            "temperature": 0.7, "kl_coef": 0.05, "missing_eos_penalty": "none", "normalize_scores": False,
            "policy_learning_rate": 3e-5, "value_learning_rate": 1e-4,
        })[0])
        policy = llama_policy(tokenizer, args, args.seed)
        reference = copy.deepcopy(policy)
        value = llama_scorer(tokenizer, args, args.seed + 1)
        reward = target_fraction_reward(target_ids)
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        trainers[length] = RLTrainer(policy, reference, value, reward, tokenizer, settings, accelerator,
                                     total_updates=1000, seed=args.seed)
        generate_seconds[length] = []
    sampling = SamplingTimer()

    for length, trainer in trainers.items():
        for _ in range(args.ppo_warmup):
            trainer.step(query_ids, query_mask)
    metrics = {length: [] for length in lengths}
    for _ in range(args.ppo_steps):
        for length, trainer in trainers.items():
            sampling.sink = generate_seconds[length]
            started = time.perf_counter()
            step_metrics, _ = trainer.step(query_ids, query_mask)
            step_metrics["_wall"] = time.perf_counter() - started
            metrics[length].append(step_metrics)

    def med(length: int, key: str) -> float:
        return median([m[key] for m in metrics[length]])

    def ratio(length: int, key: str) -> float:
        return round_ratio([m[key] for m in metrics[length]], [m[key] for m in metrics[base]])

    base = lengths[0]
    rows = []
    for length in lengths:
        step, rollout, update = med(length, "_wall"), med(length, "time/rollout"), med(length, "time/update")
        generate = median(generate_seconds[length])
        record = reporter.emit(
            "ppo_response_length", response_length=length, query_length=query_ids.shape[1],
            median_step_seconds=step, median_rollout_seconds=rollout, median_update_seconds=update,
            median_generate_seconds=generate, median_scoring_seconds=rollout - generate,
            rollout_share=rollout / (rollout + update), generate_share=generate / (rollout + update),
            mean_response_tokens=med(length, "val/response_length"),
            generated_tokens_per_second=med(length, "throughput/generated_tokens_per_second"),
            step_ratio_to_smallest=ratio(length, "_wall"),
            rollout_ratio_to_smallest=ratio(length, "time/rollout"),
            update_ratio_to_smallest=ratio(length, "time/update"),
            generate_ratio_to_smallest=round_ratio(generate_seconds[length], generate_seconds[base]),
            length_ratio_to_smallest=length / base,
            # The update's forward/backward passes cover prompt + response: its natural yardstick.
            sequence_ratio_to_smallest=(query_ids.shape[1] + length) / (query_ids.shape[1] + base),
        )
        rows.append((length, record["mean_response_tokens"], step, f"{record['step_ratio_to_smallest']:.2f}x",
                     rollout, f"{record['rollout_ratio_to_smallest']:.2f}x", generate,
                     f"{record['generate_ratio_to_smallest']:.2f}x", update, f"{record['update_ratio_to_smallest']:.2f}x",
                     f"{record['sequence_ratio_to_smallest']:.2f}x", f"{100 * record['rollout_share']:.0f}%"))
    print(f"\nPPO step (1 rollout of {args.rollout_batch} + {args.ppo_epochs} epochs x {args.mini_batches} minibatches) "
          f"vs response length; policy hidden {args.ppo_hidden}, {args.ppo_layers} layers; prompts {query_ids.shape[1]} tokens")
    print(table(rows, ("response len", "mean len", "step s", "ratio", "rollout s", "ratio", "generate s", "ratio",
                       "update s", "ratio", "(prompt+response) ratio", "rollout share")))
    print()


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {key: value for key, value in vars(args).items() if key != "out"}
    settings["device"] = str(device())
    reporter = Reporter(NAME, args.out, settings)
    reporter.header()
    tokenizer = train_tokenizer(args.vocab)
    if args.only in (None, "pretrain"):
        pretrain_scaling(args, tokenizer, reporter)
    if args.only in (None, "ppo"):
        ppo_scaling(args, tokenizer, reporter)
    reporter.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
