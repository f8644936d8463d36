#!/usr/bin/env bash
# Builds the Switchyard container image without a Docker engine or a registry:
#   1. a Debian bookworm minbase made here with debootstrap, holding exactly the tools the
#      backends call (iptables legacy+nft, ipset, conntrack, iproute2, nftables, kmod),
#      trimmed of what nothing at run time reads (docs, locales, perl, apt's lists);
#   2. imported into podman as localhost/switchyard-base:bookworm;
#   3. the stripped release binary added on top (deploy/Containerfile.local), tagged
#      localhost/switchyard:<version> and :latest.
# deploy/Dockerfile builds the same image from debian:bookworm-slim for users with a registry.
#
# usage: scripts/image.sh BINARY VERSION   (run from the repository root, as root)
set -euo pipefail

say() { printf 'image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

bin=${1:?usage: image.sh BINARY VERSION}
version=${2:?usage: image.sh BINARY VERSION}
[ "$(id -u)" = 0 ] || die "needs root (debootstrap and podman's root storage)"
for t in debootstrap podman strip tar; do
  command -v "$t" >/dev/null || die "$t not found: run scripts/bootstrap.sh (installs podman, debootstrap)"
done
[ -x "$bin" ] || die "no binary at $bin"

PKGS=iptables,ipset,conntrack,iproute2,nftables,kmod
MIRROR=${SWITCHYARD_DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/*$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
work=target/image
base="$work/rootfs-base"
stamp="$base.stamp"
want="bookworm minbase $PKGS"

mkdir -p "$work"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  rm -rf "$base" "$stamp"
  say "debootstrap bookworm minbase + $PKGS from $MIRROR (about a minute, once)"
  debootstrap --variant=minbase --include="$PKGS" bookworm "$base" "$MIRROR" > "$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log: $work/debootstrap.log)"; }
  echo "$want" > "$stamp"
fi

root="$work/rootfs"
rm -rf "$root"
cp -a "$base" "$root"
sh scripts/image-trim.sh "$root"
# The tools resolve through Debian's alternatives: check they do, in the image.
for t in iptables-legacy iptables-nft ip6tables-legacy ip6tables-nft iptables-legacy-restore iptables-nft-restore ipset conntrack ip nft modprobe setpriv sleep; do
  chroot "$root" sh -c "command -v $t" >/dev/null || die "the image has no $t"
done

# ... and that every library they, their iptables extensions and the daemon need is there.
cp "$bin" "$root/switchyard.check"
missing=$(for f in /usr/sbin/xtables-legacy-multi /usr/sbin/xtables-nft-multi /usr/sbin/ipset /usr/sbin/conntrack \
    /bin/ip /usr/sbin/nft /bin/kmod /usr/bin/setpriv /bin/sleep /bin/dash /switchyard.check \
    $(cd "$root" && ls usr/lib/x86_64-linux-gnu/xtables/*.so | sed 's|^|/|'); do
  chroot "$root" /usr/bin/ldd "$f" 2>&1 | sed -n "s|^\s*\(.*not found\)|$f: \1|p"
done)
rm -f "$root/switchyard.check"
[ -z "$missing" ] || die "libraries missing in the image: $missing"
chroot "$root" iptables-nft --version >/dev/null && chroot "$root" iptables-legacy --version >/dev/null \
  && chroot "$root" ipset --version >/dev/null && chroot "$root" ip -V >/dev/null 2>&1 \
  || die "a tool does not run in the image"

podman image exists localhost/switchyard-base:bookworm && podman rmi -f localhost/switchyard-base:bookworm >/dev/null
tar -C "$root" --numeric-owner -cf - . | podman import --quiet - localhost/switchyard-base:bookworm >/dev/null \
  || die "podman import failed"

ctx="$work/context"
rm -rf "$ctx"
mkdir -p "$ctx"
cp deploy/Containerfile.local "$ctx/Containerfile"
strip -o "$ctx/switchyard" "$bin"
podman build --quiet --pull=never -t "localhost/switchyard:$version" -t localhost/switchyard:latest "$ctx" >/dev/null \
  || die "podman build failed"
size=$(podman image inspect --format '{{.Size}}' "localhost/switchyard:$version")
say "built localhost/switchyard:$version ($((size / 1024 / 1024)) MiB; binary $(( $(stat -c %s "$ctx/switchyard") / 1024 / 1024 )) MiB)"
