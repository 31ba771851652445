# Helpers sourced by the guest-side test scripts (they run as root in the VM of tests/vm/harness).
# Needs: BIN (the ringblock binary built on the host; the guest sees the host's files).
set -euo pipefail
: "${BIN:?BIN must name the ringblock binary}"
OUT=${VM_SHARE:-/tmp}
T0=$SECONDS
export RUST_LOG=${RUST_LOG:-info}
cd /tmp # the host's files are read-only here; tools that drop files (fio) need a writable cwd

step() { echo "vm-test: [$((SECONDS - T0)) s] $*"; }
fail() {
  echo "vm-test: FAIL: $*"
  for f in /tmp/daemon*.log; do
    [[ -e $f ]] || continue
    echo "---- $f (last 40 lines)"
    tail -n 40 "$f"
  done
  dmesg | grep -iE 'ublk|nbd|blk_update|I/O error|EXT4' | tail -n 20 || true
  exit 1
}

# start_daemon CONFIG LOG: start `ringblock serve`, wait (bounded) for its ready line.
# Sets DAEMON_PID.
start_daemon() {
  local cfg=$1 log=$2 i
  "$BIN" serve --config "$cfg" >"$log" 2>&1 &
  DAEMON_PID=$!
  for ((i = 0; i < 1200; i++)); do # 120 s: TCG is slow
    grep -q '^ringblock: ready' "$log" && return 0
    kill -0 "$DAEMON_PID" 2>/dev/null || fail "daemon exited while starting"
    sleep 0.1
  done
  fail "daemon not ready within 120 s"
}

# stop_daemon: SIGTERM, wait for a clean exit.
stop_daemon() {
  kill -TERM "$DAEMON_PID"
  local rc=0
  wait "$DAEMON_PID" || rc=$?
  ((rc == 0)) || fail "daemon exited with status $rc on SIGTERM"
}

# ublk_dev LOG: the /dev/ublkbN the daemon announced.
ublk_dev() {
  sed -n 's|^ringblock: ublk \(/dev/ublkb[0-9]*\) serves.*|\1|p' "$1" | tail -n 1
}

# wait_block DEV: wait (bounded) until DEV is a block device.
wait_block() {
  local i
  for ((i = 0; i < 200; i++)); do
    [[ -b $1 ]] && return 0
    sleep 0.05
  done
  fail "$1 did not appear"
}
