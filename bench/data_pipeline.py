"""Pretraining data at scale, today's path against the token store, and chat data at 100k conversations.

    python bench/data_pipeline.py [--sizes-mb 20 200 1024] [--conversations 100000] [--baseline-rev dbb0e1c]

"Today's path" is the code of `--baseline-rev` (the commit before the token store), exported with
`git archive` and run by the same interpreter, so both paths are measured in one run, on one
machine, in turn.

Part 1, the pretrain stage on JSONL corpora of each size, generated from the shipped Tiny
Shakespeare (random runs of its speeches, one document per line; seeded, so every run has the
same corpora). For each size and path: the stage runs through the CLI (tokenizer trained once on
Shakespeare; pretrain 20 steps of 16 x 128 tokens, one process), cold, then again on a copy of
the run whose cache is warm. Reported:
- tokenization MB/s: corpus bytes / (cold - warm wall time of `chatpipe run --only pretrain`),
  the time the stage spends turning text into blocks, reading and caching included;
- the stage's peak RSS (the manifest's `peak_rss_mib`), cold;
- disk bytes per token: everything under RUN_DIR/cache (Arrow copies, blocks, shards) / tokens.
Then the largest corpus again on two processes (torchrun, gloo) from a warm cache, with the peak
RSS of each process: a private copy of the corpus per process, or one store mapped by both.

Part 2, chat data: `--conversations` HH-RLHF conversations (the shipped 1,000 repeated), rendered
for SFT, the reward model and PPO by each path, and by the new one again from its cache.

`--skip-baseline` measures the current tree alone (no `git archive`, so no git history needed):
every row is the token store's, and nothing is compared. `--skip-two-processes` leaves out the
two-process run. `--set` adds config overrides (the model, the steps) to every `chatpipe run`,
after the ones above.

Prints one JSON line per measurement and tables; writes bench/results/data_pipeline.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import RESULTS_DIR, SHAKESPEARE, machine_info  # noqa: E402
from pipeline.orchestration.manifest import read_manifest  # noqa: E402

HH_SAMPLE = REPO / "data" / "samples" / "hh_harmless_1000.jsonl"
PRETRAIN = [
    "pretrain.max_steps=20", "pretrain.warmup_steps=2", "pretrain.eval_every=20", "pretrain.eval_batches=2",
    "pretrain.save_every=20", "pretrain.log_every=10",
]


def stage_environment(tree: Path) -> dict:
    """What a user's shell has: no TOKENIZERS_PARALLELISM (bench.common turns it off for itself)."""
    env = {key: value for key, value in os.environ.items() if key not in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    return {**env, "WANDB_MODE": "disabled", "PYTHONPATH": str(tree)}


def export_baseline(revision: str, folder: Path) -> Path:
    """The repository at `revision`, as files (`git archive`)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], check=True, capture_output=True).stdout
    tarfile.open(fileobj=BytesIO(archive)).extractall(folder, filter="data")
    return folder


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> dict:
    """A JSONL corpus of `megabytes` MiB: each line a run of 5-40 consecutive Shakespeare speeches."""
    speeches = [speech for speech in SHAKESPEARE.read_text().split("\n\n") if speech.strip()]
    rng, size, documents = random.Random(seed), 0, 0
    with open(path, "w") as handle:
        while size < megabytes << 20:
            start = rng.randrange(len(speeches))
            line = json.dumps({"text": "\n\n".join(speeches[start : start + rng.randint(5, 40)])}) + "\n"
            handle.write(line)
            size += len(line)
            documents += 1
    return {"bytes": path.stat().st_size, "documents": documents}


def write_config(folder: Path, corpus: Path) -> Path:
    """configs/tiny.yaml's tokenizer and model, pretraining on `corpus` (the tokenizer learns on Shakespeare)."""
    import yaml

    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw = {key: raw[key] for key in ("name", "seed", "model", "wandb", "tokenizer", "pretrain")}
    raw["tokenizer"]["corpus"] = {"path": str(SHAKESPEARE)}
    raw["pretrain"]["data"] = {"path": str(corpus)}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def chatpipe(tree: Path, config: Path, run_dir: Path, *arguments: str) -> float:
    """Seconds `chatpipe run` took (the manifest's times have whole seconds only)."""
    command = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--run-dir", str(run_dir), *arguments]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=tree, env=stage_environment(tree), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return time.perf_counter() - started


def stage_record(run_dir: Path, seconds: float) -> dict:
    entry = read_manifest(run_dir).stages["pretrain"]
    assert entry.status == "completed", entry
    return {"seconds": seconds, **entry.metrics}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def pretrain_cell(tree: Path, path_name: str, corpus: Path, corpus_bytes: int, tokenized: Path, work: Path, *, two_processes: bool,
                  overrides: list[str]) -> dict:
    """One path on one corpus: cold and warm runs of the pretrain stage; `tokenized` holds a run with its tokenizer."""
    config = write_config(work, corpus)
    sets = [f"--set={item}" for item in PRETRAIN + overrides]
    cold = work / "cold"
    shutil.copytree(tokenized, cold)
    cold_record = stage_record(cold, chatpipe(tree, config, cold, "--only", "pretrain", *sets))
    cache_bytes = folder_bytes(cold / "cache")
    tokens = cold_record.get("corpus_tokens") or (cold_record["train_blocks"] + cold_record["validation_blocks"]) * 128
    warm = work / "warm"
    shutil.copytree(tokenized, warm)
    shutil.copytree(cold / "cache", warm / "cache", dirs_exist_ok=True)
    warm_record = stage_record(warm, chatpipe(tree, config, warm, "--only", "pretrain", *sets))
    tokenizing = cold_record["seconds"] - warm_record["seconds"]
    row = {
        "path": path_name, "corpus_mb": round(corpus_bytes / 2**20), "tokens": tokens,
        "cold_seconds": round(cold_record["seconds"], 1), "warm_seconds": round(warm_record["seconds"], 1),
        "tokenize_seconds": round(tokenizing, 1),
        "tokenize_mb_per_s": round(corpus_bytes / 2**20 / tokenizing, 2),
        "tokens_per_s": round(tokens / tokenizing),
        "peak_rss_mib": cold_record["peak_rss_mib"], "warm_peak_rss_mib": warm_record["peak_rss_mib"],
        "cache_bytes": cache_bytes, "bytes_per_token": round(cache_bytes / tokens, 3),
        "token_bytes_metric": cold_record.get("token_bytes"),
    }
    if two_processes:
        pair = work / "two"
        shutil.copytree(tokenized, pair)
        shutil.copytree(cold / "cache", pair / "cache", dirs_exist_ok=True)
        seconds = chatpipe(tree, config, pair, "--only", "pretrain", *sets,
                           "--set=pretrain.launch.num_processes=2", "--set=pretrain.launch.launcher=torchrun")
        record = stage_record(pair, seconds)
        row["two_process_peak_rss_mib"] = record.get("peak_rss_mib_by_process") or [record["peak_rss_mib"]]
    shutil.rmtree(cold, ignore_errors=True)
    shutil.rmtree(warm, ignore_errors=True)
    return row


CHAT_WORKER = r'''
import inspect, json, resource, sys, time
from pathlib import Path
from transformers import AutoTokenizer
from pipeline.config import BadRowPolicy, ConversationData, PPOData, PreferenceData
from data.chat_tokens import load_conversations, tokenize_conversations
from reward_model.batching import encode_groups
from reward_model.data import load_preference_groups as load_groups
from stages.ppo.prompts import load_prompts

corpus, tokenizer_dir, cache, part = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
new = "cache_dir" in inspect.signature(tokenize_conversations).parameters
token_cache = {"cache_dir": cache / "chat_tokens"} if new else {}
datasets_cache = cache / "datasets"
if part == "sft":
    conversations, _ = load_conversations(ConversationData(path=corpus, conversation_format="hh"), BadRowPolicy(), datasets_cache)
    started = time.perf_counter()
    rows, _ = tokenize_conversations(conversations, tokenizer, 384, "truncate", **token_cache)
    count, tokens = len(rows), sum(len(ids) for ids in rows["input_ids"])
elif part == "reward":
    section = BadRowPolicy()
    groups, _ = load_groups(PreferenceData(path=corpus), section, datasets_cache)
    started = time.perf_counter()
    encoded = encode_groups(groups, tokenizer, 384, *([token_cache["cache_dir"]] if new else []))
    count, tokens = len(encoded), sum(len(ids) for group in encoded for ids in group.completion_ids)
else:
    data = PPOData(prompts={"path": corpus, "conversation_format": "hh"}, max_prompt_length=192)
    started = time.perf_counter()  # loading is inside load_prompts: measure it with the loaded dataset cached
    split = load_prompts(data, tokenizer, datasets_cache, 1234, **({"token_cache": token_cache["cache_dir"]} if new else {}))
    count, tokens = len(split.train) + len(split.held_out), sum(len(ids) for ids in split.train)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "items": count, "tokens": tokens,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def chat_cell(tree: Path, corpus: Path, tokenizer_dir: Path, cache: Path, part: str) -> dict:
    command = [sys.executable, "-c", CHAT_WORKER, str(corpus), str(tokenizer_dir), str(cache), part]
    result = subprocess.run(command, cwd=tree, env=stage_environment(tree), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"chat worker {part} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_conversations(path: Path, count: int) -> None:
    rows = HH_SAMPLE.read_text().splitlines()
    with open(path, "w") as handle:
        for index in range(count):
            handle.write(rows[index % len(rows)] + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[20, 200, 1024])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--baseline-rev", default="dbb0e1c", help="today's path: the commit before the token store")
    parser.add_argument("--skip-pretrain", action="store_true")
    parser.add_argument("--skip-chat", action="store_true")
    parser.add_argument("--skip-baseline", action="store_true", help="measure the current tree alone, without --baseline-rev")
    parser.add_argument("--skip-two-processes", action="store_true", help="leave out the largest corpus's run on two processes")
    parser.add_argument("--work-dir", default=None, help="where corpora and runs go (default: a temporary folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override for every `chatpipe run` (repeatable), after the benchmark's own")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "data_pipeline.json", help="the JSON file written at the end")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="data_pipeline_"))
    work.mkdir(parents=True, exist_ok=True)
    trees = {} if args.skip_baseline else {"today": export_baseline(args.baseline_rev, work / "baseline")}
    trees["store"] = REPO
    results: dict = {"machine": machine_info(), "baseline_rev": None if args.skip_baseline else args.baseline_rev,
                     "pretrain": [], "chat": []}

    # A run dir with the tokenizer trained (on Shakespeare), shared by every cell.
    tokenized = work / "tokenized"
    if not (tokenized / "tokenizer" / "final").exists():
        chatpipe(REPO, write_config(work, SHAKESPEARE), tokenized, "--only", "tokenizer", *[f"--set={item}" for item in args.overrides])
    tokenizer_dir = tokenized / "tokenizer" / "final"

    if not args.skip_pretrain:
        for megabytes in args.sizes_mb:
            corpus = work / f"corpus_{megabytes}mb.jsonl"
            shape = write_corpus(corpus, megabytes)
            for name, tree in trees.items():
                cell = work / f"{name}_{megabytes}"
                shutil.rmtree(cell, ignore_errors=True)
                cell.mkdir()
                started = time.perf_counter()
                two_processes = megabytes == max(args.sizes_mb) and not args.skip_two_processes
                row = pretrain_cell(tree, name, corpus, shape["bytes"], tokenized, cell, two_processes=two_processes,
                                    overrides=args.overrides)
                row.update(documents=shape["documents"], bench_seconds=round(time.perf_counter() - started, 1))
                print(json.dumps(row), flush=True)
                results["pretrain"].append(row)
                shutil.rmtree(cell, ignore_errors=True)
            corpus.unlink()

    if not args.skip_chat:
        corpus = work / f"hh_{args.conversations}.jsonl"
        write_conversations(corpus, args.conversations)
        for part in ("sft", "reward", "ppo"):
            for name, tree in trees.items():
                cache = work / f"chat_{name}"
                attempts = ["cold", "warm"] if name == "store" else ["cold"]
                for attempt in attempts:
                    row = {"part": part, "path": name, "attempt": attempt, "conversations": args.conversations,
                           **chat_cell(tree, corpus, tokenizer_dir, cache, part)}
                    print(json.dumps(row), flush=True)
                    results["chat"].append(row)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print_tables(results)


def print_tables(results: dict) -> None:
    rows = {(row["path"], row["corpus_mb"]): row for row in results["pretrain"]}
    sizes = sorted({size for _, size in rows})
    if sizes:
        print("\ncorpus  path    tokenize MB/s  tokens/s     peak RSS MiB  bytes/token  (store vs today)")
        for size in sizes:
            today, store = rows.get(("today", size)), rows.get(("store", size))
            for row in (today, store):
                if row is not None:
                    print(f"{size:>5} MB {row['path']:<6} {row['tokenize_mb_per_s']:>12} {row['tokens_per_s']:>10,} "
                          f"{row['peak_rss_mib']:>14} {row['bytes_per_token']:>12}")
            if today and store:
                print(f"{'':>8} ratio  {store['tokenize_mb_per_s'] / today['tokenize_mb_per_s']:>12.2f}x "
                      f"{'':>10} {store['peak_rss_mib'] / today['peak_rss_mib']:>13.2f}x {store['bytes_per_token'] / today['bytes_per_token']:>11.2f}x")
        for path in ("today", "store"):
            first, last = rows.get((path, sizes[0])), rows.get((path, sizes[-1]))
            if first and last:
                print(f"{path}: peak RSS at {sizes[-1]} MB / at {sizes[0]} MB = {last['peak_rss_mib'] / first['peak_rss_mib']:.2f}x"
                      + (f"; two processes: {last.get('two_process_peak_rss_mib')} MiB" if "two_process_peak_rss_mib" in last else ""))
    for row in results["chat"]:
        print(f"chat {row['part']:<6} {row['path']:<6} {row['attempt']:<5} {row['conversations']:>7} conversations: "
              f"{row['seconds']:7.1f} s  peak RSS {row['peak_rss_mib']:7.0f} MiB")


if __name__ == "__main__":
    main()
