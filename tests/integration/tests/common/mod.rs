//! Helpers shared by the chart, example and RBAC tests: paths, running helm and kubectl,
//! reading multi-document YAML, installing the CRD once per test binary.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mailcluster_testenv::ControlPlane;
use serde_json::Value;

/// Upper bound of every wait in these tests.
pub const TIMEOUT: Duration = Duration::from_secs(180);

/// The Kubernetes version helm renders for when no cluster is asked (`helm template`, `helm
/// lint`): helm built from source without release ldflags would otherwise assume v1.20.
pub const KUBE_VERSION: &str = "1.36.3";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// `charts/mailcluster-operator`.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/mailcluster-operator")
}

/// `chart_dir()` as a `&str`-able string.
pub fn chart() -> String {
    chart_dir().display().to_string()
}

/// The directory with helm and kubectl.
pub fn bin_dir() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| mailcluster_testenv::binaries_dir().expect("control-plane binaries"))
        .clone()
}

fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("mailcluster-chart-tests-")
            .tempdir()
            .expect("temp dir");
        // Never dropped (a static): removed when the test process exits.
        mailcluster_testenv::remove_at_exit(dir.path().to_path_buf());
        dir
    })
    .path()
}

/// Runs helm without any cluster (lint, template): its own HOME, no kubeconfig.
pub fn helm_offline(args: &[&str]) -> Output {
    let home = scratch().join("helm-home");
    std::fs::create_dir_all(&home).expect("helm home");
    Command::new(bin_dir().join("helm"))
        .args(args)
        .env("HOME", &home)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", home.join("no-kubeconfig"))
        .output()
        .expect("running helm")
}

/// The text of a finished command, or a panic that shows what it said.
pub fn ok(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// `helm template` with the given `--set` values (and the pinned Kubernetes version).
pub fn template(release: &str, namespace: &str, sets: &[&str]) -> String {
    let chart = chart();
    let mut args = vec![
        "template",
        release,
        chart.as_str(),
        "--namespace",
        namespace,
        "--kube-version",
        KUBE_VERSION,
    ];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    ok(&format!("helm {}", args.join(" ")), helm_offline(&args))
}

/// Every non-empty YAML document of `text`, as JSON.
pub fn yaml_docs(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("valid YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The documents of `kind` (and `name`, when given).
pub fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The only document of `kind`.
pub fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "expected exactly one {kind}, got {found:?}");
    found[0]
}

/// Writes `text` to a fresh file in the scratch directory and returns its path.
pub fn write_temp(name: &str, text: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = scratch().join(format!("{n}-{name}"));
    std::fs::write(&path, text).expect("writing a temp file");
    path
}

/// kubectl against `cp`, which must succeed.
pub fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    ok(
        &format!("kubectl {}", args.join(" ")),
        cp.kubectl(args).expect("running kubectl"),
    )
}

/// helm against `cp`, which must succeed.
pub fn helm(cp: &ControlPlane, args: &[&str]) -> String {
    ok(
        &format!("helm {}", args.join(" ")),
        cp.run_tool("helm", args).expect("running helm"),
    )
}

/// Applies the chart's CRD (server-side, idempotent) once per test binary and waits until it is
/// Established, for tests that install with `--skip-crds`.
pub fn ensure_crd(cp: &ControlPlane) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = chart_dir().join("crds");
        let dir = dir.display().to_string();
        kubectl(
            cp,
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=mailcluster-integration-tests",
                "-f",
                &dir,
            ],
        );
        wait_crd_established(cp, "mailclusters.mailcluster.dev");
    });
}

/// Installs the test fixtures of the kinds the operator uses when they exist in a cluster
/// (external-dns `DNSEndpoint`, cert-manager `Certificate`), once per test binary.
pub fn ensure_optional_crds(cp: &ControlPlane) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for name in [
            "dnsendpoints.externaldns.k8s.io",
            "certificates.cert-manager.io",
        ] {
            let file = dir.join(format!("{name}.yaml")).display().to_string();
            kubectl(
                cp,
                &[
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "--field-manager=mailcluster-integration-tests",
                    "-f",
                    &file,
                ],
            );
            wait_crd_established(cp, name);
        }
    });
}

/// Waits until a CRD is Established and its kind is served.
pub fn wait_crd_established(cp: &ControlPlane, name: &str) {
    // Polled rather than `kubectl wait`: a CRD read before the apiserver first writes its
    // status has no conditions at all, which `kubectl wait` reports as an error.
    let crd = format!("crd/{name}");
    eventually(cp, "default", &format!("{name} is Established"), || {
        cp.kubectl(&[
            "get",
            crd.as_str(),
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
        ])
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "True")
        .unwrap_or(false)
    });
    // Discovery lags Established by a moment.
    let resource = name.split_once('.').map(|(r, _)| r).unwrap_or(name);
    eventually(cp, "default", &format!("{name} is served"), || {
        cp.kubectl(&["get", resource, "-A", "--request-timeout=5s"])
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
}

/// Polls `check` until it is true, or panics after [`TIMEOUT`] with the namespace's state.
pub fn eventually(cp: &ControlPlane, namespace: &str, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        if Instant::now() > deadline {
            panic!(
                "timed out after {TIMEOUT:?} waiting for {what}\n{}",
                cp.diagnostics(namespace)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A name unique to this test process, for cluster-scoped objects and helm releases.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id() % 100_000)
}
