#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl, kwok, helm) and the parts of a real node (kubelet, kube-proxy, CoreDNS) from their Go
# modules with the machine's Go, into a cache outside the clone.
# Idempotent: when every binary of these pinned versions is already there, it only prints the path.
#
# Usage: tests/controlplane/build.sh         # builds if needed, prints the bin directory last
# Env:   MAILCLUSTER_CACHE (default ~/.cache/mailcluster): the binaries and Go's module and build
#        caches all live under it, so a fresh directory there gives a cold build.
set -euo pipefail

K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
COREDNS_VERSION=v1.14.7

cache_root=${MAILCLUSTER_CACHE:-$HOME/.cache/mailcluster}
key="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}_coredns-${COREDNS_VERSION}"
bin="$cache_root/controlplane/$key/bin"
work="$cache_root/controlplane/$key/src"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy kwok helm
  coredns)

all_present() {
  local b
  for b in "${binaries[@]}"; do [ -x "$bin/$b" ] || return 1; done
  [ -s "$bin/kwok-stages.yaml" ]
}

if all_present; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: go is not on PATH" >&2; exit 1; }
mkdir -p "$bin" "$work"
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
export GOMODCACHE=${GOMODCACHE:-$cache_root/go/mod} GOCACHE=${GOCACHE:-$cache_root/go/build}
log() { printf '[controlplane] %s\n' "$*" >&2; }

# --- Kubernetes: a wrapper module that replaces every staging module by its published v0.x ---
k8s_dir="$work/kubernetes"
prepare_kubernetes() {
  local dir=$k8s_dir staging_version="v0.${K8S_VERSION#v1.}"
  mkdir -p "$dir"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  {
    echo "module mailcluster.dev/controlplane/kubernetes"
    echo
    echo "go 1.26.0"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^\s*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\t\1 => \1 '"$staging_version"'#p' "$gomod"
    echo ")"
  } >"$dir/go.mod"
  # A blank import keeps `go mod tidy` from pruning the requirement.
  cat >"$dir/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
	_ "k8s.io/kubernetes/cmd/kube-proxy/app"
	_ "k8s.io/kubernetes/cmd/kubelet/app"
)
GO
  # Fills go.sum; errors about packages that are not built are not ours to fix.
  (cd "$dir" && { go mod tidy -e >/dev/null 2>&1 || true; })
}

build_kubernetes() {
  local dir=$k8s_dir
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local pkg=k8s.io/component-base/version
  local ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  # One invocation for every command: the k8s.io packages they share are compiled once and the
  # links run side by side.
  local cmd pkgs=()
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
    [ -x "$bin/$cmd" ] || pkgs+=("k8s.io/kubernetes/cmd/$cmd")
  done
  [ ${#pkgs[@]} -gt 0 ] || return 0
  log "building ${pkgs[*]##*/} $K8S_VERSION"
  local out="$work/kubernetes-out"
  rm -rf "$out" && mkdir -p "$out"
  (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$out/" "${pkgs[@]}")
  mv "$out"/* "$bin/"
}

# A wrapper module: a main of our own that requires the real module at a pinned version.
wrapper_module() { # NAME "MODULE VERSION": writes its go.mod, prints its directory
  local dir="$work/$1"
  mkdir -p "$dir"
  printf 'module mailcluster.dev/controlplane/%s\n\ngo 1.26.0\n\nrequire %s\n' "$1" "$2" >"$dir/go.mod"
  echo "$dir"
}
build_wrapper() { # NAME VERSION: builds the wrapper module's main.go into $bin/NAME
  log "building $1 $2"
  (cd "$work/$1" && go mod tidy >/dev/null && go build -trimpath -ldflags "-s -w" -o "$bin/$1.tmp" .)
  mv "$bin/$1.tmp" "$bin/$1"
}

# --- etcd: a wrapper main that calls etcdmain.Main, with etcd's sibling modules pinned ---
build_etcd() {
  [ -x "$bin/etcd" ] && return
  local dir
  dir=$(wrapper_module etcd "go.etcd.io/etcd/server/v3 $ETCD_VERSION")
  cat >>"$dir/go.mod" <<GOMOD

replace (
	go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/pkg/v3 => go.etcd.io/etcd/client/pkg/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 $ETCD_VERSION
	go.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 $ETCD_VERSION
)
GOMOD
  cat >"$dir/main.go" <<'GO'
// Command etcd runs the etcd server of the pinned module version.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  build_wrapper etcd "$ETCD_VERSION"
}

# --- CoreDNS: a wrapper main with only the plugins a test cluster's DNS needs (no forwarding, so
# no name ever leaves the test network), which also keeps the build small ---
build_coredns() {
  [ -x "$bin/coredns" ] && return
  local dir
  dir=$(wrapper_module coredns "github.com/coredns/coredns $COREDNS_VERSION")
  cat >"$dir/main.go" <<'GO'
// Command coredns runs CoreDNS with the plugins of a test cluster's DNS.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/template"
)

func init() {
	dnsserver.Directives = []string{"errors", "log", "health", "ready", "kubernetes", "template", "cache", "loadbalance"}
}

func main() { coremain.Run() }
GO
  build_wrapper coredns "$COREDNS_VERSION"
}

build_go_install() { # name module@version
  local name=$1 target=$2
  [ -x "$bin/$name" ] && return
  log "building $name ${target#*@}"
  GOBIN="$bin" go install -trimpath -ldflags "${3:-}" "$target"
}

# Kubernetes' modules download while the smaller tools compile.
prepare_kubernetes &
prepare_pid=$!
build_etcd
build_go_install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "-s -w"
build_go_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
  "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
# kwok has no built-in behaviour: its "fast" stages (nodes Ready with a heartbeat lease, pods
# Running and Ready, deleted pods gone) ship in its Go module; gather them into one config file.
kwok_stages() {
  [ -s "$bin/kwok-stages.yaml" ] && return
  local dir
  dir=$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')
  local f first=1
  : >"$bin/kwok-stages.yaml.tmp"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [ $first -eq 1 ] || echo '---' >>"$bin/kwok-stages.yaml.tmp"
    first=0
    cat "$dir/kustomize/stage/$f" >>"$bin/kwok-stages.yaml.tmp"
  done
  mv "$bin/kwok-stages.yaml.tmp" "$bin/kwok-stages.yaml"
}

build_coredns
wait "$prepare_pid"
build_kubernetes
kwok_stages

all_present || { echo "build.sh: some binaries are missing from $bin" >&2; exit 1; }
echo "$bin"
