"""Resume a run exactly as `llm train` does (on any number of processes), then save the engine's state untouched.

    python tests/checkpoint/resave.py RUN_CONFIG OUT [overrides...]    (or under `accelerate launch`)

The universal-checkpoint tests compare OUT with the checkpoint that was loaded: weights, Adam moments and step
must come back exactly.
"""

import sys

from llm.config import load_config
from llm.engine.distributed import exit_worker, make_accelerator
from llm.engine.trainer import start

cfg = load_config(sys.argv[1], sys.argv[3:])
accelerator, precision = make_accelerator(cfg.train, cfg.optim.grad_clip)
try:
    run = start(cfg, accelerator, precision)
    run.engine.save_checkpoint(sys.argv[2], tag="deepspeed")
    accelerator.wait_for_everyone()
finally:
    accelerator.end_training()
exit_worker(0)
