"""A checkpoint file carrying a pickle that would run code is refused before anything unpickles it for real."""

import pickle

import pytest
import torch

from llm.checkpoint.consolidate import consolidated_state_dict
from llm.checkpoint.safety import UnsafeCheckpoint, vet_deepspeed_folder, vet_torch_file


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls open(marker, "w"): proof that code ran
        return (open, (self.marker, "w"))


def plant(path, marker):
    torch.save({"module": {"w": torch.zeros(2)}, "payload": RunsCode(str(marker))}, path)


def test_planted_pickle_is_refused_and_never_runs(tmp_path):
    ds = tmp_path / "step-00000002" / "deepspeed"
    ds.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    plant(ds / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UnsafeCheckpoint, match="mp_rank_00_model_states.pt: refused to load"):
        vet_deepspeed_folder(ds)
    with pytest.raises(UnsafeCheckpoint):
        consolidated_state_dict(ds.parent)
    assert not marker.exists()
    # The payload is real: unpickled without the check, it runs.
    pickle.loads(pickle.dumps(RunsCode(str(marker))))
    assert marker.exists()


def test_plain_tensors_pass(tmp_path):
    torch.save({"module": {"w": torch.zeros(2)}, "step": 3}, tmp_path / "ok.pt")
    vet_torch_file(tmp_path / "ok.pt")


class PickledByGetattr:
    """Pickles as getattr(owner, name), the way Python 3.11.2 and 3.12+ pickle Enum members."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return (getattr, (self.owner, self.name))


def test_enum_members_pickled_by_getattr_pass_and_other_attributes_do_not(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    ds = tmp_path / "deepspeed"
    ds.mkdir()
    torch.save({"zero_stage": PickledByGetattr(ZeroStageEnum, "gradients")}, ds / "ok_optim_states.pt")
    vet_deepspeed_folder(ds)
    torch.save({"x": PickledByGetattr(LossScaler, "__init__")}, ds / "bad_optim_states.pt")
    with pytest.raises(UnsafeCheckpoint, match="bad_optim_states.pt: refused"):
        vet_deepspeed_folder(ds)
