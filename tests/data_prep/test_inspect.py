import shutil

from data_prep import inspect, run_cli
from tests.data.conftest import flip_byte


def test_summary_and_decoded_windows(packed, capsys):
    assert run_cli(inspect.main, [str(packed), "--samples", "2", "--seq-len", "16", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "format llm-packed-lm v1, dtype uint16" in out
    assert "tokenizer: vocab 512" in out and "eos='</s>'" in out
    assert "train:" in out and "val  :" in out and "train_00000.bin" in out
    assert "integrity: all files match manifest.json (sizes, headers and sha256, every file hashed now)" in out
    assert out.count("--- train window") == 2
    assert "doc 1-" in out or "ka" in out or "the" in out  # decoded text of the corpus


def test_altered_shard_fails_with_its_name(packed, tmp_path, capsys):
    shutil.copytree(packed, tmp_path / "ds")
    shard = tmp_path / "ds" / "val_00000.bin"
    flip_byte(shard, 40)
    assert run_cli(inspect.main, [str(tmp_path / "ds"), "--samples", "0"]) == 2  # the stat changed: hashed again
    assert f"{shard}: sha256 is" in capsys.readouterr().err


def test_verify_hashes_files_the_record_trusts(packed, tmp_path, capsys, hashes):
    shutil.copytree(packed, tmp_path / "ds")
    assert run_cli(inspect.main, [str(tmp_path / "ds"), "--samples", "0"]) == 0
    assert hashes == [] and "files unchanged since verified not hashed again" in capsys.readouterr().out
    shard = tmp_path / "ds" / "val_00000.bin"
    flip_byte(shard, 40, keep_mtime=True)  # invisible to the stat check
    assert run_cli(inspect.main, [str(tmp_path / "ds"), "--samples", "0"]) == 0
    assert run_cli(inspect.main, [str(tmp_path / "ds"), "--verify"]) == 2
    assert f"{shard}: sha256 is" in capsys.readouterr().err
