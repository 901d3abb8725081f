"""Two real processes (gloo): in lockstep every rank runs as many forwards as the busiest, with the same results."""

import json
import socket
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm.config import ModelConfig
from llm.models import build_model


def _worker(rank: int, port: int, tokenizer_dir: str, out: str, lockstep: bool) -> None:
    from transformers import AutoTokenizer

    from llm.eval.harness import OurLM

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = build_model(ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                        max_seq_len=64, attention="eager")).eval()
        calls, marks = [], []

        def forward_starts(module, args):
            calls.append(1)
            if lockstep:  # a collective inside every forward, as ZeRO-3's parameter gather: all ranks must be here
                mark = torch.tensor([1000])
                dist.all_reduce(mark)
                marks.append(int(mark))

        model.register_forward_pre_hook(forward_starts)
        lm = OurLM(model, AutoTokenizer.from_pretrained(tokenizer_dir), batch_size=1, distributed=True,
                   lockstep=lockstep)
        # Uneven work: rank 0 one short request of each kind, rank 1 three long ones.
        n, budget = (1, 2) if rank == 0 else (3, 6)
        gen = lm.generate_until([SimpleNamespace(args=(f"def f{i}(x):", {"until": [], "max_gen_toks": budget,
                                                                         "do_sample": False})) for i in range(n)])
        after_gen = len(calls)
        ll = lm._loglikelihood_tokens([(None, [5, 6, 7], [8 + i]) for i in range(n * 2)])
        with open(f"{out}/{rank}.json", "w") as f:
            json.dump({"gen": gen, "ll": ll, "gen_calls": after_gen, "calls": len(calls), "marks": marks}, f)
    finally:
        dist.destroy_process_group()


def run(tmp_path, tokenizer_dir, lockstep: bool) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / ("lockstep" if lockstep else "free")
    out.mkdir()
    mp.spawn(_worker, args=(port, str(tokenizer_dir), str(out), lockstep), nprocs=2, join=True)
    return [json.loads((out / f"{r}.json").read_text()) for r in range(2)]


def test_lockstep_equalises_forwards_and_changes_no_result(tmp_path, packed_data):
    free, locked = run(tmp_path, packed_data, False), run(tmp_path, packed_data, True)
    # Without lockstep rank 0 runs fewer forwards (1 prefill + 1 step, 2 batches) than rank 1 (3 x 6, then 6).
    assert [r["gen_calls"] for r in free] == [2, 18] and [r["calls"] for r in free] == [4, 24]
    # In lockstep rank 0 joins every forward of rank 1 (ZeRO-3 gathers parameters collectively in each).
    assert [r["gen_calls"] for r in locked] == [18, 18] and [r["calls"] for r in locked] == [24, 24]
    # ... and each forward's collective met the other rank's forward, never the agreement's all-reduce.
    assert all(r["marks"] == [2000] * 24 for r in locked)
    for a, b in zip(free, locked, strict=True):
        assert a["gen"] == b["gen"] and a["ll"] == b["ll"]
    assert len(locked[1]["gen"]) == 3 and all(locked[1]["gen"])
