"""Building for training: ZeRO-3 builds partitioned, and every stage and world size starts from the same weights.

The ZeRO-3 builds run in real processes (1, 2 and 3 over gloo): this file is also the probe they run
(`python -m tests.engine.test_build OUT CONFIG...`), which builds each config with `build_for_training`, records what
each rank holds, gathers the parameters with `deepspeed.zero.GatheredParameters` and saves them from rank 0.
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import ROOT, _free_port, env, losses, run_train, write_config

PROBE_CHUNK = 1000  # small init chunks, so that partitions start and end inside chunks
LM = {"vocab_size": 250, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 96, "max_seq_len": 64,
      "tie_embeddings": False}
# The other families' parameters partition and initialise too: q/k/v biases (zeros), q/k norms (ones).
LM_FEATURES = LM | {"attention_bias": True, "qk_norm": True}
QWEN3 = LM | {"qk_norm": True, "d_head": 24}  # the transformers folder train.init_from imports
MT = {"vocab_size": 300, "d_model": 64, "n_encoder_layers": 1, "n_decoder_layers": 1, "n_heads": 4, "d_ff": 128,
      "max_seq_len": 64}


def probe_config(tmp: Path, name: str, task: str = "lm", model: dict = LM_FEATURES, **train) -> Path:
    """A run config that is only ever built, never trained: its data paths are not read."""
    data = {"path": str(tmp / "unused")} if task == "translation" else {
        "datasets": [{"path": str(tmp / "unused")}], "seq_len": 32}
    cfg = {"task": task, "model": MT if task == "translation" else model, "data": data,
           "train": {"output_dir": str(tmp / name), "zero_stage": 3, "seed": 1234, "micro_batch_size": 1, **train}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_probe(out: Path, configs: list[Path], processes: int) -> None:
    args = ["-m", "tests.engine.test_build", str(out), *map(str, configs)]
    launch = [] if processes == 1 else [
        "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
        "--num_processes", str(processes), "--main_process_port", str(_free_port())]
    result = subprocess.run([sys.executable, *launch, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def plain_build(config: Path) -> torch.nn.Module:
    """The same run config built the ZeRO-0/1/2 way: whole, in this process."""
    from llm.config import load_config
    from llm.engine.build import build_for_training
    from llm.engine.tasks import make_task

    cfg = load_config(config)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=2))
    return build_for_training(make_task(cfg), cfg, accelerator=None)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> tuple[Path, dict]:
    """A transformers Qwen3 folder, and our state dict of the same weights."""
    import transformers
    from safetensors.torch import save_file

    from llm.config import ModelConfig
    from llm.export.families import to_hf_config
    from llm.export.layout import to_hf_state_dict
    from llm.models import build_model

    folder = tmp_path_factory.mktemp("hf")
    model = build_model(ModelConfig(**QWEN3), seed=99)
    family, kwargs = to_hf_config(model.cfg)
    getattr(transformers, family.config_class)(**kwargs).save_pretrained(folder)
    hf = to_hf_state_dict(model.state_dict(), model.cfg)
    save_file({k: v.contiguous() for k, v in hf.items()}, folder / "model.safetensors")
    return folder, dict(model.named_parameters())


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_zero3_build_is_partitioned_and_equals_the_plain_build(tmp_path, hf_folder, monkeypatch, processes):
    folder, hf_params = hf_folder
    configs = [probe_config(tmp_path, "lm"), probe_config(tmp_path, "mt", task="translation"),
               probe_config(tmp_path, "init_from", model=QWEN3, init_from=str(folder))]
    run_probe(tmp_path / "out", configs, processes)

    from safetensors.torch import load_file

    from llm.models import init as model_init

    monkeypatch.setattr(model_init, "CHUNK", PROBE_CHUNK)  # what the probe used
    for i, config in enumerate(configs):
        gathered = load_file(tmp_path / "out" / f"{i}.safetensors")
        report = json.loads((tmp_path / "out" / f"{i}.json").read_text())
        expected = hf_params if config.stem == "init_from" else dict(plain_build(config).named_parameters())
        assert sorted(gathered) == sorted(expected), config.stem
        for name, p in expected.items():
            assert torch.equal(gathered[name], p.detach()), (config.stem, name)  # exactly, not approximately
            assert report["held"][name] == math.ceil(p.numel() / processes), (config.stem, name)  # 1/N, padded
        assert report["num_params"] == sum(p.numel() for p in expected.values())
    assert report["world"] == processes


def test_zero3_first_loss_is_the_same_on_1_and_2_processes_and_equals_zero2(packed_data, tmp_path):
    """Same weights, same batch: the step-1 loss of ZeRO-3 on 1 and 2 processes is the unpartitioned build's. An
    initialisation lost to zero.Init would give the same (wrong) loss on every world size, hence the ZeRO-2 run."""
    first, outputs = {}, {}
    for name, stage, processes, micro in (("zero2", 2, 1, 8), ("zero3-1", 3, 1, 8), ("zero3-2", 3, 2, 4)):
        config = write_config(tmp_path / name, packed_data, zero_stage=stage, steps=1, micro_batch_size=micro)
        result = run_train(config, processes)
        assert result.returncode == 0, result.stderr[-3000:]
        first[name], outputs[name] = losses(tmp_path / name / "run")[1], result.stdout
    assert "model built partitioned over the processes (ZeRO-3)" in outputs["zero3-2"]
    assert "model built whole on every process" in outputs["zero2"]
    assert "model: 1,262,720 parameters" in outputs["zero3-2"]  # counted right although partitioned
    assert first["zero3-1"] == first["zero2"]
    assert first["zero3-2"] == pytest.approx(first["zero2"], rel=1e-5)  # the mean of two halves, summed apart
    assert first["zero2"] == pytest.approx(math.log(4096), abs=0.1)  # N(0, 0.02) weights: near-uniform predictions


def _probe(out: Path, configs: list[str]) -> None:
    import deepspeed
    from safetensors.torch import save_file

    from llm.config import load_config
    from llm.engine.build import build_for_training
    from llm.engine.distributed import make_accelerator
    from llm.engine.tasks import make_task
    from llm.models import init as model_init

    model_init.CHUNK = PROBE_CHUNK
    cfgs = [load_config(c) for c in configs]
    accelerator, _ = make_accelerator(cfgs[0].train, cfgs[0].optim.grad_clip)
    out.mkdir(parents=True, exist_ok=True)
    for i, cfg in enumerate(cfgs):
        model = build_for_training(make_task(cfg), cfg, accelerator)
        params = dict(model.named_parameters())
        held = {name: p.ds_tensor.numel() for name, p in params.items()}  # this rank's partitions
        assert all(p.numel() == 0 for p in params.values())  # nothing whole is left on any rank
        report = {"held": held, "num_params": model.num_params(), "world": accelerator.num_processes}
        with deepspeed.zero.GatheredParameters(list(params.values())):
            if accelerator.is_main_process:
                save_file({name: p.detach().clone() for name, p in params.items()}, out / f"{i}.safetensors")
                (out / f"{i}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args()
    _probe(args.out, args.configs)
    # Everything is written. Skip the interpreter's teardown: there, now and then (3 of some 40 launches of this probe
    # on a 2-CPU machine), a thread still alive aborts a rank ("terminate called without an active exception").
    sys.stdout.flush()
    os._exit(0)

