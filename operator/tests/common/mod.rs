//! Helpers shared by the control-plane tests: the CRD installed once, an operator run
//! in-process, a client that counts its write requests, and the example manifest.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Method;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::client::ClientBuilder;
use kube::{Client, CustomResourceExt, ResourceExt};
use mailcluster_operator::crd::MailCluster;
use mailcluster_operator::leader::Elector;
use mailcluster_operator::metrics::Metrics;
use mailcluster_operator::reconcile::{Context, Settings};
use mailcluster_testenv::ControlPlane;
use serde_json::{Value, json};
use tokio::sync::{OnceCell, watch};

pub const TIMEOUT: Duration = Duration::from_secs(120);

#[allow(unused_imports)] // not every test binary waits
pub use mailcluster_testenv::eventually;

/// Applies a CRD and waits until it is Established.
pub async fn install_crd(client: &Client, crd: &CustomResourceDefinition) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.name_any();
    api.patch(
        &name,
        &PatchParams::apply("mailcluster-tests").force(),
        &Patch::Apply(crd),
    )
    .await
    .unwrap_or_else(|e| panic!("CRD {name} refused: {e}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let c = api.get(&name).await.unwrap();
        let established = c.status.and_then(|s| s.conditions).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if established {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "CRD {name} not established"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Discovery needs a moment after Established before the kind is served everywhere.
    tokio::time::sleep(Duration::from_millis(500)).await;
}

pub static MAILCLUSTER_CRD: OnceCell<()> = OnceCell::const_new();

/// The committed CRD from crds/, installed once per test binary.
pub async fn setup() -> (&'static ControlPlane, Client) {
    let cp = ControlPlane::shared();
    let client = cp.client().await.unwrap();
    MAILCLUSTER_CRD
        .get_or_init(|| async {
            let text = include_str!("../../../crds/mailcluster.dev_mailclusters.yaml");
            let crd: CustomResourceDefinition = serde_yaml::from_str(text).unwrap();
            assert_eq!(crd, MailCluster::crd());
            install_crd(&cp.client().await.unwrap(), &crd).await;
        })
        .await;
    (cp, client)
}

/// A client whose non-GET requests (writes) are counted, leases aside.
pub async fn counting_client(cp: &ControlPlane) -> (Client, Arc<AtomicUsize>) {
    let writes = Arc::new(AtomicUsize::new(0));
    let counter = writes.clone();
    let kubeconfig = kube::config::Kubeconfig::read_from(cp.kubeconfig_path()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let layer = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        if req.method() != Method::GET && !req.uri().path().contains("/leases") {
            counter.fetch_add(1, Ordering::SeqCst);
            eprintln!("write: {} {}", req.method(), req.uri().path());
        }
        req
    });
    let client = ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&layer)
        .build();
    (client, writes)
}

/// Where the test serves each member's admin port (fake pods' IPs are not reachable); members
/// not in it are not asked for `/status`.
pub type MemberPorts =
    Arc<std::sync::Mutex<std::collections::HashMap<String, std::net::SocketAddr>>>;

pub struct Operator {
    pub ctx: Arc<Context>,
    pub member_ports: MemberPorts,
    pub stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Operator {
    pub fn start(client: Client, ns: &str, elector: Option<Elector>, identity: &str) -> Self {
        let member_ports = MemberPorts::default();
        let ports = member_ports.clone();
        let ctx = Arc::new(
            Context::new(
                client,
                Settings {
                    default_image: "mailnode:test".into(),
                    ..Settings::default()
                },
                Arc::new(Metrics::default()),
                identity,
            )
            .with_member_address(Arc::new(
                move |pod: &k8s_openapi::api::core::v1::Pod| {
                    ports.lock().unwrap().get(&pod.name_any()).copied()
                },
            )),
        );
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(mailcluster_operator::controller::run(
            ctx.clone(),
            Some(ns.to_string()),
            elector,
            rx,
        ));
        Self {
            ctx,
            member_ports,
            stop,
            task,
        }
    }

    pub fn reconciles(&self) -> u64 {
        self.ctx.metrics.reconciles.get()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("operator stops within 30s")
            .unwrap();
    }
}

pub fn errors(op: &Operator) -> usize {
    let text = op.ctx.metrics.encode().unwrap();
    text.lines()
        .filter(|l| l.starts_with("mailcluster_operator_reconcile_errors_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
        .sum()
}

pub fn manifest(name: &str, ns: &str) -> Value {
    json!({
        "apiVersion": "mailcluster.dev/v1alpha1",
        "kind": "MailCluster",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "hostname": "smtp.example.com",
            "replicas": 3,
            "listeners": [
                {"name": "devices", "port": 25,
                 "relay": {"allowedSources": ["10.20.0.0/16"], "recipientDomains": ["example.com"]}},
                {"name": "apps", "port": 587, "tls": {"mode": "StartTLS", "required": true},
                 "relay": {"allowedSources": ["10.30.0.0/16"], "requireAuth": true},
                 "loadBalancerSourceRanges": ["10.30.0.0/16"]},
                {"name": "inbound-mx", "port": 2525, "acceptDomains": ["example.com"]}
            ],
            "delivery": {
                "smarthosts": [{"host": "exchange.example.internal", "port": 25, "priority": 10}],
                "retry": {"first": "1m", "max": "1h", "lifetime": "5d"}
            },
            "storage": {"size": "1Gi"},
            "dns": {"ttl": 300, "mx": [{"domain": "example.com", "priority": 20}]},
            "tls": {"secretName": "smtp-example-com"},
            "auth": {"secretName": "smtp-users"}
        }
    })
}

pub fn set(mut v: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let slot = v.pointer_mut(parent).unwrap();
    match slot {
        Value::Array(a) => a[key.parse::<usize>().unwrap()] = value,
        other => other[key] = value,
    }
    v
}

pub async fn create(api: &Api<MailCluster>, v: &Value) -> Result<MailCluster, kube::Error> {
    let mc: MailCluster = serde_json::from_value(v.clone()).unwrap();
    api.create(&PostParams::default(), &mc).await
}

pub fn condition(mc: &MailCluster, type_: &str) -> Option<(String, String, String)> {
    mc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The `mailnode` binary of this workspace, built once (on demand) into this test's target dir.
pub fn mailnode_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("MAILNODE_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/TEST-HASH -> target/<profile>/mailnode
        let profile_dir = exe.parent().and_then(|d| d.parent()).expect("profile dir");
        let target_dir = profile_dir.parent().expect("target dir");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "build",
                "-p",
                "mailnode",
                "--bin",
                "mailnode",
                "--target-dir",
            ])
            .arg(target_dir);
        if profile_dir.file_name().and_then(|n| n.to_str()) == Some("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build -p mailnode");
        assert!(status.success(), "building mailnode failed");
        let bin = profile_dir.join("mailnode");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}
