#!/usr/bin/env bash
# Shared by the benchmark scripts: a scratch dir with cleanup, free ports, a mailnode and a
# private Postfix instance started and stopped, peak RSS, and the result table.
# The caller sets T (scratch dir) and writes $T/mailnode.yaml and $T/postfix/{main,master}.cf.

MN_PID=
PF=
SINK_PID=
declare -A RATE

bench_prepare() { # builds the release binary if missing; puts smtp-source on PATH
  command -v smtp-source >/dev/null || PATH=$PATH:/usr/sbin
  command -v smtp-source >/dev/null || { echo "smtp-source missing (apt-get install postfix)"; exit 1; }
  BIN=${CARGO_TARGET_DIR:-target}/release/mailnode
  cargo build --release -q -p mailnode # a no-op when the binary is current
}

bench_cleanup() {
  if [ -n "$MN_PID" ]; then kill "$MN_PID" 2>/dev/null || true; fi
  if [ -n "$SINK_PID" ]; then kill "$SINK_PID" 2>/dev/null || true; fi
  if [ -n "$PF" ]; then postfix -c "$T/postfix" stop >/dev/null 2>&1 || true; fi
  sleep 1
  rm -rf "$T"
}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

wait_port() { # port -> 0 when something listens on 127.0.0.1:port within 5 s
  local _
  for _ in $(seq 100); do
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}

# Each run gets a fresh queue directory; the previous one is moved aside, not deleted, until
# the end: on ext4 without a journal (as on the CI machines) every inode freed in the last
# ~35 s is skipped one by one when a new file is allocated (fs/ext4/ialloc.c
# recently_deleted), so deleting one run's 8000 queue files would slow the next run's server.
set_aside() { # dir...
  local d
  for d in "$@"; do
    if [ -e "$d" ]; then mv "$d" "$T/old.$(basename "$d").$RANDOM$RANDOM"; fi
  done
}

# Before each measurement: write back what the previous one left dirty, and forget cached
# inode-table blocks, so that neither server pays for the other's (or a previous run's)
# deleted files: ext4 without a journal skips every inode freed in the last 5-35 s whose
# table block is still cached when it allocates a new one. Without root, wait the window out.
settle() {
  sync
  if [ -w /proc/sys/vm/drop_caches ]; then echo 3 >/proc/sys/vm/drop_caches; else sleep 40; fi
}

# The mailnode config both benchmarks share; MN_PORT and MN_ADMIN must be set.
write_mailnode_yaml() { # group-commit sync-filesystem delivery-yaml
  cat >"$T/mailnode.yaml" <<YAML
hostname: bench.mailnode.example
listeners:
  - name: bench
    address: 127.0.0.1:$MN_PORT
    relay: {allowedSources: [127.0.0.0/8]}
queue: {path: $T/mnq, fsync: true, groupCommit: $1, syncFilesystem: $2, minFreeBytes: 0, minFreePercent: 0}
limits: {maxSessions: 1000}
admin: {address: 127.0.0.1:$MN_ADMIN}
$3
YAML
}

# A private Postfix instance's main.cf (own queue and data directories, relay for loopback,
# no limits on connections), with the benchmark's own lines appended.
write_postfix_main_cf() { # extra-lines
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
$1
CF
}

start_mailnode() { # port
  set_aside "$T/mnq"
  MAILNODE_LOG=warn "$BIN" serve --config "$T/mailnode.yaml" 2>>"$T/mailnode.log" &
  MN_PID=$!
  wait_port "$1" || { echo "mailnode did not start"; cat "$T/mailnode.log"; exit 1; }
}
stop_mailnode() { kill "$MN_PID"; wait "$MN_PID" 2>/dev/null || true; MN_PID=; }
mailnode_rss_mb() { awk '/VmHWM/{printf "%.1f", $2/1024}' "/proc/$MN_PID/status"; }

start_postfix() { # port
  set_aside "$T/pfq" "$T/pfdata"
  mkdir -p "$T/pfq" "$T/pfdata"
  chmod 755 "$T"
  chown postfix "$T/pfdata"
  postfix -c "$T/postfix" check >/dev/null 2>&1 || true
  script -qc "postfix -c $T/postfix start" /dev/null >"$T/pfstart.log" 2>&1 || { cat "$T/pfstart.log"; exit 1; }
  PF=1
  wait_port "$1" || { echo "postfix did not start"; cat "$T/postfix.log" 2>/dev/null; exit 1; }
}
stop_postfix() { postfix -c "$T/postfix" stop >/dev/null 2>&1 || true; PF=; sleep 1; }
postfix_rss_mb() { # sum of the peak RSS of the instance's processes (master and children)
  local master total=0 p
  master=$(head -1 "$T/pfq/pid/master.pid" 2>/dev/null | tr -d ' ')
  for p in $master $(pgrep -P "$master" 2>/dev/null); do
    total=$((total + $(awk '/VmHWM/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
  done
  awk -v k="$total" 'BEGIN{printf "%.1f", k/1024}'
}

# The machine's CPU time: "busy idle" in clock ticks (all cores), from /proc/stat.
cpu_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8, $5+$6}' /proc/stat; }
cpu_busy() { # "busy idle" from cpu_ticks -> share of all cores busy since then
  local b0 i0 b1 i1
  read -r b0 i0 <<<"$1"
  read -r b1 i1 <<<"$(cpu_ticks)"
  python3 -c "print(f'{($b1-$b0)/max(1,($b1-$b0)+($i1-$i0)):.0%}')"
}

rate_of() { python3 -c "print(f'{$1/($3-$2):.0f}')"; } # messages t0 t1 -> msg/s

row() { printf '%-9s %-9s %10s %9s %9s %12s\n' "$@"; }

# For each session count in SESSIONS: mailnode, then Postfix, each started fresh and measured by
# `measure SERVER SESSIONS` (prints "msg/s p50 p99"); one table row each, then the ratios.
# Needs MN_PORT and PF_PORT.
bench_table() { # rate-column-title ratio-title measure-function
  local column=$1 title=$2 measure=$3 s rate p50 p99 rss
  row server sessions "$column" "p50 ms" "p99 ms" "peak RSS MB"
  for s in "${SESSIONS[@]}"; do
    settle
    start_mailnode "$MN_PORT"
    read -r rate p50 p99 <<<"$("$measure" mailnode "$s")"
    rss=$(mailnode_rss_mb)
    stop_mailnode
    RATE[mn$s]=$rate
    row mailnode "$s" "$rate" "$p50" "$p99" "$rss"
    settle
    start_postfix "$PF_PORT"
    read -r rate p50 p99 <<<"$("$measure" postfix "$s")"
    rss=$(postfix_rss_mb)
    stop_postfix
    RATE[pf$s]=$rate
    row postfix "$s" "$rate" "$p50" "$p99" "$rss"
  done
  print_ratios "$title" "${SESSIONS[@]}"
}

print_ratios() { # title sessions...
  local title=$1 s
  shift
  echo
  printf '%-9s %s\n' sessions "$title"
  for s in "$@"; do
    python3 -c "print(f'{\"$s\":<9} {${RATE[mn$s]}/max(1,${RATE[pf$s]}):.2f}x')"
  done
}
