"""The real-pod test cluster's cloud controller, doing what cloud-provider-kind or MetalLB and a
local-path provisioner do on a real cluster:

- LoadBalancer Services get an address from --pool (kept while the Service lives), written to
  status.loadBalancer.ingress, and routed in the host and in every client namespace to the nodes
  that should receive it: with externalTrafficPolicy Local only the nodes with a ready local
  endpoint (what a cloud balancer's health check on healthCheckNodePort finds), with Cluster
  every Ready node. Several nodes share the address by equal-cost multipath routes.
- PersistentVolumeClaims of the "local" StorageClass (WaitForFirstConsumer) get a `local`
  PersistentVolume in a directory under --volumes, bound to the node the scheduler chose; a
  released volume is deleted with its directory.

Polls the API once a second through kubectl. Python standard library only.
"""
import argparse
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time

PROVISIONER = "mailcluster.dev/realpods-local"
SELECTED_NODE = "volume.kubernetes.io/selected-node"


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

    def items(self, kind):
        out = self.k("get", kind, "-A", "-o", "json")
        if out.returncode != 0:
            raise RuntimeError(f"kubectl get {kind}: {out.stderr.strip()}")
        return json.loads(out.stdout)["items"]

    # --- load balancers ----------------------------------------------------------------------
    def sync_services(self):
        services = [s for s in self.items("services") if s["spec"].get("type") == "LoadBalancer"]
        slices = self.items("endpointslices.discovery.k8s.io")
        nodes = self.items("nodes")
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
        for pvc in self.items("persistentvolumeclaims"):
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
        for pv in self.items("persistentvolumes"):
            meta = pv["metadata"]
            if (meta.get("annotations", {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
                    and pv.get("status", {}).get("phase") == "Released"):
                path = pv["spec"].get("local", {}).get("path", "")
                if path.startswith(self.volumes + "/"):
                    shutil.rmtree(path, ignore_errors=True)
                self.k("delete", "persistentvolume", meta["name"], "--wait=false")
                log("volume", meta["name"], "released and deleted")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--kubectl", required=True)
    p.add_argument("--pool", required=True, help="CIDR of load balancer addresses")
    p.add_argument("--volumes", required=True, help="directory for local volumes")
    p.add_argument("--netns", default="", help="network namespaces that route to the balancers")
    p.add_argument("--node-ips", required=True, help="NODE=IP pairs")
    cloud = Cloud(p.parse_args())
    log("cloud controller running")
    while True:
        for step in (cloud.sync_services, cloud.sync_volumes):
            try:
                step()
            except Exception as e:  # a passing API error: try again on the next round
                log(step.__name__, "failed:", e)
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
