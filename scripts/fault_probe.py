"""A fault probe from the outside: break a finished run in each way a user (or a machine) does, count what follows.

    python scripts/fault_probe.py [--work DIR] [--group manifest,cache,...] [--out FILE.jsonl]

One tiny run of every stage (the fault suite's config, seconds per stage) is built once; each case
copies it, breaks one thing, runs the `chatpipe` command (or `python -m stages.X`) a user would
run next, with a timeout, and is classed:

    clear      no traceback reached the user, and the command did what the case expects: refused in
               one `chatpipe: ...` message (exit 2), or recovered and finished (exit 0)
    traceback  a Python traceback reached the user, or the command ended otherwise than expected
    lost       an output that was complete and intact before the case is gone or different after it
    hang       the command ran past its timeout

It prints one line per case and the counts by group (tried / clear / traceback / lost / hang), and
writes each case as a JSON line to --out. The kill -9 cases are the fault suite's
(`pytest -m faults`), which asserts bit-equal weights after every kill; this probe covers what
the suite's kill chain does not: damaged state, bad inputs, misuse and concurrency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pipeline.orchestration.manifest import (  # noqa: E402
    altered_files, manifest_path, output_folder, read_manifest, update_stage,
)


@dataclass
class Case:
    group: str
    name: str
    break_it: Callable[[Path, Path], None]  # (run_dir, work) -> None: the damage
    command: Callable[[Path, Path], list[str]]  # (run_dir, config) -> argv after `python -m`
    expect: str  # "refuse" (exit 2, one message) or "recover" (exit 0)
    timeout: float = 300
    spared: tuple[str, ...] = ()  # stages the case breaks or may rerun (their outputs are not "lost"); "*": all
    as_other_user: bool = False  # run as `nobody` (uid 65534), for whom the root-owned run dir is read-only
    runner: Callable[[Path], tuple[int, str]] | None = None  # in place of `command`: returns (exit code, output)
    needs_run: bool = True  # False: the case breaks a config, not a run (no finished run is built for it)


def chatpipe(*args: str) -> Callable[[Path, Path], list[str]]:
    """argv for `chatpipe ARGS`, with RUN and CONFIG standing for the case's run dir and config."""
    def argv(run_dir: Path, config: Path) -> list[str]:
        return ["pipeline.cli", *(str(run_dir) if a == "RUN" else str(config) if a == "CONFIG" else a for a in args)]
    return argv


def run_again(*extra: str) -> Callable[[Path, Path], list[str]]:
    return chatpipe("run", "CONFIG", "--run-dir", "RUN", *extra)


def nothing(run_dir: Path, work: Path) -> None:
    pass


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def one(pattern: str) -> Callable[[Path], Path]:
    def find(run_dir: Path) -> Path:
        found = sorted(run_dir.glob(pattern))
        if not found:
            raise FileNotFoundError(f"{run_dir}/{pattern}: nothing to break (the probe's run changed shape)")
        return found[0]
    return find


def newest(stage: str, name: str) -> Callable[[Path], Path]:
    """`name` in the newest checkpoint of `stage`."""
    def find(run_dir: Path) -> Path:
        checkpoints = sorted((run_dir / stage / "checkpoints").glob("step-*"))
        if not checkpoints:
            raise FileNotFoundError(f"{run_dir}/{stage}/checkpoints: no checkpoint to break")
        return checkpoints[-1] / name
    return find


def roll_back(stage: str) -> Callable[[Path], None]:
    """As if `stage` had been killed after its last checkpoint: its final output gone, recorded running."""
    def apply(run_dir: Path) -> None:
        shutil.rmtree(run_dir / stage / "final")
        update_stage(run_dir, stage, status="running", output=None)
    return apply


def then(*steps: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    def apply(run_dir: Path, work: Path) -> None:
        for step in steps:
            step(run_dir)
    return apply


def write_config(work: Path, name: str, change: Callable[[dict], None] | None = None, text: str | None = None) -> Path:
    import yaml

    path = work / name
    if text is not None:
        path.write_text(text)
        return path
    config = yaml.safe_load((work / "run.yaml").read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))
    return path


def with_config(name: str, change: Callable[[dict], None] | None = None, text: str | None = None, *extra: str):
    def argv(run_dir: Path, config: Path) -> list[str]:
        changed = write_config(config.parent, name, change, text)
        return ["pipeline.cli", "run", str(changed), "--run-dir", str(run_dir), *extra]
    return argv


def set_in(path: str, value) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        *parents, key = path.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return change


def cases() -> list[Case]:
    manifest = lambda run_dir: manifest_path(run_dir)  # noqa: E731
    previous = lambda run_dir: run_dir / "manifest.previous.json"  # noqa: E731
    return [
        # Manifest: lost or damaged; the previous one recovers the run, and with none nothing is deleted.
        Case("manifest", "manifest.json deleted", then(lambda d: manifest(d).unlink()), run_again(), "recover", spared=("eval",)),
        Case("manifest", "manifest.json garbage", then(lambda d: manifest(d).write_bytes(b"\x00\xff garbage")), run_again(), "recover", spared=("eval",)),
        Case("manifest", "manifest.json without config", then(lambda d: manifest(d).write_text('{"format": 1, "stages": {}}')), run_again(), "recover", spared=("eval",)),
        Case("manifest", "both manifests deleted", then(lambda d: manifest(d).unlink(), lambda d: previous(d).unlink()), run_again(), "refuse"),
        Case("manifest", "status of a garbage manifest", then(lambda d: manifest(d).write_bytes(b"\x00")), chatpipe("status", "RUN"), "recover"),
        # Resumable state and caches: damage is named, and the run ends as it would have.
        # (pretraining keeps checkpoints at steps 10 and 20: a damaged newest one falls back to the older.)
        Case("state", "newest checkpoint's optimizer byte flipped", then(roll_back("pretrain"), lambda d: flip_byte(newest("pretrain", "optimizer.safetensors")(d))), run_again(), "recover", spared=("pretrain",)),
        Case("state", "newest checkpoint's weights byte flipped", then(roll_back("pretrain"), lambda d: flip_byte(newest("pretrain", "model.safetensors")(d), 0.9)), run_again(), "recover", spared=("pretrain",)),
        Case("state", "newest checkpoint's rng file deleted", then(roll_back("pretrain"), lambda d: newest("pretrain", "rng-rank0.safetensors")(d).unlink()), run_again(), "recover", spared=("pretrain",)),
        Case("state", "newest checkpoint's state.json garbage", then(roll_back("pretrain"), lambda d: newest("pretrain", "state.json")(d).write_text("{garbage")), run_again(), "recover", spared=("pretrain",)),
        # SFT's only checkpoint damaged: nothing to resume from, refused naming it rather than silently started over.
        Case("state", "every checkpoint damaged", then(roll_back("sft"), lambda d: flip_byte(newest("sft", "model.safetensors")(d), 0.9)), run_again(), "refuse", spared=("sft",)),
        Case("cache", "token-store shard byte flipped", then(roll_back("pretrain"), lambda d: flip_byte(one("cache/pretrain/*/shard-*.bin")(d))), run_again(), "recover", spared=("pretrain",)),
        Case("cache", "token-store store.json garbage", then(roll_back("pretrain"), lambda d: one("cache/pretrain/*/store.json")(d).write_text("{garbage")), run_again(), "recover", spared=("pretrain",)),
        Case("cache", "chat-token ids.npy truncated", then(roll_back("sft"), lambda d: truncate(one("cache/chat_tokens/**/ids.npy")(d))), run_again(), "recover", spared=("sft",)),
        Case("cache", "chat-token masks.npy garbage", then(roll_back("sft"), lambda d: one("cache/chat_tokens/**/masks.npy")(d).write_bytes(b"garbage" * 100)), run_again(), "recover", spared=("sft",)),
        # Launch and concurrency.
        Case("launch", "interrupted stage rerun with another process count", then(roll_back("pretrain")), run_again("--set", "pretrain.launch.num_processes=2"), "refuse", spared=("pretrain",)),
        Case("launch", "launcher changed on a finished run", nothing, run_again("--set", "pretrain.launch.launcher=torchrun"), "recover"),
        Case("launch", "second run while one holds the run dir", nothing, run_again(), "refuse", timeout=120),
        # Filesystem misuse (a read-only run dir: the commands run as another user, for whom it is read-only).
        Case("filesystem", "read-only run dir: run", nothing, run_again(), "refuse", as_other_user=True),
        Case("filesystem", "read-only run dir: stage", nothing, chatpipe("stage", "sft", "--run-dir", "RUN"), "refuse", as_other_user=True),
        Case("filesystem", "read-only run dir: report", nothing, chatpipe("report", "RUN"), "refuse", as_other_user=True),
        Case("filesystem", "run dir that is a file", lambda d, w: (shutil.rmtree(d), d.write_text("x")), run_again(), "refuse", spared=("*",)),
        Case("filesystem", "status of a file", lambda d, w: (shutil.rmtree(d), d.write_text("x")), chatpipe("status", "RUN"), "refuse", spared=("*",)),
        Case("filesystem", "config path that is a folder", nothing, lambda d, c: ["pipeline.cli", "run", str(c.parent), "--run-dir", str(d)], "refuse"),
        # Validation.
        Case("validation", "duplicate YAML key", nothing, with_config("dup.yaml", text="name: a\nname: b\n"), "refuse", needs_run=False),
        Case("validation", "llama block_size past max_position_embeddings", nothing, with_config("block.yaml", set_in("pretrain.block_size", 4096)), "refuse", needs_run=False),
        Case("validation", "gpt2 block_size past n_positions", nothing, with_config("gpt2.yaml", lambda c: c["model"].update(architecture="gpt2", config={"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 16})), "refuse", needs_run=False),
        Case("validation", "hidden size the heads do not divide", nothing, with_config("heads.yaml", set_in("model.config.num_attention_heads", 3)), "refuse", needs_run=False),
        Case("validation", "base_model folder that does not exist", nothing, with_config("base.yaml", set_in("model.base_model", "/nonexistent/model")), "refuse", needs_run=False),
        # serve: one request's bad settings among ordinary ones.
        Case("serve", "2 bad temperatures among 24 requests", nothing, None, "recover", runner=poisoned_batch),
        # chat on damaged or odd input.
        Case("chat", "chat --temperature 1e-300", nothing, chatpipe("chat", "RUN", "--prompt", "Hello", "--temperature", "1e-300", "--max-new-tokens", "4"), "recover"),
        Case("chat", "chat --temperature nan", nothing, chatpipe("chat", "RUN", "--prompt", "Hello", "--temperature", "nan"), "refuse"),
        Case("chat", "chat on a truncated policy", then(lambda d: truncate(one("ppo/final/model.safetensors")(d))), chatpipe("chat", "RUN", "--stage", "ppo", "--prompt", "Hello"), "refuse", spared=("ppo",)),
        Case("chat", "chat on a deleted policy", then(lambda d: one("sft/final/model.safetensors")(d).unlink()), chatpipe("chat", "RUN", "--stage", "sft", "--prompt", "Hello"), "refuse", spared=("sft",)),
    ]


def as_other_user(argv: list[str], run_dir: Path) -> list[str]:
    """The command as `nobody` when this probe runs as root (for whom no folder is read-only); else the
    run dir is made read-only for this user."""
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    for path in [run_dir, *run_dir.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    return argv


def poisoned_batch(run_dir: Path) -> tuple[int, str]:
    """`chatpipe serve`, then 24 ordinary requests at once with 2 bad ones among them: exit 0 when every
    ordinary request is answered (200) and each bad one is refused (400) or answered, none a 500."""
    import re
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(run_dir), "--port", "0"], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in server.stdout:
            if (found := re.search(r"http://([\d.]+):(\d+)/v1", line)) is not None:
                url = f"http://{found.group(1)}:{found.group(2)}/v1/chat/completions"
                break
        else:
            return 1, "serve ended before listening"

        def ask(extra: dict) -> int:
            body = json.dumps({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 16, **extra})
            request = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        bad = [{"temperature": 1e-300}, {"temperature": 5e-324, "n": 4}]
        settings = [{"seed": index} for index in range(12)] + bad[:1] + [{"seed": index} for index in range(12, 24)] + bad[1:]
        with ThreadPoolExecutor(len(settings)) as pool:
            statuses = list(pool.map(ask, settings))
        ordinary = [status for extra, status in zip(settings, statuses) if extra not in bad]
        poisoned = [status for extra, status in zip(settings, statuses) if extra in bad]
        summary = f"ordinary requests: {ordinary.count(200)}/{len(ordinary)} answered; bad ones: {poisoned}"
        ok = ordinary.count(200) == len(ordinary) and all(status in (200, 400) for status in poisoned)
        return (0 if ok else 1), f"chatpipe: {summary}"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def intact_outputs(run_dir: Path) -> dict:
    """{stage: OutputRecord} of each completed stage whose output is intact now."""
    if not manifest_path(run_dir).exists():
        return {}
    manifest = read_manifest(run_dir)
    return {
        stage: entry.output for stage, entry in manifest.stages.items()
        if entry.status == "completed" and entry.output is not None
        and output_folder(run_dir, entry.output).is_dir() and not altered_files(run_dir, entry.output)
    }


def lost_outputs(run_dir: Path, before: dict) -> list[str]:
    """The stages whose output, intact before, is now missing or different on disk (whatever the manifest says)."""
    return sorted(
        stage for stage, output in before.items()
        if not output_folder(run_dir, output).is_dir() or altered_files(run_dir, output)
    )


def hold_lock_while(run_dir: Path):
    """A process holding the run dir's lock, as a `chatpipe run` in progress does."""
    script = ("import sys, time\nfrom pipeline.orchestration.lock import hold_run_dir\n"
              f"with hold_run_dir({str(run_dir)!r}, 'chatpipe run'):\n    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    holder.stdout.readline()
    return holder


def probe(case: Case, finished: Path, config: Path, work: Path) -> dict:
    run_dir = work / "case" / "run"
    if run_dir.parent.exists():
        for path in [run_dir.parent, *run_dir.parent.rglob("*")]:  # a read-only case's copy
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(run_dir.parent)
    shutil.copytree(finished, run_dir)
    before = {} if "*" in case.spared else {
        stage: output for stage, output in intact_outputs(run_dir).items() if stage not in case.spared
    }
    case.break_it(run_dir, work)
    holder = hold_lock_while(run_dir) if case.name.startswith("second run") else None
    env = {key: value for key, value in os.environ.items() if key not in ("CHATPIPE_FAULT", "CHATPIPE_LOCKED_RUN_DIR")}
    started = time.monotonic()
    try:
        if case.runner is not None:
            code, output = case.runner(run_dir)
        else:
            argv = [sys.executable, "-m", *case.command(run_dir, config)]
            if case.as_other_user:
                argv = as_other_user(argv, run_dir)
            result = subprocess.run(argv, cwd=REPO_ROOT, env=env,
                                    capture_output=True, text=True, timeout=case.timeout, stdin=subprocess.DEVNULL)
            code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:
        code, output = None, str(expired.stdout or "") + str(expired.stderr or "")
    finally:
        if holder is not None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
    seconds = time.monotonic() - started
    lost = lost_outputs(run_dir, before)
    if code is None:
        outcome = "hang"
    elif lost:
        outcome = "lost"
    elif "Traceback (most recent call last)" in output:
        outcome = "traceback"
    elif (case.expect == "refuse" and code == 2) or (case.expect == "recover" and code == 0):
        outcome = "clear"
    else:
        outcome = "traceback"  # ended otherwise than expected: counted against the pipeline
    lines = [line for line in output.splitlines() if line.startswith("chatpipe: ")]
    message = next((line for line in lines if code != 0 or any(
        word in line for word in ("recover", "damaged", "took over", "answered"))), lines[-1] if lines else "")
    return {"group": case.group, "case": case.name, "outcome": outcome, "exit_code": code, "seconds": round(seconds, 1),
            "lost": lost, "message": message[:300], "tail": "" if outcome == "clear" else output[-1500:]}


def build_run(work: Path, needed: bool = True) -> tuple[Path, Path]:
    """The finished run every case starts from, built unless no case needs one: (run dir, config)."""
    import yaml

    from tests.conftest import SAMPLES
    from tests.test_faults import run_config

    work.mkdir(parents=True, exist_ok=True)
    (work / "corpus.txt").write_text((SAMPLES / "tinyshakespeare.txt").read_text()[:100_000])
    config = work / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(work)))
    run_dir = work / "finished"
    if not needed:
        run_dir = work / "no-run"
        run_dir.mkdir(exist_ok=True)
        return run_dir, config
    if not (run_dir / "manifest.json").exists() or read_manifest(run_dir).stages.get("ppo") is None or \
            read_manifest(run_dir).stages["ppo"].status != "completed":
        subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--run-dir", str(run_dir)],
                       cwd=REPO_ROOT, check=True, capture_output=True, timeout=1800)
    return run_dir, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/chatpipe-fault-probe", help="Where the finished run and each case's copy go.")
    parser.add_argument("--group", help="Comma-separated groups to run (default: all).")
    parser.add_argument("--out", help="Write each case as a JSON line here.")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    chosen = [case for case in cases() if not args.group or case.group in args.group.split(",")]
    if not chosen:
        parser.error(f"no case in group(s) {args.group}; groups: {', '.join(dict.fromkeys(c.group for c in cases()))}")
    finished, config = build_run(work, needed=any(case.needs_run for case in chosen))
    results = []
    for case in chosen:
        result = probe(case, finished, config, work)
        results.append(result)
        print(f"{result['outcome']:9} {case.group:10} {case.name} ({result['seconds']}s) {result['message'][:120]}", flush=True)
        if result["outcome"] != "clear":
            print("    " + result["tail"][-600:].replace("\n", "\n    "), flush=True)
    print("\ngroup       tried  clear  traceback  lost  hang")
    for group in dict.fromkeys(result["group"] for result in results):
        mine = [result["outcome"] for result in results if result["group"] == group]
        print(f"{group:10}  {len(mine):5}  {mine.count('clear'):5}  {mine.count('traceback'):9}  {mine.count('lost'):4}  {mine.count('hang'):4}")
    outcomes = [result["outcome"] for result in results]
    print(f"{'all':10}  {len(outcomes):5}  {outcomes.count('clear'):5}  {outcomes.count('traceback'):9}  "
          f"{outcomes.count('lost'):4}  {outcomes.count('hang'):4}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as handle:
            for result in results:
                handle.write(json.dumps(result) + "\n")
    return 0 if all(outcome == "clear" for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
