#!/usr/bin/env bash
# Launch training with torchrun on this node; run the same command on every node of the job.
#
#   NNODES=2 MASTER_ADDR=node-001 launch/torchrun.sh --config nanovlm-450m backend.name=fsdp
#
# Reads:
#   NNODES          number of nodes (default 1)
#   NPROC_PER_NODE  processes per node (default: number of visible GPUs, else 1)
#   MASTER_ADDR     host of the c10d rendezvous, reachable from every node: the first node, the same on every node
#                   (default localhost, for one node only: with NNODES > 1 an unset MASTER_ADDR is refused)
#   MASTER_PORT     rendezvous port (default 29500 on several nodes; on one node a free port, so that two jobs on
#                   one node do not meet)
#   RDZV_ID         job id shared by all nodes (default: nanovlm-$USER; on one node without MASTER_PORT, one per run)
#   MAX_RESTARTS    times torchrun restarts the whole group after a rank dies (default 3); each restart resumes
#                   from the run's latest checkpoint (train.resume=auto). torchrun cannot tell a lost node from
#                   a failure that recurs (a full disk): that one is retried too, then reported by every try
#   PYTHON          interpreter (default: .venv/bin/python of this checkout)
#   PREFLIGHT       1 (default): check the config, paths and resume once (`train --check`) before torchrun
#                   starts, so a typo exits 2 here instead of failing every rank of every restart; 0 skips it
#   NANOVLM_STOP_FILE  file the ranks watch: once it exists they finish the step, checkpoint and exit 0 (default: a
#                   fresh file name in a temporary folder of this node, removed when the script ends). One you set
#                   is used as it is (created by the signals below, removed at the end only if this script made it)
#   NCCL_*          read by NCCL on every rank (e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA)
#   GLOO_SOCKET_IFNAME  network interface of CPU (gloo) runs across nodes, when the hostname resolves to loopback
#
# Stopping: SIGTERM, SIGUSR1 or SIGHUP to this script (its pid) create $NANOVLM_STOP_FILE; every rank finishes its
# step, writes a checkpoint and exits 0, and so does this script (torchrun itself does not pass USR1 on, and on
# TERM exits 1). A rank's stop request reaches the others with the step's all-reduce, so on several nodes signal
# any one node's script (or all of them): the default, node-local stop file is enough. SIGINT (Ctrl-C) stops at
# once, without a checkpoint: it goes on to torchrun, which stops the ranks. The script always waits for torchrun
# and exits with its status; only a SIGKILL of the script leaves torchrun and the ranks running.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
NNODES=${NNODES:-1}
if [ "$NNODES" != 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR, the first node's host name or address as every node" \
    "reaches it (the same on every node); without it each node would wait for the others on its own localhost" >&2
  exit 2
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi

LAUNCHER=launch/torchrun.sh
# shellcheck source=launch/stop_signals.sh
. launch/stop_signals.sh
# shellcheck disable=SC2317  # run by the traps
pass_on() { kill "-$1" "$LAUNCHED_PID" 2>/dev/null || true; }  # torchrun sends it on to the ranks
stop_file_init "${TMPDIR:-/tmp}/nanovlm-stop.XXXXXX"
trap_stop_signals

if [ "${PREFLIGHT:-1}" != 0 ]; then
  "$PYTHON" -m toolkit train --check --world $(( NNODES * NPROC_PER_NODE )) "$@" || exit $?
fi
exit_if_stopped
ENDPOINT=${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}
RDZV=${RDZV_ID:-nanovlm-${USER:-user}}
if [ "$NNODES" = 1 ] && [ -z "${MASTER_PORT:-}" ]; then  # one node: a free port and a job id of its own, so two
  ENDPOINT=${MASTER_ADDR:-localhost}:0                     # jobs on one node do not meet at port 29500
  RDZV=${RDZV_ID:-nanovlm-$$-$(date +%s)}
fi
# In the background, so that the traps above run while torchrun does; with SIGINT back to its default, which a
# background command would otherwise ignore.
(
  trap - INT QUIT
  exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$ENDPOINT" --rdzv_id "$RDZV" --max_restarts "${MAX_RESTARTS:-3}" \
    -m toolkit train "$@"
) &
wait_for $!
