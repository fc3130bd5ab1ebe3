#!/usr/bin/env bash
# Cluster relay benchmark on real pods: messages/s end to end through the LoadBalancer address
# of a MailCluster with 1, 2 and 3 members on the two kubelet nodes of tests/realpods/cluster.sh
# (release images). smtp-source sends 10 KiB messages over 50 sessions from the client
# namespace mcrp-c1; Postfix's smtp-sink is the smarthost, in the sink namespace. A latency probe
# (one session, messages back to back) runs from mcrp-c2 meanwhile.
# Prints per member count: accepted msg/s (smtp-source's wall time), end to end msg/s (from the
# first message until every member's queue is empty again), p50/p99 of the probe's accept
# latency, the members' peak RSS, and the end-to-end scaling against one member.
# Needs root and what tests/setup.sh installs; builds the release binaries if stale.
# Usage: bench/cluster-relay.sh [members...]   (default: 1 2 3)
#        MESSAGES=4000 SESSIONS=50 bench/cluster-relay.sh
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a MEMBERS <<<"${*:-1 2 3}"
MESSAGES=${MESSAGES:-4000}
SESSIONS=${SESSIONS:-50}
SIZE=10240
PATH=$PATH:/usr/sbin

cargo build --release --locked -q --target x86_64-unknown-linux-musl -p mailnode -p mailcluster-operator --bins
bin_dir=${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-musl/release
export MAILCLUSTER_BIN_DIR=$bin_dir MAILCLUSTER_IMAGE_TAG=bench
cluster=tests/realpods/cluster.sh
T=$(mktemp -d)
sink_pid=
cleanup() {
  [ -z "$sink_pid" ] || kill "$sink_pid" 2>/dev/null || true
  bash "$cluster" down
  rm -rf "$T"
}
trap cleanup EXIT
bash "$cluster" up
bash "$cluster" install
# shellcheck source=/dev/null
. /tmp/mailcluster-realpods/env
k() { "$MAILCLUSTER_CONTROLPLANE_BIN/kubectl" "$@"; }

ip netns exec mcrp-sink smtp-sink -u nobody "$MAILCLUSTER_REALPODS_SINK_IP:2626" 1000 &
sink_pid=$!
k create namespace bench >/dev/null

manifest() { # MEMBERS
  cat <<EOF
apiVersion: mailcluster.dev/v1alpha1
kind: MailCluster
metadata: {name: bench, namespace: bench}
spec:
  hostname: smtp.bench.test
  replicas: $1
  listeners:
    - name: relay
      port: 25
      relay: {allowedSources: [10.123.0.101/32, 10.123.0.102/32]}
  delivery:
    smarthosts: [{host: "$MAILCLUSTER_REALPODS_SINK_IP", port: 2626, priority: 10}]
  storage: {size: 512Mi}
  dns: {enabled: false}
  scheduling: {spread: Preferred}
EOF
}

members_ready() { # MEMBERS: Ready, every member on the current revision, nothing rolling
  local mc sts
  mc=$(k -n bench get mc bench -o jsonpath='{.status.membersReady} {.status.observedGeneration} {.metadata.generation} {.status.conditions[?(@.type=="Ready")].status}')
  sts=$(k -n bench get sts bench -o jsonpath='{.status.observedGeneration} {.metadata.generation} {.status.currentRevision} {.status.updateRevision} {.status.readyReplicas} {.status.updatedReplicas}')
  read -r ready mc_seen mc_gen mc_ready <<<"$mc"
  read -r sts_seen sts_gen current update ready_replicas updated <<<"$sts"
  [ "$ready" = "$1/$1" ] && [ "$mc_seen" = "$mc_gen" ] && [ "$mc_ready" = True ] &&
    [ "$sts_seen" = "$sts_gen" ] && [ "$current" = "$update" ] &&
    [ "$ready_replicas" = "$1" ] && [ "$updated" = "$1" ]
}

queued() { # sum of the members' queue depths, from their own /status
  local ip total=0 depth
  for ip in $(k -n bench get pods -l app.kubernetes.io/instance=bench -o jsonpath='{.items[*].status.podIP}'); do
    depth=$(python3 -c 'import json,sys,urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1], timeout=3))["queueDepth"])' \
      "http://$ip:8025/status" 2>/dev/null || echo 1)
    total=$((total + depth))
  done
  echo "$total"
}

members_rss_mb() { # summed RSS of the mailnode processes (both nodes run on this machine)
  ps -C mailnode -o rss= | awk '{s += $1} END {printf "%.0f", s / 1024}'
}

printf '\n| members | accepted msg/s | end to end msg/s | probe p50 ms | probe p99 ms | members RSS MB | scaling |\n'
printf '|---|---|---|---|---|---|---|\n'
base=""
for m in "${MEMBERS[@]}"; do
  manifest "$m" | k apply -f - >/dev/null
  for _ in $(seq 300); do members_ready "$m" && break; sleep 1; done
  members_ready "$m" || { echo "MailCluster bench did not get $m ready members" >&2; exit 1; }
  lb=$(k -n bench get svc bench-relay -o jsonpath='{.status.loadBalancer.ingress[0].ip}')
  for _ in $(seq 60); do
    ip netns exec mcrp-c1 bash -c "exec 3<>/dev/tcp/$lb/25" 2>/dev/null && break
    sleep 1
  done
  sync
  rm -f "$T/stop"
  ip netns exec mcrp-c2 python3 bench/latency_probe.py "$lb" 25 600 "$T/stop" >"$T/probe.out" &
  probe=$!
  peak=0
  start=$(date +%s.%N)
  ip netns exec mcrp-c1 smtp-source -d -s "$SESSIONS" -m "$MESSAGES" -l "$SIZE" \
    -f bench@bench.test -t sink@example.net "$lb:25" &
  source_pid=$!
  while kill -0 "$source_pid" 2>/dev/null; do
    rss=$(members_rss_mb); [ "$rss" -gt "$peak" ] && peak=$rss
    sleep 0.5
  done
  wait "$source_pid"
  accepted_at=$(date +%s.%N)
  touch "$T/stop"
  wait "$probe" || true
  until [ "$(queued)" = 0 ]; do
    rss=$(members_rss_mb); [ "$rss" -gt "$peak" ] && peak=$rss
    sleep 0.2
  done
  done_at=$(date +%s.%N)
  read -r p50 p99 _ <"$T/probe.out"
  accept_rate=$(awk -v n="$MESSAGES" -v a="$start" -v b="$accepted_at" 'BEGIN {print n / (b - a)}')
  e2e_rate=$(awk -v n="$MESSAGES" -v a="$start" -v b="$done_at" 'BEGIN {print n / (b - a)}')
  [ -n "$base" ] || base=$e2e_rate
  printf '| %s | %.0f | %.0f | %s | %s | %s | %.2f× |\n' "$m" "$accept_rate" "$e2e_rate" "$p50" "$p99" \
    "$peak" "$(awk -v a="$e2e_rate" -v b="$base" 'BEGIN {print a / b}')"
done
echo
echo "Both nodes, the control plane, kube-proxy and the load generators share this machine's $(nproc) cores."
