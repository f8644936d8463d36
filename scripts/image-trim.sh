#!/bin/sh
# Trims a Debian root filesystem (ROOT, "/" inside a container build) down to what the
# Switchyard image uses at run time. Shared by scripts/image.sh (the local debootstrap base)
# and deploy/Dockerfile (debian:bookworm-slim), so both images hold the same files.
# POSIX sh: it runs inside the image being trimmed too.
set -eu
root=${1:?usage: image-trim.sh ROOT}
root=${root%/}

# Packages nothing in the image uses at run time: the package manager and its crypto, user
# management and PAM, filesystem tools, perl, time zones. Their files go (the image is not
# managed with apt afterwards; a new image is built instead). scripts/image.sh checks that
# every library the tools and the daemon load is still there.
DROP="apt libapt-pkg6.0 gpgv debian-archive-keyring e2fsprogs libext2fs2 libss2 logsave
  perl-base debconf tzdata libgnutls30 libdb5.3 libp11-kit0 libtasn1-6 libidn2-0 libunistring2
  libnettle8 libhogweed6 passwd login adduser libpam-modules libpam-modules-bin libpam-runtime
  libpam0g libsemanage2 libsemanage-common libsepol2 libaudit1 libaudit-common libgcrypt20
  libgpg-error0 libsystemd0 libstdc++6 libkrb5-3 libk5crypto3 libkrb5support0 libgssapi-krb5-2
  libkeyutils1 libcom-err2 libtirpc3 libtirpc-common ncurses-bin diffutils findutils tar"

# Collect the file lists first: the removal takes away tools (find, tar) and apt's files.
lists=""
for pkg in $DROP; do
  for l in "$root/var/lib/dpkg/info/$pkg.list" "$root/var/lib/dpkg/info/$pkg:amd64.list"; do
    [ -f "$l" ] && lists="$lists $l"
  done
done
# shellcheck disable=SC2086
cat $lists | while IFS= read -r f; do
  # Directories stay (usr-merge links such as /bin are directories too).
  [ -d "$root$f" ] && continue
  rm -f "$root$f"
done

# Nothing at run time reads these.
rm -rf "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/info "$root"/usr/share/locale \
  "$root"/usr/share/zoneinfo "$root"/usr/share/i18n "$root"/usr/share/lintian \
  "$root"/usr/share/bash-completion "$root"/usr/share/perl5 \
  "$root"/usr/lib/x86_64-linux-gnu/gconv "$root"/usr/lib/x86_64-linux-gnu/perl-base \
  "$root"/usr/lib/x86_64-linux-gnu/perl "$root"/usr/bin/perl* \
  "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old \
  "$root"/var/log/* "$root"/var/lib/dpkg/*-old
