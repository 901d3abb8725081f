import pytest
import torch

from llm.config import OptimConfig
from llm.engine.optim import build_optimizer, lr_factor, param_groups, set_lr
from llm.models import build_model


def test_no_weight_decay_on_norms(tiny_cfg):
    model = build_model(tiny_cfg)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    norm_ids = {id(m.weight) for m in model.modules() if type(m).__name__ == "RMSNorm"}
    assert {id(p) for p in no_decay["params"]} == norm_ids
    assert all(p.dim() == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_schedules(schedule):
    cfg = OptimConfig(warmup_steps=10, schedule=schedule, min_lr_ratio=0.1, decay_fraction=0.2)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert all(a < b for a, b in zip(f[:9], f[1:10], strict=True))
    if schedule == "constant":
        assert all(x == 1.0 for x in f[10:])
    else:
        assert f[-1] == pytest.approx(0.1)  # ends at min_lr_ratio
        assert all(a >= b for a, b in zip(f[10:-1], f[11:], strict=True))  # never increases after warmup
    if schedule == "wsd":
        assert all(x == 1.0 for x in f[10:80]) and f[80] < 1.0  # stable, then the last 20% decays
    if schedule == "cosine":
        assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 46 / 90)).item()))


def test_inverse_sqrt_is_fairseqs_schedule():
    """fairseq's inverse_sqrt: lr * n / warmup during warmup (update n = step + 1), then lr * sqrt(warmup / n),
    whatever the run's length."""
    cfg = OptimConfig(warmup_steps=4000, schedule="inverse_sqrt", min_lr_ratio=0.5)
    for step, expected in ((0, 1 / 4000), (1999, 0.5), (3999, 1.0), (4000, (4000 / 4001) ** 0.5),
                           (15999, 0.5), (99_999, 0.2)):
        assert lr_factor(step, 10, cfg) == pytest.approx(expected, rel=1e-12), step
        assert lr_factor(step, 1_000_000, cfg) == lr_factor(step, 10, cfg)
    assert lr_factor(10**9, 10, cfg) < 0.5  # no min_lr_ratio floor


def test_inverse_sqrt_needs_warmup(tmp_path):
    from llm.config import ConfigError, load_config

    (tmp_path / "run.yaml").write_text("optim: {schedule: inverse_sqrt, warmup_steps: 0}\n")
    with pytest.raises(ConfigError, match="optim.warmup_steps = 0: inverse_sqrt decays as sqrt"):
        load_config(tmp_path / "run.yaml")


def test_set_lr_applies_to_every_group(tiny_cfg):
    opt = build_optimizer(build_model(tiny_cfg), OptimConfig())
    set_lr(opt, 1.23e-4)
    assert [g["lr"] for g in opt.param_groups] == [1.23e-4, 1.23e-4]
