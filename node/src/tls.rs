//! TLS for STARTTLS: rustls with the `ring` provider, certificate and key from PEM files,
//! reloaded when the files change (cert-manager renewals) without dropping sessions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Bad PEM or unreadable file.
    #[error("cannot load {what} from {path}: {message}")]
    Load {
        /// Certificate or key.
        what: &'static str,
        /// File.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn load_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Load {
            what: "certificate",
            path: cert.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Load {
            what: "certificate",
            path: cert.to_owned(),
            message: "no certificate found".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Load {
        what: "private key",
        path: key.to_owned(),
        message: e.to_string(),
    })?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| TlsError::Load {
            what: "private key",
            path: key.to_owned(),
            message: e.to_string(),
        })?;
    Ok(CertifiedKey::new(certs, signing))
}

fn mtimes(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &Path| std::fs::metadata(p).ok().and_then(|m| m.modified().ok());
    (m(cert), m(key))
}

type Stamp = (Option<SystemTime>, Option<SystemTime>);

/// Certificate resolver that serves the current certificate and can reload it.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Stamp, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    /// Load the files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let stamp = mtimes(cert, key);
        let ck = load_key(cert, key)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new((stamp, Arc::new(ck))),
        })
    }

    /// Reload if either file changed. Returns true when reloaded; on error the old
    /// certificate stays in use.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let stamp = mtimes(&self.cert, &self.key);
        let old = match self.current.read() {
            Ok(g) => g.0,
            Err(p) => p.into_inner().0,
        };
        if stamp == old {
            return Ok(false);
        }
        let ck = load_key(&self.cert, &self.key)?;
        if let Ok(mut g) = self.current.write() {
            *g = (stamp, Arc::new(ck));
        }
        Ok(true)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.current.read() {
            Ok(g) => Some(Arc::clone(&g.1)),
            Err(p) => Some(Arc::clone(&p.into_inner().1)),
        }
    }
}

/// Build the server configuration around a reloading certificate.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    Ok(Arc::new(cfg))
}
