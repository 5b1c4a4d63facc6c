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
#   MASTER_PORT     rendezvous port (default 29500)
#   RDZV_ID         job id shared by all nodes (default: nanovlm-$USER)
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

# The stop file: ours (a fresh folder, so nothing left from an earlier run can stop this one) or the user's.
STOP_DIR=""
if [ -z "${NANOVLM_STOP_FILE:-}" ]; then
  STOP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/nanovlm-stop.XXXXXX")
  NANOVLM_STOP_FILE=$STOP_DIR/stop
elif [ -e "$NANOVLM_STOP_FILE" ]; then
  echo "launch/torchrun.sh: warning: NANOVLM_STOP_FILE=$NANOVLM_STOP_FILE exists already, so the run stops after" \
    "its first step; delete it if an earlier run left it" >&2
fi
export NANOVLM_STOP_FILE
made_stop_file=""
TORCHRUN_PID=""
stop_signal=""  # the last signal this script received
interrupted=""  # set by every trap: the `wait` below returned because of a signal, not because torchrun ended
# shellcheck disable=SC2317  # run by the traps
cleanup() {
  if [ -n "$STOP_DIR" ]; then rm -rf "$STOP_DIR"; fi
  if [ -n "$made_stop_file" ]; then rm -f "$NANOVLM_STOP_FILE"; fi
}
trap cleanup EXIT
# shellcheck disable=SC2317  # run by the traps
request_stop() {  # TERM, USR1, HUP: every rank finishes its step, checkpoints and exits 0
  stop_signal=$1 interrupted=1
  if [ ! -e "$NANOVLM_STOP_FILE" ]; then
    if mkdir -p "$(dirname "$NANOVLM_STOP_FILE")" 2>/dev/null && touch "$NANOVLM_STOP_FILE" 2>/dev/null; then
      made_stop_file=1
    elif [ -n "$TORCHRUN_PID" ]; then  # cannot write it: torchrun's own handling (TERM to the ranks, exit 1)
      echo "launch/torchrun.sh: cannot create $NANOVLM_STOP_FILE; sending SIGTERM to torchrun instead" >&2
      kill -TERM "$TORCHRUN_PID" 2>/dev/null || true
      return
    fi
  fi
  echo "launch/torchrun.sh: SIG$1: every rank stops after its current step, with a checkpoint" >&2
}
# shellcheck disable=SC2317  # run by the traps
interrupt() {  # INT: on to torchrun, which stops the ranks at once (SIGINT to them), no checkpoint
  stop_signal=INT interrupted=1
  if [ -n "$TORCHRUN_PID" ]; then kill -INT "$TORCHRUN_PID" 2>/dev/null || true; fi
}
trap 'request_stop TERM' TERM
trap 'request_stop USR1' USR1
trap 'request_stop HUP' HUP
trap interrupt INT

if [ "${PREFLIGHT:-1}" != 0 ]; then
  "$PYTHON" -m toolkit train --check --world $(( NNODES * NPROC_PER_NODE )) "$@" || exit $?
fi
if [ -n "$stop_signal" ]; then  # asked to stop before anything started: nothing to checkpoint
  echo "launch/torchrun.sh: SIG$stop_signal before torchrun started; nothing was launched" >&2
  if [ "$stop_signal" = INT ]; then exit 130; fi
  exit 0
fi
# In the background, so that the traps above run while torchrun does; with SIGINT back to its default, which a
# background command would otherwise ignore.
(
  trap - INT QUIT
  exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
    --rdzv_id "${RDZV_ID:-nanovlm-${USER:-user}}" --max_restarts "${MAX_RESTARTS:-3}" \
    -m toolkit train "$@"
) &
TORCHRUN_PID=$!
if [ "$stop_signal" = INT ]; then interrupt; fi  # arrived while torchrun was being started
# `wait` returns early when a trapped signal arrives: wait again until torchrun itself has ended (a second `wait`
# on a process that has ended returns its status).
while :; do
  interrupted=""
  status=0
  wait "$TORCHRUN_PID" || status=$?
  if [ -z "$interrupted" ]; then break; fi
done
exit "$status"
