#!/usr/bin/env bash
# Runs every test of the repository: set-up (packages, control plane), format, lints, the
# workspace's unit and integration tests (node with real mail peers, operator against a real
# kube-apiserver), short fuzz runs, the static binaries, and a check that no test process is left
# behind. Prints each step's wall time at the end.
#
# Env: MAILCLUSTER_CACHE      every build cache (Go modules and builds, cargo registry and target
#                             directories, cargo-fuzz) lives under it; default ~/.cache/mailcluster.
#                             A fresh directory gives a cold run: MAILCLUSTER_CACHE=$(mktemp -d)
#      MAILCLUSTER_FUZZ_SECONDS   seconds per fuzz target (default 15; the corpus under the cache grows run by run)
#      MAILCLUSTER_TEST_THREADS   test threads per test binary (default 4)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

export MAILCLUSTER_CACHE=${MAILCLUSTER_CACHE:-$HOME/.cache/mailcluster}
export CARGO_HOME=$MAILCLUSTER_CACHE/cargo-home
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$MAILCLUSTER_CACHE/cargo-target}
export CARGO_TERM_COLOR=never
# Tests that need a mail peer (swaks, Postfix's tools) fail instead of skipping without it.
export MAILCLUSTER_REQUIRE_TOOLS=1
# The nightly toolchain and cargo-fuzz version the fuzz targets are built with.
fuzz_toolchain=nightly-2026-05-20
cargo_fuzz_version=0.13.2
tools=$MAILCLUSTER_CACHE/tools

timings=()
step_name=""
step_start=$SECONDS
run_start=$SECONDS
# Temp directories the tests make; none may be left at the end (checked in the last step).
scratch_dirs() { find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'mailcluster-*-*' -type d | sort; }
scratch_before=$(scratch_dirs)
step() {
  end_step
  step_name=$*
  step_start=$SECONDS
  printf '\n==> %s\n' "$*"
}
end_step() {
  [ -n "$step_name" ] && timings+=("$(printf '%6ss  %s' "$((SECONDS - step_start))" "$step_name")")
  step_name=""
}
report() {
  local rc=$?
  end_step
  printf '\n==> step times (wall)\n'
  printf '%s\n' "${timings[@]}"
  printf '%6ss  total%s\n' "$((SECONDS - run_start))" "$([ "$rc" -eq 0 ] || echo ", FAILED (exit $rc)")"
}
trap report EXIT

step "set-up: Debian packages, Rust components, capability checks"
tests/setup.sh --packages

# The Go build of the control plane is long and the Rust builds are too: they run side by side,
# and the tests wait for both.
controlplane_log=$(mktemp)
tests/controlplane/build.sh >"$controlplane_log" 2>&1 &
controlplane_pid=$!

step "cargo fmt --check"
cargo fmt --all -- --check

step "shellcheck"
mapfile -t scripts < <(git ls-files '*.sh' .ci/run)
shellcheck -x "${scripts[@]}"

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build the tests"
cargo test --workspace --locked --no-run

step "build the fuzz targets ($fuzz_toolchain, cargo-fuzz $cargo_fuzz_version)"
rustup toolchain list | grep -q "^$fuzz_toolchain" ||
  rustup toolchain install "$fuzz_toolchain" --profile minimal
[ "$("$tools/bin/cargo-fuzz" --version 2>/dev/null)" = "cargo-fuzz $cargo_fuzz_version" ] ||
  cargo install --locked --root "$tools" --version "$cargo_fuzz_version" cargo-fuzz
fuzz_target_dir=$MAILCLUSTER_CACHE/fuzz-target
# cargo-fuzz is run as a cargo subcommand: `cargo fuzz` finds it on PATH.
export PATH=$tools/bin:$PATH
fuzz() { (cd node && cargo "+$fuzz_toolchain" fuzz "$1" --target-dir "$fuzz_target_dir" -O "${@:2}"); }
fuzz build

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

step "test control plane (Go build, started with the set-up)"
if ! wait "$controlplane_pid"; then
  tail -n 80 "$controlplane_log" >&2
  echo "building the test control plane failed (log above)" >&2
  exit 1
fi
MAILCLUSTER_CONTROLPLANE_BIN=$(tail -n 1 "$controlplane_log")
export MAILCLUSTER_CONTROLPLANE_BIN
rm -f "$controlplane_log"
"$MAILCLUSTER_CONTROLPLANE_BIN/kube-apiserver" --version

step "cargo test --workspace"
cargo test --workspace --locked --no-fail-fast -- --test-threads="${MAILCLUSTER_TEST_THREADS:-4}"

step "real pods: the operator and a MailCluster on kubelet nodes (tests/realpods)"
# Debian's python3, which has pytest from set-up; no cache directory in the clone.
/usr/bin/python3 -m pytest tests/realpods -v -s -p no:cacheprovider --durations=0

step "fuzz the network-facing parsers (${MAILCLUSTER_FUZZ_SECONDS:=15}s per target)"
fuzz_log=$(mktemp)
for target in $(cd node && cargo "+$fuzz_toolchain" fuzz list); do
  # The corpus is kept outside the clone, so each run starts where the last one stopped.
  corpus=$MAILCLUSTER_CACHE/fuzz-corpus/$target
  mkdir -p "$corpus"
  if ! fuzz run "$target" "$corpus" -- -max_total_time="$MAILCLUSTER_FUZZ_SECONDS" >"$fuzz_log" 2>&1; then
    tail -n 60 "$fuzz_log"
    echo "fuzz target $target failed" >&2
    exit 1
  fi
  echo "$target: $(grep -E '^Done [0-9]+ runs' "$fuzz_log" | tail -n 1)"
done
rm -f "$fuzz_log"

step "no test process or temp directory left behind"
left=$(pgrep -a -f "$MAILCLUSTER_CONTROLPLANE_BIN/|target/.*/mailnode |mailcluster-realpods" || true)
if [ -n "$left" ]; then
  printf 'processes left running after the tests:\n%s\n' "$left" >&2
  exit 1
fi
left=$(comm -13 <(echo "$scratch_before") <(scratch_dirs))
if [ -n "$left" ]; then
  printf 'temp directories left after the tests:\n%s\n' "$left" >&2
  exit 1
fi
echo "none"
