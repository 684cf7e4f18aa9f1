import json
import re

import pytest

from pipeline.apps.report import format_value, lineage, write_report
from pipeline.errors import ManifestError
from pipeline.orchestration.manifest import duration, new_manifest, update_stage, write_manifest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIGESTS = {"tokenizer": "5d46f60e83c4f783", "pretrain": "6aaeb702e9e2adaa", "sft": "80edfb4be5b2a5ba",
           "reward": "92286d42c0ffee11"}


def write_rows(run_dir, stage, rows):
    folder = run_dir / stage
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def loss_rows(steps=20, start=7.5):
    """Training rows every step with a falling loss, an evaluation row every 5 steps."""
    rows = [{"step": 0, "eval/loss": start, "eval/perplexity": 1808.0}]
    for step in range(1, steps + 1):
        rows.append({"step": step, "train/loss": start - 0.15 * step, "train/grad_norm": 1.2, "lr": 1e-3})
        if step % 5 == 0:
            rows.append({"step": step, "eval/loss": start - 0.14 * step, "eval/perplexity": 100.0 / step})
    return rows


def record(run_dir, stage, inputs=(), **fields):
    update_stage(
        run_dir,
        stage,
        inputs={
            upstream: {"stage": upstream, "path": str(run_dir / upstream / "final"), "digest": DIGESTS[upstream]}
            for upstream in inputs
        },
        world_size=2,
        **fields,
    )


@pytest.fixture
def run_dir(tmp_path):
    """A run with tokenizer, pretrain, sft and reward completed, ppo failed; tokenizer has no metrics file."""
    write_manifest(tmp_path, new_manifest("demo", {"name": "demo"}, "configs/demo.yaml"))
    record(tmp_path, "tokenizer", status="completed", output={"path": "tokenizer/final", "digest": "aa"},
           metrics={"source": "trained", "vocab_size": 2048, "seconds": 0.52},
           started_at="2026-01-02T10:00:00+00:00", finished_at="2026-01-02T10:00:03+00:00")
    record(tmp_path, "pretrain", ("tokenizer",), status="completed", output={"path": "pretrain/final", "digest": "bb"},
           metrics={"steps": 20, "train_loss": 4.512345, "eval_loss": 4.7891234, "eval_perplexity": 120.17312,
                    "resumed_from_step": None},
           started_at="2026-01-02T10:00:05+00:00", finished_at="2026-01-02T10:01:30+00:00")
    record(tmp_path, "sft", ("pretrain",), status="completed", output={"path": "sft/final", "digest": "cc"},
           metrics={"steps": 20, "eval_loss": 3.5368661, "dropped_reasons": {"empty": 2}, "checkpoint_kind": "full"},
           started_at="2026-01-02T10:02:00+00:00", finished_at="2026-01-02T11:04:05+00:00")
    record(tmp_path, "reward", ("sft",), status="completed", output={"path": "reward/final", "digest": "dd"},
           metrics={"steps": 20, "accuracy": 0.65, "mean_margin": 0.25012},
           started_at="2026-01-02T11:05:00+00:00", finished_at="2026-01-02T11:06:39+00:00")
    record(tmp_path, "ppo", ("sft", "reward"), status="failed", output=None, metrics={},
           error="CUDA out of memory | tried to allocate 2.00 GiB",
           started_at="2026-01-02T11:07:00+00:00", finished_at="2026-01-02T11:07:42+00:00")

    write_rows(tmp_path, "pretrain", loss_rows())
    write_rows(tmp_path, "sft", loss_rows(start=6.7))
    reward_rows = [{"step": 0, "eval/accuracy": 0.5, "eval/pairs": 100}]
    for step in range(1, 21):
        reward_rows.append({"step": step, "train/loss": 0.77 - 0.01 * step, "train/accuracy": 0.5 + step / 50})
        if step % 5 == 0:
            reward_rows.append({"step": step, "eval/accuracy": 0.5 + step / 100, "eval/pairs": 100})
    write_rows(tmp_path, "reward", reward_rows)
    ppo_rows = [{"step": 0, "eval/score": 0.1, "eval/kl": 0.0}]
    for step in range(1, 13):
        ppo_rows.append({"step": step, "objective/kl": 0.02 * step, "objective/raw_scores": 0.1 + 0.05 * step,
                         "objective/entropy": 3.1})
        if step % 5 == 0:
            ppo_rows.append({"step": step, "eval/score": 0.1 + 0.04 * step, "eval/kl": 0.02 * step})
    write_rows(tmp_path, "ppo", ppo_rows)
    return tmp_path


def image_links(text):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def table_row(text, stage):
    return next(line for line in text.splitlines() if line.startswith(f"| {stage} |"))


def test_report_lists_every_stage_with_status_metrics_and_lineage(run_dir):
    report = write_report(run_dir)

    assert report == run_dir / "report.md"
    text = report.read_text()
    assert "# Run report: demo" in text
    assert "configs/demo.yaml" in text
    for stage in ("tokenizer", "pretrain", "sft", "reward", "ppo"):
        assert f"## {stage}" in text
    assert "| completed | 1m25s | 2 |" in table_row(text, "pretrain")
    assert "| completed | 1h02m05s |" in table_row(text, "sft")
    assert "| failed | 42s |" in table_row(text, "ppo")
    # Floats to 4 significant digits; nulls left out; nested values compact.
    assert "train_loss=4.512" in text and "eval_loss=4.789" in text and "eval_perplexity=120.2" in text
    assert "accuracy=0.65" in text and "vocab_size=2048" in text
    assert "resumed_from_step" not in text
    assert 'dropped_reasons={"empty":2}' in text
    assert "pretrain/final" in table_row(text, "pretrain")
    assert "pretrain <- tokenizer@5d46f60e" in table_row(text, "pretrain")
    assert "reward <- sft@80edfb4b" in table_row(text, "reward")
    assert "ppo <- sft@80edfb4b, reward@92286d42" in table_row(text, "ppo")
    assert table_row(text, "tokenizer").endswith("| - |")  # no inputs
    # The error in full (its pipe kept) in the stage's section, and the table not broken by it.
    assert "CUDA out of memory | tried to allocate 2.00 GiB" in text
    assert all(line.count("|") - line.count("\\|") == 8 for line in text.splitlines() if line.startswith("| "))


def test_every_image_link_is_a_real_png_under_the_report_folder(run_dir):
    text = write_report(run_dir).read_text()

    links = image_links(text)
    assert sorted(links) == ["report/ppo.png", "report/pretrain.png", "report/reward.png", "report/sft.png"]
    for link in links:
        image = run_dir / link
        assert image.parent == run_dir / "report"
        data = image.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5_000


def test_stage_without_metrics_file_gets_no_plot_and_no_link(run_dir):
    (run_dir / "reward" / "metrics.jsonl").unlink()

    text = write_report(run_dir).read_text()

    assert "reward.png" not in text
    assert not (run_dir / "report" / "reward.png").exists()
    assert not (run_dir / "report" / "tokenizer.png").exists()  # tokenizer never had one
    assert "No metrics logged" in text.split("## reward")[1].split("## ppo")[0]
    for link in image_links(text):
        assert (run_dir / link).is_file()


def test_rows_missing_a_key_and_stages_with_other_configs_still_plot(run_dir):
    # A reward stage run without evaluation, a torn last line from a crash, and an unknown stage.
    write_rows(run_dir, "reward", [{"step": step, "train/loss": 0.7 - 0.01 * step} for step in range(1, 11)])
    with open(run_dir / "reward" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 11, "train/lo')
    record(run_dir, "distill", ("sft",), status="completed", metrics={"kd_loss": 1.25})
    write_rows(run_dir, "distill", [{"step": s, "kd_loss": 2.0 / s, "lr": 1e-4} for s in range(1, 11)])

    text = write_report(run_dir).read_text()

    assert (run_dir / "report" / "reward.png").read_bytes().startswith(PNG_MAGIC)
    assert "1 unreadable line(s)" in text
    assert "report/distill.png" in image_links(text)
    assert "distill <- sft@" in text


def test_second_report_replaces_the_first_and_drops_stale_images(run_dir):
    first = write_report(run_dir).read_text()
    assert write_report(run_dir).read_text() == first

    (run_dir / "sft" / "metrics.jsonl").unlink()
    text = write_report(run_dir).read_text()

    assert text.count("# Run report: demo") == 1
    assert "sft.png" not in text
    assert sorted(p.name for p in (run_dir / "report").iterdir()) == ["ppo.png", "pretrain.png", "reward.png"]


def test_run_dir_without_manifest_raises_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        write_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_formatting_helpers():
    assert duration("2026-01-02T10:00:00+00:00", "2026-01-02T10:00:07+00:00") == "7s"
    assert duration("2026-01-02T10:00:00+00:00", None) == "-"
    assert duration("not a time", "2026-01-02T10:00:07+00:00") == "-"
    assert format_value(0.123456) == "0.1235"
    assert format_value(True) == "true"
    assert format_value(None) is None and format_value({}) is None
    assert lineage("tokenizer", {}) == "-"
    assert lineage("pretrain", {"tokenizer": {"stage": "tokenizer", "path": "/x", "digest": "5d46f60e83c4f783"}}) == (
        "pretrain <- tokenizer@5d46f60e"
    )


def test_the_over_optimisation_picture_plots_proxy_and_judges_against_kl():
    from pipeline.apps.report import _panels_for

    rows = [{"step": 0, "eval/kl": 0.0, "eval/score_standardized": 0.5, "eval/judges_score": 0.4, "eval/score": 0.2}]
    rows += [{"step": step, "eval/kl": step / 10, "eval/score_standardized": 0.5 + step / 20,
              "eval/judges_score": 0.4 + step / 40 - (step / 40) ** 2} for step in (5, 10, 15)]
    panels = {title: (xlabel, curves) for title, xlabel, _, curves in _panels_for("ppo", rows)}
    xlabel, curves = panels["Proxy vs held-out judges"]
    assert xlabel.startswith("KL")
    assert dict(curves)["eval/judges_score"][0] == [0.0, 0.5, 1.0, 1.5]  # against KL, not the step
    assert dict(curves)["eval/score_standardized"][1] == [0.5, 0.75, 1.0, 1.25]


def test_the_eval_section_leads_with_the_verdict_and_its_figures(run_dir):
    verdict = ["PPO vs SFT at equal length: 0.53 [0.49, 0.57] by 3 held-out judges — no clear win.",
               "The reward model's accuracy on 310 pairs no model here trained on: 0.58 [0.53, 0.64]."]
    metrics = {
        "verdict": verdict, "win_rate": 0.9, "reward_accuracy": 0.58, "accuracy/shorter_wins": 0.57,
        "ppo_vs_sft/judges/lc_win_rate": 0.53, "ppo_vs_sft/judges/lc_win_rate_low": 0.49, "ppo_vs_sft/judges/lc_win_rate_high": 0.57,
        "ppo_vs_sft/judges/win_rate": 0.46, "ppo_vs_sft/reward/win_rate": 0.9,
        "sft/score": 0.5, "sft/length_median": 26.0, "sft/eos_share": 0.85,
        "ppo/score": 1.1, "ppo/length_median": 17.0, "ppo/eos_share": 1.0,
        "accuracy/pairs": 310, "accuracy/reward": 0.58, "accuracy/reward_low": 0.53, "accuracy/reward_high": 0.64,
        **{f"null/empty/vs_ppo/judges/win_rate_{i}": 0.1 for i in range(40)},  # hundreds of figures in all
    }
    record(run_dir, "eval", ("sft", "reward"), status="completed", output={"path": "eval/final", "digest": "ee"},
           metrics=metrics, started_at="2026-01-02T11:08:00+00:00", finished_at="2026-01-02T11:09:00+00:00")
    text = write_report(run_dir).read_text()
    section = text.split("## eval")[1]
    assert section.index("### Verdict") < section.index("| judged by |")
    assert all(f"- {line}" in section for line in verdict)
    assert "| judges | 0.460 | 0.530 [0.490, 0.570] | - |" in section
    assert "| median length | 26 | 17 |" in section and "| reward | 0.580 [0.530, 0.640] |" in section
    # The stage table keeps to the headline figures.
    row = table_row(text, "eval")
    assert "ppo_vs_sft/judges/lc_win_rate=0.53" in row and "null/" not in row
