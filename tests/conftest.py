import pytest
import torch

from llm.config import ModelConfig


def devices() -> list[str]:
    """CPU always; CUDA too where a GPU is present, so the same tests cover the CUDA paths there."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    # Non-default theta and GQA, so tests exercise both.
    return ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                       rope_theta=50000.0, max_seq_len=128, attention="eager")
