#!/usr/bin/env bash
# Launch training on every host of a DeepSpeed hostfile.
#
#   launch/deepspeed.sh HOSTFILE [train overrides...]
#   launch/deepspeed.sh launch/hostfile.example --config nanovlm-450m backend.ds_config=ds_configs/zero3.json
#
# HOSTFILE (lines of `HOST slots=N`) and relative paths in the overrides are read from this checkout's root. The
# script adds backend.name=deepspeed, and refuses a backend.name=... of another backend.
#
# Reads:
#   MASTER_ADDR   address of the first host as the others see it (default: first host of the hostfile)
#   MASTER_PORT   rendezvous port (default 29500)
#   SSH_PORT      ssh port on the hosts (default: ssh's own default)
#   PYTHON        interpreter on every host (default: .venv/bin/python of this checkout)
#   PREFLIGHT     1 (default): check the config, paths and resume once (`train --check`, for the hostfile's slots)
#                 before any host starts, so a typo exits 2 here instead of on every rank; 0 skips it
#   NCCL_*        forwarded to every host by DeepSpeed (e.g. NCCL_SOCKET_IFNAME=ib0, NCCL_DEBUG=WARN)
#   GLOO_SOCKET_IFNAME  network interface of CPU (gloo) runs, when the hostname resolves to loopback: set it in
#                 DS_ENV_FILE so every host gets it (e.g. GLOO_SOCKET_IFNAME=eth0)
#   DS_ENV_FILE   file of KEY=VALUE lines DeepSpeed exports to every host (default ~/.deepspeed_env or ./.deepspeed_env);
#                 with several hosts the script passes DeepSpeed a copy of it with NANOVLM_STOP_FILE added
#   NANOVLM_STOP_FILE  file the ranks watch: once it exists they finish the step, checkpoint and exit 0 (default: a
#                 fresh name under runs/ of this checkout, removed when the script ends). One you set is used as it
#                 is (created by the signals below, removed at the end only if this script made it)
# Needs passwordless ssh and pdsh from this node to every host, and the same checkout path on each.
#
# Stopping: SIGTERM, SIGUSR1 or SIGHUP to this script (its pid) create $NANOVLM_STOP_FILE; every rank finishes its
# step, writes a checkpoint and exits 0, and so does this script. One rank seeing the file is enough (the stop
# reaches the others with the step's all-reduce), so with several hosts the file must be visible to a rank: launch
# from one of the hosts, or keep the checkout (or NANOVLM_STOP_FILE) on a filesystem the hosts share. SIGINT
# (Ctrl-C) goes on to DeepSpeed at once: on one host its launcher sends SIGTERM to the ranks (they stop after the
# step, or are killed 30 s later), on several hosts the runner kills them over pdsh; the exit status is then 1.
# The script waits for the ranks and exits with DeepSpeed's status.
set -euo pipefail
cd "$(dirname "$0")/.."
USAGE="usage: launch/deepspeed.sh HOSTFILE [--config CFG] [section.field=value ...]"
if [ $# = 0 ]; then
  echo "$USAGE" >&2
  exit 2
fi
HOSTFILE=$1
shift
if [ ! -f "$HOSTFILE" ] || [ ! -r "$HOSTFILE" ]; then
  echo "launch/deepspeed.sh: HOSTFILE '$HOSTFILE' is not a readable file (the first argument is a DeepSpeed hostfile" \
    "of 'HOST slots=N' lines, relative to $PWD); $USAGE" >&2
  exit 2
fi
HOSTS=$(awk '!/^[[:space:]]*#/ && NF {print $1}' "$HOSTFILE")
if [ -z "$HOSTS" ]; then
  echo "launch/deepspeed.sh: HOSTFILE $HOSTFILE lists no host (expected lines of 'HOST slots=N'); $USAGE" >&2
  exit 2
fi
for arg in "$@"; do
  case "$arg" in
    backend.name=*)
      value=${arg#backend.name=}
      value=${value//[\"\' ]/}
      if [ "$value" != deepspeed ]; then
        echo "launch/deepspeed.sh: $arg conflicts with this launcher, which trains with backend.name=deepspeed:" \
          "drop it, or launch a $value run with launch/torchrun.sh" >&2
        exit 2
      fi
      ;;
  esac
done
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
FIRST_HOST=${HOSTS%%$'\n'*}
# Reach every host first: DeepSpeed's own check tries only the first one and pdsh's error is easy to miss.
for host in $HOSTS; do
  case "$host" in localhost | 127.0.0.1 | "$(hostname)") continue ;; esac  # one local node: no ssh involved
  ssh -o BatchMode=yes -o ConnectTimeout=5 ${SSH_PORT:+-p "$SSH_PORT"} "$host" true 2>/dev/null || {
    echo "host $host in $HOSTFILE is unreachable by passwordless ssh: run ssh-copy-id $host (or fix the hostfile)" >&2
    exit 1
  }
done

# Ranks: the hostfile's slots (a host without slots= gets all its GPUs, unknown here: then no count to check).
WORLD=$(awk '!/^[[:space:]]*#/ && NF { n = 0; for (i = 2; i <= NF; i++) if ($i ~ /^slots=[0-9]+$/) n = substr($i, 7)
             if (!n) { unknown = 1; exit } total += n } END { if (!unknown && total) print total }' "$HOSTFILE")
if [ "${PREFLIGHT:-1}" != 0 ] && [ -n "$WORLD" ]; then  # a typo fails here once, not on every rank of every host
  "$PYTHON" -m toolkit train --check --world "$WORLD" "$@" backend.name=deepspeed || exit $?
fi

LAUNCHER=launch/deepspeed.sh
# shellcheck source=launch/stop_signals.sh
. launch/stop_signals.sh
stop_file_init "$PWD/runs/.deepspeed-stop.XXXXXX"
MULTI_HOST=""
if [ "$(wc -l <<<"$HOSTS")" -gt 1 ]; then
  # Several hosts: DeepSpeed starts every rank over pdsh/ssh with only the variables it exports, which are those of
  # its env file(s) (and NCCL_*, PYTHON* ...): pass it a copy of them with NANOVLM_STOP_FILE added.
  MULTI_HOST=1
  if [ -z "$STOP_DIR" ]; then STOP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/nanovlm-dsenv.XXXXXX"); fi
  env_name=${DS_ENV_FILE:-.deepspeed_env}
  for dir in "$HOME" .; do  # where DeepSpeed looks for it
    case "$env_name" in /*) file=$env_name ;; *) file=$dir/$env_name ;; esac
    if [ -f "$file" ]; then awk 'NF' "$file" >>"$STOP_DIR/deepspeed_env"; fi
  done
  echo "NANOVLM_STOP_FILE=$NANOVLM_STOP_FILE" >>"$STOP_DIR/deepspeed_env"
  export DS_ENV_FILE=$STOP_DIR/deepspeed_env
fi

# shellcheck disable=SC2317  # run by the traps
pass_on() {  # $1: a signal for the ranks. One host: to DeepSpeed's per-host launcher, which passes it on as
  # SIGTERM to every rank's process tree; several hosts: to the runner, which stops pdsh and kills the ranks.
  if [ -n "$MULTI_HOST" ]; then
    kill "-$1" "$LAUNCHED_PID" 2>/dev/null || true
  else
    pkill "-$1" -P "$LAUNCHED_PID" 2>/dev/null || true
  fi
}
trap_stop_signals

# Every host was checked above, so DeepSpeed's own (first host only, ssh even for localhost) is skipped.
ARGS=(--no_ssh_check --hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$FIRST_HOST}" --master_port "${MASTER_PORT:-29500}")
[ -n "${SSH_PORT:-}" ] && ARGS+=(--ssh_port "$SSH_PORT")
exit_if_stopped
# In the background, so that the traps above run while DeepSpeed does. The runner ignores SIGINT where it has no
# handler of its own (one host): that host's launcher, which has one, stops the ranks, and the runner reports it.
(
  trap '' INT
  exec "$PYTHON" -m deepspeed.launcher.runner "${ARGS[@]}" --module toolkit train "$@" backend.name=deepspeed
) &
wait_for $!
