"""Tokens/s and MFU of chatpipe's pretraining step against a plain padded loop, in one process.

    .venv/bin/python bench/pretrain_throughput.py                      # defaults: ~35 s on a quiet 2-core CPU, ~3 min under load
    .venv/bin/python bench/pretrain_throughput.py --hidden 128 --seq 128 --steps 20 --profile 3

Two loops train the same freshly initialised Llama on the same Tiny Shakespeare documents:

- chatpipe: documents tokenized, joined with EOS and cut into blocks (`data.packing.pack_documents`),
  batches drawn as the stage draws them (`pipeline.training.loop.step_indices`), the model built by
  `stages.pretrain.model.model_from_config`, AdamW and its schedule from `pipeline.training.optimization`,
  everything wrapped by accelerate as in the stage. The timed step is the stage's own
  `pipeline.training.loop.OptimizerStep` (micro-batches, no_sync, autocast, backward, clip,
  optimizer and scheduler step), called with the stage's micro-batches and loss.
- baseline: the same HF model and initial weights, each document its own row, batches padded to
  their longest row (cut at the block size) with an attention mask and labels -100 on padding,
  plain `torch.optim.AdamW`, gradient clipping, no accelerate, no scheduler, no packing.

Both count useful tokens (non-padding) per second. Model FLOPs per trained token follow the
PaLM paper (appendix B): 6*N + 12*n_layers*hidden*seq_len, N the weights that take part in a
matmul (every nn.Linear, the LM head included; embedding lookups are free). MFU is achieved FLOP/s
over the best FLOP/s of a large square matmul in the training dtype, timed in this run (before
and after the loops; the higher is the peak). Steps run interleaved in rounds (chatpipe then
baseline, then the other way round), so a slow patch on a shared machine hits both.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHAKESPEARE, Reporter, device, median, peak_matmul_flops, synchronize, table  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

NAME = "pretrain_throughput"


# ------------------------------------------------------------------------------------ setup
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--seq", type=int, default=256, help="Block size (chatpipe) and truncation length (baseline).")
    parser.add_argument("--batch", type=int, default=16, help="Sequences per step, both loops.")
    parser.add_argument("--documents", choices=("paragraph", "line"), default="paragraph",
                        help="How the text splits into documents (both loops train on the same ones).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps per loop first.")
    parser.add_argument("--steps", type=int, default=16, help="Timed steps per loop.")
    parser.add_argument("--rounds", type=int, default=4, help="Timed steps are split into this many interleaved rounds.")
    parser.add_argument("--peak-size", type=int, default=None, help="Matmul size for the peak (default 2048 CPU, 8192 GPU).")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="Afterwards, profile this many chatpipe steps with torch.profiler and print the top ops.")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", help="JSON-lines file to append to (default bench/results/pretrain_throughput.jsonl).")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice, one per core).")
    return parser.parse_args(argv)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size (the model is sized to the tokenizer).")
    parser.add_argument("--untied", action="store_true", help="Separate LM head (configs/tiny.yaml ties it to the embeddings).")


def model_config(args: argparse.Namespace, max_positions: int):
    """The run config's `model:` section for these flags, as the stage would read it."""
    from pipeline.config import ModelConfig

    return ModelConfig.model_validate({
        "architecture": "llama",
        "config": {
            "hidden_size": args.hidden,
            "intermediate_size": args.intermediate,
            "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads,
            "num_key_value_heads": args.heads,
            "max_position_embeddings": max(512, max_positions),
            "tie_word_embeddings": not args.untied,
        },
    })


def pretrain_section(block_size: int, batch: int):
    """A `pretrain:` section with the stage's defaults (learning rate, betas, decay, clipping)."""
    from pipeline.config import PretrainConfig

    return PretrainConfig.model_validate({
        "data": {"path": str(SHAKESPEARE)}, "block_size": block_size, "per_device_batch_size": batch,
        "max_steps": 10_000,
    })


# ------------------------------------------------------------------------------------- data
def train_tokenizer(vocab_size: int):
    """The tokenizer stage's BPE, trained on the whole of Tiny Shakespeare."""
    from stages.tokenizer.bpe import train_bpe

    return train_bpe([[SHAKESPEARE.read_text()]], vocab_size=vocab_size)


def tokenized_documents(tokenizer, how: str) -> list[list[int]]:
    """Tiny Shakespeare split into paragraphs (blank-line separated) or lines, tokenized, no EOS yet."""
    text = SHAKESPEARE.read_text()
    pieces = text.split("\n\n") if how == "paragraph" else text.split("\n")
    pieces = [piece for piece in pieces if piece.strip()]
    return tokenizer(pieces, add_special_tokens=False)["input_ids"]


@dataclass
class StepStats:
    seconds: float
    tokens: int  # non-padding tokens trained on
    positions: int  # positions computed, padding included
    seq_len: int  # the batch's sequence length


# ---------------------------------------------------------------------------- chatpipe loop
class ChatpipeLoop:
    """The pretrain stage's setup and step, on packed blocks, in this process."""

    name = "chatpipe"

    def __init__(self, model_cfg, section, tokenizer, blocks: np.ndarray, seed: int, *, model=None,
                 compile_backend: str = "inductor"):
        """`model`: one built elsewhere instead of from `model_cfg` and `tokenizer` (bench/gpu_check.py's
        GPT-2 shape, whose 50,304-token vocabulary no tokenizer here has). `compile_backend`: what
        `section.compile` compiles with (the stage uses inductor; a CPU smoke run, a cheaper one)."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from pipeline.orchestration.stage import resolve_mixed_precision
        from pipeline.training.loop import OptimizerStep
        from pipeline.training.optimization import adamw, warmup_cosine
        from stages.pretrain.model import model_from_config

        # As in the stage's `setup` and `model` sections.
        self.accelerator = Accelerator(mixed_precision=resolve_mixed_precision(section.launch.mixed_precision))
        set_seed(seed)
        self.section, self.blocks, self.seed = section, blocks, seed
        model = model if model is not None else model_from_config(model_cfg, tokenizer)
        optimizer = adamw(model, section.learning_rate, section.weight_decay, (section.adam_beta1, section.adam_beta2))
        self.scheduler = warmup_cosine(optimizer, section.warmup_steps, section.max_steps, section.min_lr_ratio)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.optimizer_step = OptimizerStep(self.accelerator, self.model, self.optimizer, self.scheduler, section.max_grad_norm)
        if section.compile:  # as the stage does, after prepare
            self.model.compile(backend=compile_backend)
        self.model.train()
        self.step_index = 0

    def micro_batches_at(self, step: int) -> list[torch.Tensor]:
        from pipeline.training.loop import step_indices

        section, accelerator = self.section, self.accelerator
        steps = step_indices(
            step, accelerator, accumulation=section.gradient_accumulation_steps,
            size=section.per_device_batch_size, examples=len(self.blocks), seed=self.seed,
        )
        return [torch.from_numpy(self.blocks[indices]).long().to(accelerator.device) for indices in steps]

    def step(self) -> StepStats:
        section, model = self.section, self.model
        synchronize()
        started = time.perf_counter()
        # The stage's own optimiser step (pipeline/training/loop.py), over the stage's micro-batches.
        micro_batches = self.micro_batches_at(self.step_index)
        self.optimizer_step(micro_batches, lambda blocks: (model(input_ids=blocks, labels=blocks).loss, {}))
        # Logging, eval and checkpoints are not timed.
        synchronize()
        seconds = time.perf_counter() - started
        self.step_index += 1
        tokens = section.per_device_batch_size * section.block_size * section.gradient_accumulation_steps
        return StepStats(seconds, tokens, tokens, section.block_size)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)


# ---------------------------------------------------------------------------- baseline loop
class BaselineLoop:
    """A plain loop: one document per row, padded batches, torch AdamW, no accelerate."""

    name = "baseline"

    def __init__(self, reference_model, section, documents: list[list[int]], pad_id: int, seed: int, bf16: bool):
        from transformers import AutoModelForCausalLM

        # The same HF model with the same initial weights as the chatpipe loop's.
        self.model = AutoModelForCausalLM.from_config(reference_model.config)
        self.model.load_state_dict(reference_model.state_dict())
        self.model.to(device()).train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=section.learning_rate, betas=(section.adam_beta1, section.adam_beta2),
            weight_decay=section.weight_decay,
        )
        self.section, self.documents, self.pad_id, self.bf16 = section, documents, pad_id, bf16
        self.order = np.random.default_rng(seed).permutation(len(documents))
        self.cursor = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, block = self.section.per_device_batch_size, self.section.block_size
        rows = []
        for _ in range(batch):
            rows.append(self.documents[self.order[self.cursor % len(self.order)]][:block])
            self.cursor += 1
        length = max(len(row) for row in rows)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        where = device()
        return input_ids.to(where), attention_mask.to(where), labels.to(where)

    def step(self) -> StepStats:
        synchronize()
        started = time.perf_counter()
        input_ids, attention_mask, labels = self.next_batch()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16)
        with autocast:
            loss = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.section.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize()
        seconds = time.perf_counter() - started
        return StepStats(seconds, int(attention_mask.sum()), attention_mask.numel(), input_ids.shape[1])


def expected_padding(documents: list[list[int]], batch: int, block: int, seed: int) -> float:
    """The baseline's padding fraction over one whole epoch of its batches (same order as BaselineLoop)."""
    lengths = np.array([min(len(ids), block) for ids in documents])
    order = np.random.default_rng(seed).permutation(len(lengths))
    batches = lengths[order[: len(order) // batch * batch]].reshape(-1, batch)
    return 1.0 - batches.sum() / (batches.max(axis=1) * batch).sum()


# -------------------------------------------------------------------------------- FLOPs/MFU
def matmul_parameters(model: torch.nn.Module) -> int:
    """N for 6*N: weights of every nn.Linear (a tied LM head counts: it is a matmul), and of
    transformers' Conv1D, GPT-2's linear layers with the weight transposed."""
    from transformers.pytorch_utils import Conv1D

    return sum(module.weight.numel() for module in model.modules() if isinstance(module, (torch.nn.Linear, Conv1D)))


def flops_per_token(n_matmul: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token, PaLM appendix B: 6N plus 12 * L * H * Q * T for attention (H*Q = hidden)."""
    return 6.0 * n_matmul + 12.0 * layers * hidden * seq_len


def summarise(stats: list[StepStats], n_matmul: int, layers: int, hidden: int, peak: float) -> dict:
    seconds = sum(s.seconds for s in stats)
    tokens = sum(s.tokens for s in stats)
    positions = sum(s.positions for s in stats)
    useful_flops = sum(s.tokens * flops_per_token(n_matmul, layers, hidden, s.seq_len) for s in stats)
    all_flops = sum(s.positions * flops_per_token(n_matmul, layers, hidden, s.seq_len) for s in stats)
    return {
        "steps": len(stats),
        "median_step_seconds": median([s.seconds for s in stats]),
        "tokens_per_second": tokens / seconds,
        "median_step_tokens_per_second": median([s.tokens / s.seconds for s in stats]),
        "tokens_per_step": tokens / len(stats),
        "mean_seq_len": sum(s.seq_len for s in stats) / len(stats),
        "padding_fraction": 1.0 - tokens / positions,
        "achieved_gflops": useful_flops / seconds / 1e9,
        "mfu": useful_flops / seconds / peak,
        "mfu_all_positions": all_flops / seconds / peak,
    }


def run_interleaved(loops: list, warmup: int, steps: int, rounds: int) -> tuple[dict[str, list[StepStats]], list[dict[str, float]]]:
    """Warm each loop up, then time `steps` steps of each in `rounds` alternating rounds."""
    for loop in loops:
        for _ in range(warmup):
            loop.step()
    results: dict[str, list[StepStats]] = {loop.name: [] for loop in loops}
    per_round = []
    sizes = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    for index, size in enumerate(sizes):
        order = loops if index % 2 == 0 else list(reversed(loops))
        this_round = {}
        for loop in order:
            stats = [loop.step() for _ in range(size)]
            results[loop.name].extend(stats)
            this_round[loop.name] = sum(s.tokens for s in stats) / sum(s.seconds for s in stats)
        per_round.append(this_round)
    return results, per_round


def profile_steps(loop, steps: int) -> list[dict]:
    """Top ops by self time over `steps` steps of `loop` (printed, and returned for the record)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            loop.step()
    averages = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in averages) or 1
    top = sorted(averages, key=lambda event: event.self_cpu_time_total, reverse=True)[:15]
    rows = [
        {"op": event.key, "calls": event.count, "self_cpu_ms": event.self_cpu_time_total / 1000 / steps,
         "share": event.self_cpu_time_total / total}
        for event in top
    ]
    print(f"\nprofile of {steps} {loop.name} steps: top ops by self CPU time, per step")
    print(table([(r["op"][:64], r["calls"] // steps, r["self_cpu_ms"], f"{100 * r['share']:.1f}%") for r in rows],
                ("op", "calls/step", "self ms/step", "share")))
    return rows


# ------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from data.packing import pack_documents
    from pipeline.orchestration.stage import resolve_mixed_precision

    mixed = resolve_mixed_precision("auto")
    dtype = torch.bfloat16 if mixed == "bf16" else torch.float32
    peak_size = args.peak_size or (8192 if torch.cuda.is_available() else 2048)
    settings = {
        "hidden": args.hidden, "layers": args.layers, "heads": args.heads, "intermediate": args.intermediate,
        "vocab": args.vocab, "tied_embeddings": not args.untied, "seq": args.seq, "batch": args.batch,
        "documents": args.documents, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
        "dtype": "bf16 autocast" if mixed == "bf16" else "fp32", "peak_matmul": f"{peak_size}x{peak_size}",
        "seed": args.seed,
    }
    reporter = Reporter(NAME, args.out, settings)
    reporter.header()

    # ---- data: the same documents for both loops
    started = time.perf_counter()
    tokenizer = train_tokenizer(args.vocab)
    raw = tokenized_documents(tokenizer, args.documents)
    blocks = pack_documents(raw, tokenizer.eos_token_id, args.seq)  # each document + EOS, end to end
    documents = [ids + [tokenizer.eos_token_id] for ids in raw if ids]  # the same tokens, one row each
    epoch_padding = expected_padding(documents, args.batch, args.seq, args.seed)
    print(f"data: {len(documents)} documents, {sum(map(len, documents))} tokens, {len(blocks)} packed blocks "
          f"of {args.seq} ({time.perf_counter() - started:.1f}s incl. BPE training); baseline padding over a whole "
          f"epoch {100 * epoch_padding:.0f}% (the timed steps see a sample of it)")

    # ---- models
    section = pretrain_section(args.seq, args.batch)
    chatpipe = ChatpipeLoop(model_config(args, args.seq), section, tokenizer, blocks, args.seed)
    baseline = BaselineLoop(chatpipe.unwrapped, section, documents, tokenizer.pad_token_id, args.seed, mixed == "bf16")
    n_matmul = matmul_parameters(chatpipe.unwrapped)
    n_total = sum(p.numel() for p in chatpipe.unwrapped.parameters())
    attention = chatpipe.unwrapped.config._attn_implementation
    print(f"model: {n_total:,} parameters, {n_matmul:,} in matmuls (N for 6N), attention {attention}")

    # ---- peak, loops, peak again
    peak_before = peak_matmul_flops(dtype, peak_size)
    results, per_round = run_interleaved([chatpipe, baseline], args.warmup, args.steps, args.rounds)
    peak_after = peak_matmul_flops(dtype, peak_size)
    peak = max(peak_before, peak_after)

    summaries = {
        name: summarise(stats, n_matmul, args.layers, args.hidden, peak) for name, stats in results.items()
    }
    ratio = summaries["chatpipe"]["tokens_per_second"] / summaries["baseline"]["tokens_per_second"]
    round_ratios = [r["chatpipe"] / r["baseline"] for r in per_round]

    reporter.emit("peak", peak_gflops=peak / 1e9, peak_gflops_before=peak_before / 1e9, peak_gflops_after=peak_after / 1e9,
                  dtype=str(dtype).replace("torch.", ""), size=peak_size)
    common = {"parameters": n_total, "baseline_epoch_padding_fraction": epoch_padding, "matmul_parameters": n_matmul, "attention": attention,
              "flops_per_token_at_seq": flops_per_token(n_matmul, args.layers, args.hidden, args.seq)}
    for name, summary in summaries.items():
        reporter.emit(name, **summary, **common)
    reporter.emit("ratio", chatpipe_over_baseline_tokens_per_second=ratio,
                  per_round=round_ratios, mfu_chatpipe=summaries["chatpipe"]["mfu"], mfu_baseline=summaries["baseline"]["mfu"])

    print()
    rows = []
    for name, s in summaries.items():
        rows.append((name, s["median_step_seconds"], s["tokens_per_step"], s["mean_seq_len"],
                     f"{100 * s['padding_fraction']:.0f}%", s["tokens_per_second"], s["achieved_gflops"],
                     f"{100 * s['mfu']:.1f}%", f"{100 * s['mfu_all_positions']:.1f}%"))
    print(table(rows, ("loop", "median step s", "tokens/step", "seq len", "padding", "useful tokens/s",
                       "model GFLOP/s", "MFU", "MFU incl. pad")))
    print(f"\npeak: {peak / 1e9:,.1f} GFLOP/s ({str(dtype).replace('torch.', '')} {peak_size}^3 matmul, best of 5; "
          f"{peak_before / 1e9:,.1f} before the loops, {peak_after / 1e9:,.1f} after)")
    print(f"chatpipe / baseline useful tokens/s: {ratio:.2f}x  (per round: {', '.join(f'{r:.2f}x' for r in round_ratios)})")

    if args.profile:
        rows = profile_steps(chatpipe, args.profile)
        reporter.emit("profile_chatpipe", steps=args.profile, top_ops=rows)
    reporter.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
