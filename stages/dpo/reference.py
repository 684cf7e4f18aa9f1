"""Reply log-probabilities: the policy's in every step, the reference's once, cached with the run.

    logps, tokens = reply_logps(model, batch["input_ids"], batch["attention_mask"], batch["reply_lengths"])
    train, validation = cached_reference(cache_dir, key, lambda: reference_logps(model, groups, pad_id, 8, device))

DPO compares the policy's log-probability of each reply with the reference's, the SFT policy's.
The reference never changes, so its log-probs are computed once, before the first step, by the
policy itself (with LoRA: the same model with its adapter off, which is the SFT policy at any
step): training never holds a second copy of the weights. They are kept under
RUN_DIR/cache/dpo_reference/<key>/ as safetensors beside their sha256, the key made of the SFT
checkpoint's digest and every token id scored, so a rerun, a resumed run or a run with other
training settings reads them back, and a damaged file is computed again with a warning.

A reply is the tokens after the prefix all of a prompt's completions share (`reply_lengths`
from reward_model.batching.encode_groups): the prompt, and any opening tokens every reply has.
Shared tokens have the same log-probability in every completion, so they cancel in each pair's
margin; SimPO's per-token mean counts the tokens that differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from data.chat_tokens import DamagedCache, remove_folder
from pipeline.digests import file_sha256
from pipeline.models.logprobs import logprobs_from_logits, masked_sum
from reward_model.batching import EncodedGroup, collate_groups

logger = logging.getLogger(__name__)
CACHE_FILE, DIGESTS_FILE = "reference.safetensors", "sha256.json"


def reply_mask(attention_mask: torch.Tensor, reply_lengths: torch.Tensor) -> torch.Tensor:
    """1 on each row's reply tokens, its last `reply_lengths` real tokens: (n, width) right-padded, (n,) -> (n, width)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    real = attention_mask.sum(1, keepdim=True)
    return ((positions >= real - reply_lengths.unsqueeze(1)) & (positions < real)).to(attention_mask.dtype)


def reply_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, reply_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's reply tokens, how many were scored): each (n,), float32.

    input_ids, attention_mask: (n, width) right-padded; reply_lengths: (n,). A row's first token
    has no logit predicting it, so a reply that fills the whole row is scored from its second token.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    logps = logprobs_from_logits(logits, input_ids[:, 1:], 1.0)
    mask = reply_mask(attention_mask, reply_lengths)[:, 1:].float()
    return masked_sum(logps, mask, 1), mask.sum(1)


def adapter_off(model):
    """The context in which `model` is its own reference: a peft model with its adapter off; any other as it is."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def reference_logps(model, groups: list[EncodedGroup], pad_token_id: int, batch_groups: int, device) -> torch.Tensor:
    """Each completion's summed reply log-probability under the reference, in group order: (n_completions,) float32.

    `model` is the policy before training (or at any step, with LoRA): scored in eval mode, with
    its adapter off, then left in the mode it was in.
    """
    was_training = model.training
    model.eval()
    values = []
    with adapter_off(model):
        for start in range(0, len(groups), batch_groups):
            batch = collate_groups(groups[start : start + batch_groups], pad_token_id)
            sums, _ = reply_logps(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["reply_lengths"].to(device)
            )
            values.append(sums.cpu())
    model.train(was_training)
    return torch.cat(values) if values else torch.zeros(0)


def with_reference(groups: list[EncodedGroup], logps: torch.Tensor) -> list[EncodedGroup]:
    """The groups, each carrying its completions' reference log-probs from `logps` (group order, as reference_logps gives)."""
    values, offset, carried = logps.tolist(), 0, []
    for group in groups:
        count = len(group.completion_ids)
        carried.append(dataclasses.replace(group, reference_logps=values[offset : offset + count]))
        offset += count
    return carried


def reference_key(model_digest: str, groups: list[EncodedGroup]) -> str:
    """What the reference's log-probs depend on: the reference model and every token id scored, with its reply length."""
    digest = hashlib.sha256(model_digest.encode())
    for group in groups:
        for ids, length in zip(group.completion_ids, group.reply_lengths):
            digest.update(np.asarray([len(ids), length, *ids], dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def cached_reference(cache_dir: Path, key: str, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(the reference log-probs under `key`, whether they were read from the cache): read back when
    the cache holds them intact, else computed by `compute()` and written there."""
    folder = Path(cache_dir) / key
    if folder.is_dir():
        try:
            return read_reference(folder), True
        except DamagedCache as damage:
            logger.warning(f"{damage}; computing the reference log-probs of {folder} again")
            remove_folder(folder)
    logps = compute()
    write_reference(folder, logps)
    return logps, False


def write_reference(folder: Path, logps: torch.Tensor) -> None:
    """`logps` as safetensors with its sha256, written aside and renamed into place whole."""
    partial = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    partial.mkdir(parents=True, exist_ok=True)
    save_file({"logps": logps.contiguous()}, partial / CACHE_FILE)
    (partial / DIGESTS_FILE).write_text(json.dumps({CACHE_FILE: file_sha256(partial / CACHE_FILE)}))
    try:
        partial.rename(folder)
    except OSError:  # another process wrote the same log-probs first
        shutil.rmtree(partial, ignore_errors=True)


def read_reference(folder: Path) -> torch.Tensor:
    """The log-probs write_reference wrote, checked against their sha256; DamagedCache if they do not match."""
    path = folder / CACHE_FILE
    try:
        recorded = json.loads((folder / DIGESTS_FILE).read_text())[CACHE_FILE]
        if file_sha256(path) != recorded:
            raise DamagedCache(f"{path} was changed after it was written (its sha256 differs from the one recorded)")
        return load_file(path)["logps"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DamagedCache(f"{path} cannot be read ({type(error).__name__}: {error})") from None
