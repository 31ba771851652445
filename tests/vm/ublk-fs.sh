#!/bin/bash
# Guest side of tests/vm_ublk.rs `ublk_filesystem_and_fio_verify`: a ublk device on a ringblock
# RAM volume; ext4 with files whose checksums survive unmount + cache drop + remount; fsck clean;
# discard and write-zeroes read back as zeros; fio io_uring verify on the raw device; SIGTERM
# removes the device.   Usage: ublk-fs.sh BIN
set -euo pipefail
BIN=$1
source "$(dirname "$0")/lib.sh"

# Two reactors (the default on a 2-CPU machine is one): two ublk queues, one per reactor.
cat >/tmp/ublk.toml <<TOML
cores = [0, 1]
[[device]]
name = "ram0"
kind = "ram"
size_bytes = 402653184
[[volume]]
name = "vol0"
device = "ram0"
size_bytes = 268435456
[[export]]
kind = "ublk"
volume = "vol0"
[ublk]
state_dir = "/run/ringblock"
[nbd]
listen = ["127.0.0.1:0"]
TOML

step "doctor"
"$BIN" doctor || fail "doctor reports something missing in the VM"

step "start daemon with a ublk export"
start_daemon /tmp/ublk.toml /tmp/daemon.log
dev=$(ublk_dev /tmp/daemon.log)
[[ -n $dev ]] || fail "no ublk device announced"
wait_block "$dev"
grep '^ringblock: ublk' /tmp/daemon.log
[[ $(blockdev --getsize64 "$dev") == 268435456 ]] || fail "size $(blockdev --getsize64 "$dev")"
name=${dev#/dev/}
echo "vm-test: $name: logical $(cat /sys/block/$name/queue/logical_block_size), max_sectors_kb $(cat /sys/block/$name/queue/max_sectors_kb), write_cache '$(cat /sys/block/$name/queue/write_cache)', fua $(cat /sys/block/$name/queue/fua), discard_max $(cat /sys/block/$name/queue/discard_max_bytes), hw queues $(ls /sys/block/$name/mq | wc -l)"

step "mkfs.ext4 + mount + write files"
mkfs.ext4 -q -F "$dev"
mkdir -p /tmp/m
mount "$dev" /tmp/m
for i in 1 2 3 4; do head -c $((i * 3 * 1024 * 1024 + 4096 * i + 17)) /dev/urandom >/tmp/m/big$i; done
mkdir /tmp/m/tree
cp -a /usr/include/linux /tmp/m/tree/ # a few thousand small files
(cd /tmp/m && find . -type f ! -name sums -print0 | sort -z | xargs -0 sha256sum >/tmp/sums)
echo "vm-test: $(wc -l </tmp/sums) files written"
sync
umount /tmp/m

step "drop caches, remount, compare checksums"
blockdev --flushbufs "$dev"
echo 3 >/proc/sys/vm/drop_caches
mount "$dev" /tmp/m
(cd /tmp/m && sha256sum --quiet -c /tmp/sums) || fail "checksums differ after remount"
umount /tmp/m
e2fsck -fn "$dev" >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck found problems"; }
echo "vm-test: checksums equal after remount; e2fsck clean"

step "discard and write-zeroes read back as zeros"
blkdiscard -f -o 0 -l $((16 << 20)) "$dev"
blkdiscard -f -z -o $((16 << 20)) -l $((8 << 20)) "$dev"
cmp -n $((24 << 20)) "$dev" /dev/zero || fail "discarded/zeroed range is not zeros"

step "fio io_uring verify (crc32c) on the raw device"
fio --name=verify --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite \
  --bsrange=4k-128k --iodepth=16 --size=48M --offset=32M --verify=crc32c --do_verify=1 \
  --verify_fatal=1 --fsync_on_close=1 --output=/tmp/fio1.txt || { cat /tmp/fio1.txt; fail "fio verify"; }
grep -E 'IOPS|err=' /tmp/fio1.txt | head -n 4
fio --name=par --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
  --iodepth=32 --numjobs=2 --size=16M --offset=96M --offset_increment=16M --verify=crc32c \
  --verify_fatal=1 --group_reporting --output=/tmp/fio2.txt || { cat /tmp/fio2.txt; fail "fio parallel verify"; }
grep -E 'IOPS|err=' /tmp/fio2.txt | head -n 4

step "kill -9 with a RAM volume: its data died, so the restart replaces the device"
kill -KILL "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
start_daemon /tmp/ublk.toml /tmp/daemon2.log
grep '^ringblock: ublk' /tmp/daemon2.log
grep -q 'recovered from the previous daemon' /tmp/daemon2.log && fail "a RAM volume's device was recovered"
grep -q 'did not survive the restart' /tmp/daemon2.log || fail "no warning about the replaced device"
dev=$(ublk_dev /tmp/daemon2.log)
wait_block "$dev"
cmp -n $((1 << 20)) "$dev" /dev/zero || fail "the new RAM volume is not empty"

step "SIGTERM removes the device"
stop_daemon
grep -q 'ublk export stopped' /tmp/daemon2.log || fail "no 'ublk export stopped' in the log"
grep -q 'stopped cleanly' /tmp/daemon2.log || fail "daemon did not stop cleanly"
[[ ! -e $dev ]] || fail "$dev still exists after the daemon stopped"
echo "vm-test: PASS ublk-fs in $((SECONDS - T0)) s"
