#!/usr/bin/env bash
# End-to-end test of mailcluster on a kind cluster (needs Docker; CI runs it from
# .github/workflows/e2e-kind.yml):
#   1. creates the kind cluster of kind-config/cluster.yaml (1 control plane, 2 workers) and
#      starts cloud-provider-kind, which gives LoadBalancer Services an address;
#   2. builds the static binaries in a container (images/binaries.Containerfile) and the
#      operator and relay node images from them (images/build.sh --builder docker: the same
#      FROM-scratch Containerfiles the real-pod tests build with buildah), and loads them;
#   3. installs the Helm chart (2 operator replicas, leader election);
#   4. applies examples/mailcluster.yaml (with a generated TLS certificate and AUTH users) and
#      waits until it is Ready;
#   5. applies an e2e MailCluster that delivers to an SMTP sink pod (kind-config/sink.py), sends
#      mail through the LoadBalancer address of a listener that allows the sender and of one
#      that refuses it, and checks the sink got exactly the allowed mail;
#   6. makes the sink refuse for a while so mail queues on the members (also directly on the
#      member that will be removed), scales the cluster from 3 to 2, lets the sink accept again
#      and checks every queued message arrives exactly once.
#
# About source addresses: cloud-provider-kind's load balancer is an Envoy container on the
# "kind" Docker network that proxies TCP to the nodes, so the members see the load balancer
# container's address (in the kind network's subnet), not the host's. The e2e MailCluster
# therefore allows the kind network's subnet on one listener ("allowed") and only TEST-NET-1
# (192.0.2.0/24) on the other ("refused"): the same sender is allowed on one load balancer
# address and refused on the other.
#
# Needs: docker, kind, kubectl, helm, python3, cloud-provider-kind
#   (go install sigs.k8s.io/cloud-provider-kind@latest, or a release binary; it talks to the
#   Docker socket and opens ports, so it may need sudo: set CLOUD_PROVIDER_KIND="sudo cloud-provider-kind").
#
# Env: KIND_CLUSTER_NAME (mailcluster-e2e), E2E_KEEP_CLUSTER=1 keeps the cluster afterwards,
#      E2E_REUSE_CLUSTER=1 uses an existing cluster of that name, E2E_SKIP_BUILD=1 uses images
#      already built, E2E_IMAGE_TAG (e2e), E2E_TIMEOUT seconds per wait (300),
#      E2E_ARTIFACTS directory for logs on failure (a temp dir).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

cluster=${KIND_CLUSTER_NAME:-mailcluster-e2e}
context="kind-$cluster"
tag=${E2E_IMAGE_TAG:-e2e}
operator_image="mailcluster.local/mailcluster-operator:$tag"
node_image="mailcluster.local/mailnode:$tag"
timeout=${E2E_TIMEOUT:-300}
artifacts=${E2E_ARTIFACTS:-$(mktemp -d -t mailcluster-e2e.XXXXXX)}
operator_ns=mailcluster-system
example_ns=mail
ns=mail-e2e
read -r -a cloud_provider_kind <<<"${CLOUD_PROVIDER_KIND:-cloud-provider-kind}"
mkdir -p "$artifacts"

log() { printf '\n[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() {
  printf '[e2e] FAILED: %s\n' "$*" >&2
  exit 1
}
k() { kubectl --context "$context" "$@"; }

for tool in docker kind kubectl helm python3 openssl "${cloud_provider_kind[-1]}"; do
  command -v "$tool" >/dev/null || fail "$tool is not on PATH (see the header of $0)"
done

cpk_pid=""
created_cluster=0
diagnostics() {
  log "diagnostics (also in $artifacts)"
  k get nodes -o wide || true
  k get all,mailclusters,pvc,events -A -o wide >"$artifacts/objects.txt" 2>&1 || true
  k get mailclusters -A -o yaml >"$artifacts/mailclusters.yaml" 2>&1 || true
  k -n "$operator_ns" logs -l app.kubernetes.io/name=mailcluster-operator --tail=-1 --prefix \
    >"$artifacts/operator.log" 2>&1 || true
  for n in "$ns" "$example_ns"; do
    k -n "$n" logs -l app.kubernetes.io/managed-by=mailcluster-operator --tail=-1 --prefix \
      >"$artifacts/relay-$n.log" 2>&1 || true
  done
  k -n "$ns" logs deploy/smtp-sink --tail=-1 >"$artifacts/sink.log" 2>&1 || true
  tail -n 40 "$artifacts/objects.txt" "$artifacts/operator.log" "$artifacts/relay-$ns.log" \
    "$artifacts/sink.log" "$artifacts/cloud-provider-kind.log" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    diagnostics
  fi
  if [ -n "$cpk_pid" ]; then
    kill "$cpk_pid" 2>/dev/null || true
    wait "$cpk_pid" 2>/dev/null || true
  fi
  if [ "$created_cluster" = 1 ] && [ "${E2E_KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$cluster" || true
  fi
  exit "$rc"
}
trap cleanup EXIT

# Polls a command until it succeeds, for at most $timeout seconds.
wait_for() {
  local what=$1
  shift
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${timeout}s waiting for $what"
    sleep 3
  done
}

# --- 1. cluster and load balancers -------------------------------------------------------------
if [ "${E2E_REUSE_CLUSTER:-0}" = 1 ] && kind get clusters | grep -qx "$cluster"; then
  log "using the existing kind cluster $cluster"
else
  log "creating the kind cluster $cluster"
  kind create cluster --name "$cluster" --config kind-config/cluster.yaml --wait "${timeout}s"
  created_cluster=1
fi
log "starting cloud-provider-kind (log: $artifacts/cloud-provider-kind.log)"
"${cloud_provider_kind[@]}" >"$artifacts/cloud-provider-kind.log" 2>&1 &
cpk_pid=$!

# --- 2. images ------------------------------------------------------------------------------------
if [ "${E2E_SKIP_BUILD:-0}" != 1 ]; then
  log "building the binaries, then $operator_image and $node_image"
  DOCKER_BUILDKIT=1 docker build -f images/binaries.Containerfile \
    --output "type=local,dest=$artifacts/bin" .
  images/build.sh --builder docker --bin-dir "$artifacts/bin" --repository mailcluster.local \
    --tag "$tag"
fi
log "loading the images into the cluster"
kind load docker-image --name "$cluster" "$operator_image" "$node_image"

# --- 3. operator --------------------------------------------------------------------------------
log "installing the chart"
helm --kube-context "$context" upgrade --install mailcluster charts/mailcluster-operator \
  --namespace "$operator_ns" --create-namespace \
  --set image.repository=mailcluster.local/mailcluster-operator --set image.tag="$tag" --set image.pullPolicy=Never \
  --set nodeImage="$node_image" --set replicaCount=2 --set logLevel=info,mailcluster_operator=debug \
  --wait --timeout "${timeout}s"
k -n "$operator_ns" rollout status deployment/mailcluster-mailcluster-operator --timeout "${timeout}s"
wait_for "a leader on the operator Lease" \
  bash -c "[ -n \"\$(kubectl --context '$context' -n '$operator_ns' get lease mailcluster-mailcluster-operator -o jsonpath='{.spec.holderIdentity}')\" ]"

# --- 4. the example -----------------------------------------------------------------------------
log "applying examples/mailcluster.yaml with a self-signed certificate and one AUTH user"
k create namespace "$example_ns" --dry-run=client -o yaml | k apply -f -
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=smtp.example.com" \
  -addext "subjectAltName=DNS:smtp.example.com" \
  -keyout "$artifacts/tls.key" -out "$artifacts/tls.crt" 2>/dev/null
k -n "$example_ns" create secret tls smtp-example-com --cert="$artifacts/tls.crt" \
  --key="$artifacts/tls.key" --dry-run=client -o yaml | k apply -f -
docker run --rm httpd:2.4-alpine htpasswd -nbB app "e2e-$RANDOM$RANDOM" >"$artifacts/users"
k -n "$example_ns" create secret generic smtp-users --from-file=users="$artifacts/users" \
  --dry-run=client -o yaml | k apply -f -
k apply -f examples/mailcluster.yaml
k -n "$example_ns" wait mailcluster/relay --for=condition=Ready --timeout "${timeout}s"
k -n "$example_ns" get mailcluster relay -o wide

# --- 5. allowed and refused mail through the load balancer ----------------------------------
log "starting the SMTP sink"
k create namespace "$ns" --dry-run=client -o yaml | k apply -f -
k -n "$ns" create configmap smtp-sink --from-file=kind-config/sink.py \
  --from-file=kind-config/send.py --dry-run=client -o yaml | k apply -f -
k -n "$ns" apply -f kind-config/sink.yaml
k -n "$ns" rollout status deployment/smtp-sink --timeout "${timeout}s"

kind_subnet=$(docker network inspect kind \
  -f '{{range .IPAM.Config}}{{println .Subnet}}{{end}}' | grep -v ':' | head -n 1)
[ -n "$kind_subnet" ] || fail "no IPv4 subnet on the kind Docker network"
pod_subnet=10.244.0.0/16
log "kind network $kind_subnet, pod network $pod_subnet"

k apply -f - <<EOF
apiVersion: mailcluster.dev/v1alpha1
kind: MailCluster
metadata:
  name: e2e
  namespace: $ns
spec:
  hostname: smtp.e2e.example
  replicas: 3
  listeners:
    - name: allowed
      port: 25
      relay:
        allowedSources: [$kind_subnet, $pod_subnet]
    - name: refused
      port: 2526
      relay:
        allowedSources: [192.0.2.0/24]
  delivery:
    smarthosts:
      - {host: smtp-sink.$ns.svc.cluster.local, port: 2525, priority: 10}
    retry: {first: 5s, max: 10s, lifetime: 1h}
  storage: {size: 256Mi}
  dns: {enabled: false}
  scheduling: {spread: Preferred}
EOF
k -n "$ns" wait mailcluster/e2e --for=condition=Ready --timeout "${timeout}s"
k -n "$ns" get mailcluster e2e -o wide

lb_address() {
  k -n "$ns" get service "e2e-$1" -o jsonpath='{.status.loadBalancer.ingress[0].ip}'
}
wait_for "load balancer addresses" bash -c \
  "[ -n \"\$(kubectl --context '$context' -n '$ns' get service e2e-allowed -o jsonpath='{.status.loadBalancer.ingress[0].ip}')\" ] &&
   [ -n \"\$(kubectl --context '$context' -n '$ns' get service e2e-refused -o jsonpath='{.status.loadBalancer.ingress[0].ip}')\" ]"
allowed_lb=$(lb_address allowed)
refused_lb=$(lb_address refused)
log "load balancers: allowed $allowed_lb:25, refused $refused_lb:2526"
wait_for "the allowed listener answering on $allowed_lb:25" \
  python3 -c "import smtplib,sys; s=smtplib.SMTP(sys.argv[1], 25, timeout=5); s.noop(); s.quit()" "$allowed_lb"

# Prints "COUNT SUBJECT" for every subject the sink stored.
sink_subjects() {
  # shellcheck disable=SC2016 # expanded by the shell in the sink pod
  k -n "$ns" exec deploy/smtp-sink -- sh -c \
    'for f in /data/*.eml; do [ -e "$f" ] && grep -m 1 "^Subject: " "$f"; done; true' |
    sed 's/^Subject: //' | tr -d '\r' | sort | uniq -c | awk '{print $1, $2}'
}
sink_count() {
  sink_subjects | awk '{n += $1} END {print n + 0}'
}
# Fails unless the sink holds exactly one copy of each subject in $@ and nothing else.
expect_exactly() {
  local want got
  want=$(printf '1 %s\n' "$@" | sort)
  got=$(sink_subjects | sort)
  if [ "$want" != "$got" ]; then
    diff <(printf '%s\n' "$want") <(printf '%s\n' "$got") || true
    fail "the sink holds other mail than expected (< expected, > stored)"
  fi
}
subjects() { # PREFIX COUNT
  local i
  for ((i = 1; i <= $2; i++)); do printf '%s-%d\n' "$1" "$i"; done
}

log "sending 5 messages through the allowed listener"
python3 kind-config/send.py "$allowed_lb" 25 5 allowed || fail "the allowed listener refused mail"
log "sending 3 messages through the refused listener"
rc=0
python3 kind-config/send.py "$refused_lb" 2526 3 refused || rc=$?
[ "$rc" = 3 ] || fail "the refused listener did not refuse every message (send.py exit $rc)"

wait_for "5 messages at the sink" bash -c "[ \"\$(kubectl --context '$context' -n '$ns' exec deploy/smtp-sink -- sh -c 'ls /data/*.eml 2>/dev/null | wc -l')\" -ge 5 ]"
sleep 10 # anything more that would arrive (a refused message, a duplicate) has arrived by now
mapfile -t expected < <(subjects allowed 5)
expect_exactly "${expected[@]}"
log "the sink got exactly the 5 allowed messages"

# --- 6. scale 3 -> 2 with mail in the queues -------------------------------------------------
log "pausing the sink: the members queue what they accept"
k -n "$ns" exec deploy/smtp-sink -- touch /data/paused
log "queueing 10 messages through the load balancer and 10 directly on e2e-2"
python3 kind-config/send.py "$allowed_lb" 25 10 queued-lb || fail "queueing through the load balancer"
member_ip=$(k -n "$ns" get pod e2e-2 -o jsonpath='{.status.podIP}')
[ -n "$member_ip" ] || fail "member e2e-2 has no address"
k -n "$ns" exec deploy/smtp-sink -- python3 /app/send.py "$member_ip" 25 10 queued-on-2 ||
  fail "queueing on member e2e-2 (from the sink pod, source in $pod_subnet)"
sleep 15 # a few retry rounds against the paused sink
[ "$(sink_count)" = 5 ] || fail "mail was delivered although the sink refuses"

log "scaling the MailCluster from 3 to 2"
k -n "$ns" patch mailcluster e2e --type merge -p '{"spec":{"replicas":2}}'
wait_for "member e2e-2 to be gone" bash -c "! kubectl --context '$context' -n '$ns' get pod e2e-2"
wait_for "statefulset e2e at 2 ready replicas" bash -c \
  "[ \"\$(kubectl --context '$context' -n '$ns' get statefulset e2e -o jsonpath='{.status.readyReplicas}/{.spec.replicas}')\" = 2/2 ]"
k -n "$ns" wait mailcluster/e2e --for=condition=Ready --timeout "${timeout}s"
k -n "$ns" get mailcluster e2e -o wide

log "resuming the sink"
k -n "$ns" exec deploy/smtp-sink -- rm -f /data/paused
wait_for "all 25 messages at the sink" bash -c "[ \"\$(kubectl --context '$context' -n '$ns' exec deploy/smtp-sink -- sh -c 'ls /data/*.eml 2>/dev/null | wc -l')\" -ge 25 ]"
sleep 15 # late duplicates would show up here
mapfile -t expected < <(subjects allowed 5; subjects queued-lb 10; subjects queued-on-2 10)
expect_exactly "${expected[@]}"
log "PASSED: exactly the allowed mail was delivered, and no queued mail was lost scaling 3 -> 2"
