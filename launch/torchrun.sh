#!/usr/bin/env bash
# Single- or multi-node training with torchrun.
#
#   launch/torchrun.sh CONFIG [key=value ...]                       # one node, all its GPUs
#   NPROC=2 launch/torchrun.sh configs/debug/tiny_cpu.yaml          # 2 CPU processes (gloo)
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=host0 launch/torchrun.sh CONFIG  # run once on every node
#
# Variables: NPROC (processes per node; default: GPU count, else 1), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500). A rerun with the same train.output_dir resumes.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [key=value ...]" >&2
  exit 2
fi
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NPROC=${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 1)}
exec torchrun \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m uniperceiver.train "$@"
