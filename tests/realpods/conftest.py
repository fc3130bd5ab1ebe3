"""Harness of the real-pod end-to-end tests: one cluster with real nodes (cluster.sh) per test
session, the operator installed by its Helm chart, an SMTP sink in the test network and a
PROXY-protocol balancer; torn down at the end (the last test checks that nothing is left).

Env: MAILCLUSTER_REALPODS_KEEP=1 keeps the cluster after the session (then `cluster.sh down`);
     MAILCLUSTER_REALPODS_REUSE=1 uses the cluster a kept session left (for working on a test).
"""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CLUSTER_SH = os.path.join(HERE, "cluster.sh")
STATE = os.environ.get("MAILCLUSTER_REALPODS_DIR", "/tmp/mailcluster-realpods")
TAG = os.environ.get("MAILCLUSTER_IMAGE_TAG", "e2e")
SINK_PORT = 2525
BALANCER_PORT = 10025  # the PROXY-protocol balancer's port (cluster.sh install)


def log(*args):
    print(time.strftime("[e2e %H:%M:%S]"), *args, flush=True)


class Cluster:
    """The running test cluster and what the tests do with it."""

    def __init__(self, env):
        self.env = env
        self.kubeconfig = env["KUBECONFIG"]
        self.bin = env["MAILCLUSTER_CONTROLPLANE_BIN"]
        self.sink_ip = env["MAILCLUSTER_REALPODS_SINK_IP"]
        self.balancer_ip = env["MAILCLUSTER_REALPODS_BALANCER_IP"]
        self.allowed_ip, self.denied_ip = env["MAILCLUSTER_REALPODS_CLIENT_IPS"].split()
        self.sink_dir = os.path.join(STATE, "sink")
        self.balancer_target = os.path.join(STATE, "balancer-target")
        self.work = os.path.join(STATE, "e2e")
        self.procs = []
        self.torn_down = False
        self.saved_sysctls = None

    # --- commands -----------------------------------------------------------------------------
    def run(self, *cmd, check=True, timeout=120, netns=None, **kw):
        full = (["ip", "netns", "exec", "mcrp-" + netns] if netns else []) + list(cmd)
        out = subprocess.run(full, capture_output=True, text=True, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(full)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def kubectl(self, *args, check=True, timeout=120, stdin=None):
        return self.run(os.path.join(self.bin, "kubectl"), "--kubeconfig", self.kubeconfig, *args,
                        check=check, timeout=timeout, input=stdin)

    def get(self, *args):
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def watch(self, *args):
        """`kubectl get ARGS --watch`: one JSON event a line ({"type": ..., "object": ...}) on
        the process's stdout until it is stopped (at teardown at the latest)."""
        p = subprocess.Popen([os.path.join(self.bin, "kubectl"), "--kubeconfig", self.kubeconfig, "get",
                              *args, "--watch", "--output-watch-events", "-o", "json"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                             text=True, start_new_session=True)
        self.procs.append(("kubectl-watch", p))
        return p

    def apply(self, manifest):
        return self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=e2e",
                            "-f", "-", stdin=manifest)

    def start(self, name, netns, *cmd, env=None):
        logf = open(os.path.join(self.work, name + ".log"), "w")
        full = ["ip", "netns", "exec", "mcrp-" + netns] + list(cmd)
        p = subprocess.Popen(full, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append((name, p))
        return p

    def wait(self, what, timeout, check, interval=1.0, diagnose=None):
        deadline = time.time() + timeout
        last = None
        while True:
            try:
                last = check()
                if last:
                    return last
            except (AssertionError, KeyError, IndexError, ValueError, subprocess.SubprocessError) as e:
                last = e
            if time.time() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last})\n"
                                     + (self.diagnostics(diagnose) if diagnose else ""))
            time.sleep(interval)

    # --- mail ---------------------------------------------------------------------------------
    @staticmethod
    def send_command(host, port, count, prefix, sessions=1, journal=None, size=200):
        """kind-config/send.py's command line."""
        cmd = ["python3", os.path.join(ROOT, "kind-config", "send.py"), host, str(port), str(count),
               prefix, "--sessions", str(sessions), "--size", str(size)]
        return cmd + (["--journal", journal] if journal else [])

    def send(self, netns, host, port, count, prefix, sessions=1, journal=None, size=200, timeout=600):
        return self.run(*self.send_command(host, port, count, prefix, sessions, journal, size),
                        netns=netns, check=False, timeout=timeout)

    def send_background(self, name, netns, host, port, count, prefix, sessions, journal):
        return self.start(name, netns, *self.send_command(host, port, count, prefix, sessions, journal))

    def sink_records(self):
        path = os.path.join(self.sink_dir, "transactions.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def sink_paused(self, paused):
        flag = os.path.join(self.sink_dir, "paused")
        if paused:
            open(flag, "w").close()
        elif os.path.exists(flag):
            os.remove(flag)

    @staticmethod
    def journal(path, result="accepted"):
        """The sender's records of messages with this result (None: all)."""
        if not os.path.exists(path):
            return []
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        return [r for r in records if result is None or r["result"] == result]

    def stop_sender(self, proc, timeout=120):
        """Stops a background sender after the messages it has in flight."""
        os.killpg(proc.pid, signal.SIGTERM)
        return proc.wait(timeout)

    def failures(self, name, most=5):
        """What a background sender's failed messages got (send.py's "failed" lines), by kind:
        the reply or error without the message's subject, with how often each came."""
        kinds = {}
        path = os.path.join(self.work, name + ".log")
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                for line in f:
                    if line.startswith("failed "):
                        kind = line.split(" ", 2)[2].strip() if line.count(" ") >= 2 else line
                        kinds[kind] = kinds.get(kind, 0) + 1
        top = sorted(kinds.items(), key=lambda kv: -kv[1])[:most]
        return "; ".join(f"{n}x {k}" for k, n in top) or "none"

    def delivered(self, prefix):
        """sha256 -> number of copies at the sink, of messages whose subject starts with prefix."""
        counts = {}
        for r in self.sink_records():
            if r["subject"].startswith(prefix + "-"):
                counts[r["sha256"]] = counts.get(r["sha256"], 0) + 1
        return counts

    def lb_address(self, namespace, service):
        svc = self.get("-n", namespace, "service", service)
        ingress = svc.get("status", {}).get("loadBalancer", {}).get("ingress") or []
        return ingress[0]["ip"] if ingress else None

    # --- diagnostics --------------------------------------------------------------------------
    def diagnostics(self, namespace=None):
        parts = []
        for args in (["get", "nodes,pv", "-o", "wide"],
                     ["get", "all,pvc,mailclusters,events", "-n", namespace or "default", "-o", "wide"],
                     ["get", "pods", "-A", "-o", "wide"]):
            out = self.kubectl(*args, check=False)
            parts.append(out.stdout + out.stderr)
        if namespace:
            out = self.kubectl("get", "mailclusters", "-n", namespace, "-o", "yaml", check=False)
            parts.append(out.stdout[-4000:])
        logs = []
        for dirpath, _, files in os.walk(STATE):
            for f in files:
                if f.endswith(".log") and ("pod-logs" in dirpath or dirpath.endswith("/logs")):
                    logs.append(os.path.join(dirpath, f))
        for path in sorted(logs):
            with open(path, errors="replace") as f:
                tail = f.readlines()[-25:]
            parts.append(f"--- {path} ---\n" + "".join(tail))
        return "\n".join(parts)

    # --- lifecycle ----------------------------------------------------------------------------
    def install(self):
        """The operator by its chart, the sink and the balancer (cluster.sh install)."""
        subprocess.run(["bash", CLUSTER_SH, "install"], check=True, timeout=300)

    def stop_helpers(self):
        for name, p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        self.procs = []

    def teardown(self):
        if self.torn_down:
            return
        self.torn_down = True
        self.stop_helpers()
        saved = os.path.join(STATE, "sysctl.saved")
        if os.path.exists(saved):
            self.saved_sysctls = tempfile.NamedTemporaryFile("w", delete=False, suffix=".sysctl").name
            shutil.copy(saved, self.saved_sysctls)
        subprocess.run(["bash", CLUSTER_SH, "down"], check=True, timeout=300)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the cluster's state and the components' last log lines
    (as a timed-out wait's does), so that a failure in CI can be understood from its output."""
    outcome = yield
    report = outcome.get_result()
    c = item.funcargs.get("relay") or item.funcargs.get("cluster")
    if report.when == "call" and report.failed and isinstance(c, Cluster) and not c.torn_down:
        try:
            namespace = getattr(item.module, "NS", None)
            report.sections.append(("cluster diagnostics", c.diagnostics(namespace)))
        except Exception as e:  # the report must not be lost to a failing diagnosis
            report.sections.append(("cluster diagnostics", f"could not collect: {e!r}"))


@pytest.fixture(scope="session")
def cluster():
    t0 = time.time()
    reuse = os.environ.get("MAILCLUSTER_REALPODS_REUSE") == "1" and os.path.exists(os.path.join(STATE, "env"))
    if not reuse:
        log("starting the cluster (tests/realpods/cluster.sh up)")
        up = subprocess.run(["bash", CLUSTER_SH, "up"], capture_output=True, text=True, timeout=900)
        if up.returncode != 0:
            subprocess.run(["bash", CLUSTER_SH, "down"], timeout=300)
            pytest.fail(f"cluster.sh up failed:\n{up.stderr[-6000:]}", pytrace=False)
    env = {}
    with open(os.path.join(STATE, "env")) as f:
        for line in f:
            if line.startswith("export "):
                k, _, v = line[7:].strip().partition("=")
                env[k] = v.strip('"')
    c = Cluster(env)
    try:
        if reuse:
            # A new session counts its own mail only.
            for d in (c.work, c.sink_dir):
                shutil.rmtree(d, ignore_errors=True)
        os.makedirs(c.work, exist_ok=True)
        c.install()
    except Exception:
        if os.environ.get("MAILCLUSTER_REALPODS_KEEP") != "1":
            c.teardown()
        raise
    log(f"cluster with operator ready in {time.time() - t0:.0f}s")
    yield c
    if os.environ.get("MAILCLUSTER_REALPODS_KEEP") == "1":
        c.stop_helpers()
        log("keeping the cluster: tests/realpods/cluster.sh down removes it")
    else:
        c.teardown()

