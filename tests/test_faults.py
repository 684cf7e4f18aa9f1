"""Every training stage survives a `kill -9` at each point where it writes state, and a full disk.

One tiny tokenizer → pretrain → sft → dpo → reward → judges → ppo run is shared by the module; each test works on
a copy of it. A stage is killed through CHATPIPE_FAULT (pipeline/faults.py) at each kill point in
turn, each attempt resuming from what the previous one left. After every kill the run dir must be
consistent: the manifest reads, every other stage's completed output is still there and unaltered.
Then a plain rerun must complete; pretraining's and DPO's resumed weights must equal the
uninterrupted ones bit for bit.

    pytest -m faults
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.orchestration.manifest import read_manifest, resolve_input, update_stage
from tests.conftest import REPO_ROOT, SAMPLES, chatpipe, tiny_config, tiny_sft_section

pytestmark = pytest.mark.faults

STAGES = ("pretrain", "sft", "dpo", "reward", "judges", "ppo")

# The order a stage is killed in: each attempt resumes from what the one before left behind.
# #N: the Nth time the point is reached in that process (a resumed stage writes its manifest
# entry twice: `running`, then `completed`).
KILL_CHAIN = (
    "checkpoint:after-weights",
    "checkpoint:before-rename",
    "final:after-weights",
    "manifest:before-replace#2",  # everything written, killed while recording `completed`
)
# A finished stage asked to run again, killed as it starts over: the same code (execute_stage) for
# every stage, so pretraining alone pays for it.
RESTART_KILL = "manifest:before-replace#1"

OUTCOMES = {"injected": 0, "survived": 0}


def run_config(folder) -> dict:
    """Every training stage, each saving at least one resumable checkpoint within seconds."""
    from tests.stages.test_dpo import dpo_section
    from tests.stages.test_ppo import judges_section, ppo_section
    from tests.stages.test_reward import marker_preferences

    return tiny_config(
        folder / "corpus.txt",
        # Speeches as documents, in shards of ~20 kB: the 100 kB corpus is tokenized as five, so
        # tokenizing can die in between.
        pretrain={"data": {"path": str(folder / "corpus.txt"), "sample_by": "paragraph"}, "max_steps": 30, "save_every": 10, "eval_every": 30, "keep_checkpoints": 5, "shard_mb": 0.02},
        sft=tiny_sft_section(max_steps=20, eval_every=20, sample_prompts=0),
        dpo=dpo_section(marker_preferences(folder / "marker.jsonl"), max_steps=20, eval_every=20, save_every=10),
        reward={
            "data": {"path": str(marker_preferences(folder / "marker.jsonl"))}, "init_from": "pretrain",
            "max_length": 64, "max_steps": 20, "learning_rate": 3e-3, "eval_every": 20, "save_every": 10,
        },
        judges=judges_section(),
        ppo=ppo_section(),
    )


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """One uninterrupted run of every stage: (config file, run dir)."""
    folder = tmp_path_factory.mktemp("faults")
    (folder / "corpus.txt").write_text((SAMPLES / "tinyshakespeare.txt").read_text()[:100_000])
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(folder)))
    run_dir = folder / "run"
    chatpipe("run", str(config), "--run-dir", str(run_dir))
    yield config, run_dir
    print(f"\nfaults injected: {OUTCOMES['injected']}, survived: {OUTCOMES['survived']}")


def run_stage(stage: str, run_dir, fault: str | None = None) -> subprocess.CompletedProcess:
    """The stage's own process, as `chatpipe` launches it, with CHATPIPE_FAULT set or cleared."""
    env = {key: value for key, value in os.environ.items() if key != "CHATPIPE_FAULT"}
    if fault is not None:
        env["CHATPIPE_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--run-dir", str(run_dir)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


def completed_outputs(run_dir, but: str) -> dict[str, str]:
    """{stage: output digest} of every completed stage except `but`, each checked present and unaltered."""
    manifest = read_manifest(run_dir)  # readable: a torn manifest would raise here
    return {
        stage: resolve_input(run_dir, manifest, stage).digest
        for stage, entry in manifest.stages.items()
        if stage != but and entry.status == "completed"
    }


def final_weights(folder) -> dict[str, torch.Tensor]:
    weights = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(str(shard)))
    return weights


def assert_same_weights(folder, reference) -> None:
    ours, theirs = final_weights(folder), final_weights(reference)
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:5]}"


def copy_of(upstream, tmp_path):
    _, run_dir = upstream
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_killed_at_every_kill_point_still_finishes(upstream, tmp_path, stage):
    run_dir = copy_of(upstream, tmp_path)
    others = completed_outputs(run_dir, but=stage)
    resumed_lines = []
    chain = (RESTART_KILL, *KILL_CHAIN) if stage == "pretrain" else KILL_CHAIN
    for fault in chain:
        OUTCOMES["injected"] += 1
        killed = run_stage(stage, run_dir, fault)
        assert killed.returncode == 137, f"{fault} was never reached:\n{killed.stdout[-2000:]}\n{killed.stderr[-3000:]}"
        assert completed_outputs(run_dir, but=stage) == others, f"after a kill at {fault}"
        entry = read_manifest(run_dir).stages[stage]
        assert entry.status != "completed" or (run_dir / entry.output.path).is_dir(), f"after a kill at {fault}"
        resumed_lines += resume_lines(stage, killed.stdout)

    finished = run_stage(stage, run_dir)
    assert finished.returncode == 0, finished.stderr[-3000:]
    OUTCOMES["survived"] += len(chain)
    entry = read_manifest(run_dir).stages[stage]
    assert entry.status == "completed" and completed_outputs(run_dir, but=stage) == others
    resumed_lines += resume_lines(stage, finished.stdout)
    # Every stage says where it resumed from, in the same words: the kill at `final:after-weights`
    # left complete checkpoints, so the last two attempts resumed. (The judges keep each finished
    # judge: after the kill while recording, none is left to resume.)
    assert len(resumed_lines) >= (1 if stage == "judges" else 2), resumed_lines
    assert all("/checkpoints/" in line and "/step-" in line for line in resumed_lines), resumed_lines
    if stage in ("pretrain", "dpo"):
        assert_same_weights(run_dir / stage / "final", upstream[1] / stage / "final")
    if stage == "judges":  # each judge, killed and resumed, ends as the uninterrupted one did
        for judge in ("judge-0", "judge-1"):
            assert_same_weights(run_dir / "judges" / "final" / judge, upstream[1] / "judges" / "final" / judge)


def resume_lines(stage: str, stdout: str) -> list[str]:
    """The lines a stage printed where it resumed (each judge prints its own, as `judge-<i>: ...`)."""
    prefix = "judge-" if stage == "judges" else f"{stage}: "
    return [line for line in stdout.splitlines() if line.startswith(prefix) and ": resuming from " in line]


def test_pretraining_killed_while_tokenizing_keeps_its_finished_shards(upstream, tmp_path):
    run_dir = copy_of(upstream, tmp_path)
    shutil.rmtree(run_dir / "pretrain")
    shutil.rmtree(run_dir / "cache" / "pretrain")
    update_stage(run_dir, "pretrain", status="running", output=None)

    killed = run_stage("pretrain", run_dir, "token-store:shard-written#3")  # the third shard's ids are down
    assert killed.returncode == 137, killed.stderr[-3000:]
    (store,) = (run_dir / "cache" / "pretrain").iterdir()
    kept = {path.name: path.stat().st_mtime_ns for path in store.glob("shard-*.json")}
    assert sorted(kept) == ["shard-00000.json", "shard-00001.json"] and not (store / "store.json").exists()

    finished = run_stage("pretrain", run_dir)
    assert finished.returncode == 0, finished.stderr[-3000:]
    # The two finished shards were kept as they were; the rest were tokenized, and the run is the same run.
    assert {name: (store / name).stat().st_mtime_ns for name in kept} == kept
    assert len(list(store.glob("shard-*.bin"))) == 5 and not list(store.glob("*.tmp"))
    assert_same_weights(run_dir / "pretrain" / "final", upstream[1] / "pretrain" / "final")
    metrics = read_manifest(run_dir).stages["pretrain"].metrics
    assert metrics["corpus_tokens"] == read_manifest(upstream[1]).stages["pretrain"].metrics["corpus_tokens"]


def roll_back_pretrain(run_dir) -> None:
    """As if pretraining (30 steps) had been killed after its last checkpoint, step 20."""
    shutil.rmtree(run_dir / "pretrain" / "final")
    update_stage(run_dir, "pretrain", status="running", output=None)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(upstream, tmp_path):
    config, _ = upstream
    run_dir = copy_of(upstream, tmp_path)
    roll_back_pretrain(run_dir)
    (run_dir / "pretrain" / "checkpoints" / "step-000020" / "optimizer.json").unlink()

    output = chatpipe("run", str(config), "--run-dir", str(run_dir), "--only", "pretrain")
    assert "Traceback" not in output.stdout + output.stderr
    assert "step-000020 cannot be loaded (FileNotFoundError" in output.stdout
    assert f"pretrain: resuming from {(run_dir / 'pretrain' / 'checkpoints' / 'step-000010').resolve()}" in output.stdout
    entry = read_manifest(run_dir).stages["pretrain"]
    assert entry.status == "completed" and entry.metrics["resumed_from_step"] == 10
    assert_same_weights(run_dir / "pretrain" / "final", upstream[1] / "pretrain" / "final")


def test_a_full_disk_is_an_error_that_loses_nothing(upstream, tmp_path):
    run_dir = copy_of(upstream, tmp_path)
    checkpoints = run_dir / "pretrain" / "checkpoints"
    shutil.rmtree(checkpoints / "step-000020")
    roll_back_pretrain(run_dir)
    others = completed_outputs(run_dir, but="pretrain")

    # The disk fills up while the step-20 checkpoint is written, after its weights.
    full = run_stage("pretrain", run_dir, "checkpoint:after-weights=enospc")
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "chatpipe: pretrain: " in full.stderr, full.stderr[-3000:]
    message = full.stderr[full.stderr.index("chatpipe: pretrain: "):].splitlines()[0]  # progress bars around it
    assert "disk is full" in message
    assert str(checkpoints.resolve() / "step-000020.tmp") in message
    assert "needs about" in message and "KiB" in message and "is free" in message and "rerun" in message
    assert not (checkpoints / "step-000020.tmp").exists() and not (checkpoints / "step-000020").exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000010"]
    entry = read_manifest(run_dir).stages["pretrain"]
    assert entry.status == "failed" and "disk is full" in entry.error
    assert completed_outputs(run_dir, but="pretrain") == others

    # Space freed: the rerun resumes from step 10 and ends where the uninterrupted run ended.
    resumed = run_stage("pretrain", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"pretrain: resuming from {(checkpoints / 'step-000010').resolve()}" in resumed.stdout
    assert read_manifest(run_dir).stages["pretrain"].status == "completed"
    assert_same_weights(run_dir / "pretrain" / "final", upstream[1] / "pretrain" / "final")


# ---------------------------------------------------------------------------------------------
# The launch itself killed, and two launches at once


def processes_naming(text: str) -> list[int]:
    """Pids of the live processes whose command line mentions `text` (this machine's /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry))
    return found


def start_chatpipe(*args: str) -> subprocess.Popen:
    """`chatpipe ARGS` in a session (process group) of its own, as a user's terminal starts it."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={key: value for key, value in os.environ.items() if key not in ("CHATPIPE_FAULT", "CHATPIPE_LOCKED_RUN_DIR")},
    )


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what} after {timeout:.0f}s")


def test_killing_a_two_process_launch_kills_its_workers_and_a_new_process_count_keeps_its_checkpoint(upstream, tmp_path):
    config, _ = upstream
    run_dir = copy_of(upstream, tmp_path)
    two = ["run", str(config), "--run-dir", str(run_dir), "--only", "sft", "--set", "sft.max_steps=60",
           "--set", "sft.save_every=5", "--set", "sft.eval_every=60", "--set", "sft.launch.num_processes=2"]
    launch = start_chatpipe(*two)
    checkpoints = run_dir / "sft" / "checkpoints"
    # The copied run's own sft checkpoints are steps 10 and 20; this attempt's first is step 5.
    first = wait_for(lambda: sorted(checkpoints.glob("step-000005/state.json")), 300, "the first checkpoint")
    assert len(processes_naming(str(run_dir))) >= 3  # chatpipe, torchrun and its two workers
    os.killpg(launch.pid, signal.SIGKILL)  # what a terminal's kill of the job does
    launch.communicate()
    manifest_before = (run_dir / "manifest.json").read_bytes()

    # torchrun starts each worker in a session of its own, out of the killed group: they must go too.
    wait_for(lambda: not processes_naming(str(run_dir)), 5, "the workers to stop")
    time.sleep(1)
    assert (run_dir / "manifest.json").read_bytes() == manifest_before  # nothing written after the kill
    assert read_manifest(run_dir).stages["sft"].status == "running"

    # Rerun with one process: refused, naming the checkpoint; nothing deleted.
    one = chatpipe(*two[:-2], check=False)
    assert one.returncode == 2 and "Traceback" not in one.stderr
    assert "was written with launch.num_processes=2 (now 1)" in one.stderr
    assert "--set sft.launch.num_processes=2" in one.stderr
    assert all(path.exists() for path in first)
    # With two it resumes from that checkpoint and finishes.
    resumed = chatpipe(*two)
    assert "sft: resuming from the last checkpoint (it was interrupted)" in resumed.stdout
    assert read_manifest(run_dir).stages["sft"].status == "completed"


def test_two_runs_on_one_run_dir_the_second_is_refused_and_a_killed_ones_lock_is_taken_over(upstream, tmp_path):
    config, _ = upstream
    run_dir = copy_of(upstream, tmp_path)
    command = ["run", str(config), "--run-dir", str(run_dir), "--from", "ppo"]
    first = start_chatpipe(*command)
    wait_for(lambda: read_manifest(run_dir).stages["ppo"].status == "running", 120, "ppo to start")

    second = chatpipe(*command, check=False)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"is in use by pid {first.pid} on " in second.stderr and "(chatpipe run, since" in second.stderr
    assert read_manifest(run_dir).stages["ppo"].status == "running"  # the first run's work untouched

    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    third = chatpipe("run", str(config), "--run-dir", str(run_dir))
    assert f"took over the run dir's lock from pid {first.pid}" in third.stdout
    assert "ppo: resuming from the last checkpoint (it was interrupted)" in third.stdout
    assert read_manifest(run_dir).stages["ppo"].status == "completed"
