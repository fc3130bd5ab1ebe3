//! A real Kubernetes control plane for integration tests, started the way controller-runtime's
//! envtest does: etcd and kube-apiserver on free loopback ports, and optionally
//! kube-controller-manager, kube-scheduler and kwok with fake nodes so that pods get scheduled and
//! become Running and Ready.
//!
//! Binaries come from `MAILCLUSTER_CONTROLPLANE_BIN` (a directory, like `KUBEBUILDER_ASSETS`) or,
//! when it is unset, from `tests/controlplane/build.sh`, which builds them once into
//! `~/.cache/mailcluster` and afterwards only prints the path.
//!
//! Every process is started with `PR_SET_PDEATHSIG`, from a spawner thread that lives as long as
//! the test binary, so nothing outlives the test process even when it is killed; a
//! [`ControlPlane`] that is dropped stops its processes at once.

mod exit_cleanup;
mod kubeconfig;
mod ports;
mod process;
mod provisioner;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, ObjectMeta, PostParams};

pub use exit_cleanup::remove_at_exit;
pub use process::Process;

/// The Kubernetes version the control plane is pinned to (`tests/controlplane/build.sh`).
pub const KUBERNETES_VERSION: &str = "v1.36.3";

/// Errors from starting or talking to the test control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("control-plane binaries: {0}")]
    Binaries(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{component} did not become ready within {timeout:?}; last output:\n{log}")]
    NotReady {
        component: &'static str,
        timeout: Duration,
        log: String,
    },
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Which parts of the control plane to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// Start kube-controller-manager (StatefulSets, garbage collection, namespaces, ...).
    pub controller_manager: bool,
    /// Start kube-scheduler and kwok, and create this many fake nodes (0: neither is started).
    pub fake_nodes: usize,
    /// Run the test-only volume provisioner, which creates a PersistentVolume for every pending
    /// PersistentVolumeClaim so that StatefulSets with volumeClaimTemplates get scheduled.
    pub provisioner: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            controller_manager: true,
            fake_nodes: 3,
            provisioner: true,
        }
    }
}

impl Options {
    /// etcd and kube-apiserver only: the fastest start, enough for CRD and admission tests.
    pub fn bare() -> Self {
        Self {
            controller_manager: false,
            fake_nodes: 0,
            provisioner: false,
        }
    }
}

/// A running control plane. Dropping it stops every process it started.
#[derive(Debug)]
pub struct ControlPlane {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    bin: PathBuf,
    server: String,
    fake_nodes: Vec<String>,
    // Declared last: dropped after the paths above are no longer needed. Stopped in reverse order
    // of start (kwok, scheduler, controller-manager, apiserver, etcd).
    processes: Vec<Process>,
    provisioner: Option<provisioner::Handle>,
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

impl ControlPlane {
    /// The control plane shared by all tests of this test binary, started on first use with
    /// [`Options::default`]. Give each test its own namespace ([`ControlPlane::new_namespace`]).
    ///
    /// # Panics
    /// When the control plane cannot start: a test cannot go on without it.
    pub fn shared() -> &'static ControlPlane {
        let started = SHARED.get_or_init(|| {
            // Started on a thread of its own: this may be called from inside a tokio runtime.
            let cp = std::thread::spawn(|| {
                ControlPlane::start(Options::default()).map_err(|e| e.to_string())
            })
            .join()
            .unwrap_or_else(|_| Err("control plane start-up panicked".into()));
            // Never dropped (a static): its directory goes when the test process exits.
            if let Ok(cp) = &cp {
                remove_at_exit(cp.dir.path().to_path_buf());
            }
            cp
        });
        match started {
            Ok(cp) => cp,
            Err(e) => panic!("test control plane failed to start: {e}"),
        }
    }

    /// Starts a control plane of its own (blocking; seconds for a bare one).
    pub fn start(options: Options) -> Result<Self> {
        let bin = binaries_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("mailcluster-controlplane-")
            .tempdir()
            .map_err(io("creating the control plane's temp dir"))?;
        let root = dir.path().to_path_buf();
        let mut processes = Vec::new();

        // etcd
        let etcd_client = ports::free_port()?;
        let etcd_peer = ports::free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let mut etcd = Process::spawn(
            "etcd",
            &bin.join("etcd"),
            &[
                format!("--data-dir={}", root.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
            &root,
        )?;
        etcd.wait_for_port(etcd_client, Duration::from_secs(30))?;
        processes.push(etcd);

        // kube-apiserver: token authentication, RBAC, its own self-signed serving certificate.
        let token = kubeconfig::random_token()?;
        let tokens = root.join("tokens.csv");
        std::fs::write(&tokens, format!("{token},admin,admin-uid,system:masters\n"))
            .map_err(io("writing tokens.csv"))?;
        let (sa_key, sa_pub) = kubeconfig::service_account_keys(&root)?;
        let port = ports::free_port()?;
        let server = format!("https://127.0.0.1:{port}");
        // TaintNodesByCondition taints every new node not-ready until the node-lifecycle
        // controller removes it; kwok's nodes are Ready at once and that controller is not run.
        let mut admission_off = vec!["DefaultStorageClass", "TaintNodesByCondition"];
        if !options.controller_manager {
            // Without the controller-manager no namespace gets a "default" ServiceAccount.
            admission_off.push("ServiceAccount");
        }
        let apiserver = Process::spawn(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_url}"),
                format!("--cert-dir={}", root.join("apiserver-certs").display()),
                format!("--secure-port={port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--authorization-mode=RBAC".into(),
                format!("--token-auth-file={}", tokens.display()),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", sa_pub.display()),
                format!("--service-account-signing-key-file={}", sa_key.display()),
                format!("--disable-admission-plugins={}", admission_off.join(",")),
                "--allow-privileged=true".into(),
                "--enable-priority-and-fairness=false".into(),
                // The "kubernetes" Service cannot point at a loopback address; nothing needs it.
                "--endpoint-reconciler-type=none".into(),
                "--v=1".into(),
            ],
            &root,
        )?;
        let kubeconfig = root.join("kubeconfig");
        kubeconfig::write(&kubeconfig, &server, &token)?;
        processes.push(apiserver);
        let mut cp = ControlPlane {
            dir,
            kubeconfig,
            bin,
            server,
            fake_nodes: Vec::new(),
            processes,
            provisioner: None,
        };
        cp.wait_ready("kube-apiserver", "/readyz", Duration::from_secs(60))?;

        if options.controller_manager {
            let controllers = [
                "namespace-controller",
                "garbage-collector-controller",
                "serviceaccount-controller",
                "serviceaccount-token-controller",
                "statefulset-controller",
                "replicaset-controller",
                "deployment-controller",
                "job-controller",
                "disruption-controller",
                "endpointslice-controller",
                "persistentvolume-binder-controller",
                "persistentvolumeclaim-protection-controller",
                "persistentvolume-protection-controller",
            ];
            let kcm = Process::spawn(
                "kube-controller-manager",
                &cp.bin.join("kube-controller-manager"),
                &[
                    format!("--kubeconfig={}", cp.kubeconfig.display()),
                    "--leader-elect=false".into(),
                    format!("--controllers={}", controllers.join(",")),
                    format!("--service-account-private-key-file={}", sa_key.display()),
                    format!(
                        "--root-ca-file={}",
                        root.join("apiserver-certs/apiserver.crt").display()
                    ),
                    "--use-service-account-credentials=false".into(),
                    "--secure-port=0".into(),
                    "--concurrent-statefulset-syncs=10".into(),
                    "--v=1".into(),
                ],
                &root,
            )?;
            cp.processes.push(kcm);
        }

        if options.fake_nodes > 0 {
            let scheduler = Process::spawn(
                "kube-scheduler",
                &cp.bin.join("kube-scheduler"),
                &[
                    format!("--kubeconfig={}", cp.kubeconfig.display()),
                    "--leader-elect=false".into(),
                    "--secure-port=0".into(),
                    // A pod waits for its volume claim to be bound by the provisioner; retry it
                    // in seconds, not the default five minutes.
                    "--pod-max-in-unschedulable-pods-duration=3s".into(),
                    "--v=1".into(),
                ],
                &root,
            )?;
            cp.processes.push(scheduler);
            let kwok_port = ports::free_port()?;
            let kwok = Process::spawn(
                "kwok",
                &cp.bin.join("kwok"),
                &[
                    format!("--kubeconfig={}", cp.kubeconfig.display()),
                    "--manage-all-nodes=false".into(),
                    "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
                    format!("--server-address=127.0.0.1:{kwok_port}"),
                    format!("--config={}", cp.bin.join("kwok-stages.yaml").display()),
                    "--node-lease-duration-seconds=40".into(),
                ],
                &root,
            )?;
            cp.processes.push(kwok);
        }

        // A component that exits at once (a bad flag) fails the start, not a test minutes later.
        std::thread::sleep(Duration::from_millis(300));
        for p in &cp.processes {
            p.check_running()?;
        }

        if options.controller_manager || options.fake_nodes > 0 || options.provisioner {
            // Small runtime for the set-up calls; the provisioner gets a thread of its own.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(io("starting a tokio runtime"))?;
            cp.fake_nodes = rt.block_on(cp.create_fake_nodes(options.fake_nodes))?;
            if options.provisioner {
                cp.provisioner = Some(provisioner::start(cp.kubeconfig.clone())?);
            }
        }
        Ok(cp)
    }

    /// The apiserver's URL, `https://127.0.0.1:PORT`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A kubeconfig file for kubectl and helm (admin in `system:masters`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory that holds the control-plane binaries (kubectl, helm, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The names of the kwok fake nodes.
    pub fn fake_nodes(&self) -> &[String] {
        &self.fake_nodes
    }

    /// A scratch directory that lives as long as the control plane.
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client for the runtime it is called in (a kube client must not outlive its runtime,
    /// so every test makes its own).
    pub async fn client(&self) -> Result<kube::Client> {
        let config = kubeconfig::client_config(&self.kubeconfig).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Creates a namespace with a unique name that starts with `prefix`, and returns the name.
    pub async fn new_namespace(&self, prefix: &str) -> Result<String> {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let api: Api<Namespace> = Api::all(self.client().await?);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        api.create(&PostParams::default(), &ns).await?;
        Ok(name)
    }

    /// Runs a binary of the control plane (`kubectl`, `helm`) with this control plane's
    /// kubeconfig in `KUBECONFIG`.
    pub fn run_tool(&self, tool: &str, args: &[&str]) -> Result<Output> {
        std::process::Command::new(self.bin.join(tool))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.dir.path())
            .output()
            .map_err(io(format!("running {tool}")))
    }

    /// Runs kubectl against this control plane.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        self.run_tool("kubectl", args)
    }

    /// What a person debugging a failed test wants to see: the objects and events of a
    /// namespace, the nodes, and the end of every control-plane log.
    pub fn diagnostics(&self, namespace: &str) -> String {
        let mut text = String::new();
        for args in [
            vec!["get", "all,pvc,events", "-n", namespace, "-o", "wide"],
            vec!["get", "nodes,pv", "-o", "wide"],
        ] {
            if let Ok(out) = self.kubectl(&args) {
                text.push_str(&String::from_utf8_lossy(&out.stdout));
                text.push_str(&String::from_utf8_lossy(&out.stderr));
            }
        }
        for p in &self.processes {
            text.push_str(&format!("\n--- {} ---\n{}\n", p.name(), p.log_tail(15)));
        }
        text
    }

    fn wait_ready(&self, component: &'static str, path: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let raw = format!("--raw={path}");
        loop {
            let out = self.kubectl(&["get", &raw, "--request-timeout=5s"])?;
            if out.status.success() && out.stdout.starts_with(b"ok") {
                return Ok(());
            }
            for p in &self.processes {
                p.check_running()?;
            }
            if Instant::now() > deadline {
                let log = self
                    .processes
                    .last()
                    .map(|p| p.log_tail(40))
                    .unwrap_or_default();
                return Err(Error::NotReady {
                    component,
                    timeout,
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    async fn create_fake_nodes(&self, count: usize) -> Result<Vec<String>> {
        let api: Api<Node> = Api::all(self.client().await?);
        let mut names = Vec::with_capacity(count);
        for i in 0..count {
            let name = format!("kwok-node-{i}");
            let node: Node = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {
                        "type": "kwok",
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "topology.kubernetes.io/zone": format!("zone-{}", i % 3),
                    },
                },
                "status": {
                    "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "1000"},
                    "capacity": {"cpu": "64", "memory": "512Gi", "pods": "1000"},
                },
            }))
            .map_err(|e| Error::Binaries(format!("fake node manifest: {e}")))?;
            api.create(&PostParams::default(), &node).await?;
            names.push(name);
        }
        Ok(names)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.provisioner.take();
        while let Some(mut p) = self.processes.pop() {
            p.stop();
        }
    }
}

/// Polls `check` every 250 ms until it returns `Ok(true)`; after `timeout` it panics with
/// `what` and the [`ControlPlane::diagnostics`] of `namespace`. Errors are printed and retried:
/// an apiserver that is still starting a watch cache answers with them.
///
/// # Panics
/// When the condition is not met in time: the calling test fails with what was seen.
pub async fn eventually<F, Fut>(
    cp: &ControlPlane,
    namespace: &str,
    what: &str,
    timeout: Duration,
    mut check: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, kube::Error>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => eprintln!("{what}: {e}"),
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}\n{}",
                cp.diagnostics(namespace)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Where the control-plane binaries are: `$MAILCLUSTER_CONTROLPLANE_BIN`, or what
/// `tests/controlplane/build.sh` prints (it builds them on first use).
pub fn binaries_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MAILCLUSTER_CONTROLPLANE_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../controlplane/build.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(io(format!("running {}", script.display())))?;
    if !out.status.success() {
        return Err(Error::Binaries(format!(
            "{} failed ({}); set MAILCLUSTER_CONTROLPLANE_BIN to a directory with the binaries",
            script.display(),
            out.status
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let dir = text.lines().last().unwrap_or_default().trim();
    Ok(PathBuf::from(dir))
}
