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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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
        Cmd::Serve { config } => {
            init_tracing();
            match Config::load(&config) {
                Err(e) => Err(e.to_string()),
                Ok(cfg) => match tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                {
                    Err(e) => Err(format!("cannot start runtime: {e}")),
                    Ok(rt) => rt
                        .block_on(mailnode::serve::serve(cfg))
                        .map_err(|e| e.to_string()),
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
