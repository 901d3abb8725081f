import json

import pytest

from llm.config import ConfigError, TrainConfig
from llm.engine.distributed import deepspeed_config


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_takes_batch_precision_clipping_from_run_config(stage):
    ds = deepspeed_config(TrainConfig(zero_stage=stage, micro_batch_size=4, grad_accum=3), 0.5, 2, "fp32")
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": False}


def test_offload_config():
    ds = deepspeed_config(TrainConfig(zero_stage=3, offload=True), 1.0, 8, "bf16")
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["bf16"]["enabled"]


def test_json_setting_what_the_run_config_owns_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ConfigError, match=r"ds.json: sets 'train_micro_batch_size_per_gpu'.*train.micro_batch_size"):
        deepspeed_config(TrainConfig(zero_stage=2, deepspeed_config=str(path)), 1.0, 1, "fp32")
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="stage = 3 but train.zero_stage = 2"):
        deepspeed_config(TrainConfig(zero_stage=2, deepspeed_config=str(path)), 1.0, 1, "fp32")
    with pytest.raises(ConfigError, match="file not found"):
        deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "none.json")), 1.0, 1, "fp32")


def test_bf16_accumulates_and_reduces_gradients_in_fp32_by_default():
    ds = deepspeed_config(TrainConfig(zero_stage=2, grad_accum=16), 1.0, 8, "bf16")
    assert ds["bf16"] == {"enabled": True}
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
    ds = deepspeed_config(TrainConfig(zero_stage=3, grad_reduce_dtype="bf16"), 1.0, 8, "bf16")
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "bf16"
    assert "data_types" not in deepspeed_config(TrainConfig(zero_stage=2), 1.0, 1, "fp32")


def test_bf16_at_zero_stage_0_is_refused():
    # DeepSpeed's stage 0 accumulates bf16 gradients in bf16 (no fp32 accumulation there).
    with pytest.raises(ConfigError, match="zero_stage = 0 with bf16.*use train.zero_stage: 1"):
        deepspeed_config(TrainConfig(zero_stage=0), 1.0, 8, "bf16")


def test_bf16_deepspeed_engine_accumulates_in_fp32():
    """DeepSpeed itself reads the config as fp32 accumulation (its data-type resolution, not only our dict)."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = deepspeed_config(TrainConfig(zero_stage=2, grad_accum=4, micro_batch_size=2), 1.0, 1, "bf16")
    parsed = DeepSpeedConfig(ds)
    assert parsed.bfloat16_config.enabled and parsed.grad_accum_dtype == "fp32"
    assert parsed.communication_data_type == torch.float32
