//! DKIM keys: read from their PEM files, kept until a file changes (a rotated Secret), and
//! the DNS record that publishes a key's public half.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine as _;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{DkimSigner, Done};
use mailnode_api::config::{DkimDomain, DkimKeyFile};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;

/// A DKIM key or signature that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    /// The key file cannot be read.
    #[error("{field}: cannot read DKIM key {path}: {source}")]
    Read {
        /// Config key of the file.
        field: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no key this node can sign with.
    #[error(
        "{field}: {path} is not a usable DKIM key ({why}); expected a PEM RSA key of 2048 to 4096 bits (PKCS#1 or PKCS#8) or an Ed25519 key (PKCS#8)"
    )]
    Key {
        /// Config key of the file.
        field: String,
        /// The file.
        path: PathBuf,
        /// What the parser said.
        why: String,
    },
    /// Signing failed.
    #[error("signing for {domain} with selector {selector} failed: {why}")]
    Sign {
        /// The signing domain.
        domain: String,
        /// The selector.
        selector: String,
        /// What failed.
        why: String,
    },
}

/// Reads a private key: RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8), PEM.
fn read_key(field: &str, path: &Path) -> Result<DkimKey, DkimError> {
    let pem = std::fs::read(path).map_err(|source| DkimError::Read {
        field: field.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    let bad = |why: String| DkimError::Key {
        field: field.to_owned(),
        path: path.to_owned(),
        why,
    };
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad(e.to_string()))?;
    let rsa = match RsaKey::<Sha256>::from_key_der(der.clone_key()) {
        Ok(k) => return Ok(DkimKey::Rsa(k)),
        Err(e) => e.to_string(),
    };
    match der {
        PrivateKeyDer::Pkcs8(p) => Ed25519Key::from_pkcs8_maybe_unchecked_der(p.secret_pkcs8_der())
            .map(DkimKey::Ed25519)
            .map_err(|e| bad(format!("not RSA ({rsa}), not Ed25519 ({e})"))),
        _ => Err(bad(rsa)),
    }
}

/// What a file looked like when it was read: a changed file is read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
    })
}

type Ready = Arc<DkimSigner<DkimKey, Done>>;

/// A signer's identity: key file, domain, selector and signed headers.
type SignerId = (PathBuf, String, String, Vec<String>);

/// The signers of the configured keys, each read once and again when its file changes.
#[derive(Default)]
pub struct Signer {
    cache: Mutex<HashMap<SignerId, (Option<Stamp>, Ready)>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

/// A message's new signature headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The signing domain.
    pub domain: String,
    /// `DKIM-Signature` header fields, one per key, each ending in CRLF.
    pub headers: Vec<u8>,
}

impl Signer {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn ready(&self, field: &str, d: &DkimDomain, k: &DkimKeyFile) -> Result<Ready, DkimError> {
        let headers = super::headers_of(d);
        let id = (
            k.key_file.clone(),
            d.domain.clone(),
            k.selector.clone(),
            headers.clone(),
        );
        let now = stamp(&k.key_file);
        if let Ok(cache) = self.cache.lock()
            && let Some((seen, ready)) = cache.get(&id)
            && *seen == now
            && now.is_some()
        {
            return Ok(Arc::clone(ready));
        }
        let key = read_key(field, &k.key_file)?;
        let ready = Arc::new(
            DkimSigner::from_key(key)
                .domain(d.domain.to_ascii_lowercase())
                .selector(k.selector.clone())
                .headers(headers),
        );
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(id, (now, Arc::clone(&ready)));
        }
        Ok(ready)
    }

    /// Reads every key of `cfg` (`delivery.dkim`): at start-up and before a changed config is
    /// applied, so that a bad key is refused naming its field.
    pub fn check(&self, cfg: &[DkimDomain]) -> Result<(), DkimError> {
        for (i, d) in cfg.iter().enumerate() {
            for (j, k) in d.keys.iter().enumerate() {
                self.ready(&format!("delivery.dkim[{i}].keys[{j}].keyFile"), d, k)?;
            }
        }
        Ok(())
    }

    /// The signatures for `msg` (received on `listener`), when a domain of `cfg` signs it.
    pub fn sign(
        &self,
        cfg: &[DkimDomain],
        listener: &str,
        msg: &[u8],
    ) -> Result<Option<Signed>, DkimError> {
        let Some((i, d)) = super::pick(cfg, listener, msg) else {
            return Ok(None);
        };
        let mut headers = Vec::new();
        for (j, k) in d.keys.iter().enumerate() {
            let ready = self.ready(&format!("delivery.dkim[{i}].keys[{j}].keyFile"), d, k)?;
            let sig = ready.sign(msg).map_err(|e| DkimError::Sign {
                domain: d.domain.clone(),
                selector: k.selector.clone(),
                why: e.to_string(),
            })?;
            headers.extend_from_slice(sig.to_header().as_bytes());
        }
        Ok(Some(Signed {
            domain: d.domain.to_ascii_lowercase(),
            headers,
        }))
    }
}

/// DER length octets.
fn der_len(n: usize) -> Vec<u8> {
    match n {
        0..=127 => vec![n as u8],
        128..=255 => vec![0x81, n as u8],
        _ => vec![0x82, (n >> 8) as u8, n as u8],
    }
}

/// The TXT record to publish at `<selector>._domainkey.<domain>` for the key in `path`:
/// `v=DKIM1; k=rsa; p=<SubjectPublicKeyInfo>` or `v=DKIM1; k=ed25519; p=<32 bytes>`.
pub fn dns_record(path: &Path) -> Result<String, DkimError> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    match read_key("key", path)? {
        DkimKey::Rsa(k) => {
            // SubjectPublicKeyInfo { AlgorithmIdentifier rsaEncryption NULL, BIT STRING }
            let pkcs1 = k.public_key();
            let alg: [u8; 15] = [
                0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05,
                0x00,
            ];
            let mut bits = vec![0x03];
            bits.extend(der_len(pkcs1.len() + 1));
            bits.push(0);
            bits.extend(&pkcs1);
            let mut spki = vec![0x30];
            spki.extend(der_len(alg.len() + bits.len()));
            spki.extend(alg);
            spki.extend(bits);
            Ok(format!("v=DKIM1; k=rsa; p={}", b64(&spki)))
        }
        DkimKey::Ed25519(k) => Ok(format!("v=DKIM1; k=ed25519; p={}", b64(&k.public_key()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ed25519_pem(dir: &Path) -> PathBuf {
        let der = Ed25519Key::generate_pkcs8().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let path = dir.join("ed.pem");
        std::fs::write(
            &path,
            format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"),
        )
        .unwrap();
        path
    }

    fn cfg(path: &Path) -> Vec<DkimDomain> {
        vec![DkimDomain {
            domain: "Example.com".into(),
            keys: vec![DkimKeyFile {
                selector: "ed1".into(),
                key_file: path.to_owned(),
            }],
            listeners: Vec::new(),
            headers: Vec::new(),
        }]
    }

    #[test]
    fn a_message_is_signed_once_per_key_and_a_bad_key_names_its_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = ed25519_pem(dir.path());
        let s = Signer::new();
        s.check(&cfg(&path)).unwrap();
        let msg = b"From: App <app@example.com>\r\nSubject: hi\r\n\r\nbody\r\n";
        let signed = s.sign(&cfg(&path), "apps", msg).unwrap().unwrap();
        assert_eq!(signed.domain, "example.com");
        let h = String::from_utf8(signed.headers).unwrap();
        assert!(h.starts_with("DKIM-Signature: "), "{h}");
        assert!(
            h.contains("a=ed25519-sha256") && h.contains("s=ed1") && h.contains("d=example.com"),
            "{h}"
        );
        assert!(h.ends_with("\r\n"));
        assert_eq!(
            s.sign(&cfg(&path), "apps", b"From: a@other.example\r\n\r\n")
                .unwrap(),
            None
        );
        assert!(
            dns_record(&path)
                .unwrap()
                .starts_with("v=DKIM1; k=ed25519; p=")
        );

        // A file that changes is read again: a broken key is an error naming its field.
        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = s.sign(&cfg(&path), "apps", msg).unwrap_err().to_string();
        assert!(e.starts_with("delivery.dkim[0].keys[0].keyFile: "), "{e}");
        assert!(e.contains("is not a usable DKIM key"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let e = s.check(&cfg(&path)).unwrap_err().to_string();
        assert!(e.contains("cannot read DKIM key"), "{e}");
    }
}
