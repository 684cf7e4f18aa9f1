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
from pipeline.models.logprobs import logprobs_from_logits, masked_sum, position_ids_from
from reward_model.batching import EncodedGroup, collate_groups

logger = logging.getLogger(__name__)
CACHE_FILE, DIGESTS_FILE = "reference.safetensors", "sha256.json"
# 2: batched by length (length_order), scored in length chunks with logits for the replies only
# (reply_logps): the same values to ~1e-6 relative, but not bit for bit, which step 0's exact
# zero rewards need.
REFERENCE_FORMAT = 2


def reply_mask(attention_mask: torch.Tensor, reply_lengths: torch.Tensor) -> torch.Tensor:
    """1 on each row's reply tokens, its last `reply_lengths` real tokens: (n, width) right-padded, (n,) -> (n, width)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    real = attention_mask.sum(1, keepdim=True)
    return ((positions >= real - reply_lengths.unsqueeze(1)) & (positions < real)).to(attention_mask.dtype)


def reply_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, reply_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's reply tokens, how many were scored): each (n,), float32.

    input_ids, attention_mask: (n, width) right-padded; reply_lengths: (n,). A row's first token
    has no logit predicting it, so a reply that fills the whole row is scored from its second token.

    Two savings, neither of which changes a row's value beyond float rounding:
    - the rows go through the model in a few passes of similar length (`length_chunks`), so a
      batch of short and long conversations is not all padded to its longest: in random
      micro-batches of the demo's HH pairs 45% of the positions were padding;
    - each pass is left-padded, so every row's reply ends at the last column, and only the last
      (longest reply + 1) positions go through the LM head and the log-softmax
      (`logits_to_keep`, as PPO's scoring passes do): the prompt's positions need no logits.
    """
    lengths = attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    sums, counts = [], []
    for chunk in length_chunks(lengths[order].tolist()):
        rows = order[chunk]
        row_sums, row_counts = _left_padded_reply_logps(model, input_ids[rows], lengths[rows], reply_lengths[rows])
        sums.append(row_sums)
        counts.append(row_counts)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return torch.cat(sums)[inverse], torch.cat(counts)[inverse]


def _left_padded_reply_logps(model, input_ids: torch.Tensor, lengths: torch.Tensor, reply_lengths: torch.Tensor):
    """reply_logps of right-padded rows, scored as one left-padded pass cut to their longest row."""
    width = int(lengths.max())
    columns = torch.arange(width, device=input_ids.device)
    source = columns.unsqueeze(0) - (width - lengths).unsqueeze(1)  # where each column's token sits in the right-padded row
    real = source >= 0
    ids = torch.where(real, input_ids.gather(1, source.clamp(min=0)), input_ids[:, :1])  # padding: any id, masked out
    mask = real.long()
    keep = min(width, int(reply_lengths.max()) + 1)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask), logits_to_keep=keep, use_cache=False,
    ).logits[:, :-1]
    token_columns = columns[width - keep + 1 :]  # the tokens those logits predict
    first_scored = torch.maximum(width - reply_lengths, width - lengths + 1)  # a row's own first token has no logit
    scored = (token_columns.unsqueeze(0) >= first_scored.unsqueeze(1)).float()
    logps = logprobs_from_logits(logits, ids[:, width - keep + 1 :], 1.0)
    return masked_sum(logps, scored, 1), scored.sum(1)


def length_chunks(sorted_lengths: list[int], pass_cost: float = 0.125) -> list[slice]:
    """Consecutive runs of rows sorted by length, one model pass each, chosen to compute the fewest positions.

    Each pass costs its rows x its longest row, plus `pass_cost` x the whole batch padded to its
    longest (what one pass would compute): a split is made only where it saves at least that
    share of the batch's positions, so a batch of similar lengths stays one pass and the fixed
    cost of a pass (a few milliseconds of Python and kernel launches) is not paid for nothing.
    Exact (dynamic programming over the split points; a batch has at most a few hundred rows).
    """
    count = len(sorted_lengths)
    if count <= 1:
        return [slice(0, count)]
    overhead = pass_cost * count * sorted_lengths[-1]
    best, split = [0.0] + [float("inf")] * count, [0] * (count + 1)
    for end in range(1, count + 1):  # best[end]: rows [0, end) in passes; a pass [start, end) is padded to sorted_lengths[end - 1]
        for start in range(end):
            cost = best[start] + (end - start) * sorted_lengths[end - 1] + overhead
            if cost < best[end]:
                best[end], split[end] = cost, start
    chunks, end = [], count
    while end > 0:
        chunks.append(slice(split[end], end))
        end = split[end]
    return chunks[::-1]


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
    # Batched by length (little padding), the values put back in group order.
    order = length_order(groups)
    values: list[torch.Tensor | None] = [None] * len(groups)
    with adapter_off(model):
        for start in range(0, len(order), batch_groups):
            chosen = order[start : start + batch_groups]
            batch = collate_groups([groups[index] for index in chosen], pad_token_id)
            sums, _ = reply_logps(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["reply_lengths"].to(device)
            )
            for index, group_sums in zip(chosen, sums.cpu().split([len(groups[index].completion_ids) for index in chosen])):
                values[index] = group_sums
    model.train(was_training)
    return torch.cat(values) if values else torch.zeros(0)


def length_order(groups: list[EncodedGroup]) -> list[int]:
    """The groups' indices by their longest completion, shortest first (ties in group order).

    The reference pass and the held-out evaluation batch groups in this order, `batch_groups` at a
    time: on one process both then score the held-out groups in the same batches, so at step 0,
    where the policy is the reference, every implicit reward is exactly 0 (a row's log-prob moves
    in its last bits with the batch it is scored in).
    """
    return sorted(range(len(groups)), key=lambda index: max(map(len, groups[index].completion_ids)))


def with_reference(groups: list[EncodedGroup], logps: torch.Tensor) -> list[EncodedGroup]:
    """The groups, each carrying its completions' reference log-probs from `logps` (group order, as reference_logps gives)."""
    values, offset, carried = logps.tolist(), 0, []
    for group in groups:
        count = len(group.completion_ids)
        carried.append(dataclasses.replace(group, reference_logps=values[offset : offset + count]))
        offset += count
    return carried


def reference_key(model_digest: str, groups: list[EncodedGroup]) -> str:
    """What the reference's log-probs depend on: the reference model, every token id scored, with its
    reply length, and how they are batched (REFERENCE_FORMAT)."""
    digest = hashlib.sha256(f"{model_digest}:{REFERENCE_FORMAT}".encode())
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
