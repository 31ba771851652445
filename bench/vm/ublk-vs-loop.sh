#!/bin/bash
# ublk vs loop, 4k random read at QD32, in one VM run (../shared/vm: TCG, so only the ratio means
# anything). In the guest: /dev/ublkbN on a ringblock RAM volume, and a kernel loop device on a
# tmpfs file of the same size; both filled with the same data first; fio (io_uring, O_DIRECT)
# alternates between them, ROUNDS times each; prints IOPS and the ratio ublk/loop (target >= 1).
#
#   bench/vm/ublk-vs-loop.sh [--bin PATH] [--cores LIST] [--runtime S] [--rounds N]
#     --bin      ringblock binary (default: target/release/ringblock, or $CARGO_TARGET_DIR's)
#     --cores    reactor cores for the daemon, e.g. 0,1 (default: the daemon's default)
#     --poll-idle-us  the daemon's busy-poll window before a reactor parks (default: profile's)
#     --fio      fio options for both devices (default: --cpus_allowed=0: fio on CPU 0, the
#                daemon's reactor pins itself to the last CPU, the loop worker floats)
#   Results: the ratio on stdout, JSON in $OUT (default: a temp dir, path printed).
set -euo pipefail

if [[ ${1:-} == --guest ]]; then
  # ---- inside the VM -------------------------------------------------------------------------
  shift
  BIN=$1 CORES=$2 RUNTIME=$3 ROUNDS=$4 FIO_EXTRA=${5:-} POLL_IDLE_US=${6:-}
  OUT=${VM_SHARE:-/tmp}
  cd /tmp
  SIZE_MIB=256
  cores_line=""
  [[ -z $CORES ]] || cores_line="cores = [$CORES]"
  [[ -z $POLL_IDLE_US ]] || cores_line="$cores_line
poll_idle_us = $POLL_IDLE_US"
  cat >/tmp/bench.toml <<TOML
$cores_line
[[device]]
name = "ram0"
kind = "ram"
size_bytes = $(((SIZE_MIB + 64) << 20))
[[volume]]
name = "bench"
device = "ram0"
size_bytes = $((SIZE_MIB << 20))
[[export]]
kind = "ublk"
volume = "bench"
[ublk]
state_dir = "/run/ringblock"
[nbd]
listen = ["127.0.0.1:0"]
TOML
  RUST_LOG=warn "$BIN" serve --config /tmp/bench.toml >/tmp/daemon.log 2>&1 &
  pid=$!
  for ((i = 0; i < 1200; i++)); do
    grep -q '^ringblock: ready' /tmp/daemon.log && break
    kill -0 $pid 2>/dev/null || { cat /tmp/daemon.log; exit 1; }
    sleep 0.1
  done
  grep '^ringblock: \(ublk\|engine\)' /tmp/daemon.log
  ublk=$(sed -n 's|^ringblock: ublk \(/dev/ublkb[0-9]*\) serves.*|\1|p' /tmp/daemon.log)
  [[ -b $ublk ]] || { echo "bench: no ublk device"; cat /tmp/daemon.log; exit 1; }
  truncate -s $((SIZE_MIB << 20)) /dev/shm/loop.img
  loop=$(losetup -f --show /dev/shm/loop.img)
  for d in "$ublk" "$loop"; do
    q=/sys/block/${d#/dev/}/queue
    echo "bench: $d: scheduler $(cat $q/scheduler), hw queues $(ls /sys/block/${d#/dev/}/mq | wc -l), nr_requests $(cat $q/nr_requests)"
  done
  # Same data in both (random, so nothing is a hole or a zero page).
  head -c $((SIZE_MIB << 20)) /dev/urandom >/dev/shm/data
  dd if=/dev/shm/data of="$ublk" bs=1M oflag=direct conv=fsync status=none
  dd if=/dev/shm/data of="$loop" bs=1M oflag=direct conv=fsync status=none
  rm /dev/shm/data
  run() { # DEV NAME ROUND
    fio --name="$2" --filename="$1" --ioengine=io_uring --direct=1 --rw=randread --bs=4k $FIO_EXTRA \
      --iodepth=32 --iodepth_batch_submit=8 --iodepth_batch_complete_min=1 --time_based \
      --runtime="$RUNTIME" --ramp_time=2 --randrepeat=0 --norandommap \
      --output-format=json --output="$OUT/$2-$3.json" >/dev/null
    local iops
    iops=$(sed -n 's/.*"iops" : \([0-9.]*\),.*/\1/p' "$OUT/$2-$3.json" | head -n 1)
    echo "bench: round $3 $2 ($1): $iops IOPS"
    echo "$iops" >>"$OUT/$2.iops"
  }
  # Alternate the order each round: the host's other load drifts, so compare neighbours.
  for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2)); then
      run "$ublk" ublk "$r"
      run "$loop" loop "$r"
    else
      run "$loop" loop "$r"
      run "$ublk" ublk "$r"
    fi
  done
  losetup -d "$loop"
  kill -TERM $pid
  wait $pid
  exit 0
fi

# ---- on the host ---------------------------------------------------------------------------
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${CARGO_TARGET_DIR:-$repo/target}/release/ringblock
cores="" runtime=8 rounds=6 fio_extra="--cpus_allowed=0" poll_idle_us=""
while (($#)); do
  case $1 in
    --bin) bin=$2; shift 2 ;;
    --cores) cores=$2; shift 2 ;;
    --poll-idle-us) poll_idle_us=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --fio) fio_extra=$2; shift 2 ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
  esac
done
[[ -x $bin ]] || { echo "ublk-vs-loop: no ringblock binary at $bin (cargo build --release)" >&2; exit 2; }
OUT=${OUT:-$(mktemp -d /tmp/ublk-vs-loop.XXXXXX)}
mkdir -p "$OUT"
"$repo/../shared/vm/run.sh" --timeout 1200 --share "$OUT" "$0" --guest "$(realpath "$bin")" "$cores" "$runtime" "$rounds" "$fio_extra" "$poll_idle_us" |
  grep -E '^(bench|ringblock):' || true
[[ -s $OUT/ublk.iops && -s $OUT/loop.iops ]] || { echo "ublk-vs-loop: the guest produced no results" >&2; exit 1; }
python3 - "$OUT" <<'PY'
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
u = [float(x) for x in (out / "ublk.iops").read_text().split()]
l = [float(x) for x in (out / "loop.iops").read_text().split()]
mu, ml = statistics.median(u), statistics.median(l)
ratios = [a / b for a, b in zip(u, l)]
ratio = statistics.median(ratios)
res = {"ublk_iops": u, "loop_iops": l, "ublk_median": mu, "loop_median": ml,
       "round_ratios": ratios, "ratio": ratio}
(out / "result.json").write_text(json.dumps(res, indent=2) + "\n")
print(f"ublk-vs-loop: per-round ratios {' '.join(f'{r:.2f}' for r in ratios)}")
print(f"ublk-vs-loop: 4k randread QD32 (TCG VM, {len(u)} rounds): ublk median {mu:.0f} IOPS, loop median {ml:.0f} IOPS, ratio ublk/loop = {ratio:.2f} (median of per-round ratios; target >= 1.0)")
print(f"ublk-vs-loop: results in {out}")
PY
