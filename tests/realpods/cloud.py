"""The real-pod test cluster's cloud controller, doing what cloud-provider-kind or MetalLB and a
local-path provisioner do on a real cluster:

- LoadBalancer Services get an address from --pool (kept while the Service lives), written to
  status.loadBalancer.ingress, and routed in the host and in every client namespace to the nodes
  that should receive it: with externalTrafficPolicy Local only the nodes with a ready local
  endpoint (what a cloud balancer's health check on healthCheckNodePort finds), with Cluster
  every Ready node. Several nodes share the address by equal-cost multipath routes; a
  connection already open stays with its node (cluster.sh keep_connections).
- PersistentVolumeClaims of the "local" StorageClass (WaitForFirstConsumer) get a `local`
  PersistentVolume in a directory under --volumes, bound to the node the scheduler chose; a
  released volume is deleted with its directory.

Works through kubectl: a watch per kind of object says when something that matters changed
(within a fraction of a second, as a cloud's controller would notice), and then the objects
are listed and the routes and volumes brought in line; every RESYNC_SECONDS also without a
change. Python standard library only.
"""
import argparse
import ctypes
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

PROVISIONER = "mailcluster.dev/realpods-local"
SELECTED_NODE = "volume.kubernetes.io/selected-node"
# Without any watch event the state is synced this often anyway (a watch that ended is started
# again, and what changed in between is seen then at the latest). A sync is a kubectl run, about
# 0.1 s of a core: listing every second instead of watching took a fifth of one of the two here.
RESYNC_SECONDS = 30


def relevant(kind, obj):
    """What of an object the syncs depend on; a change elsewhere in it (a node's heartbeat
    every 2 s, an endpoint's other conditions) starts no sync."""
    meta, spec = obj.get("metadata", {}), obj.get("spec", {})
    if kind == "services":
        return spec.get("type"), spec.get("externalTrafficPolicy"), json.dumps(obj.get("status"))
    if kind == "endpointslices":
        return [(ep.get("nodeName"), (ep.get("conditions") or {}).get("ready"))
                for ep in obj.get("endpoints") or []]
    if kind == "nodes":
        return [c["status"] for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
    if kind == "persistentvolumeclaims":
        return meta.get("annotations", {}).get(SELECTED_NODE), spec.get("volumeName")
    return obj.get("status", {}).get("phase")  # persistentvolumes


# The sync each watched kind of object feeds.
WATCHES = {"services": "services", "endpointslices": "services", "nodes": "services",
           "persistentvolumeclaims": "volumes", "persistentvolumes": "volumes"}


LIBC = ctypes.CDLL(None)  # loaded here: a forked child only calls into it


def die_with_parent():
    """Run in a kubectl watch before it starts: it gets SIGKILL when this controller exits, how
    ever it is stopped (cluster.sh checks that nothing is left running)."""
    LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


class Cloud:
    def __init__(self, args):
        self.kubectl = [args.kubectl, "--kubeconfig", args.kubeconfig]
        self.pool = [str(ip) for ip in ipaddress.ip_network(args.pool).hosts()][1:]
        self.volumes = args.volumes
        self.namespaces = [""] + args.netns.split()
        self.node_ips = dict(pair.split("=", 1) for pair in args.node_ips.split())
        self.routes = {}  # LB address -> tuple of node IPs it is routed to

    def k(self, *args, stdin=None):
        return subprocess.run(self.kubectl + list(args), input=stdin, capture_output=True,
                              text=True, timeout=30)

    def items(self, *kinds):
        """The objects of each of `kinds` (as named in their "kind" field), with one kubectl."""
        plural = {"Service": "services", "EndpointSlice": "endpointslices.discovery.k8s.io",
                  "Node": "nodes", "PersistentVolumeClaim": "persistentvolumeclaims",
                  "PersistentVolume": "persistentvolumes"}
        out = self.k("get", ",".join(plural[k] for k in kinds), "-A", "-o", "json")
        if out.returncode != 0:
            raise RuntimeError(f"kubectl get {kinds}: {out.stderr.strip()}")
        got = {k: [] for k in kinds}
        for item in json.loads(out.stdout)["items"]:
            got[item["kind"]].append(item)
        return got

    # --- load balancers ----------------------------------------------------------------------
    def sync_services(self):
        items = self.items("Service", "EndpointSlice", "Node")
        services = [s for s in items["Service"] if s["spec"].get("type") == "LoadBalancer"]
        slices, nodes = items["EndpointSlice"], items["Node"]
        ready_nodes = {n["metadata"]["name"] for n in nodes
                       if any(c["type"] == "Ready" and c["status"] == "True"
                              for c in n.get("status", {}).get("conditions", []))}
        used = {i.get("ip") for s in services
                for i in s.get("status", {}).get("loadBalancer", {}).get("ingress", []) or []}
        wanted = {}
        for svc in services:
            meta = svc["metadata"]
            ingress = svc.get("status", {}).get("loadBalancer", {}).get("ingress") or []
            address = ingress[0].get("ip") if ingress else None
            if not address:
                free = [ip for ip in self.pool if ip not in used]
                if not free:
                    log("no free load balancer address for", meta["namespace"], meta["name"])
                    continue
                address = free[0]
                used.add(address)
                patch = json.dumps({"status": {"loadBalancer": {"ingress": [{"ip": address, "ipMode": "VIP"}]}}})
                out = self.k("-n", meta["namespace"], "patch", "service", meta["name"],
                             "--subresource=status", "--type=merge", "-p", patch)
                if out.returncode != 0:
                    log("patching", meta["name"], out.stderr.strip())
                    continue
                log("service", f"{meta['namespace']}/{meta['name']}", "gets", address)
            if svc["spec"].get("externalTrafficPolicy") == "Local":
                targets = {
                    ep.get("nodeName")
                    for sl in slices
                    if sl["metadata"]["namespace"] == meta["namespace"]
                    and sl["metadata"].get("labels", {}).get("kubernetes.io/service-name") == meta["name"]
                    for ep in sl.get("endpoints") or []
                    if (ep.get("conditions") or {}).get("ready")
                } & ready_nodes
            else:
                targets = ready_nodes
            wanted[address] = tuple(sorted(self.node_ips[n] for n in targets if n in self.node_ips))
        for address, via in wanted.items():
            if self.routes.get(address) != via:
                self.route(address, via)
        for address in set(self.routes) - set(wanted):
            self.route(address, None)

    def route(self, address, via):
        """Routes address to the node IPs `via` (several: multipath), to none (unreachable), or
        removes the route (via None)."""
        for ns in self.namespaces:
            pre = ["ip", "netns", "exec", ns] if ns else []
            if via is None:
                cmd = pre + ["ip", "route", "del", f"{address}/32"]
            elif not via:
                cmd = pre + ["ip", "route", "replace", "unreachable", f"{address}/32"]
            elif len(via) == 1:
                cmd = pre + ["ip", "route", "replace", f"{address}/32", "via", via[0]]
            else:
                hops = [w for ip in via for w in ("nexthop", "via", ip)]
                cmd = pre + ["ip", "route", "replace", f"{address}/32"] + hops
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0 and via is not None:
                log("route", " ".join(cmd), out.stderr.strip())
        if via is None:
            self.routes.pop(address, None)
        else:
            self.routes[address] = via
        log("route", address, "->", ", ".join(via) if via else ("unreachable" if via is not None else "removed"))

    # --- volumes -------------------------------------------------------------------------------
    def sync_volumes(self):
        items = self.items("PersistentVolumeClaim", "PersistentVolume")
        for pvc in items["PersistentVolumeClaim"]:
            meta, spec = pvc["metadata"], pvc["spec"]
            node = meta.get("annotations", {}).get(SELECTED_NODE)
            if spec.get("volumeName") or spec.get("storageClassName") != "local" or not node:
                continue
            name = "pvc-" + meta["uid"]
            path = os.path.join(self.volumes, name)
            os.makedirs(path, exist_ok=True)
            # The pods run as the images' non-root user; a local volume is not chowned for them.
            os.chown(path, 65532, 65532)
            os.chmod(path, 0o770)
            pv = {
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
                "spec": {
                    "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                    "accessModes": spec.get("accessModes", ["ReadWriteOnce"]),
                    "storageClassName": "local",
                    "persistentVolumeReclaimPolicy": "Delete",
                    "volumeMode": "Filesystem",
                    "local": {"path": path},
                    "claimRef": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
                    "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
                },
            }
            out = self.k("create", "-f", "-", stdin=json.dumps(pv))
            if out.returncode == 0:
                log("volume", name, "for", f"{meta['namespace']}/{meta['name']}", "on", node)
            elif "AlreadyExists" not in out.stderr:
                log("creating volume", name, out.stderr.strip())
        for pv in items["PersistentVolume"]:
            meta = pv["metadata"]
            if (meta.get("annotations", {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
                    and pv.get("status", {}).get("phase") == "Released"):
                path = pv["spec"].get("local", {}).get("path", "")
                if path.startswith(self.volumes + "/"):
                    shutil.rmtree(path, ignore_errors=True)
                self.k("delete", "persistentvolume", meta["name"], "--wait=false")
                log("volume", meta["name"], "released and deleted")


class Watches:
    """A `kubectl get --watch` per kind of object; `wait` returns the syncs that are due."""

    def __init__(self, kubectl):
        self.kubectl = kubectl
        self.due = set(WATCHES.values())
        self.cond = threading.Condition()
        for kind in WATCHES:
            threading.Thread(target=self.watch, args=(kind,), daemon=True).start()

    def mark(self, sync):
        with self.cond:
            self.due.add(sync)
            self.cond.notify()

    def wait(self):
        with self.cond:
            changed = self.cond.wait_for(lambda: self.due, timeout=RESYNC_SECONDS)
        if changed:
            # A pod's change reaches the endpoints of each of its Services within a moment:
            # one sync for all of them.
            time.sleep(0.2)
        with self.cond:
            due, self.due = (self.due if changed else set(WATCHES.values())), set()
        return due

    def watch(self, kind):
        seen = {}  # (namespace, name) -> relevant(kind, object)
        while True:
            p = subprocess.Popen(self.kubectl + ["get", kind, "-A", "--watch", "--output-watch-events",
                                                 "-o", "json"], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, preexec_fn=die_with_parent)
            for line in p.stdout:  # one event a line: {"type": "ADDED", "object": {...}}
                try:
                    event = json.loads(line)
                    meta = event["object"]["metadata"]
                except (ValueError, KeyError, TypeError):
                    continue
                key = (meta.get("namespace"), meta.get("name"))
                now = None if event.get("type") == "DELETED" else relevant(kind, event["object"])
                if key not in seen or seen[key] != now:
                    seen[key] = now
                    self.mark(WATCHES[kind])
            p.wait()
            time.sleep(1)  # the API server ends a watch after a while: watch again


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--kubectl", required=True)
    p.add_argument("--pool", required=True, help="CIDR of load balancer addresses")
    p.add_argument("--volumes", required=True, help="directory for local volumes")
    p.add_argument("--netns", default="", help="network namespaces that route to the balancers")
    p.add_argument("--node-ips", required=True, help="NODE=IP pairs")
    cloud = Cloud(p.parse_args())
    watches = Watches(cloud.kubectl)
    log("cloud controller running")
    while True:
        for sync in sorted(watches.wait()):
            step = cloud.sync_services if sync == "services" else cloud.sync_volumes
            try:
                step()
            except Exception as e:  # a passing API error: try again in a second
                log(step.__name__, "failed:", e)
                time.sleep(1)
                watches.mark(sync)


if __name__ == "__main__":
    sys.exit(main())
