#!/bin/bash
# Prepares the kernel-test VM and prints the path of its initramfs (the kernel lies beside it). Safe to run again and from
# several processes at once: a second run only checks (well under a second).
#
#   1. host packages: qemu-system-x86 and what packs the initramfs (needs root to install)
#   2. a Debian 6.12 kernel (it has ublk_drv and nbd), fetched with `apt-get download` and
#      unpacked into the cache, never installed on the host
#   3. an initramfs: static busybox, the modules the tests load, and ./init
#
# Env: RINGBLOCK_VM_CACHE  the cache (default ${XDG_CACHE_HOME:-~/.cache}/ringblock-vm, ~200 MB)
#      RINGBLOCK_VM_KERNEL a linux-image package name (default: the newest 6.12 one apt offers)
set -euo pipefail
harness=$(cd "$(dirname "$0")" && pwd)
cache=${RINGBLOCK_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ringblock-vm}
mkdir -p "$cache"
exec 8>"$cache/lock"
flock 8 # concurrent runs: the first prepares, the others wait and then find everything ready
export DEBIAN_FRONTEND=noninteractive
note() { echo "vm setup: $*" >&2; }
die() {
  echo "vm setup: $*" >&2
  exit 1
}
work=''
trap '[[ -z $work ]] || rm -rf "$work"' EXIT

# Modules loaded in the guest, by name; their dependencies are found below. The first group is
# needed before the guest can reach the host's files; the second loads while it mounts them.
boot_modules=(virtio_net 9pnet_virtio 9p)
test_modules=(ext4 loop nbd ublk_drv)

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
debian_major=$(. /etc/os-release && echo "${VERSION_ID:-}")

# --- 1. host packages --------------------------------------------------------------------------
have_pkg() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == 'install ok installed' ]]; }
packages=(qemu-system-x86 busybox-static cpio kmod xz-utils zstd)
missing=()
for p in "${packages[@]}"; do have_pkg "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
  (($(id -u) == 0)) || die "missing packages: ${missing[*]} (run this script as root once)"
  apt_target=()
  if [[ $codename == bookworm ]] && ! have_pkg qemu-system-x86; then
    # bookworm's own qemu is 7.2. The qemu-utils the NBD tests use may come from
    # bookworm-backports (10.x), and every qemu package must be of one version: take
    # qemu-system-x86 from backports, and qemu-utils with it when it is installed.
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      # The mirror of the machine's main Debian entry (".../debian", not "...-security").
      mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v '^[[:space:]]*#' |
        grep -oE 'https?://[^[:space:]]+/debian/?([[:space:]]|$)' | head -n1 | tr -d '[:space:]' || true)
      echo "deb ${mirror:-http://deb.debian.org/debian} bookworm-backports main" \
        >/etc/apt/sources.list.d/bookworm-backports.list
      note "added bookworm-backports to the apt sources (for qemu-system-x86)"
    fi
    apt_target=(-t bookworm-backports)
    have_pkg qemu-utils && missing+=(qemu-utils)
  fi
  note "installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_target[@]}" "${missing[@]}" >/dev/null
fi

# --- 2. the guest kernel -----------------------------------------------------------------------
if [[ ! -s $cache/kernel.done ]]; then
  newest_kernel() {
    apt-cache search --names-only "^linux-image-6\\.12\\.[0-9]+\\+deb${debian_major}(\\.[0-9]+)?-amd64\$" |
      cut -d' ' -f1 | sort -V | tail -n1
  }
  pkg=${RINGBLOCK_VM_KERNEL:-$(newest_kernel)}
  [[ -n $pkg ]] || { apt-get update -qq && pkg=$(newest_kernel); } # no apt lists yet
  [[ -n $pkg ]] || die "apt offers no linux-image-6.12.*+deb${debian_major}-amd64 package"
  note "downloading $pkg"
  rm -rf "$cache/kernel" "$cache"/vmlinu[xz]
  work=$(mktemp -d "$cache/download.XXXXXX")
  # apt drops privileges to _apt for downloads, which cannot write into root's cache dir.
  (cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$pkg")
  deb=$(echo "$work"/*.deb)
  dpkg-deb -x "$deb" "$work/root"
  kver=${pkg#linux-image-}
  depmod -b "$work/root" "$kver" # lets `modprobe -d` resolve dependencies in the next step
  mv "$work/root" "$cache/kernel"
  cp "$cache/kernel/boot/vmlinuz-$kver" "$cache/vmlinuz"
  # qemu can boot the uncompressed ELF kernel directly (PVH entry), which saves the bzImage's
  # self-decompression: about a second per boot under emulation. Debian compresses with zstd;
  # the payload starts at a zstd frame magic somewhere inside the bzImage.
  if grep -qx 'CONFIG_PVH=y' "$cache/kernel/boot/config-$kver"; then
    for offset in $(LC_ALL=C grep -obUaP '\x28\xb5\x2f\xfd' "$cache/vmlinuz" | cut -d: -f1); do
      tail -c +$((offset + 1)) "$cache/vmlinuz" | zstd -dcq 2>/dev/null >"$work/vmlinux" || true
      if [[ $(head -c4 "$work/vmlinux") == $'\x7fELF' ]]; then
        mv "$work/vmlinux" "$cache/vmlinux"
        break
      fi
    done
  fi
  echo "$kver" >"$cache/kernel.version"
  echo "$pkg $(dpkg-deb -f "$deb" Version)" >"$cache/kernel.done" # last: this step is complete
  rm -rf "$work" && work=''
fi
kver=$(cat "$cache/kernel.version")

# --- 3. the initramfs --------------------------------------------------------------------------
# Named after what goes into it, so checkouts with different versions of ./init share one cache.
id=$({
  echo "$kver ${boot_modules[*]} / ${test_modules[*]}"
  cat "$harness/init"
} | sha256sum | cut -c1-12)
initrd=$cache/initrd-$id.img
if [[ ! -s $initrd ]]; then
  note "building the initramfs"
  work=$(mktemp -d "$cache/initrd.XXXXXX")
  root=$work/root
  mkdir -p "$root"/{bin,dev,proc,sys,host,lower,ctl,share,modules}
  cp /bin/busybox "$root/bin/"
  for applet in $("$root/bin/busybox" --list); do
    [[ -e $root/bin/$applet ]] || ln -s busybox "$root/bin/$applet"
  done
  # add_modules LIST NAME...: each module and its dependencies, in load order, once across all
  # lists (busybox insmod takes no compressed modules, so they are stored decompressed).
  add_modules() {
    local list=$root/modules/$1 name verb path file
    shift
    : >"$list"
    for name in "$@"; do
      while read -r verb path _; do
        [[ $verb == insmod ]] || continue # "builtin NAME": nothing to load
        file=${path##*/} && file=${file%.xz} && file=${file%.zst}
        [[ ! -e $root/modules/$file ]] || continue
        case $path in
          *.xz) xz -dc "$path" ;;
          *.zst) zstd -dcq "$path" ;;
          *) cat "$path" ;;
        esac >"$root/modules/$file"
        echo "$file" >>"$list"
      done < <(modprobe -d "$cache/kernel" -S "$kver" --show-depends "$name")
    done
  }
  add_modules boot.list "${boot_modules[@]}"
  add_modules test.list "${test_modules[@]}"
  install -m 755 "$harness/init" "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.img"
  mv "$work/initrd.img" "$initrd"
  find "$cache" -maxdepth 1 -name 'initrd-*.img' ! -newer "$initrd" ! -name "${initrd##*/}" \
    -mtime +30 -delete # initramfs of old versions of ./init, unused for a month
  rm -rf "$work" && work=''
fi
touch "$initrd"
echo "$initrd"
