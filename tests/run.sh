#!/usr/bin/env bash
# Runs every test of the repository: set-up (packages, control plane), format, lints, the
# workspace's unit and integration tests (node with real mail peers, operator against a real
# kube-apiserver), and a check that no test process is left behind.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

MAILCLUSTER_CONTROLPLANE_BIN=$(tests/setup.sh | tail -n 1)
export MAILCLUSTER_CONTROLPLANE_BIN
# Build caches outside the clone so that a second run is warm.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/mailcluster/cargo-target}
export CARGO_TERM_COLOR=never

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "shellcheck"
mapfile -t scripts < <(git ls-files '*.sh' .ci/run)
shellcheck -x "${scripts[@]}"

step "cargo test --workspace"
cargo test --workspace --locked --no-fail-fast -- --test-threads="${MAILCLUSTER_TEST_THREADS:-4}"

step "fuzz the network-facing parsers (${MAILCLUSTER_FUZZ_SECONDS:=20}s per target)"
# cargo-fuzz needs a nightly toolchain; both are installed once and then cached.
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
fuzz_target_dir=$HOME/.cache/mailcluster/fuzz-target
fuzz_log=$(mktemp)
for target in $(cd node && cargo +nightly fuzz list); do
  if ! (cd node && cargo +nightly fuzz run --target-dir "$fuzz_target_dir" -O "$target" -- \
    -max_total_time="$MAILCLUSTER_FUZZ_SECONDS" >"$fuzz_log" 2>&1); then
    tail -n 60 "$fuzz_log"
    echo "fuzz target $target failed" >&2
    exit 1
  fi
  echo "$target: $(grep -E '^Done [0-9]+ runs' "$fuzz_log" | tail -n 1)"
done
rm -f "$fuzz_log"

step "static (musl) binaries, as the container images build them"
cargo build --locked --target x86_64-unknown-linux-musl -p mailnode -p mailcluster-operator --bins
for b in mailnode mailcluster-operator; do
  exe=$CARGO_TARGET_DIR/x86_64-unknown-linux-musl/debug/$b
  "$exe" --version
  # A static(-pie) binary names no shared library ("lib.so => path") in ldd's output.
  if ldd "$exe" 2>&1 | grep -q '=>'; then
    echo "$exe is dynamically linked:" >&2
    ldd "$exe" >&2
    exit 1
  fi
done

step "no test process left behind"
left=$(pgrep -a -f "$MAILCLUSTER_CONTROLPLANE_BIN/|target/.*/mailnode " || true)
if [ -n "$left" ]; then
  printf 'processes left running after the tests:\n%s\n' "$left" >&2
  exit 1
fi
echo "none"
