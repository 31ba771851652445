#!/bin/bash
# Guest side of tests/vm_ublk.rs `kernel_nbd_client_against_host_daemon`: the kernel's NBD
# client (nbd-client, newstyle negotiation by export name) against ringblock's NBD server on
# the host (10.0.2.2 is the host's loopback through qemu user networking). ext4 on /dev/nbd0,
# files written, disconnected, reconnected (nothing cached), read back; fio verify; discards
# (mkfs sends one TRIM for the whole device: longer than the engine takes at once).
#   Usage: nbd-client.sh PORT EXPORT
set -euo pipefail
PORT=$1 EXPORT=$2
BIN=none
source "$(dirname "$0")/lib.sh"
nbd=/dev/nbd0

step "nbd-client 10.0.2.2 $PORT $nbd -N $EXPORT"
nbd-client 10.0.2.2 "$PORT" "$nbd" -N "$EXPORT" || fail "nbd-client could not connect"
size=$(blockdev --getsize64 "$nbd")
echo "vm-test: $nbd is $size bytes"
((size > 0)) || fail "zero-size device"

# The filesystem covers the first 256 MiB; fio and the discard below work past it, so the host
# can still read the files out of the volume afterwards.
step "mkfs.ext4 (256 MiB) + mount + files"
mkfs.ext4 -q -F "$nbd" 256M
mkdir -p /tmp/m
mount "$nbd" /tmp/m
for i in 1 2 3; do head -c $((i * 2 * 1024 * 1024 + 511 * i)) /dev/urandom >/tmp/m/big$i; done
mkdir /tmp/m/tree && cp -a /usr/include/linux /tmp/m/tree/
(cd /tmp/m && find . -type f -print0 | sort -z | xargs -0 sha256sum >/tmp/sums)
sha256sum </tmp/m/big2 | cut -d' ' -f1 >"$OUT/big2.sha256"
echo "vm-test: $(wc -l </tmp/sums) files written"
umount /tmp/m
nbd-client -d "$nbd"

step "reconnect and read everything back"
nbd-client 10.0.2.2 "$PORT" "$nbd" -N "$EXPORT" || fail "reconnect failed"
mount -o ro "$nbd" /tmp/m
(cd /tmp/m && sha256sum --quiet -c /tmp/sums) || fail "checksums differ after reconnect"
umount /tmp/m
e2fsck -fn "$nbd" >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck found problems"; }
echo "vm-test: checksums equal after reconnect; e2fsck clean"

step "fio io_uring verify on $nbd, past the filesystem"
fio --name=nbdverify --filename="$nbd" --ioengine=io_uring --direct=1 --rw=randwrite \
  --bsrange=4k-64k --iodepth=8 --size=16M --offset=512M --verify=crc32c --verify_fatal=1 \
  --output=/tmp/fio.txt || { cat /tmp/fio.txt; fail "fio verify over nbd"; }
grep -E 'err=|IOPS' /tmp/fio.txt

step "a 256 MiB discard (one TRIM, split by the server) reads back as zeros"
dd if=/dev/urandom of="$nbd" bs=1M count=8 seek=800 oflag=direct status=none
blkdiscard -f -o $((768 << 20)) -l $((256 << 20)) "$nbd"
cmp -i $((768 << 20)) -n $((256 << 20)) "$nbd" /dev/zero || fail "discarded range is not zeros"
dmesg | grep -E 'nbd0: Other side returned error|I/O error, dev nbd0' && fail "the server returned errors"

nbd-client -d "$nbd"
echo "vm-test: PASS nbd-client in $((SECONDS - T0)) s"
