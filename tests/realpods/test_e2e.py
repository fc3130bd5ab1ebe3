"""End-to-end tests on real pods: the operator (installed by its chart) and a MailCluster of real
mailnode containers on two kubelet nodes, reached through LoadBalancer addresses from client
network namespaces, delivering to a sink in the test network that records every transaction.
Every message is counted by the SHA-256 of its body: what got a 250 must reach the sink.

The tests run in file order on one cluster and one MailCluster; later ones change it (rolling
update, scale-down, a node lost), and the last one tears the cluster down and checks that
nothing is left.
"""
import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import BALANCER_PORT, CLUSTER_SH, SINK_PORT, STATE, TAG, log

NS = "e2e"
NAME = "relay"
HOSTNAME = "smtp.e2e.test"
# The version mailnode reports: the workspace's.
with open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "Cargo.toml")) as _f:
    VERSION = next(line.split('"')[1] for line in _f if line.startswith("version = "))
# The member table is refreshed from every member's /status at least this often (the
# operator's --member-refresh-seconds, which cluster.sh install sets).
MEMBER_REFRESH_SECONDS = 5


def manifest(cluster, replicas=3, retry_first="2s", image=None, max_sessions=None, also_allowed=()):
    image_line = f"\n  image: {image}" if image else ""
    limits_line = f"\n  limits: {{maxSessions: {max_sessions}}}" if max_sessions else ""
    sources = ", ".join(f"{ip}/32" for ip in (cluster.allowed_ip, *also_allowed))
    return f"""
apiVersion: mailcluster.dev/v1alpha1
kind: MailCluster
metadata: {{name: {NAME}, namespace: {NS}}}
spec:
  hostname: {HOSTNAME}
  replicas: {replicas}{image_line}{limits_line}
  listeners:
    - name: relay
      port: 25
      relay: {{allowedSources: [{sources}]}}
    - name: proxied
      port: 2526
      proxyProtocol: true
      trustedProxies: [{cluster.balancer_ip}/32]
      relay: {{allowedSources: [{cluster.allowed_ip}/32]}}
  delivery:
    smarthosts:
      - {{host: "{cluster.sink_ip}", port: {SINK_PORT}, priority: 10}}
    # Short retry delays: mail queued while the sink refuses goes out soon after it accepts
    # again (the tests change `first` to make a configuration change).
    retry: {{first: {retry_first}, max: 5s, lifetime: 1h}}
  storage: {{size: 64Mi}}
  dns:
    ttl: 60
    mx: [{{domain: e2e.test, priority: 10}}]
  scheduling: {{spread: Preferred}}
"""


def mailcluster(cluster):
    return cluster.get("-n", NS, "mailcluster", NAME)


def as_now(cluster, replicas):
    """The manifest as it stands (retry, image, session limit), with `replicas` members."""
    spec = mailcluster(cluster)["spec"]
    return manifest(cluster, replicas=replicas, retry_first=spec["delivery"]["retry"]["first"],
                    image=spec.get("image"), max_sessions=spec.get("limits", {}).get("maxSessions"))


def condition(mc, type_):
    return next((c for c in mc.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def ready(cluster, replicas):
    mc = mailcluster(cluster)
    members = mc.get("status", {}).get("members", [])
    sts = cluster.get("-n", NS, "statefulset", NAME)
    st = sts["status"]
    rolled_out = (st.get("observedGeneration") == sts["metadata"]["generation"]
                  and st.get("updateRevision") == st.get("currentRevision")
                  and st.get("updatedReplicas") == replicas and st.get("readyReplicas") == replicas)
    return (rolled_out and condition(mc, "Ready").get("status") == "True"
            and mc["status"].get("observedGeneration") == mc["metadata"]["generation"]
            and len(members) == replicas and all(m["ready"] and m.get("configInSync") for m in members))


def wait_ready(cluster, replicas, timeout=300):
    cluster.wait(f"MailCluster {NAME} Ready with {replicas} members", timeout,
                 lambda: ready(cluster, replicas), interval=1, diagnose=NS)


def wait_delivered(cluster, journal, prefix, timeout=240, exactly_once=False):
    """Waits until every message in the sender's journal is at the sink; returns the copies."""
    sent = {r["sha256"] for r in cluster.journal(journal)}

    def all_there():
        got = cluster.delivered(prefix)
        missing = sent - set(got)
        return got if not missing else None

    # The sink's journal is a local file: cheap to read often.
    got = cluster.wait(f"{len(sent)} '{prefix}' messages at the sink", timeout, all_there,
                       interval=0.5, diagnose=NS)
    # A message whose answer the client never saw (connection lost after the final dot) may
    # have been accepted: it may arrive, once. Nothing else may.
    unknown = {r["sha256"] for r in cluster.journal(journal, "failed")}
    extra = set(got) - sent - unknown
    assert not extra, f"the sink got {len(extra)} '{prefix}' messages that were never accepted"
    if exactly_once:
        dups = {h: n for h, n in got.items() if n > 1}
        assert not dups, f"{len(dups)} '{prefix}' messages were delivered more than once"
    return got


def wait_accepting(cluster, journal, what, count=200, timeout=60):
    """Waits until a background sender's journal shows `count` more accepted messages: load
    flows at that point (about a second's worth at the senders' rate here). Instead of a fixed
    sleep: the step starts once it holds, and fails if it never does."""
    start = len(cluster.journal(journal))
    cluster.wait(f"{count} more messages accepted {what}", timeout,
                 lambda: len(cluster.journal(journal)) >= start + count, interval=0.2, diagnose=NS)


def member_pod(cluster, ordinal):
    return cluster.get("-n", NS, "pod", f"{NAME}-{ordinal}")


def lb(cluster, listener):
    return cluster.wait(f"a load balancer address for {listener}", 60,
                        lambda: cluster.lb_address(NS, f"{NAME}-{listener}"), diagnose=NS)


@pytest.fixture(scope="module")
def relay(cluster):
    cluster.apply(f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n")
    t0 = time.time()
    cluster.apply(manifest(cluster))
    wait_ready(cluster, 3)
    log(f"MailCluster Ready with 3 members in {time.time() - t0:.0f}s")
    # The relay listener answers through its load balancer address before the tests start.
    address = lb(cluster, "relay")
    cluster.wait("the relay listener through its load balancer", 90, lambda: cluster.run(
        "python3", "-c", "import smtplib,sys; s=smtplib.SMTP(sys.argv[1], 25, timeout=5); s.noop(); s.quit()",
        address, netns="c1", check=False).returncode == 0, diagnose=NS)
    return cluster


def test_members_run_on_both_nodes_and_report_status(relay):
    # Each member probes its peers on its own schedule; the table shows it within a refresh.
    relay.wait("every member reaching its 2 peers in the member table", MEMBER_REFRESH_SECONDS + 30,
               lambda: all(m.get("peersReachable") == 2 for m in mailcluster(relay)["status"]["members"]),
               interval=2, diagnose=NS)
    mc = mailcluster(relay)
    status = mc["status"]
    members = status["members"]
    assert {m["node"] for m in members} == {"mcrp-n1", "mcrp-n2"}, members
    for m in members:
        assert m["ready"] and m["configInSync"], m
        assert m["image"] == f"ghcr.io/mailcluster/mailnode:{TAG}", m
        assert m["version"] == VERSION, m
        assert m["configHash"].startswith(status["configHash"]), m
        assert m.get("peersReachable") == 2, f"peers over the headless Service: {m}"
        assert m.get("queueDepth") == 0, m
        assert not m.get("statusError"), m
    assert condition(mc, "Degraded").get("status") == "False", status["conditions"]
    # What a person sees: kubectl get mc and describe.
    out = relay.kubectl("get", "mc", "-n", NS, NAME).stdout
    header, row = out.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "READY", "MEMBERS", "HOSTNAME"], out
    assert row.split()[:4] == [NAME, "True", "3/3", HOSTNAME], out
    for address in status["addresses"]:
        assert address in row, out
    describe = relay.kubectl("describe", "mc", "-n", NS, NAME).stdout
    for m in members:
        assert m["pod"] in describe, describe


def test_relay_by_source_through_local_load_balancer(relay):
    svc = relay.get("-n", NS, "service", f"{NAME}-relay")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    address = lb(relay, "relay")
    journal = os.path.join(relay.work, "allowed.jsonl")
    out = relay.send("c1", address, 25, 10, "allowed", sessions=2, journal=journal)
    assert out.returncode == 0, out.stdout + out.stderr
    out = relay.send("c2", address, 25, 3, "denied")
    assert out.returncode == 3, out.stdout + out.stderr
    assert "550" in out.stdout, out.stdout
    got = wait_delivered(relay, journal, "allowed", exactly_once=True)
    assert len(got) == 10
    for r in relay.sink_records():
        assert not r["subject"].startswith("denied-"), r
        if r["subject"].startswith("allowed-"):
            # The first Received header is the member's: it names the real client address.
            assert f"[{relay.allowed_ip}]" in r["received"][0], r["received"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_relay_through_proxy_protocol_balancer(relay, version):
    address = lb(relay, "proxied")
    with open(relay.balancer_target, "w") as f:
        f.write(f"{address} 2526 {version}\n")
    prefix = f"proxied-{version}"
    journal = os.path.join(relay.work, f"{prefix}.jsonl")
    out = relay.send("c1", relay.balancer_ip, BALANCER_PORT, 4, prefix, journal=journal)
    assert out.returncode == 0, out.stdout + out.stderr
    out = relay.send("c2", relay.balancer_ip, BALANCER_PORT, 2, f"denied-{prefix}")
    assert out.returncode == 3, out.stdout + out.stderr
    wait_delivered(relay, journal, prefix, exactly_once=True)
    for r in relay.sink_records():
        if r["subject"].startswith(prefix + "-"):
            # The client is the one behind the balancer; the balancer is named as the proxy.
            received = r["received"][0]
            assert f"([{relay.allowed_ip}]:" in received, received
            assert f"via proxy {relay.balancer_ip}" in received, received


def dns_query(server, port, name, netns_run):
    """One A query over UDP from the client namespace; returns the addresses."""
    script = r"""
import socket, struct, sys
name, server, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
q = struct.pack("!HHHHHH", 0x4d43, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.sendto(q, (server, port)); r, _ = s.recvfrom(4096)
an = struct.unpack("!H", r[6:8])[0]; i = len(q)
for _ in range(an):
    if r[i] & 0xC0 == 0xC0: i += 2
    else:
        while r[i]: i += r[i] + 1
        i += 1
    t, _, _, n = struct.unpack("!HHIH", r[i:i+10]); i += 10
    if t == 1: print(socket.inet_ntoa(r[i:i+4]))
    i += n
"""
    out = netns_run("python3", "-c", script, name, server, str(port), netns="c1")
    return sorted(out.stdout.split())


def test_dns_records_and_peer_names(relay):
    status = mailcluster(relay)["status"]
    addresses = sorted(status["addresses"])
    assert len(addresses) == 2, status
    endpoints = relay.get("-n", NS, "dnsendpoints")["items"]
    assert len(endpoints) == 1, endpoints
    records = {(e["dnsName"], e["recordType"]): e for e in endpoints[0]["spec"]["endpoints"]}
    assert sorted(records[(HOSTNAME, "A")]["targets"]) == addresses, records
    assert records[("e2e.test", "MX")]["targets"] == [f"10 {HOSTNAME}"], records
    # CoreDNS (a real pod) resolves each member's stable peer name to its pod.
    dns = relay.get("-n", "kube-system", "pods", "-l", "k8s-app=kube-dns")["items"][0]["status"]["podIP"]
    for i in range(3):
        pod_ip = member_pod(relay, i)["status"]["podIP"]
        name = f"{NAME}-{i}.{NAME}-peers.{NS}.svc.cluster.local"
        assert dns_query(dns, 1053, name, relay.run) == [pod_ip], name


def container_id(pod, name="mailnode"):
    for c in pod["status"]["containerStatuses"]:
        if c["name"] == name:
            return c["containerID"].split("://", 1)[1]
    raise AssertionError(f"no container {name} in {pod['metadata']['name']}")


def kill9(cluster, pod):
    node = {"mcrp-n1": "n1", "mcrp-n2": "n2"}[pod["spec"]["nodeName"]]
    cluster.run("ctr", "--address", os.path.join(STATE, node, "containerd.sock"), "-n", "k8s.io",
                "tasks", "kill", "--signal", "SIGKILL", container_id(pod))


def test_kill9_and_pod_delete_under_load_lose_nothing(relay):
    address = lb(relay, "relay")
    journal = os.path.join(relay.work, "load.jsonl")
    restarts = member_pod(relay, 0)["status"]["containerStatuses"][0]["restartCount"]
    sender = relay.send_background("load", "c1", address, 25, 1000000, "load", 8, journal)
    wait_accepting(relay, journal, "before the kill")
    log("kill -9 of relay-0's mailnode through containerd")
    kill9(relay, member_pod(relay, 0))
    # relay-0 restarts and is ready again in about 3 s here: relay-1 is deleted about then.
    time.sleep(3)
    log("deleting pod relay-1")
    relay.kubectl("-n", NS, "delete", "pod", f"{NAME}-1", "--wait=false")
    wait_ready(relay, 3)
    wait_accepting(relay, journal, "with every member back")
    relay.stop_sender(sender)
    accepted = len(relay.journal(journal))
    failed = len(relay.journal(journal, "failed"))
    log(f"{accepted} accepted, {failed} failed under kill -9 and pod deletion: {relay.failures('load')}")
    assert accepted >= 200, "the cluster stopped accepting while members were killed"
    got = wait_delivered(relay, journal, "load")
    dups = sum(n - 1 for n in got.values())
    log(f"all {accepted} accepted messages delivered ({dups} duplicates, at-least-once after kill -9)")
    assert member_pod(relay, 0)["status"]["containerStatuses"][0]["restartCount"] > restarts


class MostDown:
    """Watches the members' pods and keeps the largest number of the `replicas` members that
    were down at once (not ready, or not there): every change of a pod is seen, not samples."""

    def __init__(self, cluster, replicas):
        self.replicas = replicas
        self.ready = {}  # member pod -> its Ready condition
        self.most = 0
        self.started = threading.Event()  # the watch has listed every member
        self.proc = cluster.watch("-n", NS, "pods", "-l", f"app.kubernetes.io/instance={NAME}")
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()
        assert self.started.wait(30), "the watch on the members' pods did not list them"

    def read(self):
        for line in self.proc.stdout:
            event = json.loads(line)
            pod = event["object"]
            name = pod["metadata"]["name"]
            if not re.fullmatch(rf"{NAME}-\d+", name):
                continue
            if event["type"] == "DELETED":
                self.ready.pop(name, None)
            else:
                self.ready[name] = any(c["type"] == "Ready" and c["status"] == "True"
                                       for c in pod["status"].get("conditions", []))
            if len(self.ready) >= self.replicas:
                self.started.set()
            if self.started.is_set():
                self.most = max(self.most, self.replicas - sum(self.ready.values()))

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)
        self.reader.join(10)
        return self.most


def rollout(relay, change, prefix):
    """Applies `change` under load; checks one member at a time and that nothing is lost."""
    address = lb(relay, "relay")
    journal = os.path.join(relay.work, f"{prefix}.jsonl")
    sts = relay.get("-n", NS, "statefulset", NAME)
    assert sts["spec"]["podManagementPolicy"] == "OrderedReady"
    sender = relay.send_background(prefix, "c1", address, 25, 100000, prefix, 4, journal)
    wait_accepting(relay, journal, "before the change")
    down = MostDown(relay, 3)
    change()
    # Not Ready from the change on (the MailCluster's observed generation lags) until every
    # member runs the new template and reports the new configuration.
    wait_ready(relay, 3, timeout=420)
    most_unready = down.stop()
    wait_accepting(relay, journal, "after the rollout")
    relay.stop_sender(sender)
    assert most_unready <= 1, f"{most_unready} members were down at once"
    assert most_unready == 1, "the watch on the members' pods saw none of them restart"
    accepted = len(relay.journal(journal))
    failed = len(relay.journal(journal, "failed"))
    log(f"{prefix}: {accepted} accepted, {failed} failed (4xx or connection) during the rollout: "
        f"{relay.failures(prefix)}")
    assert accepted > 50
    return wait_delivered(relay, journal, prefix, exactly_once=True)


def test_relay_policy_change_is_reloaded_without_restarting_members(relay):
    """A change members can reload (a new allowed source, a new retry delay) reaches them
    through the mounted ConfigMap: no pod is restarted or replaced, and the new policy holds."""
    address = lb(relay, "relay")
    before = {p["metadata"]["name"]: (p["metadata"]["uid"], p["status"]["containerStatuses"][0]["restartCount"])
              for p in (member_pod(relay, i) for i in range(3))}
    out = relay.send("c2", address, 25, 2, "reload-denied")
    assert out.returncode == 3 and "550" in out.stdout, out.stdout
    old_hash = mailcluster(relay)["status"]["configHash"]
    relay.apply(manifest(relay, retry_first="3s", also_allowed=[relay.denied_ip]))
    relay.wait("the new configuration rendered", 60,
               lambda: mailcluster(relay)["status"].get("configHash") not in (None, old_hash), diagnose=NS)
    t0 = time.time()
    wait_ready(relay, 3, timeout=180)
    log(f"all members run the reloaded configuration {time.time() - t0:.0f}s after it was rendered")
    status = mailcluster(relay)["status"]
    assert all(m["configHash"].startswith(status["configHash"]) for m in status["members"]), status["members"]
    after = {p["metadata"]["name"]: (p["metadata"]["uid"], p["status"]["containerStatuses"][0]["restartCount"])
             for p in (member_pod(relay, i) for i in range(3))}
    assert after == before, "no member was restarted or replaced"
    journal = os.path.join(relay.work, "reloaded.jsonl")
    out = relay.send("c2", address, 25, 5, "reloaded", journal=journal)
    assert out.returncode == 0, out.stdout
    wait_delivered(relay, journal, "reloaded", exactly_once=True)


def test_rolling_update_of_config_then_image_under_load(relay):
    before = mailcluster(relay)["status"]["configHash"]
    # A change members cannot reload (the session limit sizes the listeners): a rollout.
    rollout(relay, lambda: relay.apply(manifest(relay, retry_first="4s", max_sessions=500)), "roll-config")
    status = mailcluster(relay)["status"]
    assert status["configHash"] != before
    assert all(m["configHash"].startswith(status["configHash"]) for m in status["members"]), status["members"]
    # The same image under a new tag, as an upgrade would bring.
    new = f"ghcr.io/mailcluster/mailnode:{TAG}-next"
    for node in ("n1", "n2"):
        relay.run("ctr", "--address", os.path.join(STATE, node, "containerd.sock"), "-n", "k8s.io",
                  "images", "tag", "--force", f"ghcr.io/mailcluster/mailnode:{TAG}", new)
    rollout(relay, lambda: relay.apply(manifest(relay, retry_first="4s", max_sessions=500, image=new)),
            "roll-image")
    status = mailcluster(relay)["status"]
    assert {m["image"] for m in status["members"]} == {new}, status["members"]
    assert {m["version"] for m in status["members"]} == {VERSION}, status["members"]


def test_scale_down_with_the_sink_down_hands_the_queue_over(relay):
    address = lb(relay, "relay")
    relay.sink_paused(True)
    try:
        journal = os.path.join(relay.work, "queued.jsonl")
        out = relay.send("c1", address, 25, 30, "queued", sessions=3, journal=journal)
        assert out.returncode == 0, out.stdout
        member2 = member_pod(relay, 2)["status"]["podIP"]
        out = relay.send("c1", member2, 25, 10, "queued", sessions=1, journal=journal)
        assert out.returncode == 0, out.stdout
        relay.wait("relay-2's queue in the member table", MEMBER_REFRESH_SECONDS + 15, lambda: next(
            m for m in mailcluster(relay)["status"]["members"] if m["pod"] == f"{NAME}-2"
        ).get("queueDepth", 0) > 0, diagnose=NS)
        log("scaling 3 -> 2 with the sink refusing")
        relay.apply(as_now(relay, 2))
        relay.wait("relay-2 gone", 180, lambda: relay.kubectl(
            "-n", NS, "get", "pod", f"{NAME}-2", check=False).returncode != 0, diagnose=NS)
        relay.wait("relay-2's volume claim removed", 240, lambda: relay.kubectl(
            "-n", NS, "get", "pvc", f"queue-{NAME}-2", check=False).returncode != 0, diagnose=NS)
        assert not relay.delivered("queued"), "mail was delivered while the sink refused"
    finally:
        relay.sink_paused(False)
    got = wait_delivered(relay, journal, "queued", exactly_once=True)
    assert len(got) == 40
    wait_ready(relay, 2)


def test_node_lost_keeps_accepting_and_its_queue_is_delivered_when_back(relay):
    address = lb(relay, "relay")
    replicas = mailcluster(relay)["spec"]["replicas"]
    members = [member_pod(relay, i) for i in range(replicas)]
    on_n2 = [p for p in members if p["spec"].get("nodeName") == "mcrp-n2"]
    assert on_n2, f"no member on node 2: {[p['spec'].get('nodeName') for p in members]}"
    victim = on_n2[0]
    log(f"{victim['metadata']['name']} ({victim['status']['podIP']}) is on node 2")
    relay.sink_paused(True)
    journal = os.path.join(relay.work, "lost.jsonl")
    try:
        out = relay.send("c1", victim["status"]["podIP"], 25, 10, "lost", journal=journal)
        assert out.returncode == 0, out.stdout
        log("stopping node 2 (kubelet, kube-proxy, containerd and its containers)")
        subprocess.run(["bash", CLUSTER_SH, "stop-node", "n2"], check=True, timeout=120)
    finally:
        # Node 2's containers are dead now: its queue stays where it is whatever the sink does,
        # so the sink accepts again (mail accepted from here on goes out at once).
        relay.sink_paused(False)
    # The balancer stops sending to node 2 once its endpoints are not ready; until then a
    # client sees failed connections and retries, as it would behind a cloud balancer.
    journal2 = os.path.join(relay.work, "during.jsonl")
    relay.wait("mail accepted through the load balancer with node 2 down", 120, lambda: relay.send(
        "c1", address, 25, 5, "during", journal=journal2, timeout=10).returncode == 0, interval=1, diagnose=NS)
    wait_delivered(relay, journal2, "during")
    # The member table says so within its refresh time (the operator's standby replica leads
    # if the leader was on node 2).
    victim_name = victim["metadata"]["name"]
    relay.wait(f"{victim_name} shown not ready, the cluster not Ready", MEMBER_REFRESH_SECONDS + 45, lambda: (
        condition(mailcluster(relay), "Ready").get("status") == "False"
        and not next(m for m in mailcluster(relay)["status"]["members"] if m["pod"] == victim_name)["ready"]
    ), interval=2, diagnose=NS)
    assert not relay.delivered("lost"), "mail on the lost node's volume cannot be delivered while it is down"
    log("starting node 2 again")
    subprocess.run(["bash", CLUSTER_SH, "start-node", "n2"], check=True, timeout=180)
    wait_delivered(relay, journal, "lost", timeout=300, exactly_once=True)
    wait_ready(relay, replicas, timeout=300)


def test_teardown_leaves_nothing_behind(cluster):
    cluster.teardown()
    out = subprocess.run(["bash", CLUSTER_SH, "check-clean", cluster.saved_sysctls or ""],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
