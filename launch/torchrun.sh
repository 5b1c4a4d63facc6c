#!/usr/bin/env bash
# Launch training with torchrun on this node; run the same command on every node of the job.
#
#   NNODES=2 MASTER_ADDR=node-001 launch/torchrun.sh --config nanovlm-450m backend.name=fsdp
#
# Reads:
#   NNODES          number of nodes (default 1)
#   NPROC_PER_NODE  processes per node (default: number of visible GPUs, else 1)
#   MASTER_ADDR     host of the c10d rendezvous, reachable from every node (default localhost)
#   MASTER_PORT     rendezvous port (default 29500)
#   RDZV_ID         job id shared by all nodes (default: nanovlm-$USER)
#   MAX_RESTARTS    times torchrun restarts the whole group after a rank dies (default 3); each restart resumes
#                   from the run's latest checkpoint (train.resume=auto). torchrun cannot tell a lost node from
#                   a failure that recurs (a full disk): that one is retried too, then reported by every try
#   PYTHON          interpreter (default: .venv/bin/python of this checkout)
#   PREFLIGHT       1 (default): check the config, paths and resume once (`train --check`) before torchrun
#                   starts, so a typo exits 2 here instead of failing every rank of every restart; 0 skips it
#   NCCL_*          read by NCCL on every rank (e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA)
#   GLOO_SOCKET_IFNAME  network interface of CPU (gloo) runs across nodes, when the hostname resolves to loopback
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
if [ "${PREFLIGHT:-1}" != 0 ]; then
  "$PYTHON" -m toolkit train --check --world $(( ${NNODES:-1} * NPROC_PER_NODE )) "$@" || exit $?
fi
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
  --rdzv_id "${RDZV_ID:-nanovlm-${USER:-user}}" --max_restarts "${MAX_RESTARTS:-3}" \
  -m toolkit train "$@"
