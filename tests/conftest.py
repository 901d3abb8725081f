import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from llm.config import ModelConfig
from tests.helpers import ROOT


def devices() -> list[str]:
    """CPU always; CUDA too where a GPU is present, so the same tests cover the CUDA paths there."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    # Non-default theta and GQA, so tests exercise both.
    return ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                       rope_theta=50000.0, max_seq_len=128, attention="eager")


@pytest.fixture(scope="session")
def packed_data(tmp_path_factory) -> Path:
    """A tokenizer and a packed dataset made by the real CLIs from a real corpus (the stdlib's email package)."""
    out = tmp_path_factory.mktemp("data")
    corpus = str(Path(sysconfig.get_paths()["stdlib"]) / "email")
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], check=True, capture_output=True,  # noqa: E731
                                       text=True, cwd=ROOT)
    run("data_prep.train_tokenizer", "--input", corpus, "--vocab-size", "512", "--output", str(out / "tok"))
    run("data_prep.pack_lm", "--input", corpus, "--tokenizer", str(out / "tok"), "--output", str(out / "packed"),
        "--val-fraction", "0.1", "--no-progress")
    return out / "packed"
