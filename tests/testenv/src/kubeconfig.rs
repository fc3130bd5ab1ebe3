//! The admin credentials: a bearer token, the service-account signing key, and a kubeconfig file.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result, io};

/// 32 random bytes from the kernel, hex-encoded.
pub fn random_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io("reading /dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// An RSA key pair for signing service-account tokens, made with openssl.
pub fn service_account_keys(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let key = dir.join("sa.key");
    let public = dir.join("sa.pub");
    for args in [
        vec!["genrsa", "-out", path_str(&key)?, "2048"],
        vec![
            "rsa",
            "-in",
            path_str(&key)?,
            "-pubout",
            "-out",
            path_str(&public)?,
        ],
    ] {
        let out = Command::new("openssl")
            .args(&args)
            .output()
            .map_err(io("running openssl (install the openssl package)"))?;
        if !out.status.success() {
            return Err(Error::Binaries(format!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
    }
    Ok((key, public))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::Binaries(format!("path is not UTF-8: {}", p.display())))
}

/// Writes a kubeconfig for the admin token. The apiserver's serving certificate is self-signed,
/// so TLS verification is off: the connection never leaves 127.0.0.1.
pub fn write(path: &Path, server: &str, token: &str) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testenv", "cluster": {"server": server, "insecure-skip-tls-verify": true}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "testenv", "context": {"cluster": "testenv", "user": "admin", "namespace": "default"}}],
        "current-context": "testenv",
    });
    let text = serde_yaml::to_string(&config)
        .map_err(|e| Error::Binaries(format!("serializing the kubeconfig: {e}")))?;
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

/// A kube client configuration read from the kubeconfig file.
pub async fn client_config(path: &Path) -> Result<kube::Config> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
    Ok(kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?)
}
