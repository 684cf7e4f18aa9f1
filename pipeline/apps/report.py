"""A run's report for reading offline: `RUN_DIR/report.md` plus one PNG of curves per stage.

    chatpipe report runs/tiny        # writes runs/tiny/report.md and runs/tiny/report/<stage>.png

Everything comes from what the run already recorded: the manifest (status, timings, final
metrics, output and lineage of each stage) and each stage's `RUN_DIR/<stage>/metrics.jsonl`.
Nothing needs W&B or a network, and the report links its images by relative path, so the run
folder can be copied anywhere and still read.

Stages log different keys under different configs (a reward stage without evaluation has no
`eval/accuracy`), so every curve is drawn only from the rows that hold its key, and a stage with
nothing to draw gets no image and no link.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit to import on a headless node

import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)

from pipeline.orchestration.manifest import Manifest, StageEntry, parse_time, read_manifest  # noqa: E402
from pipeline.orchestration.registry import STAGES  # noqa: E402
from pipeline.orchestration.tracking import METRICS_NAME, read_metric_rows  # noqa: E402

REPORT_NAME = "report.md"
IMAGES_DIR = "report"


# ---------------------------------------------------------------------------------------------
# What each stage's image shows


@dataclass(frozen=True)
class Panel:
    """One subplot: a curve per series; a series is a tuple of keys, the first one logged wins.

    Curves run against the step, or against another logged key (`x`) of the same rows.
    """

    title: str
    ylabel: str
    series: tuple[tuple[str, ...], ...]
    x: str = "step"
    xlabel: str = "step"


LOSS_PANEL = Panel("Loss", "loss", (("train/loss",), ("eval/loss",)))

STAGE_PANELS: dict[str, tuple[Panel, ...]] = {
    "pretrain": (LOSS_PANEL,),
    "sft": (LOSS_PANEL,),
    "reward": (
        Panel("Loss", "loss", (("train/loss",),)),
        # Accuracy lives in [0, 1] and would be flattened on the loss axis.
        Panel("Eval accuracy", "accuracy", (("eval/accuracy",),)),
    ),
    "ppo": (
        # objective/scores is what older runs logged before raw and normalised scores were split.
        Panel("Rollout score", "reward model score", (("objective/raw_scores", "objective/scores"),)),
        Panel("KL to reference", "KL", (("objective/kl",),)),
        Panel("Eval score", "reward model score", (("eval/score",),)),
        # Gao et al.'s over-optimisation picture: the proxy PPO maximises against judges it never
        # sees, both in their own standard units, as the policy moves away from the SFT policy.
        Panel(
            "Proxy vs held-out judges", "score (std units)",
            (("eval/score_standardized",), ("eval/judges_score",)),
            x="eval/kl", xlabel="KL to the SFT policy (nats per reply)",
        ),
        Panel("Judges: PPO vs SFT", "win rate", (("eval/judges_win_rate",), ("eval/judges_lc_win_rate",))),
    ),
}


# ---------------------------------------------------------------------------------------------
# Entry point


def write_report(run_dir: str | Path) -> Path:
    """Write `RUN_DIR/report.md` and its images under `RUN_DIR/report/`; returns the report's path.

    Raises ManifestError when RUN_DIR has no readable manifest. Stages without metrics are listed
    but not plotted. A second call replaces the report and removes images it no longer links.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    images_dir = run_dir / IMAGES_DIR
    stages = _ordered_stages(manifest.stages)

    sections: list[str] = []
    written: set[Path] = set()
    for name, entry in stages:
        rows, torn_lines = read_metric_rows(run_dir / name)
        # A resumed stage appends after the first attempt's lines; by step, its curve reads in order.
        rows.sort(key=lambda row: row["step"])
        image = plot_stage(name, rows, images_dir / f"{_file_stem(name)}.png")
        if image is not None:
            written.add(image)
        sections.append(_stage_section(name, entry, image, run_dir, bool(rows), torn_lines))

    # Images of an earlier report that this one no longer links (a stage since cleared or renamed).
    if images_dir.is_dir():
        for stale in images_dir.glob("*.png"):
            if stale not in written:
                stale.unlink()

    text = "\n".join([_header(manifest), _stage_table(stages), *sections])
    report = run_dir / REPORT_NAME
    report.write_text(text)
    return report


# ---------------------------------------------------------------------------------------------
# Reading


def _ordered_stages(stages: dict[str, StageEntry]) -> list[tuple[str, StageEntry]]:
    """The manifest's stages in pipeline order, then any the registry does not know."""
    known = [spec.name for spec in STAGES if spec.name in stages]
    others = [name for name in stages if name not in known]
    return [(name, stages[name]) for name in known + others]


# ---------------------------------------------------------------------------------------------
# Plotting


def plot_stage(stage: str, rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Draw a stage's curves into `path` (PNG); None, and no file, when it logged none of them."""
    panels = [(title, xlabel, ylabel, curves) for title, xlabel, ylabel, curves in _panels_for(stage, rows) if curves]
    if not panels:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.6), squeeze=False)
    try:
        for axis, (title, xlabel, ylabel, curves) in zip(axes[0], panels):
            for key, (steps, values) in curves:
                # Sparse curves (evaluations every few hundred steps) need markers to be seen.
                marker = "o" if len(steps) <= 30 else None
                axis.plot(steps, values, marker=marker, markersize=3, linewidth=1.4, label=key)
            axis.set_title(title)
            axis.set_xlabel(xlabel)
            axis.set_ylabel(ylabel)
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize="small")
        figure.suptitle(f"{stage}")
        figure.tight_layout()
        figure.savefig(path, format="png", dpi=100)
    finally:
        plt.close(figure)
    return path


def _panels_for(stage: str, rows: list[dict[str, Any]]):
    """(title, xlabel, ylabel, [(key, (xs, values))]) for each panel of the stage, curves that exist only."""
    panels = [_resolve(panel, rows) for panel in STAGE_PANELS.get(stage, ())]
    if any(curves for _, _, _, curves in panels):
        return panels
    # Any other stage, or a known one that logged none of its usual keys: whatever it calls a loss.
    loss_keys = list(dict.fromkeys(key for row in rows for key in row if "loss" in key))
    return [_resolve(Panel("Loss", "loss", tuple((key,) for key in loss_keys)), rows)]


def _resolve(panel: Panel, rows: list[dict[str, Any]]):
    curves = []
    for choices in panel.series:
        for key in choices:
            points = _curve(rows, key, panel.x)
            if points[0]:
                curves.append((key, points))
                break
    return panel.title, panel.xlabel, panel.ylabel, curves


def _curve(rows: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """The `x` values and values of `key` over the rows that logged both as finite numbers."""
    xs, values = [], []
    for row in rows:
        value, position = row.get(key), row.get(x)
        if _is_number(value) and math.isfinite(value) and _is_number(position) and math.isfinite(position):
            xs.append(position)
            values.append(value)
    return xs, values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _file_stem(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stage) or "stage"


# ---------------------------------------------------------------------------------------------
# Markdown


def _header(manifest: Manifest) -> str:
    return "\n".join([
        f"# Run report: {manifest.run_name}",
        "",
        f"- Config: `{manifest.config_source or '-'}`",
        f"- Created: {_timestamp(manifest.created_at)}",
        f"- Updated: {_timestamp(manifest.updated_at)}",
        "",
    ])


def _stage_table(stages: list[tuple[str, StageEntry]]) -> str:
    lines = [
        "## Stages",
        "",
        "| Stage | Status | Duration | Processes | Final metrics | Output | Lineage |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in stages:
        cells = [
            name,
            entry.status,
            entry.duration,
            str(entry.world_size or "-"),
            format_metrics(table_metrics(name, entry.metrics)) or "-",
            entry.output.path if entry.output is not None else "-",
            lineage(name, {upstream: record.to_json() for upstream, record in entry.inputs.items()}),
        ]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    lines.append("")
    return "\n".join(lines)


# Eval records hundreds of figures; the stage table shows these, its section the rest.
EVAL_TABLE_KEYS = (
    "win_rate", "judge_win_rate", "reward_accuracy", "accuracy/shorter_wins", "prompts", "samples_per_prompt",
)
TABLE_LIMIT = 24  # metrics per stage in the table before "... and N more"


def table_metrics(stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The final metrics the stage table shows for a stage."""
    if stage == "eval":
        headline = {key: metrics[key] for key in EVAL_TABLE_KEYS if key in metrics}
        headline.update({key: value for key, value in metrics.items() if key.endswith("/judges/lc_win_rate")})
        return headline
    shown = {key: value for key, value in metrics.items() if not isinstance(value, (dict, list)) or len(str(value)) < 60}
    if len(shown) > TABLE_LIMIT:
        rest = len(shown) - TABLE_LIMIT
        shown = dict(list(shown.items())[:TABLE_LIMIT])
        shown["..."] = f"and {rest} more"
    return shown


def eval_summary(metrics: dict[str, Any]) -> list[str]:
    """The eval stage's verdict and its figures as Markdown: policies, comparisons, baselines."""
    lines = ["### Verdict", ""] + [f"- {line}" for line in metrics.get("verdict", [])] + [""]
    policies = [key.split("/", 1)[0] for key in metrics if key.endswith("/length_median")]
    rows = [("score (reward model)", "score"), ("score, completed", "score_completed"), ("judges' score", "judges_score"),
            ("KL to the SFT policy", "kl"), ("median length", "length_median"), ("ends with EOS", "eos_share"),
            ("cut at the limit", "cut_share"), ("distinct-2", "distinct_2"), ("repeats another reply", "repeated_share"),
            ("perplexity, held-out replies", "perplexity")]
    if policies:
        lines += ["| | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
        for label, key in rows:
            values = [format_value(metrics.get(f"{policy}/{key}")) or "-" for policy in policies]
            lines.append(f"| {label} | " + " | ".join(values) + " |")
        lines.append("")
    comparisons = sorted({key.split("/", 1)[0] for key in metrics if "_vs_" in key.split("/", 1)[0]})
    for comparison in comparisons:
        scorers = sorted({key.split("/")[1] for key in metrics if key.startswith(comparison + "/") and key.endswith("/win_rate")})
        lines += [f"{comparison.replace('_vs_', ' vs ')}, by each model (95% intervals over prompts):", "",
                  "| judged by | win rate | at equal length (LC) | matched length |", "|---|---|---|---|"]
        for scorer in scorers:
            cells = [_interval(metrics, f"{comparison}/{scorer}/{kind}") for kind in ("win_rate", "lc_win_rate", "matched_win_rate")]
            lines.append(f"| {scorer} | " + " | ".join(cells) + " |")
        lines.append("")
    rules = ("shorter_wins", "chance")
    models = sorted(key.split("/")[1] for key in metrics if key.startswith("accuracy/") and key.count("/") == 1
                    and f"{key}_low" in metrics)
    if models:
        lines += [f"Accuracy on {metrics.get('accuracy/pairs', '?')} held-out preference pairs no model here trained on "
                  f"({metrics.get('accuracy/excluded_pairs', 0)} left out), beside rules that need no model:", "",
                  "| | accuracy |", "|---|---|"]
        lines += [f"| {name} | {_interval(metrics, f'accuracy/{name}')} |" for name in (*models, *rules)]
        lines.append("")
    fixed = metrics.get("null_replies") or []
    policies_judged = [policy for policy in policies if any(f"/vs_{policy}/" in key for key in metrics)]
    if fixed and policies_judged:
        header = [f"beats {policy}: {scorer}" for policy in policies_judged for scorer in ("reward model", "judges")]
        lines += ["Fixed replies scored like a policy's (win rate against each policy's replies):", "",
                  "| reply | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
        for slug, text in fixed:
            cells = [_interval(metrics, f"null/{slug}/vs_{policy}/{scorer}/win_rate")
                     for policy in policies_judged for scorer in ("reward_sampled", "judges")]
            lines.append(f"| {text!r} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _interval(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if not _is_number(value) or not math.isfinite(value):
        return "-"
    low, high = metrics.get(f"{key}_low"), metrics.get(f"{key}_high")
    if _is_number(low) and _is_number(high) and math.isfinite(low):
        return f"{value:.3f} [{low:.3f}, {high:.3f}]"
    return f"{value:.3f}"


def _stage_section(
    name: str, entry: StageEntry, image: Path | None, run_dir: Path, logged: bool, torn_lines: int
) -> str:
    lines = [f"## {name}", ""]
    lines.append(
        f"Status: **{entry.status}**"
        + (f", started {_timestamp(entry.started_at)}" if entry.started_at else "")
        + (f", took {entry.duration}" if entry.finished_at else "")
    )
    lines.append("")
    if entry.error:
        lines += ["Error:", "", _fenced(entry.error), ""]
    if name == "eval" and entry.metrics:
        lines += eval_summary(entry.metrics)
    if torn_lines:
        lines += [f"{torn_lines} unreadable line(s) in `{name}/{METRICS_NAME}` were skipped.", ""]
    if image is not None:
        relative = image.relative_to(run_dir).as_posix()
        lines += [f"![{name} metrics]({relative})", ""]
    elif logged:
        if name != "eval":  # eval logs one row of figures, shown above
            lines += ["Nothing to plot: none of its logged metrics is a curve this report draws.", ""]
    else:
        lines += [f"No metrics logged (no `{name}/{METRICS_NAME}`).", ""]
    return "\n".join(lines)


def format_metrics(metrics: dict[str, Any]) -> str:
    """`key=value, ...` for a stage's final metrics; floats to 4 significant digits, nulls left out."""
    parts = []
    for key, value in metrics.items():
        text = format_value(value)
        if text is not None:
            parts.append(f"{key}={text}")
    return ", ".join(parts)


def format_value(value: Any) -> str | None:
    """A metric as a short string, or None when there is nothing worth showing."""
    if value is None or value == {} or value == []:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"), default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value)


def lineage(stage: str, inputs: dict[str, Any]) -> str:
    """`ppo <- sft@80edfb4b, reward@1c2d3e4f`: the checkpoints a stage consumed, with digests."""
    if not inputs:
        return "-"
    upstream = []
    for key, record in inputs.items():
        record = record if isinstance(record, dict) else {}
        digest = str(record.get("digest") or "")[:8]
        upstream.append(f"{record.get('stage') or key}" + (f"@{digest}" if digest else ""))
    return f"{stage} <- " + ", ".join(upstream)


def _timestamp(value: str | None) -> str:
    parsed = parse_time(value)
    if parsed is None:
        return value or "-"
    return parsed.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _fenced(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"

