#!/bin/bash
# ublk vs loop, 4k random read at QD32, in one VM run (tests/vm/harness: TCG, so only the ratio means
# anything). In the guest: /dev/ublkbN on a ringblock RAM volume, and a kernel loop device on a
# tmpfs file of the same size; both filled with the same data first; fio (io_uring, O_DIRECT)
# alternates between them, ROUNDS times each; prints IOPS and the ratio ublk/loop (target >= 1).
#
#   bench/vm/ublk-vs-loop.sh [--bin PATH] [--cores LIST] [--runtime S] [--rounds N]
#     --bin      ringblock binary (default: target/release/ringblock, or $CARGO_TARGET_DIR's)
#     --cores    reactor cores for the daemon, e.g. 0,1 (default: the daemon's default)
#     --poll-idle-us  the daemon's busy-poll window before a reactor parks (default: profile's)
#     --user-copy 0|1|both  [ublk] user_copy (default 1: USER_COPY where the kernel has it);
#                both: a second daemon with user_copy = false, its device ("ublktag") measured too
#     --thp MODE  the guest's transparent_hugepage/enabled before the daemons start (always,
#                madvise, never; default: the guest kernel's, `always` on Debian's 6.12)
#     --fio      fio options for both devices (default: --cpus_allowed=0: fio on CPU 0, the
#                daemon's reactor pins itself to the last CPU, the loop worker floats)
#   Results: the ratio on stdout, JSON in $OUT (default: a temp dir, path printed).
set -euo pipefail

if [[ ${1:-} == --guest ]]; then
  # ---- inside the VM -------------------------------------------------------------------------
  shift
  BIN=$1 CORES=$2 RUNTIME=$3 ROUNDS=$4 FIO_EXTRA=${5:-} POLL_IDLE_US=${6:-} USER_COPY=${7:-1} THP=${8:-}
  OUT=${VM_SHARE:-/tmp}
  cd /tmp
  SIZE_MIB=256
  cores_line=""
  [[ -z $CORES ]] || cores_line="cores = [$CORES]"
  [[ -z $POLL_IDLE_US ]] || cores_line="$cores_line
poll_idle_us = $POLL_IDLE_US"
  thp=/sys/kernel/mm/transparent_hugepage/enabled
  [[ -z $THP ]] || echo "$THP" >$thp
  echo "bench: guest THP $(cat $thp)"
  # start_daemon TAG USER_COPY: a daemon with one RAM volume exported as ublk; sets $dev, $pid.
  start_daemon() {
    local tag=$1 uc=$2 i
    cat >/tmp/bench-$tag.toml <<TOML
$cores_line
[[device]]
name = "ram-$tag"
kind = "ram"
size_bytes = $(((SIZE_MIB + 64) << 20))
[[volume]]
name = "bench-$tag"
device = "ram-$tag"
size_bytes = $((SIZE_MIB << 20))
[[export]]
kind = "ublk"
volume = "bench-$tag"
[ublk]
state_dir = "/run/ringblock-$tag"
user_copy = $([[ $uc == 0 ]] && echo false || echo true)
[nbd]
listen = ["127.0.0.1:0"]
[web]
enabled = false
TOML
    RUST_LOG=warn "$BIN" serve --config /tmp/bench-$tag.toml >/tmp/daemon-$tag.log 2>&1 &
    pid=$!
    for ((i = 0; i < 1200; i++)); do
      grep -q '^ringblock: ready' /tmp/daemon-$tag.log && break
      kill -0 $pid 2>/dev/null || { cat /tmp/daemon-$tag.log; exit 1; }
      sleep 0.1
    done
    grep '^ringblock: \(ublk\|engine\)' /tmp/daemon-$tag.log
    dev=$(sed -n 's|^ringblock: ublk \(/dev/ublkb[0-9]*\) serves.*|\1|p' /tmp/daemon-$tag.log)
    [[ -b $dev ]] || { echo "bench: no ublk device"; cat /tmp/daemon-$tag.log; exit 1; }
  }
  # NAME -> device and daemon pid ("loop" has no daemon).
  declare -A DEV PID
  names=(ublk)
  if [[ $USER_COPY == both ]]; then
    start_daemon uc 1
    DEV[ublk]=$dev PID[ublk]=$pid
    start_daemon tag 0
    DEV[ublktag]=$dev PID[ublktag]=$pid
    names+=(ublktag)
  else
    start_daemon uc "$USER_COPY"
    DEV[ublk]=$dev PID[ublk]=$pid
  fi
  ublk=${DEV[ublk]}
  truncate -s $((SIZE_MIB << 20)) /dev/shm/loop.img
  loop=$(losetup -f --show /dev/shm/loop.img)
  DEV[loop]=$loop
  names+=(loop)
  for n in "${names[@]}"; do
    d=${DEV[$n]}
    q=/sys/block/${d#/dev/}/queue
    echo "bench: $d: scheduler $(cat $q/scheduler), hw queues $(ls /sys/block/${d#/dev/}/mq | wc -l), nr_requests $(cat $q/nr_requests)"
  done
  # Same data in both (random, so nothing is a hole or a zero page).
  head -c $((SIZE_MIB << 20)) /dev/urandom >/dev/shm/data
  for n in "${names[@]}"; do
    dd if=/dev/shm/data of="${DEV[$n]}" bs=1M oflag=direct conv=fsync status=none
  done
  rm /dev/shm/data
  # CPU ticks (user + system) the daemon has used so far, and the guest's busy ticks.
  daemon_ticks() { # NAME
    if [[ -n ${PID[$1]:-} ]]; then awk '{print $14 + $15}' "/proc/${PID[$1]}/stat"; else echo 0; fi
  }
  guest_busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
  hz=$(getconf CLK_TCK)
  run() { # DEV NAME ROUND
    local d0 g0 t0 d1 g1 t1
    d0=$(daemon_ticks "$2") g0=$(guest_busy) t0=$(date +%s%N)
    fio --name="$2" --filename="$1" --ioengine=io_uring --direct=1 --rw=randread --bs=4k $FIO_EXTRA \
      --iodepth=32 --iodepth_batch_submit=8 --iodepth_batch_complete_min=1 --time_based \
      --runtime="$RUNTIME" --ramp_time=2 --randrepeat=0 --norandommap \
      --output-format=json --output="$OUT/$2-$3.json" >/dev/null
    d1=$(daemon_ticks "$2") g1=$(guest_busy) t1=$(date +%s%N)
    local iops usr sys wall
    iops=$(sed -n 's/.*"iops" : \([0-9.]*\),.*/\1/p' "$OUT/$2-$3.json" | head -n 1)
    usr=$(sed -n 's/.*"usr_cpu" : \([0-9.]*\),.*/\1/p' "$OUT/$2-$3.json" | head -n 1)
    sys=$(sed -n 's/.*"sys_cpu" : \([0-9.]*\),.*/\1/p' "$OUT/$2-$3.json" | head -n 1)
    # Over the whole fio run (ramp included): the daemon's CPU and all guest CPUs' busy share,
    # in % of one CPU.
    wall=$(((t1 - t0) / 1000000))
    echo "bench: round $3 $2 ($1): $iops IOPS; fio usr ${usr}% sys ${sys}%; daemon $(((d1 - d0) * 100000 / hz / wall))%; guest busy $(((g1 - g0) * 100000 / hz / wall))% of one CPU"
    [[ -z ${PID[$2]:-} ]] || echo "bench: round $3 $2: daemon $(grep -E '^(Rss|AnonHugePages):' /proc/${PID[$2]}/smaps_rollup | tr -s ' ' | tr '\n' ' ')"
    echo "$iops" >>"$OUT/$2.iops"
  }
  # Rotate the order each round: the host's other load drifts, so compare neighbours.
  for ((r = 1; r <= ROUNDS; r++)); do
    k=${#names[@]}
    for ((j = 0; j < k; j++)); do
      n=${names[$(((j + r - 1) % k))]}
      run "${DEV[$n]}" "$n" "$r"
    done
  done
  losetup -d "$loop"
  for p in "${PID[@]}"; do kill -TERM "$p"; done
  for p in "${PID[@]}"; do wait "$p"; done
  exit 0
fi

# ---- on the host ---------------------------------------------------------------------------
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${CARGO_TARGET_DIR:-$repo/target}/release/ringblock
cores="" runtime=8 rounds=6 fio_extra="--cpus_allowed=0" poll_idle_us="" user_copy=1 thp=""
while (($#)); do
  case $1 in
    --bin) bin=$2; shift 2 ;;
    --cores) cores=$2; shift 2 ;;
    --poll-idle-us) poll_idle_us=$2; shift 2 ;;
    --user-copy) user_copy=$2; shift 2 ;;
    --thp) thp=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --fio) fio_extra=$2; shift 2 ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
  esac
done
[[ -x $bin ]] || { echo "ublk-vs-loop: no ringblock binary at $bin (cargo build --release)" >&2; exit 2; }
OUT=${OUT:-$(mktemp -d /tmp/ublk-vs-loop.XXXXXX)}
mkdir -p "$OUT"
echo "ublk-vs-loop: host load before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs)"
"$repo/tests/vm/harness/run.sh" --timeout 1200 --share "$OUT" "$0" --guest "$(realpath "$bin")" "$cores" "$runtime" "$rounds" "$fio_extra" "$poll_idle_us" "$user_copy" "$thp" |
  grep -E '^(bench|ringblock):' || true
echo "ublk-vs-loop: host load after: $(cut -d' ' -f1-3 /proc/loadavg)"
[[ -s $OUT/ublk.iops && -s $OUT/loop.iops ]] || { echo "ublk-vs-loop: the guest produced no results" >&2; exit 1; }
python3 - "$OUT" <<'PY'
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
def load(name):
    f = out / f"{name}.iops"
    return [float(x) for x in f.read_text().split()] if f.exists() else None
u, l, t = load("ublk"), load("loop"), load("ublktag")
def ratios(a, b):
    return [x / y for x, y in zip(a, b)]
res = {"ublk_iops": u, "loop_iops": l, "ublk_median": statistics.median(u),
       "loop_median": statistics.median(l), "round_ratios": ratios(u, l),
       "ratio": statistics.median(ratios(u, l))}
if t:
    res.update({"ublktag_iops": t, "ublktag_median": statistics.median(t),
                "ublktag_round_ratios": ratios(t, l),
                "ublktag_ratio": statistics.median(ratios(t, l)),
                "user_copy_gain": statistics.median(ratios(u, t))})
(out / "result.json").write_text(json.dumps(res, indent=2) + "\n")
print(f"ublk-vs-loop: per-round ratios {' '.join(f'{r:.2f}' for r in res['round_ratios'])}")
print(f"ublk-vs-loop: 4k randread QD32 (TCG VM, {len(u)} rounds): ublk median {res['ublk_median']:.0f} IOPS, loop median {res['loop_median']:.0f} IOPS, ratio ublk/loop = {res['ratio']:.2f} (median of per-round ratios; target >= 1.0)")
if t:
    print(f"ublk-vs-loop: tag-buffer ublk: per-round ratios to loop {' '.join(f'{r:.2f}' for r in res['ublktag_round_ratios'])}; median {res['ublktag_median']:.0f} IOPS, ratio to loop {res['ublktag_ratio']:.2f}; user_copy/tag_buffer {res['user_copy_gain']:.2f} (median of per-round ratios)")
print(f"ublk-vs-loop: results in {out}")
PY
