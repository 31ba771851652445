#!/bin/bash
# Guest side of tests/vm_ublk.rs `ublk_filesystem_and_fio_verify`: a ublk device on a ringblock
# RAM volume; ext4 with files whose checksums survive unmount + cache drop + remount; fsck clean;
# discard and write-zeroes read back as zeros; fio io_uring verify on the raw device; SIGTERM
# removes the device. The device must run in USER_COPY mode (6.12 has it), and a fio crc32c
# verify with request sizes up to 2 MiB across 1 MiB chunk boundaries, plus large reads of
# unmapped space, go through the daemon's pread/pwrite copies. Then the same volume exported at
# runtime through the web API (`ringblock export ublk|list|stop`, GET /api/ublk) with
# `[ublk] user_copy = false` (the tag-buffer path): write + read back, stop, SIGTERM.
#   Usage: ublk-fs.sh BIN
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
grep -q "^ringblock: ublk $dev serves volume vol0 .*copy user_copy" /tmp/daemon.log ||
  fail "the device does not run in USER_COPY mode on this kernel"
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

step "USER_COPY: large and mixed request sizes across chunk boundaries"
# Chunks are 1 MiB; requests up to 2 MiB at 4 KiB-aligned offsets straddle chunk boundaries
# (the kernel splits them at chunk_sectors and max_sectors, so each ublk request moves in one or
# more pieces at its own offsets). Random and sequential, written then verified (crc32c).
fio --name=mixed --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite \
  --bsrange=4k-2M --iodepth=8 --size=40M --offset=130M --verify=crc32c --do_verify=1 \
  --verify_fatal=1 --randseed=7 --output=/tmp/fio4.txt || { cat /tmp/fio4.txt; fail "fio mixed-size verify"; }
grep -E 'IOPS|err=' /tmp/fio4.txt | head -n 4
fio --name=seq --filename="$dev" --ioengine=psync --direct=1 --rw=write --bs=1536k \
  --size=24M --offset=$((176 << 20)) --verify=crc32c --do_verify=1 \
  --verify_fatal=1 --output=/tmp/fio5.txt || { cat /tmp/fio5.txt; fail "fio sequential 1.5 MiB verify"; }
grep -E 'IOPS|err=' /tmp/fio5.txt | head -n 4
# Unmapped space (whole chunks discarded), read in 2 MiB direct reads (512 KiB requests):
# zeros, moved 64 KiB at a time at offsets inside each request.
blkdiscard -f -o $((224 << 20)) -l $((16 << 20)) "$dev"
dd if="$dev" bs=2M skip=112 count=8 iflag=direct status=none | cmp -n $((16 << 20)) - /dev/zero ||
  fail "unmapped space does not read as zeros through USER_COPY"

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

# The same volume exported at runtime through the web API, as `ringblock export …` and the
# dashboard do it: the daemon starts without an [[export]]; the CLI gets the token of its
# first start from the 0600 file the daemon names (its output is not a terminal).
step "runtime export: daemon without [[export]], with the web API"
grep -v -e '^\[\[export\]\]' -e '^kind = "ublk"' -e '^volume = "vol0"' /tmp/ublk.toml |
  sed 's/^\[ublk\]$/&\nuser_copy = false/' >/tmp/api.toml
cat >>/tmp/api.toml <<TOML
[web]
listen = "127.0.0.1:18080"
state_dir = "/tmp/webstate"
TOML
start_daemon /tmp/api.toml /tmp/daemon3.log
grep -q '^ringblock: ublk' /tmp/daemon3.log && fail "a ublk device without an [[export]]"
# Output to a log file, not a terminal: the first token is in a 0600 file, never in the log.
grep -q "(shown once)" /tmp/daemon3.log && fail "the API token went to a log file"
grep -q "API token (first start) in /tmp/webstate/api-token.first" /tmp/daemon3.log \
    || fail "the daemon did not say where the first API token is"
RINGBLOCK_TOKEN=$(cat /tmp/webstate/api-token.first)
[[ -n $RINGBLOCK_TOKEN ]] || fail "no API token in /tmp/webstate/api-token.first"
export RINGBLOCK_TOKEN RINGBLOCK_API=http://127.0.0.1:18080
# What the dashboard reads.
api_get() { curl -fsS --max-time 30 -H "Authorization: Bearer $RINGBLOCK_TOKEN" "$RINGBLOCK_API$1"; }
[[ $(api_get /api/ublk) == "[]" ]] || fail "GET /api/ublk before: $(api_get /api/ublk)"

step "ringblock export ublk vol0"
out=$("$BIN" export ublk vol0 2>&1) || fail "export ublk: $out"
echo "$out"
dev=$(sed -n 's|^\(/dev/ublkb[0-9]*\) serves volume vol0$|\1|p' <<<"$out")
[[ -n $dev ]] || fail "export ublk printed: $out"
wait_block "$dev"
[[ $(blockdev --getsize64 "$dev") == 268435456 ]] || fail "size $(blockdev --getsize64 "$dev")"
"$BIN" export list | tee /tmp/list.txt
grep -qE "^$dev +vol0 +2 +[0-9]+ +tag_buffer +live$" /tmp/list.txt ||
  fail "export list does not show $dev in tag_buffer mode ([ublk] user_copy = false)"
json=$(api_get /api/ublk)
echo "vm-test: GET /api/ublk: $json"
for want in "\"path\":\"$dev\"" '"volume":"vol0"' '"state":"live"' '"copy_mode":"tag_buffer"'; do
  grep -qF "$want" <<<"$json" || fail "GET /api/ublk lacks $want"
done
api_get /api/status | grep -qF '"ublk_exports":1' || fail "status: $(api_get /api/status)"
out=$("$BIN" export ublk vol0 2>&1) && fail "a second export of vol0 succeeded: $out"
grep -q '409' <<<"$out" || fail "second export: $out"

step "write + read back through the runtime export"
head -c $((8 << 20)) /dev/urandom >/tmp/pattern
dd if=/tmp/pattern of="$dev" bs=1M seek=16 oflag=direct conv=fsync status=none
echo 3 >/proc/sys/vm/drop_caches
dd if="$dev" of=/tmp/readback bs=1M skip=16 count=8 iflag=direct status=none
cmp /tmp/readback /tmp/pattern || fail "read-back through the runtime export differs"
fio --name=api --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
  --iodepth=8 --size=8M --offset=64M --verify=crc32c --do_verify=1 --verify_fatal=1 \
  --output=/tmp/fio3.txt || { cat /tmp/fio3.txt; fail "fio verify on the runtime export"; }
grep -E 'IOPS|err=' /tmp/fio3.txt | head -n 2
api_get /api/ublk | grep -qE '"writes":[1-9]' || fail "no writes counted: $(api_get /api/ublk)"

step "ringblock export stop vol0"
"$BIN" export stop vol0 || fail "export stop"
for ((i = 0; i < 100; i++)); do [[ -e $dev ]] || break; sleep 0.05; done
[[ ! -e $dev ]] || fail "$dev still exists after export stop"
[[ $(api_get /api/ublk) == "[]" ]] || fail "GET /api/ublk after stop: $(api_get /api/ublk)"
[[ $("$BIN" export list | wc -l) == 1 ]] || fail "export list after stop: $("$BIN" export list)"
out=$("$BIN" export stop vol0 2>&1) && fail "stopping a stopped export succeeded"
grep -q '404' <<<"$out" || fail "second stop: $out"
[[ ! -e /run/ringblock/ublk-vol0.state ]] || fail "state file left after export stop"

step "an export started through the API is removed at SIGTERM too"
out=$("$BIN" export ublk vol0 2>&1) || fail "export ublk again: $out"
dev=$(sed -n 's|^\(/dev/ublkb[0-9]*\) serves volume vol0$|\1|p' <<<"$out")
wait_block "$dev"
stop_daemon
grep -q 'ublk export stopped' /tmp/daemon3.log || fail "no 'ublk export stopped' in the log"
grep -q 'stopped cleanly' /tmp/daemon3.log || fail "daemon did not stop cleanly"
[[ ! -e $dev ]] || fail "$dev still exists after the daemon stopped"
echo "vm-test: PASS ublk-fs in $((SECONDS - T0)) s"
