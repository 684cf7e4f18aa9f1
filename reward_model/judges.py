"""Judges: reward models the policy never trained against, and the training reward model beside them.

    panel = JudgePanel.load({"reward": reward_dir, **judge_folders(judges_dir)}, device)
    raw = panel.score(responses, micro_batch_size)     # {name: (batch,)} each model's raw scores
    standard = panel.standardized(raw)                 # each in its own held-out standard deviations
    panel.ensemble(raw)                                # the judges' mean (the training model left out)

A proxy reward that PPO optimises is the one number that cannot tell whether PPO helped (Gao et
al., "Scaling Laws for Reward Model Overoptimization"): the policy learns whatever the proxy
mistakes for quality. Reward models trained on other preference pairs, with other seeds, make
different mistakes; their mean is the "gold" stand-in. Each model's scores are put in its own
units (its held-out mean and standard deviation, `reward_stats.json`) before they are averaged, so
no judge outweighs the others by its scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.models.responses import Responses, score_in_micro_batches
from reward_model.functions import RewardFunction, reward_model_function
from reward_model.model import TokenScorer, load_reward_model
from reward_model.statistics import STATISTICS_NAME, ScoreStatistics

PANEL_NAME = "judges.json"
TRAINING_MODEL = "reward"  # the name the training reward model goes by among judges


@dataclass
class Judge:
    name: str
    scorer: torch.nn.Module  # a TokenScorer
    statistics: ScoreStatistics


def judge_folders(judges_dir: str | Path | None, extra: list[str] = ()) -> dict[str, Path | str]:
    """The judges a judges stage recorded in its output (`judges.json`), then any given by path.

    A folder or hub id given by path is named `judge:<its last path part>`.
    """
    folders: dict[str, Path | str] = {}
    if judges_dir is not None:
        listing = json.loads((Path(judges_dir) / PANEL_NAME).read_text())
        for judge in listing["judges"]:
            folders[judge["name"]] = Path(judges_dir) / judge["folder"]
        extra = [*listing.get("external", []), *extra]
    for path in extra:
        name = f"judge:{Path(str(path)).name}"
        folders.setdefault(name, path)
    return folders


def read_statistics(folder: str | Path) -> ScoreStatistics:
    """A reward model's held-out score statistics; raw units (mean 0, std 1) for one trained elsewhere."""
    if (Path(folder) / STATISTICS_NAME).exists():
        return ScoreStatistics.read(folder)
    return ScoreStatistics(mean=0.0, std=1.0)


class JudgePanel:
    """Several reward models scoring the same responses."""

    def __init__(self, judges: list[Judge]):
        self.judges = judges

    @classmethod
    def load(cls, folders: dict[str, Path | str], device: torch.device | str = "cpu") -> JudgePanel:
        """Whole models on `device`, in eval mode (callers that shard place them themselves)."""
        return cls([
            Judge(name, TokenScorer(load_reward_model(folder)).eval().to(device), read_statistics(folder))
            for name, folder in folders.items()
        ])

    @property
    def names(self) -> list[str]:
        return [judge.name for judge in self.judges]

    @property
    def held_out_names(self) -> list[str]:
        """The judges proper: every model but the one the policy was trained against."""
        return [name for name in self.names if name != TRAINING_MODEL]

    def reward_function(self, name: str) -> RewardFunction:
        """One model of the panel as a reward function (eval scores replies as sampled with the training model)."""
        [scorer] = [judge.scorer for judge in self.judges if judge.name == name]
        return reward_model_function(scorer)

    @torch.no_grad()
    def score(self, responses: Responses, micro_batch_size: int) -> dict[str, torch.Tensor]:
        """Each model's raw score of every response: {name: (batch,) float32}."""
        return {
            judge.name: score_in_micro_batches(responses, micro_batch_size, reward_model_function(judge.scorer), per_token=False)
            for judge in self.judges
        }

    def standardized(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each model's scores in its own held-out units: (score - mean) / std."""
        statistics = {judge.name: judge.statistics for judge in self.judges}
        return {
            name: (scores - statistics[name].mean) / (statistics[name].std if statistics[name].std > 0 else 1.0)
            for name, scores in raw.items()
        }

    def ensemble(self, raw: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The held-out judges' mean standardized score per response, or None without judges."""
        names = self.held_out_names
        if not names:
            return None
        standard = self.standardized({name: raw[name] for name in names})
        return torch.stack([standard[name] for name in names]).mean(0)
