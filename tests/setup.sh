#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine and builds the test control plane.
# Idempotent: on a machine that has everything it takes a few seconds.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log() { printf '[setup] %s\n' "$*" >&2; }

# Debian packages: real mail peers (Postfix with smtp-source/smtp-sink, swaks), openssl for test
# keys, shellcheck for the scripts, iproute2/procps for process and network checks, musl-tools
# for the static binaries of the container images.
packages=(postfix swaks openssl shellcheck iproute2 procps python3 ca-certificates musl-tools)
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

# Rust toolchain components used by the test command.
if command -v rustup >/dev/null; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  # The container images ship static musl binaries; the test command checks that they build.
  rustup target list --installed | grep -q '^x86_64-unknown-linux-musl' ||
    rustup target add x86_64-unknown-linux-musl
fi

# The control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# kwok, helm, built from their Go modules into ~/.cache/mailcluster (once).
command -v go >/dev/null || { log "Go is required to build the test control plane"; exit 1; }
bin=$("$here/controlplane/build.sh" | tail -n 1)
export MAILCLUSTER_CONTROLPLANE_BIN=$bin
"$bin/kube-apiserver" --version >&2
echo "$bin"
