#!/bin/bash
# Zero-copy sends to a replica over a real network device: the primary runs in the project's
# qemu VM (tests/vm/harness: Debian's 6.12 kernel under TCG), the replica on the host, reached
# through a virtio-net device of the guest. On loopback the kernel copies every zero-copy send
# anyway; here it need not, if the device can send from the pages: with `--net tap` (the
# default) the guest's second NIC is a tap device with vnet headers in a network namespace of
# its own (checksum offload, so scatter-gather: the kernel can hand the pages to the device);
# with `--net user` it is qemu's user networking (the host's loopback at 10.0.2.2), whose
# virtio-net device has no checksum offload and so no scatter-gather. Two primaries in turn, each with a replica of its own on the host: zero-copy sends
# on (the default) and `zero_copy_sends = false`. Each: the first sync, MIB MiB written with
# 1 MiB sequential writes (fio's nbd engine, in the guest) while the replica follows, then the
# replica suspended, MIB MiB written, resumed and resynced. The primary's /metrics counters
# (ringblock_reactor_zero_copy_sends_total, ..._kernel_copied_total: SEND_ZC with
# REPORT_USAGE, the kernel says when it copied) are read before and after each phase.
#
#   bench/vm/repl-zero-copy.sh [--bin PATH] [--mib N] [--net tap|user]
#     --bin   ringblock binary (default: target/release/ringblock, or $CARGO_TARGET_DIR's)
#     --mib   MiB written per phase (default 64; TCG is slow)
#     --net   how the guest reaches the replicas (default tap: root, `unshare --net`)
#   Results: a table on stdout, the raw counters in $OUT (default: a temp dir, path printed).
#   Only ratios and counters mean anything: TCG runs 3-30x slower than the host.
set -euo pipefail

PRIMARY_IDS=(0123456789abcdef0123456789abcd01 0123456789abcdef0123456789abcd02)
REPLICA_IDS=(fedcba9876543210fedcba98765432a1 fedcba9876543210fedcba98765432a2)
ZC=(true false)

# node_dir DIR ID: a state directory with the node id, and the shared secret.
node_dir() {
  mkdir -p "$1/state"
  chmod 700 "$1/state"
  echo "$2" >"$1/state/node-id"
  echo "ringblock-bench vm cluster secret" >"$1/cluster.secret"
  chmod 600 "$1/state/node-id" "$1/cluster.secret"
}

# config DIR ROLE PEER_LISTEN OTHER_ID OTHER_ADDR ZC SIZE_MIB
config() {
  cat >"$1/ringblock.toml" <<TOML
zero_copy_sends = $6

[peer]
cluster_id = "vm"
listen = "$3"
secret_file = "$1/cluster.secret"

[[device]]
name = "ram0"
kind = "ram"
size_bytes = $((($7 + 64) << 20))

[[volume]]
name = "v"
device = "ram0"
size_bytes = $(($7 << 20))
role = "$2"

[[volume.replica]]
node = "$4"
address = "$5"
mode = "sync"
TOML
}

if [[ ${1:-} == --guest ]]; then
  # ---- inside the VM: the primaries --------------------------------------------------------
  shift
  BIN=$1 MIB=$2 PORT0=$3 PORT1=$4 HOST_IP=$5
  OUT=${VM_SHARE:-/tmp}
  nic=eth0
  if [[ $HOST_IP != 10.0.2.2 ]]; then
    # The tap NIC, by the MAC the host gave it.
    for n in /sys/class/net/*; do
      [[ $(cat $n/address) == 52:54:00:77:00:02 ]] && nic=$(basename $n)
    done
    ip addr add 10.77.0.2/24 dev $nic
    ip link set $nic up
  fi
  PORTS=("$PORT0" "$PORT1")
  SIZE=$((2 * MIB + 64))
  # The primaries' logs go to the share whatever happens.
  trap 'for i in 0 1; do [[ -f /tmp/primary$i/daemon.log ]] && cp /tmp/primary$i/daemon.log "$OUT/primary$i.log"; done' EXIT
  echo "bench: guest kernel $(uname -r); $nic ($HOST_IP side) driver $(basename "$(readlink /sys/class/net/$nic/device/driver)")"
  # What the device offloads decides whether the kernel can send from the pages (if installed).
  if command -v ethtool >/dev/null; then
    ethtool -k $nic | grep -E '^(scatter-gather|tx-checksumming|tcp-segmentation-offload|generic-segmentation-offload):' |
      tr -s ' \t' ' ' | paste -sd';' | sed "s/^/bench: $nic offloads: /"
  fi
  for i in 0 1; do
    d=/tmp/primary$i
    node_dir $d ${PRIMARY_IDS[$i]}
    config $d primary "0.0.0.0:10810" ${REPLICA_IDS[$i]} "$HOST_IP:${PORTS[$i]}" ${ZC[$i]} $SIZE
    RUST_LOG=info "$BIN" serve --config $d/ringblock.toml --listen 127.0.0.1:10809 \
      --web-listen 127.0.0.1:8080 --state-dir $d/state >$d/daemon.log 2>&1 &
    pid=$!
    for ((t = 0; t < 1200; t++)); do
      [[ -s $d/state/api-token.first ]] && curl -fs -o /dev/null -H "Authorization: Bearer $(cat $d/state/api-token.first)" http://127.0.0.1:8080/api/status && break
      kill -0 $pid 2>/dev/null || { cat $d/daemon.log; exit 1; }
      sleep 0.1
    done
    tok=$(cat $d/state/api-token.first)
    api() { curl -fs -H "Authorization: Bearer $tok" "$@"; }
    peer_state() { api http://127.0.0.1:8080/api/replication | jq -r '.volumes[0].peers[0].state'; }
    wait_state() { # STATE
      local s
      for ((t = 0; t < 600; t++)); do
        s=$(peer_state)
        [[ $s == "$1" ]] && return 0
        sleep 0.1
      done
      echo "bench: peer is $s, not $1"; tail -20 $d/daemon.log; return 1
    }
    counters() { # PHASE
      api http://127.0.0.1:8080/metrics | grep -E '^ringblock_reactor_(zero_copy|copied)' |
        sed "s/^/${ZC[$i]} $1 /" >>"$OUT/counters.txt"
    }
    write() { # what
      fio --name="$1" --ioengine=nbd --uri=nbd://127.0.0.1:10809/v --rw=write --bs=1M \
        --iodepth=8 --size=${MIB}m --offset=$(((${2:-0}) << 20)) --output-format=json \
        --output="$OUT/fio-$i-$1.json" >/dev/null
    }
    wait_state up-to-date
    grep -m1 "zero-copy sends unavailable" $d/daemon.log | sed 's/^/bench: /' || true
    counters start
    write follow 0
    counters follow
    api -X POST http://127.0.0.1:8080/api/volumes/v/replicas/${REPLICA_IDS[$i]}/suspend >/dev/null
    wait_state suspended
    write suspended $MIB
    counters suspended
    t0=$(date +%s%N)
    api -X POST http://127.0.0.1:8080/api/volumes/v/replicas/${REPLICA_IDS[$i]}/resume >/dev/null
    wait_state up-to-date
    t1=$(date +%s%N)
    counters resynced
    api http://127.0.0.1:8080/api/replication | jq -c ".volumes[0].peers[0].last_resync" |
      sed "s/^/${ZC[$i]} /" >>"$OUT/resync.txt"
    echo "bench: zero_copy_sends=${ZC[$i]}: resume to up-to-date $(((t1 - t0) / 1000000)) ms"
    kill -TERM $pid
    wait $pid || true
  done
  exit 0
fi

# ---- on the host: the replicas, the VM, the table --------------------------------------------
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${CARGO_TARGET_DIR:-$repo/target}/release/ringblock
mib=64 net=tap
args=("$@")
while (($#)); do
  case $1 in
    --bin) bin=$2; shift 2 ;;
    --mib) mib=$2; shift 2 ;;
    --net) net=$2; shift 2 ;;
    *) sed -n '2,25p' "$0"; exit 2 ;;
  esac
done
case $net in
  user) host_ip=10.0.2.2 ;;
  tap)
    host_ip=10.77.0.1
    if [[ -z ${REPL_ZC_NETNS:-} ]]; then
      # A network namespace of our own: the tap device and the replicas live there.
      exec unshare --net env REPL_ZC_NETNS=1 "$0" "${args[@]}"
    fi
    ip link set lo up
    ip tuntap add dev rbzc0 mode tap
    ip addr add $host_ip/24 dev rbzc0
    ip link set rbzc0 up
    export RINGBLOCK_VM_QEMU_ARGS="-netdev tap,id=net1,ifname=rbzc0,script=no,downscript=no,vnet_hdr=on -device virtio-net-pci,netdev=net1,mac=52:54:00:77:00:02,romfile="
    ;;
  *) echo "repl-zero-copy: --net tap or user" >&2; exit 2 ;;
esac
[[ -x $bin ]] || { echo "repl-zero-copy: no ringblock binary at $bin (cargo build --release)" >&2; exit 2; }
OUT=${OUT:-$(mktemp -d /tmp/repl-zero-copy.XXXXXX)}
mkdir -p "$OUT"
rm -f "$OUT/counters.txt" "$OUT/resync.txt"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait || true; }
trap cleanup EXIT
ports=()
for i in 0 1; do
  d=$OUT/replica$i
  node_dir "$d" ${REPLICA_IDS[$i]}
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  ports+=("$port")
  listen=127.0.0.1:$port
  [[ $net == user ]] || listen=$host_ip:$port
  config "$d" replica "$listen" ${PRIMARY_IDS[$i]} "10.0.2.15:10810" ${ZC[$i]} $((2 * mib + 64))
  "$bin" serve --config "$d/ringblock.toml" --listen 127.0.0.1:0 --web-listen 127.0.0.1:0 \
    --state-dir "$d/state" >"$d/daemon.log" 2>&1 &
  pids+=($!)
done
echo "repl-zero-copy: host load before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs); replicas on ${listen%:*}:${ports[0]} and :${ports[1]} (--net $net)"
"$repo/tests/vm/harness/run.sh" --timeout 1500 --mem 3072 --share "$OUT" "$0" --guest "$(realpath "$bin")" "$mib" "${ports[0]}" "${ports[1]}" "$host_ip" |
  grep -E '^(bench|ringblock):' || true
[[ -s $OUT/counters.txt ]] || { echo "repl-zero-copy: the guest produced no counters" >&2; exit 1; }
python3 - "$OUT" "$mib" <<'PY'
import collections, json, sys, pathlib
out, mib = pathlib.Path(sys.argv[1]), int(sys.argv[2])
# zc phase metric value -> summed over reactors
c = collections.defaultdict(float)
for line in (out / "counters.txt").read_text().splitlines():
    zc, phase, series, value = line.split(" ")
    name = series.split("{")[0]
    if "reason=" in series:
        name += "{" + series.split("reason=")[1].split('"')[1] + "}"
    c[(zc, phase, name)] += float(value)
names = ["ringblock_reactor_zero_copy_sends_total", "ringblock_reactor_zero_copy_kernel_copied_total",
         "ringblock_reactor_copied_sends_total{small}", "ringblock_reactor_copied_sends_total{unsupported}"]
short = ["zero-copy", "kernel copied", "copied (small)", "copied (unsupported)"]
rs = {}
for line in (out / "resync.txt").read_text().splitlines():
    zc, js = line.split(" ", 1)
    rs[zc] = json.loads(js)
print(f"| zero_copy_sends | phase ({mib} MiB) | " + " | ".join(short) + " |")
print("|---|---|" + "---|" * len(short))
for zc in ["true", "false"]:
    prev = "start"
    for phase in ["follow", "resynced"]:
        # "resynced" counts from after the suspended writes (which send nothing).
        base = "suspended" if phase == "resynced" else prev
        d = [int(c[(zc, phase, n)] - c[(zc, base, n)]) for n in names]
        label = {"follow": "writes, replica following", "resynced": "resync after suspend"}[phase]
        print(f"| {zc} | {label} | " + " | ".join(str(x) for x in d) + " |")
        prev = phase
for zc, r in rs.items():
    if r and r.get("finished_unix_ms"):
        s = (r["finished_unix_ms"] - r["started_unix_ms"]) / 1000
        print(f"repl-zero-copy: zero_copy_sends={zc}: resync {r['done_bytes'] >> 20} MiB in {s:.2f} s = {r['done_bytes'] / 1048576 / max(s, 1e-3):.1f} MiB/s (TCG)")
print(f"repl-zero-copy: results in {out}")
PY
