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


@pytest.fixture(scope="session")
def packed_pairs(tmp_path_factory) -> Path:
    """Parallel text (the toy word-for-word language pair of the pack_translation tests) packed by the real CLI."""
    from tests.data_prep.test_pack_translation import make_pairs

    out = tmp_path_factory.mktemp("pairs")
    (out / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in make_pairs(2000, seed=7)))
    subprocess.run([sys.executable, "-m", "data_prep.pack_translation", "--tsv", str(out / "train.tsv"),
                    "--vocab-size", "300", "--val-fraction", "0.05", "--output", str(out / "packed")],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    return out / "packed"


@pytest.fixture(scope="session")
def translation_run(packed_pairs, tmp_path_factory) -> Path:
    """Two processes, ZeRO-2, 24 steps with a checkpoint every 8 and validation (loss, BLEU) at 12 and 24."""
    from tests.helpers import run_train, write_translation_config

    tmp = tmp_path_factory.mktemp("mt")
    config = write_translation_config(tmp, packed_pairs, pair_vocab(packed_pairs), save_every=8, keep_last=3)
    result = run_train(config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "llm train: 2 process(es), ZeRO-2" in result.stdout and "task translation" in result.stdout
    return tmp / "run"


def pair_vocab(packed: Path) -> int:
    import json

    return json.loads((packed / "manifest.json").read_text())["tokenizer"]["vocab_size"]
