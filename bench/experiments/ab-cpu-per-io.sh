#!/usr/bin/env bash
# Paired A/B of two ringblock binaries: server CPU per IO at a fixed rate (4 KiB random reads,
# QD32, 20k IOPS by default), with fio's nbd engine and the lean client, against nbdkit memory
# in the same rounds. Every server runs the whole time; the order alternates each round
# (the place alone moves a pair by a few percent). CPU is the sum of the server's threads'
# /proc/PID/task/*/schedstat (nanoseconds), over 6 s after 1 s of warm-up.
#
#   bench/experiments/ab-cpu-per-io.sh ROUNDS RINGBLOCK_A RINGBLOCK_B [CLIENT_CPU]
#
# CLIENT_CPU pins the client (taskset); by default it runs where the scheduler puts it.
# Needs fio, nbdkit and ringblock-bench (RINGBLOCK_BENCH, default: next to RINGBLOCK_A).
set -euo pipefail
rounds=$1 bin_a=$2 bin_b=$3 client_cpu=${4:-}
bench=${RINGBLOCK_BENCH:-$(dirname "$bin_a")/ringblock-bench}
rate=${RATE_IOPS:-20000}
dir=$(mktemp -d /tmp/ab-cpu.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
pin=()
[[ -n $client_cpu ]] && pin=(taskset -c "$client_cpu")

region=1072693248
cat >"$dir/rb.toml" <<EOF
[[device]]
name = "ram0"
kind = "ram"
size_bytes = $((region + (64 << 20)))

[[volume]]
name = "bench"
device = "ram0"
size_bytes = $region
EOF
"$bin_a" serve --config "$dir/rb.toml" --cores 0 --unix "$dir/a.sock" --listen 127.0.0.1:0 --no-web >"$dir/a.log" 2>&1 &
pids+=($!) && pid_a=$!
"$bin_b" serve --config "$dir/rb.toml" --cores 0 --unix "$dir/b.sock" --listen 127.0.0.1:0 --no-web >"$dir/b.log" 2>&1 &
pids+=($!) && pid_b=$!
nbdkit -f --exit-with-parent -e bench -U "$dir/k.sock" memory "$region" &
pids+=($!) && pid_k=$!
for s in a b k; do
  for _ in $(seq 50); do [[ -S $dir/$s.sock ]] && break; sleep 0.1; done
  # Written data, so reads are served from memory rather than as holes.
  "$bench" load --unix "$dir/$s.sock" --export bench --qd 32 --read-percent 0 --sequential \
    --bs 1048576 --runtime-s 2 --range-mib 256 >/dev/null
done

cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {print s}'; }
# Server CPU in µs per IO while `client` drives `sock` at the fixed rate.
measure() {
  local pid=$1 client=$2 sock=$3
  if [[ $client == lean ]]; then
    "${pin[@]}" "$bench" load --unix "$sock" --export bench --qd 32 --rate-iops "$rate" \
      --runtime-s 8 --range-mib 256 >/dev/null &
  else
    "${pin[@]}" fio --name=r --ioengine=nbd --uri="nbd+unix:///bench?socket=$sock" \
      --rw=randread --bs=4k --iodepth=32 --rate_iops="$rate" --time_based --runtime=8 \
      --size=256m >/dev/null 2>&1 &
  fi
  local load=$!
  sleep 1
  local a b
  a=$(cpu_ns "$pid")
  sleep 6
  b=$(cpu_ns "$pid")
  wait "$load"
  awk -v a="$a" -v b="$b" -v n=$((rate * 6)) 'BEGIN {printf "%.2f", (b - a) / 1e3 / n}'
}

echo "round client nbdkit A B B/A A/nbdkit B/nbdkit (server µs per IO at $rate IOPS)"
for i in $(seq "$rounds"); do
  for client in fio lean; do
    if ((i % 2)); then order="k a b"; else order="b a k"; fi
    declare -A v=()
    for s in $order; do
      case $s in a) pid=$pid_a ;; b) pid=$pid_b ;; k) pid=$pid_k ;; esac
      v[$s]=$(measure "$pid" "$client" "$dir/$s.sock")
    done
    awk -v i="$i" -v c="$client" -v k="${v[k]}" -v a="${v[a]}" -v b="${v[b]}" \
      'BEGIN {printf "%s %s %s %s %s %.3f %.3f %.3f\n", i, c, k, a, b, b / a, a / k, b / k}'
  done
done
