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
# - iproute2, procps, util-linux, mount: addresses, process checks, tmpfs mounts in tests;
# - real pods (tests/realpods): containerd, runc and containernetworking-plugins (the nodes'
#   runtime and pod network), iptables and conntrack (kube-proxy), buildah (images without a
#   Docker daemon), python3-pytest (the end-to-end tests, on Debian's python3).
# - python3-dkim (dkimpy) and python3-nacl (its Ed25519): the independent DKIM verifier.
# - nsd and ldnsutils (ldns-keygen, ldns-signzone, ldns-key2ds): DNSSEC-signed zones on loopback
#   for the DANE tests (node/tests/common/dnssec.rs runs its own nsd in the foreground).
packages=(postfix swaks libnet-ssleay-perl libio-socket-ssl-perl openssl ca-certificates python3
  python3-dkim python3-nacl nsd ldnsutils
  gcc g++ libc6-dev make musl-tools shellcheck git iproute2 procps util-linux mount
  containerd runc containernetworking-plugins iptables conntrack buildah python3-pytest)
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
  # The nsd package may start a system nsd on port 53; the tests run their own, so stop it.
  if [[ " ${missing[*]} " == *" nsd "* ]] && command -v systemctl >/dev/null &&
    systemctl is-system-running >/dev/null 2>&1; then
    "${sudo_cmd[@]}" systemctl disable --now nsd >/dev/null 2>&1 || true
  fi
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
# DANE tests: NSD serves zones that ldns signs; a key must come out of ldns-keygen.
[ -x /usr/sbin/nsd ] || die "/usr/sbin/nsd is missing (package nsd)"
ldns_probe=$(mktemp -d)
(cd "$ldns_probe" && ldns-keygen -a ECDSAP256SHA256 probe.test >/dev/null 2>&1) ||
  die "ldns-keygen cannot make an ECDSA P-256 key (package ldnsutils)"
rm -rf "$ldns_probe"
for tool in containerd containerd-shim-runc-v2 ctr runc buildah conntrack iptables-restore nsenter; do
  command -v "$tool" >/dev/null || die "$tool is missing (see the package list in $0)"
done
[ -x /usr/lib/cni/bridge ] || die "the CNI bridge plugin is missing (package containernetworking-plugins)"
[ -x /usr/lib/cni/host-local ] ||
  die "the CNI host-local plugin is missing (package containernetworking-plugins)"
/usr/bin/python3 -m pytest --version >/dev/null 2>&1 || die "Debian's python3 has no pytest (python3-pytest)"
if [ "$(id -u)" -eq 0 ]; then
  probe=$(mktemp -d)
  if mount -t tmpfs -o size=1m tmpfs "$probe" 2>/dev/null; then
    umount "$probe"
  else
    die "cannot mount a tmpfs as root (the disk-full tests need it)"
  fi
  # Real pods: network namespaces, netfilter, overlay mounts (containerd's snapshotter).
  ip netns add mcrp-probe 2>/dev/null || die "cannot create a network namespace (ip netns add)"
  ip netns del mcrp-probe
  iptables -S >/dev/null 2>&1 || die "iptables does not work here (kube-proxy needs it)"
  mkdir -p "$probe/l" "$probe/u" "$probe/w" "$probe/m"
  if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" "$probe/m" 2>/dev/null; then
    umount "$probe/m"
  else
    die "cannot mount an overlay file system (containerd's snapshotter needs it)"
  fi
  rm -rf "$probe"
else
  die "the tests run as root (tmpfs mounts, Postfix's smtp-sink, network checks)"
fi

[ "${1:-}" = "--packages" ] && exit 0

# The control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# kwok, helm, built from their Go modules under MAILCLUSTER_CACHE (once).
bin=$("$here/controlplane/build.sh" | tail -n 1)
"$bin/kube-apiserver" --version >&2
echo "$bin"
