#!/usr/bin/env bash
# Fetches one of Debian's stock kernels for `cargo xtask vm-test`; prints its vmlinuz path and
# the path of virtme-ng's `vng`, one per line.
#   scripts/vm-kernel.sh 6.1    bookworm's linux-image-amd64 (6.1 LTS)
#   scripts/vm-kernel.sh 6.12   bookworm-backports' linux-image-amd64 (6.12)
# The package is downloaded with apt and unpacked under target/vm/ (never installed as the
# host's kernel); its modules are copied to /lib/modules/<version> so that the guest, which
# runs over the host's own root filesystem, can load them (ip_vs, dummy). Also installs what
# booting needs: qemu-system-x86, busybox-static (virtme-ng's initramfs), kmod, ipvsadm, and
# virtme-ng from PyPI. Fails with a message naming what cannot be had.
set -euo pipefail

say() { printf 'vm-kernel: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

want="${1:-}"
case "$want" in
  6.1) suite=bookworm ;;
  6.12) suite=bookworm-backports ;;
  *) die "usage: $0 6.1|6.12" ;;
esac
[ "$(id -u)" = 0 ] || die "needs root (apt, /lib/modules)"
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/vm"
mkdir -p "$out"

export DEBIAN_FRONTEND=noninteractive
need=()
for p in qemu-system-x86 busybox-static kmod ipvsadm; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || die "apt-get install ${need[*]} failed"
fi
scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
vng=$(command -v vng || true)
[ -n "$vng" ] || { [ -x "$scripts_dir/vng" ] && vng="$scripts_dir/vng"; }
if [ -z "$vng" ]; then
  say "installing virtme-ng from PyPI"
  python3 -m pip install -q 'virtme-ng==1.42' >&2 || die "pip install virtme-ng failed"
  vng=$(command -v vng || true)
  [ -n "$vng" ] || { [ -x "$scripts_dir/vng" ] && vng="$scripts_dir/vng"; }
  [ -n "$vng" ] || die "virtme-ng installed but its vng script is neither on PATH nor in $scripts_dir"
fi

if [ "$suite" = bookworm-backports ]; then
  list=/etc/apt/sources.list.d/switchyard-bookworm-backports.sources
  if ! apt-cache policy 2>/dev/null | grep -q 'bookworm-backports'; then
    say "adding the bookworm-backports suite to apt's sources ($list)"
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$list"
    apt-get update -qq || die "apt-get update with bookworm-backports failed"
  fi
  pkg=$(apt-cache depends -t bookworm-backports linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
else
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
fi
[ -n "$pkg" ] || die "no linux-image-amd64 in $suite: apt cannot resolve the kernel package"
kver="${pkg#linux-image-}"
case "$kver" in
  "$want".*|"$want"-*|"$want"+*) ;;
  *) die "$suite's linux-image-amd64 is $pkg, not a $want kernel" ;;
esac

dir="$out/$kver"
if [ ! -f "$dir/boot/vmlinuz-$kver" ]; then
  say "downloading $pkg ($suite)"
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  if [ "$suite" = bookworm-backports ]; then
    (cd "$dir.tmp" && apt-get download -q -t bookworm-backports "$pkg" >/dev/null 2>&1) || die "apt-get download $pkg failed"
  else
    (cd "$dir.tmp" && apt-get download -q "$pkg" >/dev/null 2>&1) || die "apt-get download $pkg failed"
  fi
  dpkg -x "$dir.tmp"/*.deb "$dir.tmp/root" || die "dpkg -x $pkg failed"
  rm -rf "$dir" && mv "$dir.tmp/root" "$dir" && rm -rf "$dir.tmp"
fi
if [ ! -f "/lib/modules/$kver/modules.dep" ]; then
  say "copying $kver's modules to /lib/modules/$kver"
  mkdir -p /lib/modules
  rm -rf "/lib/modules/$kver"
  cp -a "$dir/lib/modules/$kver" "/lib/modules/$kver"
  depmod "$kver" || die "depmod $kver failed"
fi
echo "$dir/boot/vmlinuz-$kver"
echo "$vng"
