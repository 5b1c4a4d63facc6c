# shellcheck shell=bash
# Sourced by launch/torchrun.sh and launch/deepspeed.sh: how a signal to the launcher becomes a clean stop of every
# rank, and the wait for the launched process. torchrun does not pass SIGUSR1 on (its agent died of it and left the
# ranks training) and DeepSpeed's runner passes nothing on; the stop file reaches every rank either way.
#
# The caller sets LAUNCHER (its name, for messages) and defines `pass_on SIGNAL`: how a signal reaches the ranks
# through the launched process (for Ctrl-C, and when the stop file cannot be written).
#   stop_file_init TEMPLATE  NANOVLM_STOP_FILE: the user's (kept), or a fresh name in a new folder made with
#                            `mktemp -d TEMPLATE`, removed at exit, so a file an earlier run left cannot stop this one
#   trap_stop_signals        TERM, USR1, HUP: create the stop file (every rank finishes its step, checkpoints and
#                            exits 0); INT: pass_on INT (the ranks stop at once)
#   exit_if_stopped          before launching: a signal already came, so launch nothing
#   wait_for PID             wait until PID has ended (a trapped signal ends `wait` early), exit with its status

STOP_DIR=""
made_stop_file=""
LAUNCHED_PID=""
stop_signal=""  # the last signal the launcher received
interrupted=""  # set by every trap: `wait` returned because of a signal, not because the process ended

stop_file_init() {
  if [ -z "${NANOVLM_STOP_FILE:-}" ]; then
    mkdir -p "$(dirname "$1")"
    STOP_DIR=$(mktemp -d "$1")
    NANOVLM_STOP_FILE=$STOP_DIR/stop
  elif [ -e "$NANOVLM_STOP_FILE" ]; then
    echo "$LAUNCHER: warning: NANOVLM_STOP_FILE=$NANOVLM_STOP_FILE exists already, so the run stops after its" \
      "first step; delete it if an earlier run left it" >&2
  fi
  export NANOVLM_STOP_FILE
  trap stop_file_cleanup EXIT
}

# shellcheck disable=SC2317  # run by the EXIT trap
stop_file_cleanup() {
  if [ -n "$STOP_DIR" ]; then rm -rf "$STOP_DIR"; fi
  if [ -n "$made_stop_file" ]; then rm -f "$NANOVLM_STOP_FILE"; fi
}

# shellcheck disable=SC2317  # run by the traps
request_stop() {
  stop_signal=$1 interrupted=1
  if [ ! -e "$NANOVLM_STOP_FILE" ]; then
    if mkdir -p "$(dirname "$NANOVLM_STOP_FILE")" 2>/dev/null && touch "$NANOVLM_STOP_FILE" 2>/dev/null; then
      made_stop_file=1
    elif [ -n "$LAUNCHED_PID" ]; then
      echo "$LAUNCHER: cannot create $NANOVLM_STOP_FILE; passing SIGTERM on instead" >&2
      pass_on TERM
      return
    fi
  fi
  echo "$LAUNCHER: SIG$1: every rank stops after its current step, with a checkpoint" >&2
}

# shellcheck disable=SC2317  # run by the traps
interrupt() {
  stop_signal=INT interrupted=1
  if [ -n "$LAUNCHED_PID" ]; then pass_on INT; fi
}

trap_stop_signals() {
  trap 'request_stop TERM' TERM
  trap 'request_stop USR1' USR1
  trap 'request_stop HUP' HUP
  trap interrupt INT
}

exit_if_stopped() {
  if [ -n "$stop_signal" ]; then
    echo "$LAUNCHER: SIG$stop_signal before the ranks started; nothing was launched" >&2
    if [ "$stop_signal" = INT ]; then exit 130; fi
    exit 0
  fi
}

wait_for() {
  LAUNCHED_PID=$1
  if [ "$stop_signal" = INT ]; then interrupt; fi  # arrived while the process was being started
  local status
  while :; do  # a second `wait` on a process that has ended returns its status
    interrupted=""
    status=0
    wait "$LAUNCHED_PID" || status=$?
    if [ -z "$interrupted" ]; then break; fi
  done
  exit "$status"
}
