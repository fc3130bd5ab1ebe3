//! `mailcluster-operator`: reconciles `MailCluster` objects into relay clusters.

use clap::Parser;

/// Kubernetes operator for highly available SMTP relay clusters.
#[derive(Debug, Parser)]
#[command(name = "mailcluster-operator", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "mailcluster-operator");
}
