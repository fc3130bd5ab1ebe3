//! `mailcluster-operator`: reconciles `MailCluster` objects into relay clusters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mailcluster_operator::controller;
use mailcluster_operator::leader::{Elector, LeaseSettings};
use mailcluster_operator::metrics::{self, Metrics};
use mailcluster_operator::reconcile::{Context, Settings};
use tokio::sync::watch;

/// Kubernetes operator for highly available SMTP relay clusters.
#[derive(Debug, Parser)]
#[command(name = "mailcluster-operator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller against the cluster of the current kubeconfig or service account.
    Run(RunArgs),
    /// Print the MailCluster CustomResourceDefinition as YAML.
    Crd,
    /// Print every object the operator would create for a MailCluster manifest, offline.
    Render(RenderArgs),
    /// Run the cluster a MailCluster manifest describes as local `mailnode` processes on
    /// loopback (rendered by the operator's own builders); Ctrl-C stops it.
    Local(LocalArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Relay node image for MailClusters that name none.
    #[arg(long, env = "MAILCLUSTER_DEFAULT_IMAGE", default_value = mailcluster_operator::DEFAULT_IMAGE)]
    default_image: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "MAILCLUSTER_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "MAILCLUSTER_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Elect a leader on a Lease so that several replicas can run.
    #[arg(long, env = "MAILCLUSTER_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "mailcluster-operator")]
    lease_name: String,
    /// This instance's identity in the Lease and in events (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader's lease lasts without renewal.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// Seconds between resyncs of a healthy MailCluster.
    #[arg(long, default_value_t = 300)]
    resync_seconds: u64,
    /// Seconds between refreshes of the member table from every member's /status (queue depth,
    /// loaded configuration, peers reached).
    #[arg(long, default_value_t = 15)]
    member_refresh_seconds: u64,
}

#[derive(Debug, clap::Args)]
struct RenderArgs {
    /// A MailCluster manifest (YAML).
    file: PathBuf,
    /// Namespace for a manifest that names none.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Relay node image for a MailCluster that names none.
    #[arg(long, default_value = mailcluster_operator::DEFAULT_IMAGE)]
    default_image: String,
    /// Pretend a load balancer has this address (repeatable), to see the DNS records.
    #[arg(long = "address")]
    addresses: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct LocalArgs {
    /// A MailCluster manifest (YAML).
    file: PathBuf,
    /// Directory for queues, configs, logs, keys and the sink [default: ./.mailcluster-local/NAME].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The `mailnode` binary [default: next to this program, then PATH].
    #[arg(long)]
    mailnode: Option<PathBuf>,
    /// Loopback address of the first member; member i listens on this address plus i.
    #[arg(long, default_value = "127.0.0.10")]
    listen_ip: std::net::Ipv4Addr,
    /// Deliver to the local directory sink even when the manifest names smarthosts.
    #[arg(long)]
    sink: bool,
    /// Namespace for a manifest that names none (shown in names only).
    #[arg(long, default_value = "default")]
    namespace: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match mailcluster_operator::crd_yaml() {
            Ok(y) => {
                print!("{y}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Render(args) => {
            let out =
                mailcluster_operator::render::read(&args.file, &args.namespace).and_then(|mc| {
                    mailcluster_operator::render::render(&mc, &args.default_image, &args.addresses)
                });
            match out {
                Ok(y) => {
                    print!("{y}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Local(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                )
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = mailcluster_operator::local::Options {
                manifest: args.file,
                namespace: args.namespace,
                state_dir: args.state_dir,
                mailnode: args.mailnode,
                first_ip: args.listen_ip,
                force_sink: args.sink,
            };
            match rt.block_on(mailcluster_operator::local::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                // Colours only on a terminal: the pod's log (kubectl logs) gets plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                .init();
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn run(args: RunArgs) -> Result<(), String> {
    let client = kube::Client::try_default().await.map_err(|e| {
        format!("cannot reach the Kubernetes API (kubeconfig or in-cluster service account): {e}")
    })?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "mailcluster-operator".to_string());
        format!("{host}-{}", std::process::id())
    });
    let metrics = Arc::new(Metrics::default());
    let settings = Settings {
        default_image: args.default_image.clone(),
        resync: Duration::from_secs(args.resync_seconds),
        member_refresh: Duration::from_secs(args.member_refresh_seconds),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics.clone(),
        &identity,
    ));
    let elector = args.leader_elect.then(|| {
        Elector::new(
            client.clone(),
            LeaseSettings {
                namespace: args.lease_namespace.clone(),
                name: args.lease_name.clone(),
                identity: identity.clone(),
                lease_duration: Duration::from_secs(args.lease_seconds),
                renew_interval: Duration::from_secs((args.lease_seconds / 3).max(1)),
            },
        )
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal received; shutting down");
        let _ = stop_tx.send(true);
    });
    let http_stop = controller::stopped(stop_rx.clone());
    let http = tokio::spawn(metrics::serve(args.metrics_addr, metrics, http_stop));
    tracing::info!(identity = %identity, metrics = %args.metrics_addr, "mailcluster-operator starting");
    controller::run(ctx, args.namespace.clone(), elector, stop_rx).await;
    match http.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("metrics endpoint on {}: {e}", args.metrics_addr)),
        Err(e) => Err(format!("metrics endpoint task: {e}")),
    }
}
