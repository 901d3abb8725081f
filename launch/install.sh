#!/usr/bin/env bash
# Install llm into a virtual environment: torch first (pinned, so nothing can swap it for another build), then
# DeepSpeed built against it without compiling CUDA ops, then the project with its extras.
#   VENV=.venv EXTRAS=dev bash launch/install.sh
#   TORCH_SPEC="torch==2.13.0" ...   the torch to install when none is there (default: the CPU build 2.13.0;
#                                    on a GPU machine install your CUDA build of torch first, it is kept)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip setuptools wheel

if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
# Pin whatever torch is installed for every later install, build environments included: an unpinned torch
# pulled in by another package brings gigabytes of CUDA wheels onto a CPU machine.
TORCH_VERSION=$(python -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$TORCH_VERSION" > "$VENV/torch-constraint.txt"
export PIP_CONSTRAINT="$PWD/$VENV/torch-constraint.txt"

# DeepSpeed is a source package whose setup imports torch: build it against this torch, ops compiled on first use.
python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation deepspeed
python -m pip install -q -e ".[$EXTRAS]"

if ! python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
  if python -m pip list 2>/dev/null | grep -iE '^nvidia-' ; then
    echo "CUDA packages were installed next to a CPU build of torch; see the list above" >&2
    exit 1
  fi
fi
python -c "import torch, deepspeed, llm; print(f'installed llm with torch {torch.__version__}, deepspeed {deepspeed.__version__}')"
