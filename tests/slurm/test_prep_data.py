"""slurm/prep_data.sbatch: a job array packing slices of a corpus, then a merge job, on the local Slurm; the result
must be the folder a single `python -m data_prep.pack_lm` run writes, file for file and byte for byte."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.helpers import ROOT

# The stdlib's email package: 30 files, one of them empty (email/mime/__init__.py), so the merge has to number
# documents around a skipped one. At --val-fraction 0.3 every slice has validation documents, so a slice numbered
# from 0 instead of its global offset would put different documents in val; --shard-tokens 20000 makes shards that
# cross slice boundaries.
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"


def pack_args(tokenizer: Path, output: Path) -> list[str]:
    return ["--input", str(CORPUS), "--tokenizer", str(tokenizer), "--output", str(output),
            "--val-fraction", "0.3", "--seed", "7", "--shard-tokens", "20000"]


def test_array_job_writes_the_same_dataset_as_one_pack_lm_run(slurm, env_setup, packed_data, tmp_path):
    tokenizer = packed_data.parent / "tok"  # the session's tokenizer, trained by data_prep.train_tokenizer
    single, merged = tmp_path / "single", tmp_path / "merged"
    subprocess.run([sys.executable, "-m", "data_prep.pack_lm", *pack_args(tokenizer, single), "--num-proc", "1",
                    "--no-progress"], cwd=ROOT, check=True, capture_output=True, text=True)

    array = slurm.sbatch(ROOT / "slurm" / "prep_data.sbatch", pack_args(tokenizer, merged),
                         ["--array=0-2", "--cpus-per-task=1", f"--output={tmp_path}/%x-%A_%a.out"], cwd=ROOT,
                         LLM_ENV_SETUP=env_setup)
    tasks = [slurm.wait_job(f"{array}_{i}", timeout=180) for i in range(3)]
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.out")}
    assert all(t["JobState"] == "COMPLETED" for t in tasks), (tasks, logs)
    submitted = [line for log in logs.values() for line in log.splitlines() if "submitted the merge as job" in line]
    assert len(submitted) == 1, logs  # by the first task only
    merge_job = submitted[0].split("submitted the merge as job ")[1].split()[0]
    info = slurm.wait_job(merge_job, timeout=180)
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.out")}
    assert info["JobState"] == "COMPLETED", logs
    # It ran after the whole array (afterok on the array job), not beside it.
    assert info["StartTime"] >= max(t["EndTime"] for t in tasks), (info, tasks)

    # Each task packed its own slice (three slices, each with files).
    for i in range(3):
        assert f"slice {i}/3:" in logs[f"llm-prep-{array}_{i}.out"], logs
    manifest = json.loads((merged / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) > 3 and manifest["splits"]["val"]["num_docs"] > 3
    assert manifest["stats"]["empty_documents_skipped"] == 1
    # Byte for byte: same files, same contents (shards, indexes, tokenizer files, manifest).
    names = sorted(p.name for p in single.iterdir() if p.is_file())  # not verified/: a cache holding file times
    assert sorted(p.name for p in merged.iterdir() if p.is_file()) == names
    assert (merged / "verified" / "record.json").is_file()  # the merged shards open without being hashed again
    match, mismatch, errors = filecmp.cmpfiles(single, merged, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    assert not (tmp_path / "merged.slices").exists()  # removed after a successful merge
