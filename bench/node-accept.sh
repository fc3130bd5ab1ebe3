#!/usr/bin/env bash
# Accept benchmark: smtp-source -> mailnode and smtp-source -> a private Postfix that only
# accepts and queues (qmgr not running), 10 KiB messages, 1/10/50 sessions, fsync on in both.
# Prints messages/s, p50/p99 from end of DATA to 250 (a probe session running beside the
# load), peak RSS, and the mailnode/Postfix throughput ratio.
# Needs: postfix (smtp-source), python3, a release build (built here if missing).
# Usage: bench/node-accept.sh [sessions...]   (default: 1 10 50)
#        MAILNODE_GROUP_COMMIT=false bench/node-accept.sh   (per-message fsync pair)
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS=("${@:-1 10 50}")
read -r -a SESSIONS <<<"${SESSIONS[*]}"
GROUP=${MAILNODE_GROUP_COMMIT:-true}
SIZE=10240
msgs_for() { case $1 in 1) echo 1000 ;; 10) echo 4000 ;; *) echo 8000 ;; esac; }

command -v smtp-source >/dev/null || PATH=$PATH:/usr/sbin
command -v smtp-source >/dev/null || { echo "smtp-source missing (apt-get install postfix)"; exit 1; }
BIN=target/release/mailnode
[ -x "$BIN" ] || cargo build --release -p mailnode
T=$(mktemp -d /var/tmp/mailnode-bench.XXXXXX)
MN_PID= ; PF=
cleanup() {
  [ -n "$MN_PID" ] && kill "$MN_PID" 2>/dev/null || true
  [ -n "$PF" ] && postfix -c "$T/postfix" stop >/dev/null 2>&1 || true
  sleep 1; rm -rf "$T"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# --- mailnode -------------------------------------------------------------------------
MN_PORT=$(free_port); MN_ADMIN=$(free_port)
cat >"$T/mailnode.yaml" <<YAML
hostname: bench.mailnode.example
listeners:
  - name: bench
    address: 127.0.0.1:$MN_PORT
    relay: {allowedSources: [127.0.0.0/8]}
queue: {path: $T/mnq, fsync: true, groupCommit: $GROUP, minFreeBytes: 0, minFreePercent: 0}
limits: {maxSessions: 1000}
admin: {address: 127.0.0.1:$MN_ADMIN}
delivery: {enabled: false}   # accept and queue only, like Postfix without qmgr
YAML

start_mailnode() {
  rm -rf "$T/mnq"
  MAILNODE_LOG=warn "$BIN" serve --config "$T/mailnode.yaml" 2>>"$T/mailnode.log" &
  MN_PID=$!
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$MN_PORT) 2>/dev/null && return; sleep 0.05; done
  echo "mailnode did not start"; cat "$T/mailnode.log"; exit 1
}
stop_mailnode() { kill "$MN_PID"; wait "$MN_PID" 2>/dev/null || true; MN_PID=; }

# --- postfix (private instance: own config and queue directories) ------------------------
PF_PORT=$(free_port)
mkdir -p "$T/postfix"
cat >"$T/postfix/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $T/pfq
data_directory = $T/pfdata
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = bench.postfix.example
mydestination =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
in_flow_delay = 0
default_process_limit = 200
maillog_file_prefixes = $T
maillog_file = $T/postfix.log
CF
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
start_postfix() {
  rm -rf "$T/pfq" "$T/pfdata"; mkdir -p "$T/pfq" "$T/pfdata"
  chmod 755 "$T"; chown postfix "$T/pfdata"
  postfix -c "$T/postfix" check >/dev/null 2>&1 || true
  script -qc "postfix -c $T/postfix start" /dev/null >"$T/pfstart.log" 2>&1 || { cat "$T/pfstart.log"; exit 1; }
  PF=1
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$PF_PORT) 2>/dev/null && return; sleep 0.05; done
  echo "postfix did not start"; cat "$T/postfix.log" 2>/dev/null; exit 1
}
stop_postfix() { postfix -c "$T/postfix" stop >/dev/null 2>&1 || true; PF=; sleep 1; }
postfix_rss_kb() {
  # Sum of peak RSS of the instance's processes (master and its children).
  local master; master=$(head -1 "$T/pfq/pid/master.pid" 2>/dev/null | tr -d ' ')
  local total=0 p
  for p in $master $(pgrep -P "$master" 2>/dev/null); do
    total=$((total + $(awk '/VmHWM/{print $2}' /proc/$p/status 2>/dev/null || echo 0)))
  done
  echo $total
}

run_one() { # name port sessions -> "msgs/s p50 p99"
  local port=$2 s=$3 n; n=$(msgs_for "$s")
  rm -f "$T/stop"
  python3 bench/latency_probe.py 127.0.0.1 "$port" 120 "$T/stop" >"$T/probe.out" &
  local probe=$!
  local t0 t1
  t0=$(date +%s.%N)
  smtp-source -d -s "$s" -m "$n" -l $SIZE -f bench@example.com -t sink@example.net 127.0.0.1:"$port"
  t1=$(date +%s.%N)
  touch "$T/stop"; wait $probe || true
  local rate; rate=$(python3 -c "print(f'{$n/($t1-$t0):.0f}')")
  read -r p50 p99 cnt <"$T/probe.out"
  echo "$rate $p50 $p99"
}

printf '%-9s %-9s %10s %9s %9s %12s\n' server sessions "msg/s" "p50 ms" "p99 ms" "peak RSS MB"
declare -A RATE
for s in "${SESSIONS[@]}"; do
  start_mailnode
  read -r rate p50 p99 <<<"$(run_one mailnode "$MN_PORT" "$s")"
  rss=$(awk '/VmHWM/{printf "%.1f", $2/1024}' /proc/$MN_PID/status)
  stop_mailnode
  RATE[mn$s]=$rate
  printf '%-9s %-9s %10s %9s %9s %12s\n' mailnode "$s" "$rate" "$p50" "$p99" "$rss"
  start_postfix
  read -r rate p50 p99 <<<"$(run_one postfix "$PF_PORT" "$s")"
  rss=$(awk -v k="$(postfix_rss_kb)" 'BEGIN{printf "%.1f", k/1024}')
  stop_postfix
  RATE[pf$s]=$rate
  printf '%-9s %-9s %10s %9s %9s %12s\n' postfix "$s" "$rate" "$p50" "$p99" "$rss"
done
echo
printf '%-9s %s\n' sessions "mailnode/postfix msg/s"
for s in "${SESSIONS[@]}"; do
  python3 -c "print(f'{\"$s\":<9} {${RATE[mn$s]}/max(1,${RATE[pf$s]}):.2f}x')"
done
echo "(group commit: $GROUP; Postfix peak RSS is the sum over its processes)"
