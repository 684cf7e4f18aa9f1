"""Load any policy checkpoint a stage produced: full weights, or a LoRA adapter on its base.

An adapter checkpoint is a peft folder (`adapter_config.json`, `adapter_model.safetensors`) plus
`chatpipe_adapter.json`, which names its base model folder relative to the adapter, so a run
directory can move without breaking the link. Later stages call `load_causal_lm` and never need
to know which kind they got.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedModel

ADAPTER_NOTE = "chatpipe_adapter.json"


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").exists()


def write_adapter_note(folder: str | Path, base_folder: str | Path, base_digest: str | None) -> None:
    folder, base_folder = Path(folder), Path(base_folder)
    note = {"base_model": os.path.relpath(base_folder.resolve(), folder.resolve()), "base_digest": base_digest}
    (folder / ADAPTER_NOTE).write_text(json.dumps(note, indent=2) + "\n")


def adapter_base(folder: str | Path) -> Path | str:
    """The base model an adapter was trained on: from chatpipe's note, else peft's own record."""
    folder = Path(folder)
    note = folder / ADAPTER_NOTE
    if note.exists():
        return (folder / json.loads(note.read_text())["base_model"]).resolve()
    return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_causal_lm(folder: str | Path, *, merge: bool = True, trainable: bool = False, **kwargs) -> PreTrainedModel:
    """A causal LM from a full checkpoint, or from an adapter on its base (merged unless merge=False)."""
    if not is_adapter(folder):
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(adapter_base(folder), **kwargs)
    model = PeftModel.from_pretrained(base, folder, is_trainable=trainable)
    return model.merge_and_unload() if merge else model
