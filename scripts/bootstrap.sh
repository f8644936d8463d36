#!/usr/bin/env bash
# Installs what Switchyard's build and tests need on a fresh Debian 12 machine of this kind.
# Idempotent: each step checks first. Fails with a message naming the missing piece.
set -euo pipefail

say() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

APT_PKGS=(iproute2 iptables ipset nftables bpftool dnsutils dnsperf knot conntrack curl wrk nginx-light jq python3 util-linux
  podman debootstrap binutils ipvsadm gcc linux-libc-dev)

need_apt=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing apt packages ${need_apt[*]} and not root: run as root or install them"
  say "installing apt packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  # Servers installed for benchmarks (nginx, knot) must not start on the host.
  policy=/usr/sbin/policy-rc.d
  had_policy=0; [ -e "$policy" ] && had_policy=1
  [ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; }
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null || { [ "$had_policy" = 1 ] || rm -f "$policy"; die "apt-get install ${need_apt[*]} failed"; }
  [ "$had_policy" = 1 ] || rm -f "$policy"
fi

# The chart is linted and rendered by Helm's own library and validated against the Kubernetes
# schemas (scripts/helm-render.py). helm-sdkpy declares Python >= 3.12 but loads on 3.11.
PIP_PKGS=(helm-sdkpy==0.1.32 kubernetes-validate==1.37.0 PyYAML)
if ! python3 -c 'import helm_sdkpy, kubernetes_validate, yaml' 2>/dev/null; then
  say "installing Python packages: ${PIP_PKGS[*]}"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --ignore-requires-python "${PIP_PKGS[@]}" || die "pip install ${PIP_PKGS[*]} failed"
fi

command -v rustup >/dev/null || die "rustup not found: install Rust via rustup (stable 1.95 + nightly)"
rustup toolchain list | grep -q '^nightly' || { say "installing nightly toolchain"; rustup toolchain install nightly --profile minimal || die "rustup toolchain install nightly failed"; }
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  say "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly || die "rustup component add rust-src --toolchain nightly failed"
fi

# bpf-linker must link against the nightly's own LLVM (DESIGN.md §6).
if ! command -v bpf-linker >/dev/null && [ ! -x "$HOME/.cargo/bin/bpf-linker" ]; then
  sysroot=$(rustc +nightly --print sysroot)
  llvm_so=$(ls "$sysroot"/lib/libLLVM.so.*-rust-*-nightly 2>/dev/null | head -n1 || true)
  [ -n "$llvm_so" ] || die "no libLLVM.so.* in $sysroot/lib: nightly toolchain is incomplete"
  prefix="${BPF_LLVM_PREFIX:-$HOME/.local/switchyard-llvm}"
  mkdir -p "$prefix/lib"
  ln -sf "$llvm_so" "$prefix/lib/libLLVM.so"
  ln -sf "$llvm_so" "$prefix/lib/$(basename "$llvm_so")"
  say "building bpf-linker 0.13.0 against $(basename "$llvm_so") (a few minutes, once)"
  LLVM_PREFIX="$prefix" RUSTFLAGS="-L $prefix/lib -C link-arg=-Wl,-rpath,$prefix/lib" \
    cargo +nightly install bpf-linker --version 0.13.0 --no-default-features --features llvm-22 --locked \
    || die "cargo install bpf-linker failed (see output above)"
fi
# The fuzz targets (fuzz/, `cargo xtask fuzz`) run under cargo fuzz with nightly's libFuzzer.
if ! command -v cargo-fuzz >/dev/null && [ ! -x "$HOME/.cargo/bin/cargo-fuzz" ]; then
  say "installing cargo-fuzz 0.13.2 (a minute, once)"
  cargo install cargo-fuzz --version 0.13.2 --locked || die "cargo install cargo-fuzz failed (see output above)"
fi
say "ok"
