//! DKIM test helpers: keys made by openssl, and Python's dkimpy (Debian's python3-dkim) as the
//! independent verifier, given the public keys as `mailnode dkim-record` publishes them (no
//! resolver is asked).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use super::sink::Got;
use super::{have, run_ok, unavailable};

pub fn genkey(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let path = dir.join(name);
    run_ok(
        Command::new("openssl")
            .args(["genpkey", "-out", path.to_str().unwrap()])
            .args(args),
        "",
    );
    path
}

pub fn rsa_key(dir: &Path, name: &str) -> PathBuf {
    genkey(
        dir,
        name,
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    )
}

pub fn ed_key(dir: &Path, name: &str) -> PathBuf {
    genkey(dir, name, &["-algorithm", "ed25519"])
}

/// Checks every DKIM-Signature of `msg` with dkimpy; `keys` are (selector, key file). Returns
/// per signature (selector, verified).
pub fn verify(msg: &str, domain: &str, keys: &[(&str, &Path)]) -> Vec<(String, bool)> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("msg.eml");
    std::fs::write(&file, msg).unwrap();
    let records: Vec<String> = keys
        .iter()
        .map(|(s, k)| {
            format!(
                "\"{s}._domainkey.{domain}.\": {:?}",
                mailnode::dkim::dns_record(k).unwrap()
            )
        })
        .collect();
    let script = format!(
        r#"
import sys, dkim
records = {{{}}}
def dns(name, timeout=5):
    return records.get(name.decode() if isinstance(name, bytes) else name, "").encode()
msg = open(sys.argv[1], "rb").read()
d = dkim.DKIM(msg)
n = sum(1 for line in msg.split(b"\r\n\r\n")[0].split(b"\r\n") if line.lower().startswith(b"dkim-signature:"))
for i in range(n):
    ok = d.verify(idx=i, dnsfunc=dns)
    print(d.selector.decode() if isinstance(d.selector, bytes) else d.selector, ok)
"#,
        records.join(", ")
    );
    run_ok(
        Command::new("/usr/bin/python3").args(["-c", &script, file.to_str().unwrap()]),
        "dkimpy",
    )
    .lines()
    .map(|l| {
        let (s, ok) = l.split_once(' ').unwrap();
        (s.to_owned(), ok == "True")
    })
    .collect()
}

pub fn signatures(g: &Got) -> usize {
    g.data
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase()
        .matches("dkim-signature:")
        .count()
}

pub fn have_tools() -> bool {
    for t in ["swaks", "openssl"] {
        if !have(t) {
            unavailable(t);
            return false;
        }
    }
    let dkimpy = Command::new("/usr/bin/python3")
        .args(["-c", "import dkim, nacl"])
        .status()
        .is_ok_and(|s| s.success());
    if !dkimpy {
        unavailable("python3-dkim and python3-nacl");
    }
    dkimpy
}
