"""The pretrain stage end to end, through the command line a user runs."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.orchestration.manifest import read_manifest
from pipeline.orchestration.tracking import read_metric_rows
from tests.conftest import REPO_ROOT, chatpipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shakespeare_excerpt):
    """One tiny tokenizer + pretrain run, shared by the tests that only read its results."""
    import yaml

    from tests.conftest import tiny_config

    folder = tmp_path_factory.mktemp("pretrain_run")
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(shakespeare_excerpt)))
    run_dir = folder / "run"
    result = chatpipe("run", str(config), "--run-dir", str(run_dir))
    return config, run_dir, result


def test_pretraining_loss_falls(finished_run):
    _, run_dir, _ = finished_run
    metrics = read_manifest(run_dir).stages["pretrain"].metrics
    assert metrics["steps"] == 40
    # From uniform guessing over 400 tokens (ln 400 = 6.0) to well below it in 40 steps.
    assert metrics["initial_eval_loss"] > 5.5
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 1.0
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-4)
    losses = [row["train/loss"] for row in read_metric_rows(run_dir / "pretrain")[0] if "train/loss" in row]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_the_corpus_is_tokenized_once_into_a_memory_mapped_token_store(finished_run, shakespeare_excerpt):
    _, run_dir, _ = finished_run
    metrics = read_manifest(run_dir).stages["pretrain"].metrics
    (store,) = (run_dir / "cache" / "pretrain").iterdir()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "pretrain" / "final")
    # One document (the .txt file), then its EOS, as uint16 ids: 2 bytes a token, headers aside.
    ids = tokenizer(shakespeare_excerpt.read_text(), add_special_tokens=False)["input_ids"]
    assert metrics["corpus_tokens"] == len(ids) + 1 and metrics["corpus_documents"] == 1
    stream = np.fromfile(store / "shard-00000.bin", dtype=np.uint16)
    assert stream.tolist() == [*ids, tokenizer.eos_token_id]
    assert 2 * metrics["corpus_tokens"] < metrics["token_bytes"] <= 2.01 * metrics["corpus_tokens"]
    assert metrics["train_blocks"] + metrics["validation_blocks"] == metrics["corpus_tokens"] // 32
    # The text was streamed, not converted: no Arrow copy of the corpus in the run's cache.
    assert not list((run_dir / "cache").rglob("*.arrow"))


def test_checkpoint_loads_with_plain_transformers_and_generates(finished_run):
    _, run_dir, _ = finished_run
    folder = run_dir / "pretrain" / "final"
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("First Citizen:", return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(output[0]), str)


def test_manifest_records_lineage_hashes_and_provenance(finished_run):
    _, run_dir, _ = finished_run
    manifest = read_manifest(run_dir)
    tokenizer, pretrain = manifest.stages["tokenizer"], manifest.stages["pretrain"]
    assert tokenizer.status == pretrain.status == "completed"
    assert pretrain.inputs["tokenizer"].digest == tokenizer.output.digest
    assert pretrain.inputs["tokenizer"].path == str((run_dir / "tokenizer" / "final").resolve())
    assert "model.safetensors" in pretrain.output.files
    assert pretrain.world_size == 1 and pretrain.versions["torch"] == torch.__version__
    assert pretrain.config["pretrain"]["max_steps"] == 40 and len(pretrain.config_hash) == 16
    assert pretrain.started_at <= pretrain.finished_at


def test_status_prints_the_manifest_as_a_table(finished_run):
    _, run_dir, _ = finished_run
    lines = chatpipe("status", str(run_dir)).stdout.splitlines()
    assert lines[1].split()[:2] == ["stage", "status"]
    assert lines[2].split()[:2] == ["tokenizer", "completed"]
    assert lines[3].split()[:2] == ["pretrain", "completed"] and "eval_loss=" in lines[3]


def test_rerun_skips_unchanged_stages_and_reruns_changed_ones(finished_run, tmp_path):
    config, run_dir, _ = finished_run
    # Work on a copy: the other tests read the original run.
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = read_manifest(copy).stages
    again = chatpipe("run", str(config), "--run-dir", str(copy)).stdout
    assert "tokenizer: up to date, skipped" in again and "pretrain: up to date, skipped" in again
    assert read_manifest(copy).stages["pretrain"].finished_at == before["pretrain"].finished_at

    changed = chatpipe("run", str(config), "--run-dir", str(copy), "--set", "pretrain.max_steps=20").stdout
    assert "tokenizer: up to date, skipped" in changed and "pretrain: config changed; running" in changed
    after = read_manifest(copy).stages
    assert after["pretrain"].metrics["steps"] == 20
    assert after["tokenizer"].finished_at == before["tokenizer"].finished_at


def test_an_altered_input_checkpoint_is_refused(finished_run, tmp_path):
    import shutil

    _, run_dir, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    tokenizer_json = copy / "tokenizer" / "final" / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text() + "\n")
    result = chatpipe("stage", "pretrain", "--run-dir", str(copy), check=False)
    assert result.returncode != 0
    assert "altered since it was recorded" in result.stderr + result.stdout and "tokenizer.json" in result.stderr + result.stdout


def test_killed_stage_resumes_from_its_last_checkpoint(write_config, tmp_path):
    steps = 300
    config = write_config(pretrain={"max_steps": steps, "save_every": 10, "eval_every": 100, "log_every": 10})
    run_dir = tmp_path / "run"
    from pipeline.cli import record_config
    from pipeline.config import load_config

    record_config(run_dir, load_config(config), str(config))
    chatpipe("stage", "tokenizer", "--run-dir", str(run_dir))
    # Start pretraining in the background and kill -9 it once it has written a checkpoint.
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.pretrain", "--run-dir", str(run_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = run_dir / "pretrain" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*[0-9]")) and time.monotonic() < deadline:
        assert process.poll() is None, "pretraining ended before it could be interrupted"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_manifest(run_dir).stages["pretrain"].status == "running"

    output = chatpipe("run", str(config), "--run-dir", str(run_dir)).stdout
    assert "pretrain: resuming from the last checkpoint (it was interrupted)" in output
    entry = read_manifest(run_dir).stages["pretrain"]
    resumed_from = entry.metrics["resumed_from_step"]
    assert entry.status == "completed" and entry.metrics["steps"] == steps
    assert 10 <= resumed_from < steps and resumed_from % 10 == 0
    logged_steps = [row["step"] for row in read_metric_rows(run_dir / "pretrain")[0] if "train/loss" in row]
    # The second attempt picks up after the checkpoint rather than starting again from step 10.
    second_attempt = logged_steps[logged_steps.index(steps) - (steps - resumed_from) // 10 + 1 :]
    assert second_attempt[0] == resumed_from + 10
    assert logged_steps.count(10) == 1


def test_resumed_training_matches_uninterrupted_training(write_config, tmp_path):
    """Optimiser moments, schedule, RNG and data order all come back: the result is the same run."""
    config = write_config(pretrain={"max_steps": 30, "save_every": 10, "eval_every": 30, "keep_checkpoints": 5})
    straight = tmp_path / "straight"
    chatpipe("run", str(config), "--run-dir", str(straight))

    interrupted = tmp_path / "interrupted"
    import shutil

    shutil.copytree(straight, interrupted)
    # Roll the copy back to its step-10 checkpoint, as if the process had died just after saving it.
    checkpoints = interrupted / "pretrain" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000010", "step-000020"]
    shutil.rmtree(checkpoints / "step-000020")
    shutil.rmtree(interrupted / "pretrain" / "final")
    from pipeline.orchestration.manifest import update_stage

    update_stage(interrupted, "pretrain", status="running", output=None)
    chatpipe("run", str(config), "--run-dir", str(interrupted))

    resumed, uninterrupted = (read_manifest(d).stages["pretrain"].metrics for d in (interrupted, straight))
    assert resumed["resumed_from_step"] == 10 and uninterrupted["resumed_from_step"] is None
    assert resumed["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], abs=1e-5)
    weights = [AutoModelForCausalLM.from_pretrained(d / "pretrain" / "final").state_dict() for d in (interrupted, straight)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], atol=1e-5, rtol=1e-4)


def test_only_and_from_rerun_the_named_stages(finished_run, tmp_path):
    import shutil

    config, run_dir, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = read_manifest(copy).stages
    only = chatpipe("run", str(config), "--run-dir", str(copy), "--only", "pretrain").stdout
    assert "pretrain: requested; running" in only and "tokenizer:" not in only
    after = read_manifest(copy).stages
    assert after["tokenizer"].finished_at == before["tokenizer"].finished_at
    assert after["pretrain"].started_at >= before["pretrain"].finished_at
    # The rerun is deterministic: the same weights as before.
    assert after["pretrain"].output.digest == before["pretrain"].output.digest
    both = chatpipe("run", str(config), "--run-dir", str(copy), "--from", "tokenizer").stdout
    assert "tokenizer: requested; running" in both and "pretrain: requested; running" in both
    unknown = chatpipe("run", str(config), "--run-dir", str(copy), "--only", "sft", check=False)
    assert unknown.returncode == 2 and "has no `sft:` section" in unknown.stderr


def test_a_base_model_can_replace_pretraining(finished_run, tmp_path, shakespeare_excerpt):
    import yaml

    from tests.conftest import tiny_config

    _, run_dir, _ = finished_run
    base = run_dir / "pretrain" / "final"
    raw = tiny_config(shakespeare_excerpt, model={"architecture": "llama", "config": {}, "base_model": str(base)})
    raw["pretrain"].pop("data")
    raw["tokenizer"] = {}
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(raw))
    new_run = tmp_path / "run"
    chatpipe("run", str(config), "--run-dir", str(new_run))
    stages = read_manifest(new_run).stages
    assert stages["tokenizer"].metrics["source"] == str(base)
    assert stages["pretrain"].metrics["source"] == str(base)
    adopted = AutoModelForCausalLM.from_pretrained(new_run / "pretrain" / "final")
    original = AutoModelForCausalLM.from_pretrained(base)
    for name, tensor in original.state_dict().items():
        assert torch.equal(adopted.state_dict()[name], tensor)


def test_a_hub_corpus_is_streamed_once_per_machine_by_its_first_process(bpe_tokenizer, tmp_path):
    """Local files are read by every process (the page cache serves them); a hub stream is one
    download per process, so there the first process encodes on every core and the rest wait."""
    import json
    import threading

    from pipeline.config import PretrainConfig
    from stages.pretrain.corpus import prepare_store

    repo = tmp_path / "org-corpus"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.jsonl").write_text("".join(json.dumps({"text": f"speech {n} " * 50}) + "\n" for n in range(400)))
    bpe_tokenizer.save_pretrained(tmp_path / "tokenizer")
    section = PretrainConfig(data={"hub": str(repo), "max_rows": 300}, shard_mb=0.01)
    stores = {}

    def work(worker):
        stores[worker] = prepare_store(section, bpe_tokenizer, tmp_path / "tokenizer", tmp_path / "cache", worker=worker, workers=2)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in (1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert stores[0].tokens == stores[1].tokens and stores[0].documents == 300
    headers = [json.loads(path.read_text()) for path in stores[0].folder.glob("shard-*.json")]
    assert len(headers) > 2 and {header["worker"] for header in headers} == {0}
