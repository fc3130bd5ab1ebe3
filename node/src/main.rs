//! `mailnode`: the relay node of a mailcluster.

use clap::Parser;

/// Durable ESMTP relay node of a mailcluster.
#[derive(Debug, Parser)]
#[command(name = "mailnode", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
