import shutil

from data_prep import inspect, run_cli


def test_summary_and_decoded_windows(packed, capsys):
    assert run_cli(inspect.main, [str(packed), "--samples", "2", "--seq-len", "16", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "format llm-packed-lm v1, dtype uint16" in out
    assert "tokenizer: vocab 512" in out and "eos='</s>'" in out
    assert "train:" in out and "val  :" in out and "train_00000.bin" in out
    assert "integrity: all files match manifest.json (sizes, headers and sha256)" in out
    assert out.count("--- train window") == 2
    assert "doc 1-" in out or "ka" in out or "the" in out  # decoded text of the corpus


def test_altered_shard_fails_with_its_name(packed, tmp_path, capsys):
    shutil.copytree(packed, tmp_path / "ds")
    shard = tmp_path / "ds" / "val_00000.bin"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x10
    shard.write_bytes(bytes(data))
    assert run_cli(inspect.main, [str(tmp_path / "ds"), "--samples", "0"]) == 0  # sizes only: not detectable
    assert run_cli(inspect.main, [str(tmp_path / "ds"), "--verify"]) == 2
    assert f"{shard}: sha256 is" in capsys.readouterr().err
