#!/usr/bin/env bash
# A Kubernetes cluster with real nodes on this machine, without Docker: etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler on the host; two nodes, each a network namespace
# with its own containerd (+ runc, CNI bridge), kubelet and kube-proxy; CoreDNS as a pod; client,
# balancer and sink namespaces; a small cloud controller (cloud.py) that gives LoadBalancer
# Services an address routed to the nodes with a local endpoint and provisions local volumes.
#
# Everything lives on one test network, a bridge that this script creates (10.123.0.0/24):
#   10.123.0.1    the host: kube-apiserver :6443, etcd :2379
#   10.123.0.11   node mcrp-n1 (pods 10.124.1.0/24)     10.123.0.12  node mcrp-n2 (10.124.2.0/24)
#   10.123.0.50   netns mcrp-sink    10.123.0.60  netns mcrp-lb (a PROXY-protocol balancer)
#   10.123.0.101  netns mcrp-c1      10.123.0.102 netns mcrp-c2 (clients)
#   10.125.0.0/24 LoadBalancer addresses (routed by cloud.py)    10.96.0.0/16 Services
# A guard rule drops every forwarded packet towards the machine's uplink; no component is given
# a resolver of the machine (pods get CoreDNS, which answers only cluster names).
#
# Usage: tests/realpods/cluster.sh demo     up + install + examples/realpods.yaml; prints how to
#                                           send mail; Ctrl-C tears everything down
#        tests/realpods/cluster.sh up       builds images, starts everything, waits for Ready
#        tests/realpods/cluster.sh install  the operator by its Helm chart (2 replicas, leader
#                                           election), the external-dns CRD, the sink and the
#                                           PROXY balancer (idempotent)
#        tests/realpods/cluster.sh down     stops everything and removes every trace
#        tests/realpods/cluster.sh check-clean   fails if anything of a cluster is left
#        tests/realpods/cluster.sh env      prints the variables tests use (KUBECONFIG, ...)
#        tests/realpods/cluster.sh stop-node N | start-node N   (a node lost and back)
# Env:   MAILCLUSTER_REALPODS_DIR   state directory (default /tmp/mailcluster-realpods)
#        MAILCLUSTER_CONTROLPLANE_BIN  Go-built binaries (default: tests/controlplane/build.sh)
#        MAILCLUSTER_IMAGE_TAG      tag of the mailnode and operator images (default e2e)
#        MAILCLUSTER_BIN_DIR        static binaries for the images (default: the musl debug build)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
state=${MAILCLUSTER_REALPODS_DIR:-/tmp/mailcluster-realpods}
prefix=mcrp
bridge=${prefix}-br
net=10.123.0
host_ip=$net.1
pod_net=10.124
lb_pool=10.125.0.0/24
service_cidr=10.96.0.0/16
dns_ip=10.96.0.10
nodes=(n1 n2)
clients=(c1:101 c2:102 lb:60 sink:50)
mark="mailcluster-realpods"
# The operator reads every member's /status this often (the chart's default is 15 s): the tests
# wait for the member table to show a reloaded configuration, a queue or a lost member.
member_refresh_seconds=5
# Pod network namespaces (cni-*) that existed before the cluster: not ours to remove.
netns_before=${state}.netns-before
# Kernel settings that kubelet or the network set-up may change; put back as they were.
sysctls=(kernel.panic kernel.panic_on_oops vm.overcommit_memory vm.panic_on_oom
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.ip_forward
  net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables
  net.bridge.bridge-nf-call-ip6tables net.netfilter.nf_conntrack_max)

log() { printf '[realpods %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[realpods] error: %s\n' "$*" >&2; exit 1; }

node_ip() { case $1 in n1) echo "$net.11" ;; n2) echo "$net.12" ;; esac; }
node_index() { echo "${1#n}"; }
node_name() { echo "$prefix-$1"; }
in_ns() { local ns=$1; shift; ip netns exec "$prefix-$ns" "$@"; }

controlplane_bin() {
  if [ -n "${MAILCLUSTER_CONTROLPLANE_BIN:-}" ]; then
    echo "$MAILCLUSTER_CONTROLPLANE_BIN"
  else
    "$root/tests/controlplane/build.sh" | tail -n 1
  fi
}

# --- processes: started detached, PID in $state/pids, log in $state/logs -------------------------
start_proc() { # NAME NETNS|- CMD...
  local name=$1 ns=$2
  shift 2
  local pre=()
  [ "$ns" = - ] || pre=(nsenter "--net=/run/netns/$prefix-$ns")
  setsid "${pre[@]}" "$@" >"$state/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$state/pids/$name"
}
stop_proc() { # NAME [SIGNAL]
  local f=$state/pids/$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if alive "$pid"; then
    kill "-${2:-TERM}" "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}
# Whether PID runs: a zombie (exited, not yet reaped by whoever inherited it) does not.
alive() { [ -r "/proc/$1/stat" ] && ! awk '{exit $3 == "Z" ? 0 : 1}' "/proc/$1/stat" 2>/dev/null; }
wait_for() { # WHAT SECONDS CMD...
  local what=$1 deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { log "timed out waiting for $what"; return 1; }
    sleep 0.5
  done
}

# --- PKI: one CA; the apiserver's serving and kubelet-client certificates; tokens for the rest ---
make_pki() {
  local d=$state/pki
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=$mark-ca" \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  cert() { # NAME SUBJECT [SAN]
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$d/$1.key" -out "$d/$1.csr" 2>/dev/null
    local ext=$d/$1.ext
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n' >"$ext"
    if [ -n "${3:-}" ]; then
      printf 'extendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$3" >>"$ext"
    else
      printf 'extendedKeyUsage=clientAuth\n' >>"$ext"
    fi
    openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
      -days 2 -extfile "$ext" -out "$d/$1.crt" 2>/dev/null
  }
  cert apiserver "/CN=kube-apiserver" \
    "IP:$host_ip,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  # Static tokens: admin, each kubelet (Node authorizer), kube-proxy (bootstrap role binding).
  : >"$d/tokens.csv"
  token() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
  local t
  t=$(token); echo "$t,admin,admin,system:masters" >>"$d/tokens.csv"; kubeconfig admin "$t"
  t=$(token); echo "$t,system:kube-proxy,kube-proxy" >>"$d/tokens.csv"; kubeconfig kube-proxy "$t"
  local n
  for n in "${nodes[@]}"; do
    t=$(token)
    echo "$t,system:node:$(node_name "$n"),$(node_name "$n"),system:nodes" >>"$d/tokens.csv"
    kubeconfig "kubelet-$n" "$t"
  done
}
kubeconfig() { # NAME TOKEN
  cat >"$state/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $mark
  cluster: {server: "https://$host_ip:6443", certificate-authority: "$state/pki/ca.crt"}
users:
- name: $1
  user: {token: "$2"}
contexts:
- name: $mark
  context: {cluster: $mark, user: $1}
current-context: $mark
EOF
}

# --- network ---------------------------------------------------------------------------------------
uplink() { ip -4 route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1)}' | head -n 1; }

save_sysctls() {
  local k
  : >"$state/sysctl.saved"
  for k in "${sysctls[@]}"; do
    [ -e "/proc/sys/${k//.//}" ] && echo "$k=$(sysctl -n "$k")" >>"$state/sysctl.saved"
  done
}
restore_sysctls() {
  [ -f "$state/sysctl.saved" ] || return 0
  local line
  while IFS= read -r line; do
    [ "$(sysctl -n "${line%%=*}" 2>/dev/null)" = "${line#*=}" ] || sysctl -q -w "$line" >/dev/null || true
  done <"$state/sysctl.saved"
}

add_host() { # NS IP: a namespace with a veth on the bridge
  local ns=$prefix-$1 ip=$2 hv="$prefix-$1"
  ip netns add "$ns"
  ip link add "$hv" type veth peer name eth0 netns "$ns"
  ip link set "$hv" master "$bridge" up
  in_ns "$1" ip link set lo up
  # Equal-cost routes to a load balancer address spread connections by port too, not only by
  # address, as a cloud balancer spreads clients (this namespace's setting only).
  in_ns "$1" sysctl -q -w net.ipv4.fib_multipath_hash_policy=1
  in_ns "$1" ip link set eth0 up
  in_ns "$1" ip addr add "$ip/24" dev eth0
  # Pod networks are routed to their nodes, as a flat routed network would.
  local n
  for n in "${nodes[@]}"; do
    [ "$(node_ip "$n")" = "$ip" ] || in_ns "$1" ip route add "$pod_net.$(node_index "$n").0/24" via "$(node_ip "$n")"
  done
}

net_up() {
  ip link add "$bridge" type bridge
  ip addr add "$host_ip/24" dev "$bridge"
  ip link set "$bridge" up
  local up
  up=$(uplink)
  if [ -n "$up" ]; then
    # The guard: nothing that this machine forwards may leave through its uplink.
    iptables -I FORWARD -o "$up" -m comment --comment "$mark" -j DROP
    echo "$up" >"$state/uplink"
  fi
  local n c
  for n in "${nodes[@]}"; do
    add_host "$n" "$(node_ip "$n")"
    ip route add "$pod_net.$(node_index "$n").0/24" via "$(node_ip "$n")"
    # Traffic from the node's own processes to Services is DNATed by kube-proxy after routing.
    in_ns "$n" ip route add "$service_cidr" dev eth0
    in_ns "$n" sysctl -q -w net.ipv4.ip_forward=1
  done
  for c in "${clients[@]}"; do
    add_host "${c%%:*}" "$net.${c#*:}"
    keep_connections "${c%%:*}"
  done
}

# A cloud balancer tracks connections: one it sent to a node stays with that node until it
# closes, also once the node fails its health check (its kube-proxy goes on serving the
# connection, through a terminating endpoint if need be). The equal-cost routes that cloud.py
# changes would instead move an open connection to the other node, which does not know it: it
# hangs, the client waiting for a reply until its timeout and a terminating member waiting for
# the next command until its 30 s shutdown grace is over (so each roll of the only member on a
# node took 30 s longer). So each client namespace notes which node answered a connection to a
# balancer address (the node's MAC address on the reply) and routes the connection's later
# packets there; only new connections follow cloud.py's routes.
keep_connections() { # NS (the nodes' namespaces exist)
  local n mark mac
  for n in "${nodes[@]}"; do
    mark=$((100 + $(node_index "$n")))
    mac=$(in_ns "$n" cat /sys/class/net/eth0/address)
    in_ns "$1" iptables -t mangle -A PREROUTING -s "$lb_pool" -m mac --mac-source "$mac" \
      -j CONNMARK --set-mark "$mark"
    in_ns "$1" ip route add "$lb_pool" via "$(node_ip "$n")" dev eth0 table "$mark"
    in_ns "$1" ip rule add fwmark "$mark" lookup "$mark"
  done
  in_ns "$1" iptables -t mangle -A OUTPUT -d "$lb_pool" -j CONNMARK --restore-mark
}

# --- images ----------------------------------------------------------------------------------------
build_images() {
  local tag=${MAILCLUSTER_IMAGE_TAG:-e2e} out=$state/images cp_bin=$1
  mkdir -p "$out"
  # The product's images, from the same Containerfiles as docker build uses.
  "$root/images/build.sh" --tag "$tag" --out "$out" ${MAILCLUSTER_BIN_DIR:+--bin-dir "$MAILCLUSTER_BIN_DIR"} >/dev/null
  # The test cluster's own: a pause image (kubelet's pod sandbox) and CoreDNS, FROM scratch too.
  local ctx=$state/build
  mkdir -p "$ctx/pause" "$ctx/coredns"
  musl-gcc -static -Os -s -o "$ctx/pause/pause" "$here/pause.c"
  printf 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n' >"$ctx/pause/Containerfile"
  cp "$cp_bin/coredns" "$ctx/coredns/coredns"
  printf 'FROM scratch\nCOPY coredns /coredns\nUSER 65532:65532\nENTRYPOINT ["/coredns"]\n' \
    >"$ctx/coredns/Containerfile"
  local image
  for image in pause coredns; do
    "$root/images/build.sh" --out "$out" \
      --one "mailcluster.local/$image:1" "$ctx/$image/Containerfile" "$ctx/$image" >/dev/null
  done
}

# --- control plane ---------------------------------------------------------------------------------
controlplane_up() {
  local bin=$1
  start_proc etcd - "$bin/etcd" --data-dir="$state/etcd" \
    --listen-client-urls="http://$host_ip:2379" --advertise-client-urls="http://$host_ip:2379" \
    --listen-peer-urls="http://$host_ip:2380" --initial-advertise-peer-urls="http://$host_ip:2380" \
    --initial-cluster="default=http://$host_ip:2380" --unsafe-no-fsync=true --log-level=warn \
    --listen-metrics-urls=""
  start_proc kube-apiserver - "$bin/kube-apiserver" \
    --etcd-servers="http://$host_ip:2379" \
    --bind-address="$host_ip" --advertise-address="$host_ip" --secure-port=6443 \
    --tls-cert-file="$state/pki/apiserver.crt" --tls-private-key-file="$state/pki/apiserver.key" \
    --client-ca-file="$state/pki/ca.crt" --token-auth-file="$state/pki/tokens.csv" \
    --kubelet-client-certificate="$state/pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$state/pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="" \
    --kubelet-preferred-address-types=InternalIP \
    --service-cluster-ip-range="$service_cidr" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$state/pki/sa.pub" \
    --service-account-signing-key-file="$state/pki/sa.key" \
    --allow-privileged=true --enable-priority-and-fairness=false --v=1
  wait_for "kube-apiserver" 90 kctl get --raw=/readyz
  start_proc kube-controller-manager - "$bin/kube-controller-manager" \
    --kubeconfig="$state/admin.kubeconfig" --leader-elect=false --controllers='*' \
    --service-account-private-key-file="$state/pki/sa.key" --root-ca-file="$state/pki/ca.crt" \
    --use-service-account-credentials=true --secure-port=0 --bind-address="$host_ip" \
    --node-monitor-grace-period=10s --node-monitor-period=1s --v=1
  start_proc kube-scheduler - "$bin/kube-scheduler" \
    --kubeconfig="$state/admin.kubeconfig" --leader-elect=false --secure-port=0 \
    --bind-address="$host_ip" --pod-max-in-unschedulable-pods-duration=5s --v=1
}

kctl() { "$bin/kubectl" --kubeconfig "$state/admin.kubeconfig" "$@"; }

# --- nodes -----------------------------------------------------------------------------------------
node_configs() { # NODE
  local n=$1 d=$state/$1 ip
  ip=$(node_ip "$n")
  mkdir -p "$d/cni" "$d/containerd" "$d/kubelet" "$d/pod-logs"
  cat >"$d/containerd.toml" <<EOF
version = 2
root = "$d/containerd/root"
state = "$d/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd-ttrpc.sock"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$d/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "mailcluster.local/pause:1"
  # Required here: the sandbox is run without CAP_SYS_RESOURCE.
  restrict_oom_score_adj = true
  stream_server_address = "$ip"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$d/cni"
EOF
  cat >"$d/cni/10-$prefix.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "$prefix", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$d/cni-ipam",
            "ranges": [[{"subnet": "$pod_net.$(node_index "$n").0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
  : >"$state/resolv.conf"
  cat >"$d/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupRoot: /$prefix-$n
containerRuntimeEndpoint: unix://$d/containerd.sock
address: $ip
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $state/pki/ca.crt}
authorization: {mode: Webhook}
clusterDNS: [$dns_ip]
clusterDomain: cluster.local
# Pods never see the machine's resolver: cluster DNS only.
resolvConf: $state/resolv.conf
podLogsDir: $d/pod-logs
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 1Mi, nodefs.available: 1%, imagefs.available: 1%}
serializeImagePulls: false
# A lost node is noticed within the controller manager's node-monitor grace period (10 s,
# checked every second), five of these status updates.
nodeStatusUpdateFrequency: 2s
shutdownGracePeriod: 0s
# Pods are synced (and a changed ConfigMap reaches their volume) every 15 s instead of every
# minute, so the config reload test does not wait a minute for it.
syncFrequency: 15s
EOF
  cat >"$d/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $state/kube-proxy.kubeconfig}
hostnameOverride: $(node_name "$n")
bindAddress: $ip
healthzBindAddress: $ip:10256
metricsBindAddress: $ip:10249
mode: iptables
clusterCIDR: $pod_net.0.0/16
nodePortAddresses: [$net.0/24]
# Zero: kube-proxy leaves the machine's conntrack settings alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

node_up() { # NODE [again]: containerd, images (not again: they are in its store), kubelet, kube-proxy
  local n=$1 d=$state/$1 h
  # kubelet's cgroupRoot must exist in every hierarchy; a v1 cpuset needs its CPUs and memory
  # nodes before it can hold a process.
  for h in /sys/fs/cgroup/*/; do
    [ -e "$h/cgroup.procs" ] || continue
    mkdir -p "$h$prefix-$n"
    if [ -e "$h/cpuset.cpus" ]; then
      cat "$h/cpuset.cpus" >"$h$prefix-$n/cpuset.cpus"
      cat "$h/cpuset.mems" >"$h$prefix-$n/cpuset.mems"
    fi
  done
  start_proc "containerd-$n" "$n" containerd --config "$d/containerd.toml"
  wait_for "containerd on $n" 30 ctr --address "$d/containerd.sock" version
  local img
  [ "${2:-}" = again ] || for img in "$state"/images/*.tar; do
    ctr --address "$d/containerd.sock" -n k8s.io images import "$img" >/dev/null
  done
  start_proc "kubelet-$n" "$n" "$bin/kubelet" --config="$d/kubelet.yaml" \
    --kubeconfig="$state/kubelet-$n.kubeconfig" --hostname-override="$(node_name "$n")" \
    --node-ip="$(node_ip "$n")" --root-dir="$d/kubelet" --cert-dir="$d/kubelet/pki" --v=1
  start_proc "kube-proxy-$n" "$n" "$bin/kube-proxy" --config="$d/kube-proxy.yaml" --v=1
}

# Stops a node as a lost machine would go: kubelet, kube-proxy and containerd stop, and every
# container of it dies; its volumes stay on disk.
node_down() { # NODE
  local n=$1
  stop_proc "kube-proxy-$n" KILL
  stop_proc "kubelet-$n" KILL
  stop_proc "containerd-$n" KILL
  kill_cgroup_tree "$prefix-$n"
}

kill_cgroup_tree() { # CGROUP NAME under every hierarchy: kill its processes (shims too)
  local h pids
  for _ in 1 2 3 4 5; do
    pids=$(for h in /sys/fs/cgroup/*/"$1" /sys/fs/cgroup/unified/"$1"; do
      [ -d "$h" ] && find "$h" -name cgroup.procs -exec cat {} + 2>/dev/null
    done | sort -u)
    # The runc shims live outside the pods' cgroups: find them by their containerd address.
    pids="$pids $(pgrep -f "containerd-shim-runc-v2 .*-address $state/${1#"$prefix"-}/containerd.sock" || true)"
    pids=$(echo "$pids" | xargs)
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086 # a list of PIDs
    kill -KILL $pids 2>/dev/null || true
    sleep 0.3
  done
}

remove_cgroups() {
  local dir
  for dir in /sys/fs/cgroup/*/"$prefix"-* /sys/fs/cgroup/unified/"$prefix"-*; do
    [ -d "$dir" ] || continue
    find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
}

cluster_objects() {
  kctl apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: mailcluster.dev/realpods-local
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:1053 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        # No forwarding: a name outside the cluster does not exist on the test network.
        template ANY ANY {
            rcode NXDOMAIN
        }
        cache 30
        loadbalance
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532}
      containers:
      - name: coredns
        image: mailcluster.local/coredns:1
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 1053, protocol: UDP}
        - {name: dns-tcp, containerPort: 1053, protocol: TCP}
        readinessProbe: {httpGet: {path: /ready, port: 8181}, periodSeconds: 2}
        securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $dns_ip
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, targetPort: 1053, protocol: UDP}
  - {name: dns-tcp, port: 53, targetPort: 1053, protocol: TCP}
EOF
}

# The operator as users install it, and the test network's mail peers.
install() {
  kctl apply --server-side -f "$root/tests/integration/tests/fixtures/dnsendpoints.externaldns.k8s.io.yaml" >/dev/null
  log "installing the operator with its Helm chart"
  # --wait waits for the operators' readiness, probed every second here (the chart's default
  # period of 5 s would add seconds). A leader lost with its node is replaced by the standby
  # within 8 s (a 6 s lease, tried every 2 s; the chart's default lease is 15 s), before the
  # node is noticed lost (10 s).
  HOME=$state "$bin/helm" --kubeconfig "$state/admin.kubeconfig" upgrade --install mailcluster \
    "$root/charts/mailcluster-operator" --namespace mailcluster-system --create-namespace \
    --set image.tag="${MAILCLUSTER_IMAGE_TAG:-e2e}" --set image.pullPolicy=Never \
    --set readinessProbe.initialDelaySeconds=0 --set readinessProbe.periodSeconds=1 \
    --set leaderElection.leaseSeconds=6 \
    --set nodeImage="ghcr.io/mailcluster/mailnode:${MAILCLUSTER_IMAGE_TAG:-e2e}" \
    --set replicaCount=2 --set 'logLevel=info\,mailcluster_operator=debug' \
    --set memberRefreshSeconds="$member_refresh_seconds" \
    --wait --timeout 180s >/dev/null
  mkdir -p "$state/sink"
  stop_proc sink
  stop_proc balancer
  # The sink stores every message under $state/sink and journals each transaction.
  SINK_DATA=$state/sink SINK_ADDRESS=$net.50 SINK_PORT=2525 \
    start_proc sink sink python3 "$root/kind-config/sink.py"
  start_proc balancer lb python3 "$here/balancer.py" --listen "$net.60:10025" \
    --routes-file "$state/balancer-target"
  wait_for "the sink" 30 in_ns c1 bash -c "exec 3<>/dev/tcp/$net.50/2525"
}

lb_address() { # SERVICE in namespace demo
  kctl -n demo get service "$1" -o jsonpath='{.status.loadBalancer.ingress[0].ip}'
}

demo() {
  up
  install
  kctl create namespace demo >/dev/null
  kctl apply -f "$root/examples/realpods.yaml" >/dev/null
  log "waiting for MailCluster demo/relay to be Ready"
  wait_for "MailCluster demo/relay Ready" 300 \
    kctl -n demo wait mailcluster/relay --for=condition=Ready --timeout=2s
  wait_for "load balancer addresses" 60 test -n "$(lb_address relay-proxied)"
  local lb_relay lb_proxied
  lb_relay=$(lb_address relay-relay)
  lb_proxied=$(lb_address relay-proxied)
  echo "$lb_proxied 2526 v2" >"$state/balancer-target"
  kctl get mc -A -o wide
  cat <<EOF

The cluster runs until Ctrl-C, which removes all of it. In another shell:
  source $state/env                      # KUBECONFIG and the binaries
  \$MAILCLUSTER_CONTROLPLANE_BIN/kubectl describe mc -n demo relay
  # an allowed client (10.123.0.101) through the load balancer address:
  ip netns exec mcrp-c1 swaks --server $lb_relay:25 --from app@demo.test --to someone@example.org
  # a refused one (550):
  ip netns exec mcrp-c2 swaks --server $lb_relay:25 --from app@demo.test --to someone@example.org
  # behind the PROXY-protocol balancer:
  ip netns exec mcrp-c1 swaks --server $net.60:10025 --from app@demo.test --to someone@example.org
Delivered mail: $state/sink/*.eml (one JSON line per transaction in transactions.jsonl).
EOF
  trap 'log "tearing down"; down; exit 0' INT TERM
  while sleep 3600; do :; done
}

env_file() {
  cat <<EOF
export KUBECONFIG=$state/admin.kubeconfig
export MAILCLUSTER_REALPODS_DIR=$state
export MAILCLUSTER_CONTROLPLANE_BIN=$bin
export MAILCLUSTER_REALPODS_SINK_IP=$net.50
export MAILCLUSTER_REALPODS_BALANCER_IP=$net.60
export MAILCLUSTER_REALPODS_CLIENT_IPS="$net.101 $net.102"
export MAILCLUSTER_REALPODS_HOST_IP=$host_ip
EOF
}

up() {
  [ "$(id -u)" -eq 0 ] || die "real nodes need root (network namespaces, containerd, kubelet)"
  if [ -d "$state" ] || ip netns list | grep -q "^$prefix-"; then
    log "a cluster (or its remains) is there: tearing it down first"
    down
  fi
  local t0=$SECONDS
  mkdir -p "$state/pids" "$state/logs" "$state/volumes"
  ip netns list | awk '{print $1}' | grep '^cni-' >"$netns_before" || true
  bin=$(controlplane_bin)
  save_sysctls
  log "images, PKI, network and control plane"
  # The images are built while the control plane starts: each takes seconds.
  build_images "$bin" &
  local images=$!
  make_pki
  net_up
  controlplane_up "$bin"
  wait "$images"
  local n
  for n in "${nodes[@]}"; do node_configs "$n"; done
  log "nodes ${nodes[*]}"
  # Side by side: starting containerd and importing the images take seconds per node.
  local pids=() p
  for n in "${nodes[@]}"; do
    node_up "$n" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  start_proc cloud - python3 "$here/cloud.py" --kubeconfig "$state/admin.kubeconfig" \
    --kubectl "$bin/kubectl" --pool "$lb_pool" --volumes "$state/volumes" \
    --netns "$(for c in "${clients[@]}"; do printf '%s-%s ' "$prefix" "${c%%:*}"; done)" \
    --node-ips "$(for n in "${nodes[@]}"; do printf '%s=%s ' "$(node_name "$n")" "$(node_ip "$n")"; done)"
  for n in "${nodes[@]}"; do
    wait_for "node $(node_name "$n") Ready" 120 kctl wait --for=condition=Ready "node/$(node_name "$n")" --timeout=2s
  done
  # kubelet changed kernel settings at start: put them back.
  restore_sysctls
  cluster_objects
  wait_for "CoreDNS" 120 kctl -n kube-system wait --for=condition=Available deployment/coredns --timeout=2s
  env_file >"$state/env"
  log "cluster up in $((SECONDS - t0))s; source $state/env for KUBECONFIG"
}

down() {
  [ -d "$state" ] || { cleanup_network; remove_cgroups; restore_sysctls; return 0; }
  local n p
  # The pods' networks need no CNI DEL: their namespaces, veths and bridges go with the nodes'
  # network namespaces, and the pinned pod namespaces are removed below.
  stop_proc cloud
  stop_proc sink
  stop_proc balancer
  for n in "${nodes[@]}"; do node_down "$n"; done
  # Nothing of theirs is kept: no graceful shutdown needed.
  for p in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_proc "$p" KILL; done
  # Whatever the processes left mounted under the state directory (tokens, rootfs, shm, netns).
  for _ in 1 2 3; do
    awk -v s="$state" 'index($2, s) == 1 {print $2}' /proc/mounts | sort -ru |
      while IFS= read -r m; do umount -l "$m" 2>/dev/null || true; done
  done
  cleanup_network
  remove_cgroups
  restore_sysctls
  rm -rf "$state"
}

cleanup_network() {
  local ns
  for ns in $(ip netns list | awk '{print $1}' | grep "^$prefix-" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link show "$bridge" >/dev/null 2>&1 && ip link del "$bridge"
  local l
  for l in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^$prefix-" || true); do
    ip link del "$l" 2>/dev/null || true
  done
  while iptables -S FORWARD | grep -q -- "--comment $mark"; do
    iptables -S FORWARD | grep -- "--comment $mark" | head -n 1 | sed 's/^-A /-D /' |
      xargs iptables 2>/dev/null || break
  done
  # Routes to the pod networks and LB addresses went with the bridge. containerd pins each pod's
  # network namespace at /run/netns/cni-*: kubelet removes them, and so does this for a lost
  # node's pods (those that were there before the cluster are kept).
  for ns in $(ip netns list | awk '{print $1}' | grep '^cni-' || true); do
    grep -qx "$ns" "$netns_before" 2>/dev/null || ip netns del "$ns" 2>/dev/null || true
  done
}

check_clean() {
  local bad=()
  [ -z "$(ip netns list | grep "^$prefix-" || true)" ] || bad+=("network namespaces: $(ip netns list | grep "^$prefix-" | xargs)")
  [ -z "$(ip -o link show | grep -E ": $prefix-" || true)" ] || bad+=("links: $(ip -o link show | grep -E ": $prefix-" | awk -F': ' '{print $2}' | xargs)")
  [ -z "$(ip route | grep -E "^($pod_net|10\.125)\." || true)" ] || bad+=("routes: $(ip route | grep -E "^($pod_net|10\.125)\." | xargs)")
  ! iptables -S | grep -q -- "$mark" || bad+=("iptables rules: $(iptables -S | grep -- "$mark")")
  [ -z "$(pgrep -a -f "$state/|$prefix-n[0-9]" || true)" ] || bad+=("processes: $(pgrep -a -f "$state/|$prefix-n[0-9]" | cut -c1-120)")
  local cgroups
  cgroups=$(find /sys/fs/cgroup -mindepth 2 -maxdepth 2 -name "$prefix-*" -printf "%p " 2>/dev/null)
  [ -z "$cgroups" ] || bad+=("cgroups: $cgroups")
  ! grep -q "$state" /proc/mounts || bad+=("mounts: $(grep "$state" /proc/mounts | awk '{print $2}' | xargs)")
  [ ! -e "$state" ] || bad+=("state directory $state")
  local cni
  [ -f "$netns_before" ] || : >"$netns_before"
  cni=$(ip netns list | awk '{print $1}' | grep '^cni-' | grep -vxF -f "$netns_before" || true)
  rm -f "$netns_before"
  [ -z "$cni" ] || bad+=("pod network namespaces: $cni")
  if [ -f "${1:-}" ]; then
    local line
    while IFS= read -r line; do
      [ "$(sysctl -n "${line%%=*}" 2>/dev/null)" = "${line#*=}" ] ||
        bad+=("sysctl ${line%%=*} is $(sysctl -n "${line%%=*}"), was ${line#*=}")
    done <"$1"
  fi
  if [ ${#bad[@]} -gt 0 ]; then
    printf 'left behind: %s\n' "${bad[@]}" >&2
    return 1
  fi
  echo "nothing left behind"
}

case "${1:-}" in
  demo) demo ;;
  up) up ;;
  install) bin=$(controlplane_bin); install ;;
  down) down ;;
  check-clean) check_clean "${2:-}" ;;
  env) bin=$(controlplane_bin); env_file ;;
  stop-node) bin=$(controlplane_bin); node_down "${2:?node (n1, n2)}" ;;
  start-node)
    bin=$(controlplane_bin)
    node_up "${2:?node (n1, n2)}" again
    # kubelet sets its kernel settings before its node is Ready: put them back after.
    wait_for "node $(node_name "$2") Ready" 120 kctl wait --for=condition=Ready "node/$(node_name "$2")" --timeout=2s
    restore_sysctls
    ;;
  *) sed -n '2,32p' "$0" >&2; exit 2 ;;
esac
