#!/usr/bin/env bash
# Relay benchmark, end to end: smtp-source -> mailnode -> smtp-sink beside
# smtp-source -> Postfix (private instance, relayhost) -> smtp-sink; 10 KiB messages,
# 1/10/50 sessions, fsync on in both. Prints messages/s delivered end to end (from the
# first message sent until the relay's queue is empty again), p50/p99 end-to-end latency
# (a probe sends one message every 20 ms while smtp-source runs, routed to a probe sink that
# records arrival minus send time), peak RSS, and the mailnode/Postfix throughput ratio.
# Needs: postfix (smtp-source, smtp-sink), python3, a release build (built here if missing).
# Usage: bench/node-relay.sh [sessions...]   (default: 1 10 50)
#        MAILNODE_SYNC_FS=false bench/node-relay.sh   (group commit by file syncs, not syncfs)
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS=("${@:-1 10 50}")
read -r -a SESSIONS <<<"${SESSIONS[*]}"
SIZE=10240
msgs_for() { case $1 in 1) echo 500 ;; 10) echo 2000 ;; *) echo 4000 ;; esac; }

# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_prepare
T=$(mktemp -d /var/tmp/mailnode-relay.XXXXXX)
trap bench_cleanup EXIT

SINK_PORT=$(free_port); PROBE_PORT=$(free_port)
SINK_USER=(); [ "$(id -u)" = 0 ] && SINK_USER=(-u nobody)
smtp-sink "${SINK_USER[@]}" "127.0.0.1:$SINK_PORT" 1000 &
SINK_PID=$!

# --- mailnode -------------------------------------------------------------------------
MN_PORT=$(free_port); MN_ADMIN=$(free_port)
write_mailnode_yaml true "${MAILNODE_SYNC_FS:-true}" "delivery:
  smarthosts: [{host: 127.0.0.1, port: $SINK_PORT, priority: 1}]
  routes:
    - domains: [probe.example]
      smarthosts: [{host: 127.0.0.1, port: $PROBE_PORT, priority: 1}]
  tls: {mode: none}
  concurrencyPerDestination: 50
  idleConnectionSeconds: 10"
mailnode_queue() { find "$T/mnq/active" -type f 2>/dev/null | wc -l; }

# --- postfix (private instance, relays everything to the sink) ---------------------------
PF_PORT=$(free_port)
write_postfix_main_cf "relayhost = [127.0.0.1]:$SINK_PORT
transport_maps = inline:{probe.example=smtp:[127.0.0.1]:$PROBE_PORT}
default_destination_concurrency_limit = 50
smtp_tls_security_level = none
smtp_connection_cache_on_demand = yes"
cat >"$T/postfix/master.cf" <<CF
127.0.0.1:$PF_PORT inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
CF
postfix_queue() { find "$T/pfq/incoming" "$T/pfq/active" "$T/pfq/deferred" "$T/pfq/maildrop" -type f 2>/dev/null | wc -l; }

run_one() { # port sessions queuefn -> "msgs/s p50 p99"
  local port=$1 s=$2 qfn=$3 n; n=$(msgs_for "$s")
  rm -f "$T/stop"
  python3 bench/relay_probe.py "$port" "$PROBE_PORT" "$T/stop" >"$T/probe.out" &
  local probe=$!
  local t0 t1
  t0=$(date +%s.%N)
  smtp-source -d -s "$s" -m "$n" -l "$SIZE" -f bench@example.com -t sink@example.net 127.0.0.1:"$port"
  touch "$T/stop"   # the probe stops sending; the queue then drains
  local deadline=$((SECONDS + 300))
  while [ "$($qfn)" != 0 ] && [ $SECONDS -lt $deadline ]; do sleep 0.01; done
  t1=$(date +%s.%N)
  wait $probe || true
  read -r p50 p99 _ _ <"$T/probe.out"
  echo "$(rate_of "$n" "$t0" "$t1") $p50 $p99"
}

measure() { # server sessions
  if [ "$1" = mailnode ]; then
    run_one "$MN_PORT" "$2" mailnode_queue
  else
    run_one "$PF_PORT" "$2" postfix_queue
  fi
}
bench_table "msg/s e2e" "mailnode/postfix msg/s end to end" measure
echo "(Postfix peak RSS is the sum over its processes; both fsync; sink: Postfix smtp-sink)"
