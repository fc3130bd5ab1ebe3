#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine and builds the test control plane, then
# checks that each tool can do what the tests ask of it (not only that its package is there).
# Idempotent: on a machine that has everything it takes a few seconds.
#
# Usage: tests/setup.sh              # prints the control plane's bin directory last
#        tests/setup.sh --packages   # only the Debian packages, the Rust parts and the checks
# Env:   MAILCLUSTER_CACHE (default ~/.cache/mailcluster): every cache lives under it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# Debian packages, each named because a test or a script uses it (Recommends are not installed,
# so nothing may come in only as one):
# - postfix: the real mail peer, with its smtp-source / smtp-sink load tools;
# - swaks with libnet-ssleay-perl and libio-socket-ssl-perl: its STARTTLS (only Recommends of swaks);
# - openssl: test certificates and keys; ca-certificates: the images' CA bundle;
# - python3: smtplib clients and small test servers;
# - gcc, g++, libc6-dev, make: C parts of crates (ring, libfuzzer-sys); musl-tools: static binaries;
# - shellcheck: the scripts; git: the file list it checks;
# - iproute2, procps, util-linux, mount: addresses, process checks, tmpfs mounts in tests.
packages=(postfix swaks libnet-ssleay-perl libio-socket-ssl-perl openssl ca-certificates python3
  gcc g++ libc6-dev make musl-tools shellcheck git iproute2 procps util-linux mount)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Rust: the toolchain the repository builds with, its lints and the static (musl) target.
command -v rustup >/dev/null || die "rustup is required (https://rustup.rs); see README Prerequisites"
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup target list --installed | grep -q '^x86_64-unknown-linux-musl' ||
  rustup target add x86_64-unknown-linux-musl

# --- capabilities: what the tests ask of each tool ---
version_at_least() { # have want: dotted versions
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]
}
rustc_version=$(rustc --version | awk '{print $2}')
version_at_least "${rustc_version%%-*}" 1.89 || die "Rust >= 1.89 is needed, rustc is $rustc_version"
command -v go >/dev/null || die "Go >= 1.26 is required to build the test control plane"
go_version=$(go env GOVERSION); go_version=${go_version#go}
version_at_least "$go_version" 1.26 || die "Go >= 1.26 is needed, go is $go_version"
# swaks lists what it can do: TLS needs Net::SSLeay and IO::Socket::SSL, AUTH needs nothing more.
swaks_support=$(swaks --support 2>&1 || true)
for feature in 'TLS' 'Basic AUTH'; do
  grep -q "^=== $feature supported" <<<"$swaks_support" ||
    die "swaks cannot do $feature: $(grep -m1 "$feature" <<<"$swaks_support" || echo 'not listed by swaks --support')"
done
for tool in smtp-source smtp-sink postconf; do
  [ -x "/usr/sbin/$tool" ] || die "/usr/sbin/$tool is missing (package postfix)"
done
python3 -c 'import smtplib, ssl; ssl.create_default_context()' ||
  die "python3 cannot import smtplib and ssl"
openssl version >/dev/null || die "openssl does not run"
command -v musl-gcc >/dev/null || die "musl-gcc is missing (package musl-tools)"
if [ "$(id -u)" -eq 0 ]; then
  probe=$(mktemp -d)
  if mount -t tmpfs -o size=1m tmpfs "$probe" 2>/dev/null; then
    umount "$probe"
  else
    die "cannot mount a tmpfs as root (the disk-full tests need it)"
  fi
  rmdir "$probe"
else
  die "the tests run as root (tmpfs mounts, Postfix's smtp-sink, network checks)"
fi

[ "${1:-}" = "--packages" ] && exit 0

# The control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# kwok, helm, built from their Go modules under MAILCLUSTER_CACHE (once).
bin=$("$here/controlplane/build.sh" | tail -n 1)
"$bin/kube-apiserver" --version >&2
echo "$bin"
