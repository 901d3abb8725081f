#!/usr/bin/env bash
# The main job on the embedded default corpus, from a fresh clone:
#   1. install what is missing (a .venv with CPU torch, DeepSpeed, llm) unless llm is already importable;
#   2. prepare the corpus: a byte-level BPE tokenizer and packed shards of the Python standard library's source;
#   3. train the tiny preset with ZeRO-2 on 2 CPU processes (on every GPU when there are GPUs), with validation;
#   4. print the loss curve's start and end and where the checkpoint is.
#   bash launch/quickstart.sh [section.key=value ...]      e.g. train.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c "import llm, deepspeed" 2>/dev/null; then
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import llm, deepspeed" 2>/dev/null; then
    echo "== installing into .venv"
    bash launch/install.sh
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi

echo "== preparing the default corpus (Python stdlib source)"
[ -f data/tokenizer/tokenizer.json ] || python -m data_prep.train_tokenizer --vocab-size 4096 --output data/tokenizer
[ -f data/stdlib/manifest.json ] || python -m data_prep.pack_lm --tokenizer data/tokenizer --output data/stdlib

RUN=runs/quickstart-$(date +%Y%m%d-%H%M%S)
echo "== training the tiny preset into $RUN"
bash launch/train.sh configs/train/tiny_cpu.yaml "train.output_dir=$RUN" "$@"

echo "== result"
python - "$RUN" <<'PY'
import json, sys
records = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
train = [r for r in records if r["split"] == "train"]
val = [r for r in records if r["split"] == "val"]
print(f"train loss {train[0]['loss']:.2f} at step {train[0]['step']} -> {train[-1]['loss']:.2f} at step {train[-1]['step']}")
if val:
    print(f"validation loss {val[-1]['loss']:.2f} (perplexity {val[-1]['ppl']:.1f}) at step {val[-1]['step']}")
print(f"checkpoint: {sys.argv[1]}/checkpoints/{open(f'{sys.argv[1]}/checkpoints/latest').read().strip()}")
print(f"loss curve: {sys.argv[1]}/loss.png   metrics: {sys.argv[1]}/metrics.jsonl   tensorboard: {sys.argv[1]}/tensorboard")
PY
