#!/usr/bin/env bash
# Accept benchmark: smtp-source -> mailnode and smtp-source -> a private Postfix that only
# accepts and queues (qmgr not running), 10 KiB messages, 1/10/50 sessions, fsync on in both.
# Prints messages/s, p50/p99 from end of DATA to 250 (a probe session running beside the
# load), peak RSS, and the mailnode/Postfix throughput ratio; then what the disk allows
# (node/benches/disk_rate.rs: durable 10 KiB files/s by as many writer threads as the most
# sessions, no SMTP) and mailnode's rate at the most sessions as a share of it.
# Needs: postfix (smtp-source), python3, a release build (built here if missing).
# Usage: bench/node-accept.sh [sessions...]   (default: 1 10 50)
#        MAILNODE_GROUP_COMMIT=false bench/node-accept.sh   (per-message fsync pair)
#        MAILNODE_SYNC_FS=false bench/node-accept.sh   (group commit by file syncs, not syncfs)
# By default mailnode runs as the operator deploys it: group commit made durable by one
# syncfs of the queue's file system (each member has a volume of its own). Here the queue
# shares the machine's file system, so keep the machine otherwise quiet while it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS=("${@:-1 10 50}")
read -r -a SESSIONS <<<"${SESSIONS[*]}"
GROUP=${MAILNODE_GROUP_COMMIT:-true}
SYNCFS=${MAILNODE_SYNC_FS:-true}
SIZE=10240
msgs_for() { case $1 in 1) echo 1000 ;; 10) echo 4000 ;; *) echo 8000 ;; esac; }

# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_prepare
T=$(mktemp -d /var/tmp/mailnode-bench.XXXXXX)
trap bench_cleanup EXIT

# --- mailnode -------------------------------------------------------------------------
MN_PORT=$(free_port); MN_ADMIN=$(free_port)
write_mailnode_yaml "$GROUP" "$SYNCFS" "delivery: {enabled: false}   # accept and queue only, like Postfix without qmgr"


# --- postfix (private instance: own config and queue directories) ------------------------
PF_PORT=$(free_port)
write_postfix_main_cf ""
# No qmgr/pickup: messages stay in the incoming queue, so Postfix only accepts and queues.
cat >"$T/postfix/master.cf" <<CF
127.0.0.1:$PF_PORT inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
proxymap  unix  - - n - - proxymap
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
CF
run_one() { # name port sessions -> "msgs/s p50 p99"
  local port=$2 s=$3 n; n=$(msgs_for "$s")
  rm -f "$T/stop"
  python3 bench/latency_probe.py 127.0.0.1 "$port" 120 "$T/stop" >"$T/probe.out" &
  local probe=$!
  local t0 t1 cpu0
  cpu0=$(cpu_ticks)
  t0=$(date +%s.%N)
  smtp-source -d -s "$s" -m "$n" -l "$SIZE" -f bench@example.com -t sink@example.net 127.0.0.1:"$port"
  t1=$(date +%s.%N)
  cpu_busy "$cpu0" >"$T/cpu.$1.$s"
  touch "$T/stop"; wait $probe || true
  read -r p50 p99 _ <"$T/probe.out"
  echo "$(rate_of "$n" "$t0" "$t1") $p50 $p99"
}

measure() { # server sessions
  if [ "$1" = mailnode ]; then run_one mailnode "$MN_PORT" "$2"; else run_one postfix "$PF_PORT" "$2"; fi
}
bench_table "msg/s" "mailnode/postfix msg/s" measure
most=${SESSIONS[-1]}
echo
settle
cargo bench -q -p mailnode --bench disk_rate -- "$T/disk" "$most" "$(msgs_for "$most")" "$SIZE" | tee "$T/disk.out"
disk=$(awk '$1 == "group" {print $NF}' "$T/disk.out")
python3 -c "print(f'mailnode at $most sessions: {${RATE[mn$most]}/$disk:.0%} of the disk rate by group syncfs ($disk files/s)')"
echo "machine CPU busy (client, server, kernel) at $most sessions: mailnode $(cat "$T/cpu.mailnode.$most"), postfix $(cat "$T/cpu.postfix.$most")"
echo "(group commit: $GROUP, syncfs: $SYNCFS; Postfix peak RSS is the sum over its processes)"
