//! What DKIM signing costs a delivery: signatures per second for one core, by key type and
//! message size, with the signer mailnode uses (`dkim::Signer`, mail-auth on ring, relaxed/
//! relaxed, the default header list). Prints a table; not a test.
//! Usage: `cargo bench -p mailnode --bench dkim_sign -- [MESSAGES]` (default 2000 per row).
//! Needs `openssl` for the RSA key (ring does not generate RSA keys).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use base64::Engine as _;
use mailnode::config::{DkimDomain, DkimKeyFile};
use mailnode::dkim::Signer;

fn domain(selector: &str, key: &Path) -> Vec<DkimDomain> {
    vec![DkimDomain {
        domain: "example.com".into(),
        keys: vec![DkimKeyFile {
            selector: selector.into(),
            key_file: key.to_owned(),
        }],
        listeners: Vec::new(),
        headers: Vec::new(),
    }]
}

fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: App <app@example.com>\r\nTo: it@b.example\r\nSubject: report\r\nDate: Thu, 3 Dec 2026 04:00:00 +0000\r\nMessage-ID: <b@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n".to_vec();
    while m.len() < size {
        m.extend_from_slice(
            b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n",
        );
    }
    m
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir()?;
    let rsa = dir.path().join("rsa.pem");
    let ok = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&rsa)
        .output()?
        .status
        .success();
    if !ok {
        return Err("openssl genpkey failed".into());
    }
    let ed = dir.path().join("ed.pem");
    let der =
        mail_auth::common::crypto::Ed25519Key::generate_pkcs8().map_err(|e| format!("{e}"))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    std::fs::write(
        &ed,
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"),
    )?;
    println!("| key | message | signatures/s (one core) | µs each |");
    println!("| --- | --- | --- | --- |");
    for (name, key) in [("RSA-2048", &rsa), ("Ed25519", &ed)] {
        let cfg = domain("s1", key);
        let signer = Signer::new();
        for size in [1024, 10 * 1024, 100 * 1024] {
            let msg = message(size);
            signer.sign(&cfg, "apps", &msg)?;
            let t = Instant::now();
            for _ in 0..n {
                signer.sign(&cfg, "apps", &msg)?;
            }
            let each = t.elapsed().as_secs_f64() / n as f64;
            println!(
                "| {name} | {} KiB | {:.0} | {:.0} |",
                size / 1024,
                1.0 / each,
                each * 1e6
            );
        }
    }
    Ok(())
}
