#!/bin/bash
# Where the CPU goes during fio 4k random read QD32 on /dev/ublkbN (ringblock RAM volume) in the
# TCG VM: `perf record -e cpu-clock` system-wide (TCG has no PMU) while fio runs, then the top
# symbols overall and of the daemon alone. Companion of ublk-vs-loop.sh (same fio job).
#
#   bench/vm/ublk-profile.sh [--bin PATH] [--runtime S] [--poll-idle-us N] [--user-copy 0|1]
#   Results: the reports on stdout and in $OUT (default: a temp dir, path printed).
set -euo pipefail

if [[ ${1:-} == --guest ]]; then
  shift
  BIN=$1 RUNTIME=$2 POLL_IDLE_US=$3 USER_COPY=$4
  OUT=${VM_SHARE:-/tmp}
  cd /tmp
  poll_line=""
  [[ -z $POLL_IDLE_US ]] || poll_line="poll_idle_us = $POLL_IDLE_US"
  cat >/tmp/p.toml <<TOML
$poll_line
[[device]]
name = "ram0"
kind = "ram"
size_bytes = $((320 << 20))
[[volume]]
name = "bench"
device = "ram0"
size_bytes = $((256 << 20))
[[export]]
kind = "ublk"
volume = "bench"
[ublk]
state_dir = "/run/ringblock"
user_copy = $([[ $USER_COPY == 0 ]] && echo false || echo true)
[nbd]
listen = ["127.0.0.1:0"]
[web]
enabled = false
TOML
  RUST_LOG=warn "$BIN" serve --config /tmp/p.toml >/tmp/daemon.log 2>&1 &
  pid=$!
  for ((i = 0; i < 1200; i++)); do
    grep -q '^ringblock: ready' /tmp/daemon.log && break
    kill -0 $pid 2>/dev/null || { cat /tmp/daemon.log; exit 1; }
    sleep 0.1
  done
  grep '^ringblock: ublk' /tmp/daemon.log | sed 's/^/profile: /'
  dev=$(sed -n 's|^ringblock: ublk \(/dev/ublkb[0-9]*\) serves.*|\1|p' /tmp/daemon.log)
  head -c $((256 << 20)) /dev/urandom | dd of="$dev" bs=1M oflag=direct iflag=fullblock conv=fsync status=none
  echo 0 >/proc/sys/kernel/kptr_restrict 2>/dev/null || true
  echo -1 >/proc/sys/kernel/perf_event_paranoid 2>/dev/null || true
  fio --name=p --filename="$dev" --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
    --cpus_allowed=0 --iodepth=32 --iodepth_batch_submit=8 --iodepth_batch_complete_min=1 \
    --time_based --runtime="$RUNTIME" --ramp_time=2 --randrepeat=0 --norandommap \
    --output-format=json --output="$OUT/fio.json" >/dev/null &
  fio_pid=$!
  sleep 3
  perf record -e cpu-clock -F 999 -a -g -o /tmp/perf.data -- sleep $((RUNTIME - 2)) 2>/tmp/perf-record.err ||
    { cat /tmp/perf-record.err; echo "profile: perf record failed"; }
  wait $fio_pid
  echo "profile: daemon $(grep -E '^(Rss|AnonHugePages):' /proc/$pid/smaps_rollup | tr -s ' ' | tr '\n' ' ')"
  echo "profile: thp $(grep -E '^thp_(fault_alloc|fault_fallback|collapse_alloc) ' /proc/vmstat | tr '\n' ' ')"
  echo "profile: fio $(sed -n 's/.*"iops" : \([0-9.]*\),.*/\1/p' "$OUT/fio.json" | head -n 1) IOPS"
  rep() { perf report -i /tmp/perf.data --no-children --stdio -g none "$@" 2>/dev/null | grep -v '^#' | grep -v '^$'; }
  echo "profile: ---- samples by command (2 CPUs; swapper = idle)"
  rep --sort comm | head -n 12 | sed 's/^/profile: /' | tee "$OUT/report-comm.txt"
  echo "profile: ---- top symbols, all"
  rep --sort comm,dso,sym --percent-limit 0.5 | head -n 40 | sed 's/^/profile: /' | tee "$OUT/report-all.txt"
  echo "profile: ---- the daemon only (% of all samples)"
  rep --pid "$pid" --sort sym --percent-limit 0.2 | head -n 60 | sed 's/^/profile: /' | tee "$OUT/report-daemon.txt"
  cp /tmp/perf.data "$OUT/" && cat /proc/kallsyms >"$OUT/kallsyms"
  kill -TERM $pid
  wait $pid
  exit 0
fi

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${CARGO_TARGET_DIR:-$repo/target}/release/ringblock
runtime=12 poll_idle_us="" user_copy=1
while (($#)); do
  case $1 in
    --bin) bin=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --poll-idle-us) poll_idle_us=$2; shift 2 ;;
    --user-copy) user_copy=$2; shift 2 ;;
    *) sed -n '2,7p' "$0"; exit 2 ;;
  esac
done
[[ -x $bin ]] || { echo "ublk-profile: no ringblock binary at $bin" >&2; exit 2; }
OUT=${OUT:-$(mktemp -d /tmp/ublk-profile.XXXXXX)}
mkdir -p "$OUT"
echo "ublk-profile: host load before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$repo/tests/vm/harness/run.sh" --timeout 900 --share "$OUT" "$0" --guest "$(realpath "$bin")" "$runtime" "$poll_idle_us" "$user_copy" |
  grep -E '^profile:' || true
echo "ublk-profile: host load after: $(cut -d' ' -f1-3 /proc/loadavg); results in $OUT"
