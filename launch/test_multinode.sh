#!/usr/bin/env bash
# `make test-multinode`: two hosts on this machine, and `deepspeed --hostfile` training across them.
#
# Two network namespaces joined by a veth pair stand in for two nodes; each runs its own sshd, and the DeepSpeed
# launcher (run inside the first) reaches both over ssh + pdsh exactly as on a cluster. It trains the tiny
# preset under ZeRO-3 over gloo for a few steps and checks that
#   1. both hosts ran a rank and trained (pdsh prefixes every line with the host it came from),
#   2. the checkpoint holds both ranks' ZeRO shards and both ranks' loader state,
#   3. the losses equal a 2-rank run on one host (torchrun),
#   4. killing the rank on the second host makes the launch fail (non-zero, no hang).
# Everything it creates (namespaces, sshd, processes, temp files) is removed on exit, whatever happens.
# Needs root (ip netns); installs openssh-server and pdsh with apt-get when missing.
# Exit status: 0 pass, 1 fail, 3 this machine cannot make network namespaces (nothing was tested).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
TAG=nv$$
NS1=${TAG}a NS2=${TAG}b IP1=10.231.$((RANDOM % 200)).1
IP2=${IP1%.1}.2
WORK=$(mktemp -d /tmp/nvms-multinode.XXXXXX)
PORT=$((29000 + RANDOM % 1000))
STEPS=${MULTINODE_STEPS:-6}

log() { echo "[test-multinode] $*"; }
fail() { log "FAIL: $*"; exit 1; }

cleanup() {
  for ns in "$NS1" "$NS2"; do
    pids=$(ip netns pids "$ns" 2>/dev/null)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  done
  ip link del "${TAG}x" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

can_netns() {
  [ "$(id -u)" = 0 ] || return 1
  ip netns add "${TAG}probe" 2>/dev/null || return 1
  ip netns del "${TAG}probe"
}
if ! can_netns; then
  log "SKIPPED: this machine does not allow network namespaces (needs root and 'ip netns'); nothing was tested"
  exit 3
fi

install_tools() {
  command -v sshd >/dev/null && command -v pdsh >/dev/null && return 0
  log "installing openssh-server and pdsh"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server pdsh) >/dev/null \
    || fail "could not install openssh-server and pdsh with apt-get"
}

make_hosts() {
  ip netns add "$NS1" && ip netns add "$NS2" || fail "ip netns add"
  ip link add "${TAG}x" type veth peer name "${TAG}y" || fail "veth pair"
  ip link set "${TAG}x" netns "$NS1" && ip link set "${TAG}y" netns "$NS2"
  # Same interface name on both hosts, so one GLOO_SOCKET_IFNAME fits both (the hostname resolves to loopback).
  ip -n "$NS1" link set "${TAG}x" name nvveth0 && ip -n "$NS2" link set "${TAG}y" name nvveth0
  ip -n "$NS1" addr add "$IP1/24" dev nvveth0 && ip -n "$NS2" addr add "$IP2/24" dev nvveth0
  for ns in "$NS1" "$NS2"; do ip -n "$ns" link set lo up && ip -n "$ns" link set nvveth0 up; done
}

start_sshd() {
  mkdir -p /run/sshd "$WORK/bin"
  ssh-keygen -q -t ed25519 -N '' -f "$WORK/id" && ssh-keygen -q -t ed25519 -N '' -f "$WORK/hostkey"
  cp "$WORK/id.pub" "$WORK/authorized_keys"
  local sshd; sshd=$(command -v sshd)
  for pair in "$NS1:$IP1" "$NS2:$IP2"; do
    ns=${pair%%:*} ip=${pair##*:}
    cat >"$WORK/sshd_$ns" <<EOF
ListenAddress $ip
HostKey $WORK/hostkey
AuthorizedKeysFile $WORK/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
UsePAM no
PidFile $WORK/sshd_$ns.pid
EOF
    ip netns exec "$ns" "$sshd" -f "$WORK/sshd_$ns" -E "$WORK/sshd_$ns.log" || fail "sshd in $ns"
  done
  # pdsh and DeepSpeed's reachability check call plain `ssh`: a wrapper first in PATH adds our key and options.
  cat >"$WORK/bin/ssh" <<EOF
#!/bin/sh
exec /usr/bin/ssh -i $WORK/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes "\$@"
EOF
  chmod +x "$WORK/bin/ssh"
  export PATH="$WORK/bin:$PATH" PDSH_RCMD_TYPE=ssh
  for ip in "$IP1" "$IP2"; do
    ip netns exec "$NS1" ssh "$ip" true || fail "ssh to $ip"
  done
}

train_args() {  # $1 = run dir
  echo --config tiny backend.name=deepspeed backend.ds_config=ds_configs/zero3.json backend.device=cpu \
    backend.precision=fp32 model.tokenizer="$WORK/data/tokenizer" data.train_shards="$WORK/data/train" \
    data.val_shards= data.num_workers=1 train.batch_size=2 train.max_training_steps="$STEPS" \
    train.eval_interval=0 train.checkpoint_interval="$STEPS" train.log_interval=1 train.run_dir="$1" \
    train.resume=none
}

launch_two_hosts() {  # $1 = run dir; output to $1.log
  printf '%s slots=1\n%s slots=1\n' "$IP1" "$IP2" >"$WORK/hostfile"
  printf 'DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME=nvveth0\nPATH=%s\nPDSH_RCMD_TYPE=ssh\n' "$PATH" >"$WORK/ds_env"
  DS_ENV_FILE="$WORK/ds_env" DS_ACCELERATOR=cpu ip netns exec "$NS1" "$PY" -m deepspeed.launcher.runner \
    --hostfile "$WORK/hostfile" --master_addr "$IP1" --master_port "$PORT" \
    --module toolkit train $(train_args "$1") >"$1.log" 2>&1
}

check_run() {  # $1 = two-host run dir
  # Rank 0 alone says the run finished; each host's DeepSpeed launcher says which rank it ran and how it exited.
  grep -q "^$IP1: finished at step $STEPS on 2 rank(s)" "$1.log" || fail "rank 0 on host $IP1 did not finish (see log)"
  grep -q "^$IP2: .*node_rank=1" "$1.log" || fail "host $IP2 was not given node rank 1"
  for ip in "$IP1" "$IP2"; do
    grep -q "^$ip: .*Process [0-9]* exits successfully" "$1.log" || fail "the rank on host $ip did not exit cleanly"
  done
  local step="$1/checkpoints/step_$STEPS"
  for r in 0 1; do
    ls "$step"/model/deepspeed/zero_pp_rank_${r}_*optim_states.pt >/dev/null 2>&1 || fail "no ZeRO-3 shard of rank $r in $step"
    [ -f "$step/rank_$r.pt" ] || fail "no loader/RNG state of rank $r in $step"
  done
}

compare_losses() {  # $1, $2 = run dirs
  "$PY" - "$1/metrics.jsonl" "$2/metrics.jsonl" <<'EOF' || fail "losses differ between two hosts and one host"
import json, math, sys
a, b = ([json.loads(line)["loss"] for line in open(p)] for p in sys.argv[1:])
print("[test-multinode] two hosts:", a, "\n[test-multinode] one host: ", b)
assert len(a) == len(b) > 0 and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))
EOF
}

killed_host_fails() {
  MULTINODE_STEPS=400 STEPS=400 launch_two_hosts "$WORK/killed" &
  local launcher=$! waited=0
  until grep -q '"step"' "$WORK/killed/metrics.jsonl" 2>/dev/null; do
    sleep 1; waited=$((waited + 1))
    [ $waited -gt 300 ] && fail "the run to be killed never started"
  done
  for pid in $(ip netns pids "$NS2"); do
    grep -q "toolkit" "/proc/$pid/cmdline" 2>/dev/null && grep -qa "train" "/proc/$pid/cmdline" && kill -9 "$pid"
  done
  log "killed the rank on $IP2; waiting for the launcher to fail"
  for _ in $(seq 1 180); do
    if ! kill -0 "$launcher" 2>/dev/null; then
      wait "$launcher" && fail "launcher exited 0 although a host's rank was killed"
      return 0
    fi
    sleep 1
  done
  fail "launcher still running 180 s after a host's rank was killed (hang)"
}

install_tools
make_hosts
start_sshd
log "hosts $IP1 ($NS1) and $IP2 ($NS2) up, ssh works"
"$PY" -m toolkit synth "$WORK/data" --samples 256 --val-samples 16 >/dev/null || fail "synth"
launch_two_hosts "$WORK/two" || { tail -40 "$WORK/two.log"; fail "two-host run failed"; }
grep -E "node_rank=|finished at step" "$WORK/two.log" | head -4
check_run "$WORK/two" || exit 1
DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nproc_per_node 2 --master_port $((PORT + 1)) \
  -m toolkit train $(train_args "$WORK/one") >"$WORK/one.log" 2>&1 || { tail -40 "$WORK/one.log"; fail "one-host run"; }
compare_losses "$WORK/two" "$WORK/one"
killed_host_fails
log "PASS: both hosts trained, both shards saved, losses equal one host, a killed host fails the launch"
