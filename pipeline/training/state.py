"""Resumable checkpoints without pickle: model, optimiser, scheduler and RNG in safetensors + JSON.

    RUN_DIR/<stage>/checkpoints/step-000200/
        model.safetensors, config.json, ...   the model (save_pretrained: loads with from_pretrained);
                                               PPO keeps two, in policy/ and value/
        optimizer.safetensors                  optimiser tensors (AdamW moments, step counts); under
                                               FSDP2 and ZeRO gathered whole and named `<parameter>::<key>`
                                               (ZeRO adds each parameter's fp32 master weights, `::fp32`)
        optimizer.json                         optimiser param groups and scalars, scheduler state
        rng-rank0.safetensors, rng-rank0.json  each process's torch and Python RNG state
        state.json                             step and extras, and the sha256 of every other file; written last,
                                               so its presence marks a complete checkpoint

Every stage writes and reads these through one `Checkpointer`. A checkpoint is written to
`step-N.tmp/` and renamed when complete, so a `kill -9` mid-save leaves the previous checkpoint as
the latest; a complete checkpoint that fails to load (a file deleted or damaged since) is skipped
for the next newest, with a message naming the file. Damage that would still load (a flipped bit
in a tensor) is caught by the digests: state.json records every file's sha256 when the checkpoint
is written, and the main process checks every file (each rank's RNG files too) before loading and
tells the others which checkpoint to resume from, so the processes of a launch agree on it. Checkpoints written before
digests were recorded load unchecked. A full disk mid-save removes the partial folder and is a
`DiskFullError` saying how much space the checkpoint needs and how much is free. Loading never
unpickles anything. CHATPIPE_FAULT (pipeline/faults.py) can kill the writer at
`checkpoint:after-weights` and `checkpoint:before-rename`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.digests import file_sha256
from pipeline.errors import ChatpipeError
from pipeline.faults import fault_point
from pipeline.training.distributed import engine_of

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"
DIGESTS_KEY = "sha256"  # in state.json: {path relative to the checkpoint: sha256} of every other file
STATE_DIGEST_KEY = "state_sha256"  # in state.json: the sha256 of the rest of state.json


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """The completed checkpoints under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for step, path in sorted(found, reverse=True) if (path / STATE_FILE).exists()]


def checkpoint_step(path: Path) -> int:
    """The step of a `step-N` checkpoint folder."""
    return int(CHECKPOINT_PATTERN.match(Path(path).name).group(1))


def latest_checkpoint(root: Path) -> Path | None:
    """The completed checkpoint with the highest step under `root`, if any."""
    complete = complete_checkpoints(root)
    return complete[0] if complete else None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into tensors (for safetensors) and JSON (param groups, scalars)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            key = f"{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_optimizer_state(folder: Path, optimizer: torch.optim.Optimizer, scheduler=None) -> None:
    """optimizer.safetensors (tensors) + optimizer.json (param groups, scalars, scheduler)."""
    tensors, meta = optimizer_tensors(optimizer)
    save_file(tensors, str(Path(folder) / "optimizer.safetensors"))
    meta["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    (Path(folder) / "optimizer.json").write_text(json.dumps(meta, default=_json_default))


def load_optimizer_state(folder: Path, optimizer: torch.optim.Optimizer, scheduler=None) -> None:
    meta = json.loads((Path(folder) / "optimizer.json").read_text())
    restore_optimizer(optimizer, load_file(str(Path(folder) / "optimizer.safetensors")), meta)
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])


def save_rng_state(folder: Path, process_index: int) -> None:
    """This process's torch (and CUDA) RNG to safetensors, Python's to JSON."""
    Path(folder).mkdir(parents=True, exist_ok=True)  # any process may get here first
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(Path(folder) / f"rng-rank{process_index}.safetensors"))
    (Path(folder) / f"rng-rank{process_index}.json").write_text(json.dumps(_jsonable(random.getstate())))


def load_rng_state(folder: Path, process_index: int) -> None:
    tensors_file = Path(folder) / f"rng-rank{process_index}.safetensors"
    if not tensors_file.exists():  # resumed with more processes than saved: fresh streams for the new ones
        return
    rng = load_file(str(tensors_file))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_python_rng(json.loads((Path(folder) / f"rng-rank{process_index}.json").read_text())))


@contextlib.contextmanager
def writing_checkpoint(root: Path, step: int, accelerator, state: dict[str, Any], keep: int, needed_bytes: int = 0):
    """Collective: yields a temporary folder to write into, then publishes it as `step-N`.

    Every process writes its part into the yielded folder; once all are done, the main process
    writes state.json (whose presence marks a complete checkpoint), renames the folder into place
    and prunes old checkpoints. A crash before the rename leaves the previous checkpoint latest;
    a full disk removes the temporary folder and raises DiskFullError (`needed_bytes` estimates
    the checkpoint's size for its message).
    """
    final = checkpoint_dir(root, step)
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with removed_when_disk_full(partial, needed_bytes, "checkpoint"):
        yield partial
        save_rng_state(partial, accelerator.process_index)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_state(partial, {"step": step, **state})
            fault_point("checkpoint:before-rename")
            if final.exists():  # a damaged checkpoint of this step that resuming skipped: replaced
                shutil.rmtree(final)
            partial.rename(final)
            prune_checkpoints(root, keep)
    accelerator.wait_for_everyone()


def checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint but state.json, by path relative to it."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE)


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """state.json: `state`, the sha256 of every other file in `folder` (one read of each), and its own."""
    body = json.dumps({**state, DIGESTS_KEY: {name: file_sha256(folder / name) for name in checkpoint_files(folder)}},
                      default=_json_default)
    record = {**json.loads(body), STATE_DIGEST_KEY: hashlib.sha256(body.encode()).hexdigest()}
    (Path(folder) / STATE_FILE).write_text(json.dumps(record))


def read_state_record(folder: Path) -> dict[str, Any]:
    """state.json as written, its digests included, checked against its own sha256 (when it has one)."""
    path = Path(folder) / STATE_FILE
    record = json.loads(path.read_text())
    recorded = record.pop(STATE_DIGEST_KEY, None)
    if recorded is not None and hashlib.sha256(json.dumps(record).encode()).hexdigest() != recorded:
        raise CheckpointDamaged(f"{path} was damaged after it was written (its sha256 differs from the one recorded)")
    return record


def read_state(folder: Path) -> dict[str, Any]:
    """state.json's step, extras and whatever the stage stored (checked, without the digests)."""
    state = read_state_record(folder)
    state.pop(DIGESTS_KEY, None)
    return state


def verify_checkpoint(folder: Path) -> None:
    """Check every file of a checkpoint against the sha256 recorded in its state.json (one read of each).

    Raises CheckpointDamaged naming the first damaged file, FileNotFoundError for a recorded file
    that is gone. A checkpoint written before digests were recorded passes unchecked. Each
    rank's files are checked, so the verdict holds for every process of the launch.
    """
    folder = Path(folder)
    for name, digest in sorted(read_state_record(folder).get(DIGESTS_KEY, {}).items()):
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, "recorded in state.json but missing", str(path))
        if file_sha256(path) != digest:
            raise CheckpointDamaged(f"{path} was damaged after it was written (its sha256 differs from the one recorded)")


class DiskFullError(ChatpipeError):
    """The disk filled up while a checkpoint was written; what was written before is intact."""


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC from Python, or from safetensors' Rust writer (`... os error 28`, `StorageFull`)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    return isinstance(error, SafetensorError) and any(
        mark in text for mark in ("os error 28", "code: 28", "StorageFull", "No space left on device")
    )


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def free_bytes(folder: Path) -> int | None:
    """Free space on the disk holding `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def human_bytes(count: int | None) -> str:
    if count is None:
        return "an unknown amount"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


@contextlib.contextmanager
def removed_when_disk_full(folder: Path, needed_bytes: int, what: str):
    """Turn a full disk while writing `folder` into a DiskFullError, removing the partial `folder`."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        if not is_disk_full(error):
            raise
        shutil.rmtree(folder, ignore_errors=True)
        raise DiskFullError(
            f"{folder}: the disk is full; writing this {what} needs about {human_bytes(needed_bytes)} "
            f"(weights and optimiser state) and {human_bytes(free_bytes(folder))} is free. The partial {what} "
            f"was removed and earlier checkpoints and the manifest are intact: free some space "
            f"(or move the run dir to a larger disk) and rerun to resume."
        ) from None


class Stateful(Protocol):
    """A component whose state a checkpoint carries (torchtitan's protocol): JSON values only."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Restored:
    path: Path
    step: int
    state: dict[str, Any]  # state.json: step, extra and whatever the stage stored

    @property
    def extra(self) -> dict[str, Any]:
        return self.state.get("extra", {})


class Checkpointer:
    """Writes and restores one stage's resumable checkpoints under `root` (collective calls).

    `parts` maps a sub-folder of the checkpoint to the Hugging Face model inside the prepared
    module that goes there: {"": ""} (the default) saves the module itself at the top;
    {"": "pretrained_model"} the model inside a TokenScorer; PPO keeps {"policy": "policy",
    "value": "value.pretrained_model"}. `components` are the stage's own state (torchtitan's
    `Stateful`: `state_dict()` of JSON values, `load_state_dict(state)`), registered once: PPO's
    trainer (episode count, KL controller, minibatch generator) and its evaluation record. Each
    process saves its own (`components-rank<i>.json`), so a per-process generator is one too.
    """

    def __init__(self, root: Path, accelerator, keep: int, parts: dict[str, str] | None = None,
                 components: dict[str, Stateful] | None = None):
        self.root, self.accelerator, self.keep = Path(root), accelerator, keep
        self.parts = parts or {"": ""}
        self.components = components or {}

    def modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """{sub-folder: Hugging Face model} of the parts present (PPO's value model may be absent)."""
        found = {}
        for folder, path in self.parts.items():
            module = self.accelerator.unwrap_model(model)
            for attribute in filter(None, path.split(".")):
                module = getattr(module, attribute, None)
            if module is not None:
                found[folder] = module
        return found

    def save(self, step: int, *, model, optimizer, scheduler, tokenizer=None, state: dict[str, Any] | None = None) -> Path:
        accelerator = self.accelerator
        # The checkpoint's size, for the message if the disk fills up: weights plus optimiser moments.
        needed = tensor_bytes(model.parameters()) + tensor_bytes(
            value for values in optimizer.state.values() for value in values.values()
        )
        state = {"extra": {}, **(state or {}), "world_size": accelerator.num_processes}
        with writing_checkpoint(self.root, step, accelerator, state, self.keep, needed) as folder:
            state_dict = accelerator.get_state_dict(model)
            sharded_optimizer = engine_of(accelerator).whole_optimizer_state(model, optimizer)
            if accelerator.is_main_process:
                for sub, module in self.modules(model).items():
                    prefix = self.parts[sub] + "." if self.parts[sub] else ""
                    part_state = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
                    module.save_pretrained(folder / sub, state_dict=part_state, safe_serialization=True)
                fault_point("checkpoint:after-weights")
                if tokenizer is not None:
                    tokenizer.save_pretrained(folder)
                if sharded_optimizer is None:
                    save_optimizer_state(folder, optimizer, scheduler)
                else:
                    save_whole_optimizer_state(folder, sharded_optimizer, scheduler)
            if self.components:
                states = {name: component.state_dict() for name, component in self.components.items()}
                self.components_file(folder).write_text(json.dumps(states, default=_json_default))
        return checkpoint_dir(self.root, step)

    def restore(self, model, optimizer, scheduler) -> Restored | None:
        """Load the newest complete checkpoint that loads; None when there is none (collective).

        A checkpoint damaged after it was written (a file deleted, truncated, or changed by a
        single bit, which its recorded sha256 shows) is reported, naming the file, and skipped for
        the next newest one. If every one is damaged, that is an error naming them: starting over
        silently would throw the run's progress away.

        The processes of a launch resume from one checkpoint, never each from its own: the main
        process checks the candidates and its choice is broadcast, and a checkpoint that fails to
        load on any process (a file only that process reads, in a checkpoint older than digests)
        is given up by all of them together. Under FSDP2 or ZeRO a load is a run of collectives, so
        processes at different steps would run mismatched ones and hang.
        """
        damaged: list[Path] = []
        remaining = complete_checkpoints(self.root)
        while True:
            chosen, damaged_names = self.agreed(lambda: self.first_intact(remaining, damaged))
            damaged = [Path(name) for name in damaged_names]
            if chosen is None:
                break
            path = Path(chosen)
            remaining = [candidate for candidate in remaining if checkpoint_step(candidate) < checkpoint_step(path)]
            self.require_same_world(path)
            try:
                loaded, failure = self.load(path, model, optimizer, scheduler), None
            except (OSError, ValueError, KeyError, SafetensorError, CheckpointDamaged) as error:
                loaded, failure = None, f"process {self.accelerator.process_index}: {type(error).__name__}: {error}"
            failures = self.gathered(failure)
            if not failures:
                return Restored(path, *loaded)
            damaged.append(path)
            self.accelerator.print(f"checkpoint {path} cannot be loaded ({'; '.join(failures)}); trying an older one")
        if damaged:
            raise CheckpointError(
                f"no checkpoint under {self.root} can be loaded ({', '.join(p.name for p in damaged)} are damaged); "
                f"delete them to start the stage over"
            )
        return None

    def first_intact(self, candidates: list[Path], damaged: list[Path]) -> tuple[str | None, list[str]]:
        """(the newest of `candidates` whose files match their digests, or None; every damaged one so far)."""
        for path in candidates:
            try:
                verify_checkpoint(path)
            except (OSError, ValueError, CheckpointDamaged) as error:
                damaged.append(path)
                self.accelerator.print(f"checkpoint {path} cannot be loaded ({type(error).__name__}: {error}); trying an older one")
                continue
            return str(path), [str(p) for p in damaged]
        return None, [str(p) for p in damaged]

    def agreed(self, choose):
        """`choose()` as the main process computes it, the same on every process (a broadcast)."""
        if self.accelerator.num_processes == 1:
            return choose()
        from accelerate.utils import broadcast_object_list

        choice = [choose() if self.accelerator.is_main_process else None]
        broadcast_object_list(choice, from_process=0)
        return choice[0]

    def gathered(self, failure: str | None) -> list[str]:
        """Every process's failure (None where it succeeded), on every process."""
        if self.accelerator.num_processes == 1:
            return [failure] if failure is not None else []
        import torch.distributed as dist

        everyone: list[str | None] = [None] * self.accelerator.num_processes
        dist.all_gather_object(everyone, failure)
        return [item for item in everyone if item is not None]

    def require_same_world(self, path: Path) -> None:
        """Refuse a checkpoint written by a different number of processes.

        Each process's data position, RNG streams and (under sharding) share of the weights and
        optimiser state follow from the world size, so a resumed run with another one would not
        be the run that was interrupted. Checkpoints from before the world size was recorded pass.
        """
        try:
            written = read_state(path).get("world_size")
        except (OSError, ValueError, CheckpointDamaged):
            return  # a damaged state.json: load() reports it and falls back
        current = self.accelerator.num_processes
        if written is not None and written != current:
            raise CheckpointError(
                f"{path} was written by {written} process(es) and this launch has {current}: resume with "
                f"launch.num_processes={written} (each process's data, RNG and shard of the state follow from it), "
                f"or delete {self.root} to start the stage over"
            )

    def load(self, path: Path, model, optimizer, scheduler) -> tuple[int, dict[str, Any]]:
        state = read_state(path)
        engine = engine_of(self.accelerator)
        if engine.shards_optimizer:  # whole weights and optimiser state by parameter name, sharded again here
            weights = self.whole_weights(path, model)
            tensors = load_file(str(path / "optimizer.safetensors"))
            meta = json.loads((path / "optimizer.json").read_text())
            param_groups = engine.load_whole_state(model, optimizer, weights, tensors, meta, path)
            restore_hyperparameters(param_groups, meta, scheduler)
        else:
            for sub, module in self.modules(model).items():
                load_model_weights(path / sub, module)
            load_optimizer_state(path, optimizer, scheduler)
        load_rng_state(path, self.accelerator.process_index)
        if self.components:
            states = json.loads(self.components_file(path).read_text())
            for name, component in self.components.items():
                component.load_state_dict(states[name])
        return state["step"], state

    def components_file(self, folder: Path) -> Path:
        return Path(folder) / f"components-rank{self.accelerator.process_index}.json"

    def whole_weights(self, path: Path, model) -> dict[str, torch.Tensor]:
        """The checkpoint's whole weights, named as in the prepared `model` (each part under its prefix)."""
        weights = {}
        for sub in self.modules(model):
            prefix = self.parts[sub] + "." if self.parts[sub] else ""
            for shard in sorted((path / sub).glob("model*.safetensors")):
                weights.update({prefix + key: value for key, value in load_file(str(shard)).items()})
        return weights


def restore_hyperparameters(param_groups: list[dict], meta: dict[str, Any], scheduler=None) -> None:
    """A whole-state checkpoint's learning rates and other group settings (not its parameters), and the scheduler."""
    for group, saved in zip(param_groups, meta["param_groups"]):
        group.update({key: value for key, value in saved.items() if key != "params"})
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])


def save_whole_optimizer_state(folder: Path, whole: tuple[dict[str, torch.Tensor], dict[str, Any]], scheduler=None) -> None:
    """optimizer.safetensors (whole tensors by parameter name) + optimizer.json (param groups, scheduler)."""
    tensors, meta = whole
    save_file(tensors, str(Path(folder) / "optimizer.safetensors"))
    meta = {**meta, "scheduler": scheduler.state_dict() if scheduler is not None else None}
    (Path(folder) / "optimizer.json").write_text(json.dumps(meta, default=_json_default))


class CheckpointError(ChatpipeError):
    """No resumable checkpoint of a stage can be loaded."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint file no longer matches the sha256 recorded when it was written."""


def load_model_weights(folder: Path, model: torch.nn.Module) -> None:
    """Load a save_pretrained folder's weights into `model` in place: full weights, or a peft adapter's."""
    folder = Path(folder)
    if (folder / "adapter_model.safetensors").exists():  # peft saved only the adapter's weights
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    weights = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied weights (lm_head = embeddings) are saved once; anything else missing is a real error.
    real_missing = [name for name in missing if not name.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise RuntimeError(f"{folder}: checkpoint does not match the model (missing {real_missing}, unexpected {unexpected})")


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints under `root`."""
    found = sorted(p for p in Path(root).iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name))
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _python_rng(value: list) -> tuple:
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in {STATE_FILE}")
