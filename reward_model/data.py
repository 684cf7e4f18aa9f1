"""Which preference groups each reward model trains on: the reward model's, the judges', and none
of the pairs either holds out. DPO reads and splits its preferences the same way.

    groups, rows = load_preference_groups(config.reward.data, config.reward, cache_dir)
    reward_groups, judge_groups = split_for_judges(groups, share=0.5, seed=config.seed)
    train_groups, validation_groups = held_out_groups(reward_groups, config.reward, config.seed, cache_dir)

When the judges have no data of their own they take a share of the reward data's prompts, and the
reward model never sees that share. Both stages draw the split with this one function from the
same seed, so they agree on it without reading each other's folders.
"""

from __future__ import annotations

from pathlib import Path

from data.preferences import PreferenceGroup, normalize_preferences
from data.rows import RowReport
from data.sources import load_source
from data.splits import held_out_split
from pipeline.config import BadRowPolicy, PreferenceData, PreferenceSplit

# Offsets the seed of the reward/judges split from the reward model's own validation split, so
# the two draws are not the same permutation.
JUDGES_SPLIT_SALT = 7919


def load_preference_groups(
    source: PreferenceData, section: BadRowPolicy, cache_dir: Path | None = None, config_section: str = "reward"
) -> tuple[list[PreferenceGroup], RowReport]:
    """The usable preference groups of a source, with the section's bad-row policy applied."""
    rows = load_source(source, cache_dir=cache_dir)
    return normalize_preferences(
        rows,
        ranking_is=source.ranking_is,
        on_bad_row=section.on_bad_row,
        max_bad_fraction=section.max_bad_fraction,
        source=source.hub or source.path,
        config_section=config_section,
    )


def split_for_judges(groups: list[PreferenceGroup], share: float, seed: int) -> tuple[list[PreferenceGroup], list[PreferenceGroup]]:
    """(the reward model's groups, the judges' groups): `share` of the prompts go to the judges."""
    return held_out_split(groups, share, seed + JUDGES_SPLIT_SALT, what="preference prompts")


def held_out_groups(
    groups: list[PreferenceGroup], section: PreferenceSplit | BadRowPolicy, seed: int, cache_dir: Path | None = None,
    config_section: str = "reward",
) -> tuple[list[PreferenceGroup], list[PreferenceGroup]]:
    """(groups to train on, held-out groups): the section's `validation_data` when it names one, else
    a seeded `validation_fraction` of the prompts."""
    if section.validation_data is not None:
        return groups, load_preference_groups(section.validation_data, section, cache_dir, config_section)[0]
    return held_out_split(groups, section.validation_fraction, seed, what="prompts")
