#!/bin/bash
# Guest side of tests/vm_ublk.rs `ublk_survives_kill_9_under_fio_verify`: a ublk device on a
# persistent volume (bbram device backed by a file in /dev/shm, which outlives the daemon);
# fio writes with crc32c verify; the daemon is killed with SIGKILL twice while fio runs (in its
# write phase, then in its verify phase) and
# restarted each time; it recovers the same /dev/ublkbN (USER_RECOVERY) and fio completes and
# verifies every block. Then a clean restart and a verify-only pass: the data is still there.
# Last, what a restart does with a device left for a volume it is not configured to export:
# recover it (an export started at runtime), or with `recovery = false` delete it.
#   Usage: ublk-recovery.sh BIN
set -euo pipefail
BIN=$1
source "$(dirname "$0")/lib.sh"

cat >/tmp/ublk.toml <<TOML
cores = [0, 1]
[[device]]
name = "bb0"
kind = "bbram"
path = "/dev/shm/bb0.img"
size_bytes = 201326592
[[volume]]
name = "vol0"
device = "bb0"
size_bytes = 134217728
[[export]]
kind = "ublk"
volume = "vol0"
[ublk]
state_dir = "/run/ringblock"
[nbd]
listen = ["127.0.0.1:0"]
# The host's files are read-only in the guest: the device's state record and the API token
# live in a writable directory.
[web]
state_dir = "/run/ringblock-state"
TOML

step "start daemon"
start_daemon /tmp/ublk.toml /tmp/daemon1.log
dev=$(ublk_dev /tmp/daemon1.log)
[[ -n $dev ]] || fail "no ublk device announced"
wait_block "$dev"
grep '^ringblock: ublk' /tmp/daemon1.log
grep -q "^ringblock: ublk $dev serves volume vol0 .*copy user_copy" /tmp/daemon1.log ||
  fail "the device does not run in USER_COPY mode on this kernel"
cat /run/ringblock/ublk-vol0.state

# Allocate every chunk fio will touch and make the volume's chunk map durable (FLUSH): a crash
# of the daemon loses what a power cut would (unflushed metadata), so the drill starts from a
# flushed, fully mapped range, as a filesystem in use would be.
step "fill the range and flush"
dd if=/dev/zero of="$dev" bs=1M count=64 oflag=direct conv=fsync status=none

FIO=(fio --name=crash --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k
  --iodepth=16 --size=64M --verify=crc32c --verify_fatal=1 --rate_iops=2500 --randseed=1234)
reads() { awk '{print $1}' "/sys/block/${dev#/dev/}/stat"; }
reads0=$(reads)
step "fio write+verify in the background"
"${FIO[@]}" --do_verify=1 --output=/tmp/fio.txt &
fio_pid=$!

# Round 1 kills during fio's write phase, round 2 once its verify phase has read 2000 blocks.
for round in 1 2; do
  if ((round == 1)); then
    sleep 4
  else
    for ((i = 0; i < 1200; i++)); do
      (($(reads) - reads0 > 2000)) && break
      kill -0 "$fio_pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  kill -0 "$fio_pid" 2>/dev/null || fail "fio finished before kill $round: make the job longer"
  step "kill -9 the daemon (round $round, $(($(reads) - reads0)) blocks verified so far) while fio runs"
  kill -KILL "$DAEMON_PID"
  wait "$DAEMON_PID" 2>/dev/null || true
  [[ -b $dev ]] || fail "$dev vanished when the daemon died"
  sleep 1
  kill -0 "$fio_pid" 2>/dev/null || { cat /tmp/fio.txt; fail "fio ended while the daemon was down"; }
  step "restart: recover $dev"
  start_daemon /tmp/ublk.toml /tmp/daemon$((round + 1)).log
  grep '^ringblock: ublk' /tmp/daemon$((round + 1)).log
  grep -q "^ringblock: ublk $dev serves volume vol0 .*copy user_copy, recovered from the previous daemon" /tmp/daemon$((round + 1)).log ||
    fail "restart did not recover $dev (in the USER_COPY mode it was created with)"
done

step "wait for fio"
rc=0
wait "$fio_pid" || rc=$?
cat /tmp/fio.txt
((rc == 0)) || fail "fio exited with status $rc"
grep -q 'err= 0' /tmp/fio.txt || fail "fio reports errors"
dmesg | grep -iE 'I/O error|blk_update_request' && fail "the kernel saw IO errors (the host must see a pause, not an error)"

step "clean restart, then verify-only: the data is still there"
stop_daemon
[[ ! -e $dev ]] || fail "$dev still exists after SIGTERM"
[[ ! -e /run/ringblock/ublk-vol0.state ]] || fail "state file left after a clean stop"
start_daemon /tmp/ublk.toml /tmp/daemon9.log
dev=$(ublk_dev /tmp/daemon9.log)
wait_block "$dev"
"${FIO[@]/--filename=*/--filename=$dev}" --verify_only --output=/tmp/fio-verify.txt ||
  { cat /tmp/fio-verify.txt; fail "verify-only pass after a clean restart"; }
grep -E 'err=|READ:' /tmp/fio-verify.txt

step "kill -9, restart without the [[export]]: an export started at runtime is recovered too"
kill -KILL "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
[[ -b $dev ]] || fail "$dev vanished when the daemon died"
grep -v -e '^\[\[export\]\]' -e '^kind = "ublk"' -e '^volume = "vol0"' /tmp/ublk.toml >/tmp/noexport.toml
start_daemon /tmp/noexport.toml /tmp/daemon10.log
grep "^ringblock: ublk $dev serves volume vol0 .*recovered from the previous daemon" /tmp/daemon10.log ||
  fail "the left-over device was not recovered"
dd if="$dev" of=/dev/null bs=1M count=4 iflag=direct status=none || fail "read after recovery"

step "kill -9, restart with [ublk] recovery = false: the left-over device is deleted"
kill -KILL "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
sed 's|^state_dir = "/run/ringblock"$|&\nrecovery = false|' /tmp/noexport.toml >/tmp/norecovery.toml
start_daemon /tmp/norecovery.toml /tmp/daemon11.log
grep "^ringblock: deleted ${dev#/dev/}" /tmp/daemon11.log || fail "the left-over device was not deleted"
for ((i = 0; i < 100; i++)); do [[ -e $dev ]] || break; sleep 0.05; done
[[ ! -e $dev ]] || fail "$dev still exists"
[[ ! -e /run/ringblock/ublk-vol0.state ]] || fail "state file left"
stop_daemon
echo "vm-test: PASS ublk-recovery in $((SECONDS - T0)) s"
