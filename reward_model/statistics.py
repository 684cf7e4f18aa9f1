"""The reward model's score statistics, saved in its checkpoint folder as `reward_stats.json`.

    ScoreStatistics(mean=0.12, std=0.98).write("runs/tiny/reward/final")   # the reward stage
    reward_stats = ScoreStatistics.read(reward_dir)                          # PPO, from its input

PPO normalises raw reward-model scores with the mean and standard deviation the reward stage
measured on held-out completions. They belong to that checkpoint: a copy of the folder, or a run
that consumes it from elsewhere, must carry them along, and the output digest covers them. So they
travel as a file in the folder rather than as manifest metrics another stage reads by key (the
manifest keeps them as metrics too, for people reading `chatpipe status` or W&B).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import ManifestError

STATISTICS_NAME = "reward_stats.json"


@dataclass(frozen=True)
class ScoreStatistics:
    """Mean and (population) standard deviation of the reward model's scores on held-out completions,
    and the least-squares slope of those scores against reply length in tokens (how much the model
    pays for length as such; `ppo.reward.length_correction` subtracts it)."""

    mean: float
    std: float
    length_slope: float = 0.0
    length_mean: float = 0.0  # the held-out completions' mean reply length, where the trend is centred

    def write(self, folder: str | Path) -> Path:
        """Save as `folder/reward_stats.json`; returns its path."""
        path = Path(folder) / STATISTICS_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        # json writes a float's repr, which reads back to the same float: PPO normalises exactly as before.
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> ScoreStatistics:
        """The statistics saved in a reward checkpoint folder; a ManifestError says how to get them."""
        path = Path(folder) / STATISTICS_NAME
        rerun = "rerun the reward stage to write it (chatpipe run CONFIG --from reward)"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(
                f"{folder}: no {STATISTICS_NAME} (a reward checkpoint from an older chatpipe); {rerun}"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ManifestError(f"{path}: not valid JSON ({error}); {rerun}") from None
        values = raw if isinstance(raw, dict) else {}
        if not all(isinstance(values.get(key), (int, float)) and not isinstance(values.get(key), bool)
                   for key in ("mean", "std")):
            raise ManifestError(f"{path}: expected numbers `mean` and `std`, found {raw!r}; {rerun}")
        length = {key: values.get(key, 0.0) for key in ("length_slope", "length_mean")}
        for key, value in length.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ManifestError(f"{path}: {key} must be a number, found {value!r}; {rerun}")
        statistics = cls(mean=float(values["mean"]), std=float(values["std"]), **{k: float(v) for k, v in length.items()})
        if not (math.isfinite(statistics.mean) and math.isfinite(statistics.std) and statistics.std >= 0
                and math.isfinite(statistics.length_slope) and math.isfinite(statistics.length_mean)):
            raise ManifestError(
                f"{path}: mean {statistics.mean}, std {statistics.std} and length_slope {statistics.length_slope} "
                f"must be finite, std >= 0; {rerun}"
            )
        return statistics
