"""Which preferences a reward model saw: accuracy is only ever measured on pairs it did not.

    write_trained_on(output_dir, train_groups)          # the reward and judges stages
    unseen = [g for g in groups if fingerprint(g) not in read_trained_on(model_dir)]   # eval

A reward model's accuracy on its own training pairs is a training figure, however it is labelled.
Each training stage writes the fingerprints of the preference groups it trained on into its
checkpoint folder (`trained_on.json`, covered by the folder's digest), and writes the pairs it held
out (`held_out_preferences.jsonl`) for eval to measure on. Eval drops any pair a model it reports
on trained on, and says how many, whatever file it was pointed at.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from data.preferences import PreferenceGroup

TRAINED_ON_NAME = "trained_on.json"
HELD_OUT_NAME = "held_out_preferences.jsonl"


def fingerprint(group: PreferenceGroup) -> str:
    """A preference group's identity: its completions (prompt included), whatever file it came from."""
    return hashlib.sha256(json.dumps(group.completions, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def write_trained_on(folder: str | Path, groups: list[PreferenceGroup]) -> Path:
    path = Path(folder) / TRAINED_ON_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprints": sorted({fingerprint(group) for group in groups})}) + "\n")
    return path


def read_trained_on(folder: str | Path) -> set[str]:
    """The fingerprints a reward model trained on; empty for one trained elsewhere (nothing is known)."""
    path = Path(folder) / TRAINED_ON_NAME
    if not path.exists():
        return set()
    return set(json.loads(path.read_text())["fingerprints"])


def write_held_out(folder: str | Path, groups: list[PreferenceGroup]) -> Path:
    """The held-out groups as ranked rows (`prompt`, `completions`, `scores`), a format the reward data reads.

    A completion's score is the number of completions it beats, which gives back exactly its pairs.
    """
    path = Path(folder) / HELD_OUT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for group in groups:
            scores = [sum(1 for better, _ in group.pairs if better == index) for index in range(len(group.completions))]
            handle.write(json.dumps({"prompt": group.prompt, "completions": group.completions, "scores": scores}, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
    return path
