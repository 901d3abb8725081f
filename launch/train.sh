#!/usr/bin/env bash
# Train on this machine with every GPU it has, or with two CPU processes when it has none.
#   bash launch/train.sh configs/train/tiny_cpu.yaml [section.key=value ...]
# Any accelerate launch option can be given through ACCELERATE_ARGS, e.g. ACCELERATE_ARGS="--main_process_port 29600".
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash launch/train.sh CONFIG [section.key=value ...]" >&2; exit 2; }

GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 0 ]; then
  LAUNCH_CONFIG=configs/accelerate/1node_8gpu.yaml
  PROCS=$GPUS
else
  LAUNCH_CONFIG=configs/accelerate/cpu_2proc.yaml
  PROCS=2
  # Split the cores between the two processes instead of letting each take them all.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}
fi
echo "launch/train.sh: $PROCS process(es) with $LAUNCH_CONFIG"
# shellcheck disable=SC2086
exec accelerate launch --config_file "$LAUNCH_CONFIG" --num_processes "$PROCS" ${ACCELERATE_ARGS:-} \
  -m llm.cli train "$@"
