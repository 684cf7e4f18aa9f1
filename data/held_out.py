"""The prompts a policy was never trained on, kept with the checkpoint that was trained without them.

The PPO stage writes its held-out conversations to `held_out.jsonl` in its output folder (so the
output digest covers them), and eval reads them from there: "never trained on" is then a fact
about the files, not an agreement between two copies of the split code. Each line is
`{"messages": [{"role": ..., "content": ...}, ...]}`, the same shape as a conversation data
file, so the set can also be passed as `eval.prompts` elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.errors import DataError

HELD_OUT_NAME = "held_out.jsonl"


def write_held_out(folder: str | Path, conversations: list[list[dict]]) -> Path:
    """Write the conversations to FOLDER/held_out.jsonl atomically; returns the path."""
    path = Path(folder) / HELD_OUT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for messages in conversations:
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def read_held_out(folder: str | Path) -> list[list[dict]]:
    """The conversations in FOLDER/held_out.jsonl, in order."""
    path = Path(folder) / HELD_OUT_NAME
    if not path.exists():
        raise DataError(
            f"{path}: missing; the PPO output in {folder} was written before held-out prompts were saved "
            f"with it. Rerun the ppo stage (`chatpipe run CONFIG --from ppo`) or set eval.prompts"
        )
    conversations = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                conversations.append(json.loads(line)["messages"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise DataError(f"{path}, line {number}: not a {{\"messages\": [...]}} row ({error}); rerun the ppo stage") from None
    return conversations
