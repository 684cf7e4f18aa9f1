"""W&B for real, offline: one run per stage, grouped, with config, curves, tables and checkpoints."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import WandbConfig
from pipeline.orchestration.manifest import read_manifest
from pipeline.orchestration.tracking import resolve_wandb_mode
from tests.conftest import chatpipe, tiny_config, tiny_sft_section
from tests.wandb_records import summarize

SECRET = "test-key-0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, shakespeare_excerpt):
    folder = tmp_path_factory.mktemp("wandb_run")
    raw = tiny_config(shakespeare_excerpt, wandb={"mode": "offline", "project": "chatpipe-tests"},
                      sft=tiny_sft_section(max_steps=10, eval_every=5, save_every=10))
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = folder / "run"
    # A key in the environment must never end up in anything chatpipe or W&B writes.
    result = chatpipe("run", str(config), "--run-dir", str(run_dir), env={"WANDB_MODE": None, "WANDB_API_KEY": SECRET})
    return run_dir, result


def offline_runs(run_dir: Path) -> dict[str, dict]:
    runs = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        summary = summarize(path)
        runs[summary["job_type"]] = {**summary, "id": path.stem.removeprefix("run-")}
    return runs


def test_one_offline_run_per_stage_in_the_run_group(offline_run):
    run_dir, result = offline_run
    runs = offline_runs(run_dir)
    assert set(runs) == {"tokenizer", "pretrain", "sft"}
    manifest = read_manifest(run_dir)
    for stage, run in runs.items():
        assert run["group"] == "test" and run["name"] == f"test-{stage}"
        assert manifest.stages[stage].wandb_run_id == run["id"]
    assert "wandb sync" in result.stdout


def test_runs_carry_config_curves_tables_and_checkpoints(offline_run):
    run_dir, _ = offline_run
    runs = offline_runs(run_dir)
    manifest = read_manifest(run_dir)
    pretrain, sft = runs["pretrain"], runs["sft"]
    assert pretrain["config"]["pretrain"]["max_steps"] == 40 and pretrain["config"]["model"]["architecture"] == "llama"
    assert {"train/loss", "eval/loss", "eval/perplexity", "lr"} <= pretrain["history_keys"]
    assert {"train/loss", "eval/loss"} <= sft["history_keys"]
    (table,) = [row for row in sft["history"] if "samples/_type" in row]  # the table of sample replies
    assert table["samples/_type"] == "table-file" and table["samples/nrows"] == 2 and table["samples/ncols"] == 3
    assert sft["config"]["inputs"] == {"pretrain": manifest.stages["pretrain"].output.digest}
    for stage in ("pretrain", "sft"):
        (artifact,) = [a for a in runs[stage]["artifacts"] if a["type"] == "model"]
        assert artifact["type"] == "model" and artifact["name"] == f"test-{stage}"
        assert artifact["metadata"]["digest"] == manifest.stages[stage].output.digest
        assert "model.safetensors" in artifact["files"]
    assert pretrain["summary"]["eval_loss"] == pytest.approx(manifest.stages["pretrain"].metrics["eval_loss"])


def test_no_secret_is_written_anywhere(offline_run):
    run_dir, result = offline_run
    assert SECRET not in result.stdout + result.stderr
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.setenv("HOME", "/nonexistent")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode(WandbConfig(mode="auto")) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert resolve_wandb_mode(WandbConfig(mode="auto")) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(WandbConfig(mode="online")) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_wandb_mode(WandbConfig(mode="disabled")) == "disabled"  # the config's "off" wins
