#!/usr/bin/env bash
# Launch training on every host of a DeepSpeed hostfile.
#
#   launch/deepspeed.sh HOSTFILE [train overrides...]
#   launch/deepspeed.sh launch/hostfile.example --config nanovlm-450m backend.ds_config=ds_configs/zero3.json
#
# Reads:
#   MASTER_ADDR   address of the first host as the others see it (default: first host of the hostfile)
#   MASTER_PORT   rendezvous port (default 29500)
#   SSH_PORT      ssh port on the hosts (default: ssh's own default)
#   PYTHON        interpreter on every host (default: .venv/bin/python of this checkout)
#   NCCL_*        forwarded to every host by DeepSpeed (e.g. NCCL_SOCKET_IFNAME=ib0, NCCL_DEBUG=WARN)
#   GLOO_SOCKET_IFNAME  network interface of CPU (gloo) runs, when the hostname resolves to loopback: set it in
#                 DS_ENV_FILE so every host gets it (e.g. GLOO_SOCKET_IFNAME=eth0)
#   DS_ENV_FILE   file of KEY=VALUE lines DeepSpeed exports to every host (default ~/.deepspeed_env or ./.deepspeed_env)
# Needs passwordless ssh and pdsh from this node to every host, and the same checkout path on each.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${1:?usage: launch/deepspeed.sh HOSTFILE [--config CFG] [section.field=value ...]}
shift
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
FIRST_HOST=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')
# Reach every host first: DeepSpeed's own check tries only the first one and pdsh's error is easy to miss.
for host in $(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1}'); do
  case "$host" in localhost | 127.0.0.1 | "$(hostname)") continue ;; esac  # one local node: no ssh involved
  ssh -o BatchMode=yes -o ConnectTimeout=5 ${SSH_PORT:+-p "$SSH_PORT"} "$host" true 2>/dev/null || {
    echo "host $host in $HOSTFILE is unreachable by passwordless ssh: run ssh-copy-id $host (or fix the hostfile)" >&2
    exit 1
  }
done
# Every host was checked above, so DeepSpeed's own (first host only, ssh even for localhost) is skipped.
ARGS=(--no_ssh_check --hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$FIRST_HOST}" --master_port "${MASTER_PORT:-29500}")
[ -n "${SSH_PORT:-}" ] && ARGS+=(--ssh_port "$SSH_PORT")
exec "$PYTHON" -m deepspeed.launcher.runner "${ARGS[@]}" --module toolkit train "$@" backend.name=deepspeed
