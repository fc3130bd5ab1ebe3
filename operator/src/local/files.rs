//! What the members share and need from the machine: the `mailnode` binary, the cluster key, a
//! self-signed certificate and the users file, made once under the state directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::builders::secret;
use crate::crd::MailCluster;

use super::{LOCAL_USER, LocalError, io};

/// Files shared by the members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFiles {
    /// The cluster key file.
    pub cluster_key: PathBuf,
    /// TLS certificate and key, when the manifest has TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Users file, when the manifest has AUTH.
    pub users: Option<PathBuf>,
}

/// The `mailnode` binary: `explicit`, else next to this executable, else on PATH.
pub fn find_mailnode(explicit: Option<&Path>) -> Result<PathBuf, LocalError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(LocalError::Io {
                what: "--mailnode",
                path: p.display().to_string(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        };
    }
    let exe_name = format!("mailnode{}", std::env::consts::EXE_SUFFIX);
    if let Ok(exe) = std::env::current_exe() {
        let mut dirs: Vec<PathBuf> = exe.parent().map(Path::to_path_buf).into_iter().collect();
        // A test binary lives in target/PROFILE/deps; the binaries one level up.
        if let Some(up) = exe.parent().and_then(Path::parent) {
            dirs.push(up.to_path_buf());
        }
        for d in dirs {
            let p = d.join(&exe_name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join(&exe_name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(LocalError::MailnodeMissing)
}

pub(super) fn write_private(path: &Path, contents: &[u8]) -> Result<(), LocalError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("cannot write", path.display()))?;
    std::io::Write::write_all(&mut f, contents).map_err(io("cannot write", path.display()))
}

pub(super) fn mkdir(path: &Path) -> Result<(), LocalError> {
    std::fs::create_dir_all(path).map_err(io("cannot create directory", path.display()))
}

fn random_hex(bytes: usize) -> Result<String, LocalError> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(LocalError::Random)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The cluster key, TLS and users files under `state`, made once and kept across runs.
/// Returns them and the local user's password (when AUTH is on).
pub(super) async fn shared_files(
    mc: &MailCluster,
    state: &Path,
    mailnode: &Path,
) -> Result<(SharedFiles, Option<String>), LocalError> {
    let cluster_key = state.join("cluster-key");
    if !cluster_key.is_file() {
        let key = secret::generate_key().map_err(LocalError::Random)?;
        write_private(&cluster_key, format!("{key}\n").as_bytes())?;
    }
    let tls = if mc.spec.tls.is_some() {
        let dir = state.join("tls");
        mkdir(&dir)?;
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        if !cert.is_file() || !key.is_file() {
            let ck = rcgen::generate_simple_self_signed(vec![
                mc.spec.hostname.clone(),
                "localhost".to_string(),
            ])?;
            write_private(&key, ck.signing_key.serialize_pem().as_bytes())?;
            std::fs::write(&cert, ck.cert.pem()).map_err(io("cannot write", cert.display()))?;
        }
        Some((cert, key))
    } else {
        None
    };
    let (users, password) = if mc.spec.auth.is_some() {
        let dir = state.join("auth");
        mkdir(&dir)?;
        let (users, pw_file) = (dir.join("users"), dir.join("password"));
        let password = match std::fs::read_to_string(&pw_file) {
            Ok(p) if users.is_file() && !p.trim().is_empty() => p.trim().to_string(),
            _ => {
                let password = random_hex(12)?;
                let hash = hash_password(mailnode, &password).await?;
                write_private(&users, format!("{LOCAL_USER}:{hash}\n").as_bytes())?;
                write_private(&pw_file, format!("{password}\n").as_bytes())?;
                password
            }
        };
        (Some(users), Some(password))
    } else {
        (None, None)
    };
    Ok((
        SharedFiles {
            cluster_key,
            tls,
            users,
        },
        password,
    ))
}

async fn hash_password(mailnode: &Path, password: &str) -> Result<String, LocalError> {
    let mut child = Command::new(mailnode)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(io("cannot run", mailnode.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(format!("{password}\n").as_bytes())
            .await
            .map_err(io("cannot write to", "mailnode hash-password"))?;
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| LocalError::HashPassword("timed out".into()))?
        .map_err(io("cannot run", mailnode.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hash = text.lines().map(str::trim).find(|l| l.starts_with('$'));
    match (out.status.success(), hash) {
        (true, Some(h)) => Ok(h.to_string()),
        _ => Err(LocalError::HashPassword(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )),
    }
}

#[cfg(test)]
pub(super) mod testing {
    use super::SharedFiles;

    pub(in crate::local) fn files() -> SharedFiles {
        SharedFiles {
            cluster_key: "/state/cluster-key".into(),
            tls: Some(("/state/tls/tls.crt".into(), "/state/tls/tls.key".into())),
            users: Some("/state/auth/users".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_mailnode_is_named() {
        let e = find_mailnode(Some(Path::new("/nonexistent/mailnode"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/mailnode"), "{e}");
        assert!(
            LocalError::MailnodeMissing
                .to_string()
                .contains("--mailnode")
        );
    }
}
