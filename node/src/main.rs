//! `mailnode`: the relay node of a mailcluster.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mailnode::config::Config;
use mailnode::queue::Queue;

/// Durable ESMTP relay node of a mailcluster.
#[derive(Debug, Parser)]
#[command(name = "mailnode", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the node.
    Serve {
        /// Config file (YAML).
        #[arg(long, env = "MAILNODE_CONFIG")]
        config: PathBuf,
    },
    /// Check a config file; names the bad key and exits non-zero on error.
    CheckConfig {
        /// Config file (YAML).
        file: PathBuf,
    },
    /// Inspect and change the queue directory.
    Queue {
        #[command(flatten)]
        target: QueueTarget,
        #[command(subcommand)]
        action: QueueCmd,
    },
    /// Read a password from standard input and print an argon2 hash for the users file.
    HashPassword,
    /// Print the DNS TXT record that publishes a DKIM key's public half (RSA or Ed25519,
    /// PEM), as a zone file line for `<selector>._domainkey.<domain>`.
    DkimRecord {
        /// The private key file (PEM), as `delivery.dkim[].keys[].keyFile`.
        key: PathBuf,
        /// The selector.
        #[arg(long)]
        selector: String,
        /// The signing domain.
        #[arg(long)]
        domain: String,
    },
    /// Hand the queue to the other cluster members. With `--queue-dir`: without serving,
    /// move every message of that directory (e.g. the volume of a removed member) to the
    /// members named in the config's `peers`, exit 0 only when the directory is empty.
    /// Without: ask the running node (admin port of the config) to drain, and wait.
    Drain {
        /// Config file (YAML): peers, key file, admin address.
        #[arg(long, env = "MAILNODE_CONFIG")]
        config: PathBuf,
        /// Queue directory to empty (instead of asking the running node).
        #[arg(long)]
        queue_dir: Option<PathBuf>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct QueueTarget {
    /// Queue directory.
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    /// Config file whose queue.path is used.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum QueueCmd {
    /// List messages.
    List,
    /// Show envelope and delivery state of a message.
    Show {
        /// Message id.
        id: String,
        /// Also print the message.
        #[arg(long)]
        body: bool,
    },
    /// Delete messages.
    Delete {
        /// Message ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Hold messages (no delivery).
    Hold {
        /// Message ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Release held messages.
    Release {
        /// Message ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Ask the running node to deliver now (all messages, or those for one domain). Writes a
    /// request file into QUEUE/flush/, which the node's scheduler picks up within a second;
    /// it also rescans the queue (so released messages are delivered).
    Flush {
        /// Only messages with recipients in this domain.
        #[arg(long)]
        domain: Option<String>,
    },
}

/// Print to stdout, ignoring a closed pipe (`mailnode queue list | head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAILNODE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a container's log (kubectl logs) gets plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn queue_cmd(target: QueueTarget, action: QueueCmd) -> Result<(), String> {
    let dir = match (target.dir, target.config) {
        (Some(d), _) => d,
        (None, Some(c)) => Config::load(&c).map_err(|e| e.to_string())?.queue.path,
        (None, None) => return Err("give --dir or --config".into()),
    };
    if !dir.is_dir() {
        return Err(format!("queue directory {} does not exist", dir.display()));
    }
    let q = Queue::open_dir(&dir).map_err(|e| e.to_string())?;
    match action {
        QueueCmd::List => {
            out!(
                "{:<20} {:<7} {:>9}  {:<20}  {:<30} RECIPIENTS",
                "ID",
                "WHERE",
                "SIZE",
                "RECEIVED",
                "SENDER"
            );
            for e in q.list().map_err(|e| e.to_string())? {
                match q.read(&e.id) {
                    Ok((env, _, _, loc)) => {
                        let when = jiff::Timestamp::from_second(env.received_at)
                            .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
                            .unwrap_or_default();
                        let sender = if env.sender.is_empty() {
                            "<>".to_owned()
                        } else {
                            env.sender.clone()
                        };
                        out!(
                            "{:<20} {:<7} {:>9}  {:<20}  {:<30} {}",
                            env.id,
                            loc.as_str(),
                            env.size,
                            when,
                            sender,
                            env.recipients.join(",")
                        );
                    }
                    Err(err) => out!(
                        "{:<20} {:<7} {:>9}  invalid: {err}",
                        e.id,
                        e.location.as_str(),
                        e.file_size
                    ),
                }
            }
        }
        QueueCmd::Show { id, body } => {
            let (env, state, msg, loc) = q.read(&id).map_err(|e| e.to_string())?;
            let out =
                serde_json::json!({"location": loc.as_str(), "envelope": env, "state": state});
            out!(
                "{}",
                serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
            );
            if body {
                use std::io::Write as _;
                out!();
                std::io::stdout()
                    .write_all(&msg)
                    .map_err(|e| e.to_string())?;
            }
        }
        QueueCmd::Delete { ids } => {
            for id in ids {
                q.delete(&id).map_err(|e| e.to_string())?;
                out!("deleted {id}");
            }
        }
        QueueCmd::Hold { ids } => {
            for id in ids {
                let changed = q.hold(&id).map_err(|e| e.to_string())?;
                out!("{} {id}", if changed { "held" } else { "already held" });
            }
        }
        QueueCmd::Flush { domain } => {
            let p = mailnode::delivery::request_flush(&dir, domain.as_deref())
                .map_err(|e| format!("cannot write flush request: {e}"))?;
            out!(
                "flush requested ({}): {}",
                domain.as_deref().unwrap_or("all domains"),
                p.display()
            );
        }
        QueueCmd::Release { ids } => {
            for id in ids {
                let changed = q.release(&id).map_err(|e| e.to_string())?;
                out!("{} {id}", if changed { "released" } else { "not held" });
            }
        }
    }
    Ok(())
}

fn hash_password() -> Result<(), String> {
    use argon2::PasswordHasher as _;
    let mut pw = String::new();
    std::io::stdin()
        .read_to_string(&mut pw)
        .map_err(|e| e.to_string())?;
    let pw = pw.trim_end_matches(['\r', '\n']);
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    let salt = argon2::password_hash::SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    let hash = argon2::Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .map_err(|e| e.to_string())?;
    println!("{hash}");
    Ok(())
}

async fn drain_dir(cfg: Config, dir: PathBuf, timeout: u64) -> Result<(), String> {
    use mailnode::queue::SyncMode;
    use prometheus_client::metrics::histogram::Histogram;
    if !dir.is_dir() {
        return Err(format!("queue directory {} does not exist", dir.display()));
    }
    let (q, rec) = Queue::open(
        &dir,
        SyncMode::PerMessage,
        Histogram::new([0.01]),
        Histogram::new([1.0]),
    )
    .map_err(|e| e.to_string())?;
    tracing::info!(dir = %dir.display(), messages = rec.kept, removed_partial = rec.removed, "draining queue directory");
    let peers = mailnode::peer::Peers::new(&cfg);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
    let mut total = 0;
    loop {
        match peers.hand_off(&q).await {
            Ok((moved, left)) => {
                total += moved;
                if left == 0 {
                    out!(
                        "drained {}: {total} messages handed to peers",
                        dir.display()
                    );
                    return Ok(());
                }
                tracing::warn!(moved, left, "hand-off incomplete; retrying");
            }
            Err(e) => tracing::warn!(error = %e, "hand-off failed; retrying"),
        }
        if std::time::Instant::now() > until {
            let left = q.list().map(|l| l.len()).unwrap_or(0);
            return Err(format!(
                "timeout: {left} messages left in {} ({total} moved)",
                dir.display()
            ));
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// Ask the running node of `cfg` to drain, and wait until its queue is handed off.
async fn drain_running(cfg: Config, timeout: u64) -> Result<(), String> {
    use std::time::Duration;
    let admin = mailnode_api::admin::AdminClient::new(cfg.admin.address, Duration::from_secs(30));
    admin.drain().await.map_err(|e| e.to_string())?;
    let until = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let s = admin.status().await.map_err(|e| e.to_string())?;
        if s.fully_drained() {
            out!("drained");
            return Ok(());
        }
        if tokio::time::Instant::now() > until {
            return Err(format!("timeout; queue depth {}", s.queue_depth));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::CheckConfig { file } => Config::load(&file)
            .map(|c| {
                println!("{}: ok ({} listeners)", file.display(), c.listeners.len());
            })
            .map_err(|e| e.to_string()),
        Cmd::Queue { target, action } => queue_cmd(target, action),
        Cmd::HashPassword => hash_password(),
        Cmd::DkimRecord {
            key,
            selector,
            domain,
        } => mailnode::dkim::dns_record(&key)
            .map(|txt| {
                // A TXT string holds at most 255 octets; longer records are split.
                let parts: Vec<String> = txt
                    .as_bytes()
                    .chunks(255)
                    .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
                    .collect();
                println!(
                    "{selector}._domainkey.{domain}. IN TXT ( {} )",
                    parts.join(" ")
                );
            })
            .map_err(|e| e.to_string()),
        Cmd::Serve { config } => {
            init_tracing();
            // The hash and the config come from the same bytes: the file may change any time.
            let loaded = std::fs::read(&config)
                .map_err(|e| format!("cannot read {}: {e}", config.display()))
                .and_then(|bytes| {
                    let cfg = Config::from_yaml(&String::from_utf8_lossy(&bytes))
                        .map_err(|e| format!("{}: {e}", config.display()))?;
                    Ok((cfg, mailnode::peer::sha256_hex(&bytes)))
                });
            match loaded {
                Err(e) => Err(e),
                Ok((cfg, hash)) => match tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                {
                    Err(e) => Err(format!("cannot start runtime: {e}")),
                    Ok(rt) => rt
                        .block_on(mailnode::serve::serve_with(cfg, &hash, Some(config)))
                        .map_err(|e| e.to_string()),
                },
            }
        }
        Cmd::Drain {
            config,
            queue_dir,
            timeout,
        } => {
            init_tracing();
            match (
                Config::load(&config),
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build(),
            ) {
                (Err(e), _) => Err(e.to_string()),
                (_, Err(e)) => Err(format!("cannot start runtime: {e}")),
                (Ok(cfg), Ok(rt)) => match queue_dir {
                    None => rt.block_on(drain_running(cfg, timeout)),
                    Some(dir) => rt.block_on(drain_dir(cfg, dir, timeout)),
                },
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailnode: {e}");
            ExitCode::FAILURE
        }
    }
}
