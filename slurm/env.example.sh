# An environment hook for the sbatch templates: copy it, edit it, and submit with LLM_ENV_SETUP=path/to/copy.
# It is sourced by bash at the start of the job, on the job's first node, in the repository folder; srun passes the
# resulting environment to every node. Everything below is an example: keep what your cluster documents.

# --- Software -------------------------------------------------------------------------------------------------------
# module load cuda/12.4 nccl                  # site modules, if your cluster uses them
# source "$HOME/miniforge3/bin/activate" llm  # or a conda environment
# shellcheck disable=SC1091
source .venv/bin/activate                      # or the venv made by `bash launch/install.sh`

# DeepSpeed compiles its ops on first use into ~/.cache/torch_extensions; many nodes compiling into one shared home
# folder at once can step on each other. A node-local folder avoids that (or pre-build with DS_BUILD_OPS=1).
# export TORCH_EXTENSIONS_DIR=/tmp/$USER/torch_extensions
# export HF_HOME=/scratch/$USER/hf            # Hugging Face caches off a small home quota

# --- Networking between nodes (NCCL) ---------------------------------------------------------------------------------
# export NCCL_DEBUG=WARN                      # INFO once, to see which transport (IB, EFA, sockets) NCCL picked
# export NCCL_SOCKET_IFNAME=ib0               # the interface for NCCL's bootstrap, e.g. ib0, eth0 or ^lo,docker0
# export GLOO_SOCKET_IFNAME=ib0               # the same for gloo (CPU collectives), where the default route is wrong
# InfiniBand:
# export NCCL_IB_HCA=mlx5                     # which HCAs to use (ibv_devinfo lists them)
# export NCCL_IB_GID_INDEX=3                  # RoCE clusters often need this (ask your admins)
# AWS EFA (with the aws-ofi-nccl plugin installed):
# export FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1
# Fail fast on a stuck collective instead of hanging until the time limit:
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# --- Threads ---------------------------------------------------------------------------------------------------------
# torchrun sets OMP_NUM_THREADS=1 per worker unless it is set; data loading is light, so that is usually right.
# export OMP_NUM_THREADS=4
