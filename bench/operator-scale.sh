#!/usr/bin/env bash
# Operator scale benchmark: N MailClusters (3 members each) against the test control plane with
# kwok fake nodes; the operator runs in-process. Prints one "operator-scale:" line with the time
# until all are Ready, reconcile count and mean duration, writes until steady, and the writes of
# a no-op resync of every cluster (must be 0).
#
# Usage: bench/operator-scale.sh [CLUSTERS]     (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
export MAILCLUSTER_SCALE_CLUSTERS="${1:-20}"
cargo test --release -p mailcluster-operator --test scale -- --ignored --nocapture 2>&1 \
  | grep -E '^operator-scale:|test result|panicked'
