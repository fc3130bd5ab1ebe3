//! The member processes: started with their configuration and log, probed until ready,
//! watched, and stopped with SIGTERM (killed when they overstay).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use mailnode_api::admin::AdminClient;
use mailnode_api::config as node;
use tokio::process::{Child, Command};

use super::files::mkdir;
use super::{LocalError, MemberLayout, io};

/// How long members may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a member may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(45);

/// A running member.
pub(super) struct Member {
    /// Where it listens.
    pub(super) layout: MemberLayout,
    /// Its `mailnode serve` process (killed when dropped).
    pub(super) child: Child,
    /// Its log file (stdout and stderr).
    pub(super) log: PathBuf,
}

fn log_tail(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|t| {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        })
        .unwrap_or_default()
}

async fn wait_ready(members: &mut [Member]) -> Result<(), LocalError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for m in members.iter_mut() {
        loop {
            if let Ok(Some(status)) = m.child.try_wait() {
                return Err(LocalError::Member {
                    member: m.layout.name.clone(),
                    message: format!("exited with {status} while starting:\n{}", log_tail(&m.log)),
                    log: m.log.display().to_string(),
                });
            }
            let admin = AdminClient::new(m.layout.admin(), Duration::from_secs(2));
            if admin.ready().await.unwrap_or(false) {
                break;
            }
            if Instant::now() > deadline {
                return Err(LocalError::Member {
                    member: m.layout.name.clone(),
                    message: format!(
                        "not ready after {}s:\n{}",
                        READY_TIMEOUT.as_secs(),
                        log_tail(&m.log)
                    ),
                    log: m.log.display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

fn signal(child: &Child, sig: rustix::process::Signal) {
    if let Some(pid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// SIGTERM to every member, wait for them (killing those that overstay), and report.
pub(super) async fn stop_all(members: &mut [Member]) {
    for m in members.iter() {
        signal(&m.child, rustix::process::Signal::TERM);
    }
    let waits = members.iter_mut().map(|m| async move {
        match tokio::time::timeout(STOP_TIMEOUT, m.child.wait()).await {
            Ok(Ok(status)) => println!("  {} stopped ({status})", m.layout.name),
            Ok(Err(e)) => println!("  {}: {e}", m.layout.name),
            Err(_) => {
                let _ = m.child.kill().await;
                println!(
                    "  {} did not stop within {}s; killed",
                    m.layout.name,
                    STOP_TIMEOUT.as_secs()
                );
            }
        }
    });
    futures::future::join_all(waits).await;
}

/// A member's exit, as a future (for watching while running).
pub(super) async fn any_exit(members: &mut [Member]) -> (String, String) {
    let waits = members.iter_mut().map(|m| {
        Box::pin(async move {
            let s = m.child.wait().await;
            (
                m.layout.name.clone(),
                match s {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                },
            )
        })
    });
    futures::future::select_all(waits).await.0
}

impl Member {
    /// Writes the member's configuration into its directory and starts `mailnode serve` with
    /// its log there.
    fn start(
        layout: &MemberLayout,
        mailnode: &Path,
        config: &node::Config,
    ) -> Result<Self, LocalError> {
        mkdir(&layout.dir)?;
        let path = layout.dir.join("mailnode.yaml");
        std::fs::write(&path, config.to_yaml()?).map_err(io("cannot write", path.display()))?;
        let log = layout.dir.join("mailnode.log");
        let out = std::fs::File::create(&log).map_err(io("cannot create", log.display()))?;
        let err = out.try_clone().map_err(io("cannot open", log.display()))?;
        let child = Command::new(mailnode)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(io("cannot start", mailnode.display()))?;
        Ok(Self {
            layout: layout.clone(),
            child,
            log,
        })
    }
}

/// Starts every member and waits until all are ready; on a failure the ones started are
/// stopped again.
pub(super) async fn start_all(
    mailnode: &Path,
    layouts: &[MemberLayout],
    configs: &[node::Config],
) -> Result<Vec<Member>, LocalError> {
    let mut members = Vec::with_capacity(layouts.len());
    for (layout, config) in layouts.iter().zip(configs) {
        match Member::start(layout, mailnode, config) {
            Ok(m) => members.push(m),
            Err(e) => {
                stop_all(&mut members).await;
                return Err(e);
            }
        }
    }
    if let Err(e) = wait_ready(&mut members).await {
        stop_all(&mut members).await;
        return Err(e);
    }
    Ok(members)
}
