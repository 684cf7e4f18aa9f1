"""The engine object: detected once from the Accelerator, answering what differs between engines.

The engines themselves run in tests/test_engines.py (two CPU processes each); here, what the
detection makes of each kind of Accelerator.
"""

from types import SimpleNamespace

import pytest
from accelerate import Accelerator
from accelerate.utils import DistributedType

from pipeline.errors import ConfigError
from pipeline.training.distributed import detect_engine, engine_of


def accelerator_of(kind: DistributedType, **state):
    return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(**state))


def test_one_process_is_ddp_holding_everything_and_is_detected_once():
    accelerator = Accelerator(cpu=True)
    engine = engine_of(accelerator)
    assert (engine.kind, engine.name, engine.zero_stage) == ("ddp", "DDP", None)
    assert not engine.shards_weights and not engine.shards_optimizer and engine.clips_groups_apart
    assert engine_of(accelerator) is engine


@pytest.mark.parametrize("stage, shards_weights", [(2, False), (3, True)])
def test_zero_shards_the_optimiser_and_at_stage_three_the_weights(stage, shards_weights):
    engine = detect_engine(accelerator_of(DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=stage)))
    assert (engine.kind, engine.name) == ("zero", f"DeepSpeed ZeRO-{stage}")
    assert engine.shards_optimizer and engine.shards_weights == shards_weights and not engine.clips_groups_apart


def test_fsdp2_shards_both_and_fsdp1_is_refused_naming_the_setting():
    engine = detect_engine(accelerator_of(DistributedType.FSDP, fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    assert (engine.kind, engine.name, engine.shards_weights, engine.shards_optimizer) == ("fsdp2", "FSDP2", True, True)
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        detect_engine(accelerator_of(DistributedType.FSDP, fsdp_plugin=SimpleNamespace(fsdp_version=1)))
