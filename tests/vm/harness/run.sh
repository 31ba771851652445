#!/bin/bash
# Runs one command as root in the kernel-test VM and exits with its exit status.
#
#   run.sh [OPTIONS] SCRIPT [ARGS...]      a script (by its #! line if executable, else bash)
#   run.sh [OPTIONS] -- COMMAND [ARGS...]
#
#   --timeout SECS  for the whole run, boot included (default 600)
#   --share DIR     a host dir the guest can write, at /tmp/share ($VM_SHARE) and at DIR itself
#                   (default: a temporary dir, removed afterwards)
#   --mem MIB       guest memory (default 2048)
#   --smp N         guest CPUs (default 2)
#   --show DIR      a host dir under /tmp or /run the guest must see (repeatable): the guest has
#                   its own /tmp and /run; the working dir and the script's dir are shown anyway
#
# The guest sees this machine's / read-only and starts in the current directory; the guest
# console goes to stdout. Exit status: the command's; 124 on timeout; 125 when the guest did not
# run the command to its end (boot failure, kernel panic). setup.sh runs first (fast once done).
# Env: RINGBLOCK_VM_ACCEL   qemu accelerator (default TCG; "kvm" where /dev/kvm works)
#      RINGBLOCK_VM_APPEND  extra kernel command line
#      RINGBLOCK_VM_QEMU_ARGS  extra qemu arguments, split on spaces (e.g. a second NIC)
set -euo pipefail
harness=$(cd "$(dirname "$0")" && pwd)
usage() {
  sed -n '4,14p' "$0" | cut -c3- >&2
  exit 2
}
timeout_s=600 share='' mem_mib=2048 cpus=2 command_kind='' shown=()
while (($#)); do
  case $1 in
    --timeout) timeout_s=$2 && shift 2 ;;
    --share) share=$2 && shift 2 ;;
    --mem) mem_mib=$2 && shift 2 ;;
    --smp) cpus=$2 && shift 2 ;;
    --show) shown+=("$(realpath -e "$2")") && shift 2 ;;
    --) command_kind=argv && shift && break ;;
    -h | --help) usage ;;
    -*) echo "run.sh: unknown option $1" >&2 && usage ;;
    *) command_kind=script && break ;;
  esac
done
(($#)) || usage

initrd=$("$harness/setup.sh")
cache=$(dirname "$initrd")
kernel=$cache/vmlinux # the uncompressed kernel boots faster (see setup.sh)
[[ -s $kernel ]] || kernel=$cache/vmlinuz

# The control dir: what to run goes in, the exit status comes back.
ctl=$(mktemp -d)
qemu_pid=''
cleanup() {
  [[ -z $qemu_pid ]] || kill -TERM "$qemu_pid" 2>/dev/null || true
  rm -rf "$ctl"
}
trap cleanup EXIT
trap 'echo "vm: interrupted" >&2; exit 130' INT TERM
if [[ -z $share ]]; then
  share=$ctl/share && mkdir "$share"
else
  mkdir -p "$share" && share=$(cd "$share" && pwd -P)
fi
echo "$share" >"$ctl/share_path"
echo "$PWD" >"$ctl/cwd"
printf '%s\n' "$PWD" "${shown[@]}" >"$ctl/visible"
if [[ $command_kind == script ]]; then
  script=$(realpath -e "$1") && shift
  echo "${script%/*}" >>"$ctl/visible"
  if [[ -x $script ]]; then set -- "$script" "$@"; else set -- bash "$script" "$@"; fi
fi
printf '%q ' "$@" >"$ctl/command"

# 9p options are separated by commas: a comma in a path is written twice.
p9=security_model=none,multidevs=remap
# -no-reboot: the guest's reset at the end makes qemu exit.
timeout -k 10 "$timeout_s" qemu-system-x86_64 \
  -accel "${RINGBLOCK_VM_ACCEL:-tcg,thread=multi}" -cpu max -m "$mem_mib" -smp "$cpus" \
  -nodefaults -display none -no-reboot -serial stdio \
  -bios /usr/share/qemu/qboot.rom -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyS0 quiet panic=-1 mitigations=off ${RINGBLOCK_VM_APPEND:-}" \
  -virtfs "local,path=/,mount_tag=hostroot,readonly=on,$p9" \
  -virtfs "local,path=${ctl//,/,,},mount_tag=ctl,$p9" \
  -virtfs "local,path=${share//,/,,},mount_tag=share,$p9" \
  -netdev user,id=net0 -device virtio-net-pci,netdev=net0,romfile= \
  ${RINGBLOCK_VM_QEMU_ARGS:-} \
  </dev/null &
qemu_pid=$!
qemu_status=0
wait "$qemu_pid" || qemu_status=$?
qemu_pid=''

if [[ -s $ctl/status ]]; then
  exit "$(cat "$ctl/status")"
fi
if [[ -e $ctl/started ]]; then
  what="the command did not run to its end"
else
  what="the guest did not start the command (boot failure? the console is above)"
fi
if ((qemu_status == 124)); then
  echo "vm: timeout after ${timeout_s}s: $what" >&2
  exit 124
fi
echo "vm: $what; qemu exit status $qemu_status" >&2
exit 125
