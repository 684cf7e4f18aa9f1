"""The shared training core: the optimiser step, the cadence and the checkpointer's fallback."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.training.loop import Cadence, OptimizerStep, micro_batch_position, step_indices
from pipeline.training.optimization import adamw, warmup_cosine
from pipeline.training.state import Checkpointer, CheckpointError


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


def training_parts(seed: int = 0):
    accelerator = Accelerator(cpu=True)
    model = tiny_model(seed)
    optimizer = adamw(model, 1e-2, 0.1)
    scheduler = warmup_cosine(optimizer, 1, 10, 0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, scheduler


def test_optimizer_step_matches_a_hand_written_accumulation_loop():
    """Same weights, loss and grad norm as the loop pretraining wrote by hand before the core."""
    torch.manual_seed(1)
    batches = [torch.randint(0, 64, (2, 8)) for _ in range(3)]
    accelerator, model, optimizer, scheduler = training_parts()
    output = OptimizerStep(accelerator, model, optimizer, scheduler, 0.5)(
        batches, lambda ids: (model(input_ids=ids, labels=ids).loss, {"tokens": torch.tensor(float(ids.numel()))})
    )

    _, reference, ref_optimizer, ref_scheduler = training_parts()
    total = torch.zeros(())
    for ids in batches:
        loss = reference(input_ids=ids, labels=ids).loss / len(batches)
        loss.backward()
        total += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    ref_optimizer.step()
    ref_scheduler.step()

    assert torch.equal(output.loss, total)
    assert torch.equal(output.grad_norms[""], norm)
    assert output.stats["tokens"].item() == pytest.approx(16.0)  # the mean over micro-batches
    assert len(output.micro_stats) == 3
    for (name, value), ref_value in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, ref_value), name
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


def test_explicit_weights_and_clip_groups():
    accelerator, model, optimizer, scheduler = training_parts()
    ids = torch.randint(0, 64, (2, 8))
    step = OptimizerStep(accelerator, model, optimizer, scheduler, 1.0,
                         clip_groups=lambda: {"body": model.model, "absent": None})
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss
    output = step([ids, ids], lambda batch: (model(input_ids=batch, labels=batch).loss, {}), weights=[0.25, 0.75])
    assert set(output.grad_norms) == {"body"}  # one norm per group present; an absent part is skipped
    assert output.loss.item() == pytest.approx(before.item(), rel=1e-6)  # 0.25 l + 0.75 l


def test_cadence_and_positions():
    cadence = Cadence(total=10, log_every=3, eval_every=5, save_every=4)
    assert [d for d in range(1, 11) if cadence.log(d)] == [3, 6, 9, 10]
    assert [d for d in range(1, 11) if cadence.evaluate(d)] == [5, 10]
    assert [d for d in range(1, 11) if cadence.save(d)] == [4, 8]  # never at the end: the final model is written then
    # Two processes, two micro-steps of 4: every example position is read once, in order.
    positions = sorted(
        micro_batch_position(step, micro, accumulation=2, world=2, rank=rank, size=4)
        for step in range(3) for micro in range(2) for rank in range(2)
    )
    assert positions == list(range(0, 48, 4))


def test_step_indices_give_each_process_its_slice_of_one_shared_order():
    """Two processes with two micro-steps of 3 read, between them, the order one process reads alone."""
    from types import SimpleNamespace

    from data.packing import batch_indices

    def process(rank: int, world: int) -> SimpleNamespace:
        return SimpleNamespace(process_index=rank, num_processes=world)

    alone = [step_indices(step, process(0, 1), accumulation=1, size=12, examples=20, seed=5)[0] for step in range(3)]
    assert [i.tolist() for i in alone] == [batch_indices(12 * step, 12, 20, 5).tolist() for step in range(3)]
    for step in range(3):
        shards = [step_indices(step, process(rank, 2), accumulation=2, size=3, examples=20, seed=5) for rank in range(2)]
        assert [len(micro) for shard in shards for micro in shard] == [3, 3, 3, 3]
        # Micro-step by micro-step, rank 0 then rank 1: the single process's batch, in its order.
        interleaved = [index for micro in range(2) for rank in range(2) for index in shards[rank][micro].tolist()]
        assert interleaved == alone[step].tolist()


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    accelerator, model, optimizer, scheduler = training_parts()
    checkpointer = Checkpointer(tmp_path, accelerator, keep=3)
    checkpointer.save(1, model=model, optimizer=optimizer, scheduler=scheduler, state={"extra": {"first_eval": {"loss": 1.0}}})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    checkpointer.save(2, model=model, optimizer=optimizer, scheduler=scheduler)
    (tmp_path / "step-000002" / "optimizer.json").unlink()  # damaged after it was written

    _, fresh, fresh_optimizer, fresh_scheduler = training_parts(seed=5)
    restored = checkpointer.restore(fresh, fresh_optimizer, fresh_scheduler)
    assert restored.step == 1 and restored.path.name == "step-000001"
    assert restored.extra == {"first_eval": {"loss": 1.0}}
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, saved[name]), name

    (tmp_path / "step-000001" / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="step-000001, step-000002 are damaged|step-000002, step-000001 are damaged"):
        checkpointer.restore(fresh, fresh_optimizer, fresh_scheduler)


class Counter:
    """A stage's own state, as a checkpoint component: a count and a per-process generator."""

    def __init__(self, count: int, seed: int):
        self.count, self.generator = count, torch.Generator().manual_seed(seed)

    def state_dict(self):
        return {"count": self.count, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.count = state["count"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


def test_parts_and_components_round_trip(tmp_path):
    """PPO's layout: named model parts in sub-folders, and components (a count, a per-process generator)."""
    accelerator = Accelerator(cpu=True)
    holder = torch.nn.Module()
    holder.policy = tiny_model(0)
    optimizer = torch.optim.AdamW(holder.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    counter = Counter(12, seed=3)
    checkpointer = Checkpointer(tmp_path, accelerator, keep=1, parts={"policy": "policy"}, components={"counter": counter})
    checkpointer.save(4, model=holder, optimizer=optimizer, scheduler=scheduler)
    expected = torch.randperm(10, generator=counter.generator)
    assert LlamaForCausalLM.from_pretrained(tmp_path / "step-000004" / "policy") is not None
    assert json.loads((tmp_path / "step-000004" / "components-rank0.json").read_text())["counter"]["count"] == 12

    other = Counter(0, seed=99)
    restored = Checkpointer(tmp_path, accelerator, keep=1, parts={"policy": "policy"}, components={"counter": other}).restore(
        holder, optimizer, scheduler
    )
    assert restored.step == 4 and other.count == 12
    assert torch.equal(torch.randperm(10, generator=other.generator), expected)


def test_a_full_disk_mid_checkpoint_removes_the_partial_folder_and_says_what_space_it_needs(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import pipeline.training.state as state
    from pipeline.training.state import DiskFullError

    accelerator, model, optimizer, scheduler = training_parts()
    checkpointer = Checkpointer(tmp_path, accelerator, keep=3)
    OptimizerStep(accelerator, model, optimizer, scheduler, 1.0)([torch.randint(0, 64, (2, 8))], lambda ids: (model(input_ids=ids, labels=ids).loss, {}))
    checkpointer.save(1, model=model, optimizer=optimizer, scheduler=scheduler)

    def full_disk(*args, **kwargs):  # what safetensors' Rust writer raises on ENOSPC
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(state, "save_file", full_disk)
    with pytest.raises(DiskFullError) as raised:
        checkpointer.save(2, model=model, optimizer=optimizer, scheduler=scheduler)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'step-000002.tmp'}: the disk is full")
    # Weights plus AdamW's two moments: about three times the parameters.
    assert f"needs about {state.human_bytes(3 * parameters)}" in message and "is free" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]
    monkeypatch.undo()
    assert checkpointer.restore(model, optimizer, scheduler).step == 1

    monkeypatch.setattr(state, "save_file", lambda *a, **k: (_ for _ in ()).throw(SafetensorError("invalid tensor")))
    with pytest.raises(SafetensorError):  # anything but a full disk is not disguised as one
        checkpointer.save(3, model=model, optimizer=optimizer, scheduler=scheduler)


def flip_byte(path, offset: int = -5) -> None:
    """Change one byte of a file in place (by default near its end: a tensor file's data, not its header)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def two_checkpoints(tmp_path):
    """Checkpoints at steps 1 and 2 (with other weights); the parts, and the weights at step 1."""
    accelerator, model, optimizer, scheduler = training_parts()
    checkpointer = Checkpointer(tmp_path, accelerator, keep=3)
    OptimizerStep(accelerator, model, optimizer, scheduler, 1.0)([torch.randint(0, 64, (2, 8))], lambda ids: (model(input_ids=ids, labels=ids).loss, {}))
    checkpointer.save(1, model=model, optimizer=optimizer, scheduler=scheduler)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    OptimizerStep(accelerator, model, optimizer, scheduler, 1.0)([torch.randint(0, 64, (2, 8))], lambda ids: (model(input_ids=ids, labels=ids).loss, {}))
    checkpointer.save(2, model=model, optimizer=optimizer, scheduler=scheduler)
    return checkpointer, saved


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "optimizer.json", "rng-rank0.safetensors", "rng-rank0.json", "state.json"])
def test_a_flipped_byte_in_any_checkpoint_file_is_named_and_the_checkpoint_before_is_used(tmp_path, capsys, name):
    checkpointer, saved = two_checkpoints(tmp_path)
    damaged = tmp_path / "step-000002" / name
    # state.json: a digit of the step (2 -> 3), which would still parse; the others: a byte of their data
    flip_byte(damaged, damaged.read_text().index('"step": 2') + 8 if name == "state.json" else -5)

    _, fresh, fresh_optimizer, fresh_scheduler = training_parts(seed=5)
    restored = checkpointer.restore(fresh, fresh_optimizer, fresh_scheduler)
    assert restored.step == 1 and restored.path.name == "step-000001"
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key
    out = capsys.readouterr().out
    assert f"{damaged} was damaged after it was written" in out and "trying an older one" in out


def test_every_process_checks_every_ranks_files_so_all_resume_from_the_same_checkpoint(tmp_path):
    """Rank 1 of a launch does not read rank 0's RNG file, yet must not resume from a checkpoint rank 0 rejects."""
    checkpointer, _ = two_checkpoints(tmp_path)
    flip_byte(tmp_path / "step-000002" / "rng-rank0.safetensors")

    class RankOne:  # the same launch seen from its second process
        def __init__(self, accelerator):
            self.accelerator, self.process_index = accelerator, 1

        def __getattr__(self, name):
            return getattr(self.accelerator, name)

    _, fresh, fresh_optimizer, fresh_scheduler = training_parts(seed=5)
    restored = Checkpointer(tmp_path, RankOne(checkpointer.accelerator), keep=3).restore(fresh, fresh_optimizer, fresh_scheduler)
    assert restored.step == 1


def test_a_checkpoint_written_before_digests_were_recorded_still_loads(tmp_path):
    checkpointer, _ = two_checkpoints(tmp_path)
    state_file = tmp_path / "step-000002" / "state.json"
    state = json.loads(state_file.read_text())
    assert len(state.pop("sha256")) >= 5 and state.pop("state_sha256")
    state_file.write_text(json.dumps(state))  # as older versions wrote it

    _, fresh, fresh_optimizer, fresh_scheduler = training_parts(seed=5)
    restored = checkpointer.restore(fresh, fresh_optimizer, fresh_scheduler)
    assert restored.step == 2 and "sha256" not in restored.state
