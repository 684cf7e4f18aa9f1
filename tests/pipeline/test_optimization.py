"""The optimiser and schedule of the hand-written loops (pipeline/optimization.py)."""

import pytest
import torch

from pipeline.training.optimization import adamw, fused_adamw_supported, warmup_cosine


def test_warmup_then_cosine_down_to_the_floor():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = warmup_cosine(optimizer, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    rates = []
    for _ in range(111):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[5] == pytest.approx(1.0) and rates[10] == pytest.approx(2.0)
    assert rates[60] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # halfway down the cosine
    assert rates[110] == pytest.approx(0.2)  # the floor at the last step
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_adamw_decays_matrices_only_with_the_fused_kernel_on_cpu():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = adamw(model, learning_rate=1e-3, weight_decay=0.1)
    decayed, plain = optimizer.param_groups
    assert [p.dim() for p in decayed["params"]] == [2] and decayed["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert optimizer.defaults["fused"] is True
    model(torch.randn(2, 4)).sum().backward()
    before = model[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model[0].weight)


def test_fused_only_where_the_kernel_exists():
    assert fused_adamw_supported([torch.nn.Parameter(torch.zeros(2))])
    assert not fused_adamw_supported([torch.nn.Parameter(torch.zeros(2, device="meta"))])
    assert not fused_adamw_supported([])


def test_prepare_training_takes_the_norm_and_micro_batch_once_for_every_engine():
    """DeepSpeed clips inside its engine (its config gets the norm and micro-batch); the step clips elsewhere."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pipeline.training.optimization import prepare_training

    class Engine:  # an accelerator under DeepSpeed ZeRO-2, as far as prepare_training (and detect_engine) see it
        num_processes = 2
        distributed_type = DistributedType.DEEPSPEED
        state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(
            zero_stage=2, deepspeed_config={"train_micro_batch_size_per_gpu": "auto"},
        ))
        prepared = []

        def prepare(self, *objects):
            self.prepared.append(objects)
            return tuple(objects)

    model = torch.nn.Linear(4, 4)
    optimizer = adamw(model, learning_rate=1e-3, weight_decay=0.1)
    scheduler = warmup_cosine(optimizer, 1, 10, 0.1)
    engine = Engine()
    step = prepare_training(engine, model, optimizer, scheduler, micro_batch_size=3, max_grad_norm=0.5)
    assert engine.prepared == [(model, optimizer)]
    assert (step.model, step.optimizer, step.scheduler, step.max_grad_norm) == (model, optimizer, scheduler, 0.5)
    assert engine.state.deepspeed_plugin.deepspeed_config == {
        "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1, "train_batch_size": 6, "gradient_clipping": 0.5,
    }
