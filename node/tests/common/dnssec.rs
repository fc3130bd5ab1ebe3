//! A real authoritative DNS server with DNSSEC-signed zones for tests: NSD (Debian `nsd`)
//! on a loopback address, zones signed by `ldns-keygen` and `ldns-signzone` (`ldnsutils`),
//! ECDSA P-256 (algorithm 13) keys made for each run.
//!
//! The server also serves a signed root zone that delegates every zone given (with DS
//! records for the signed ones: an unsigned zone is an insecure delegation, proven by the
//! root's NSEC records). Its key-signing key is the trust anchor (`trust_anchor`, for
//! `delivery.dns.trustAnchorFile`), so the validator follows the chain as it does on the
//! Internet. The root uses NSEC, the other signed zones NSEC3 (no salt, no extra iterations,
//! RFC 9276). Zones must not be nested in each other (they are all delegated from the root).
//! Nothing but the chosen 127.0.0.x address is ever asked.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Whether NSD and the ldns tools are installed (see [`super::have`]: under the test command
/// a missing one fails the test instead).
pub fn available() -> bool {
    ["nsd", "ldns-keygen", "ldns-signzone", "ldns-key2ds"]
        .iter()
        .all(|t| super::have(t))
}

/// A zone to serve.
#[derive(Debug, Clone, Copy)]
pub struct Zone<'a> {
    /// Its name, e.g. `dane.test.`.
    pub origin: &'a str,
    /// Zone file lines (names relative to `origin` or absolute); the SOA, the apex NS
    /// (`ns.ORIGIN`) and its address are added.
    pub records: &'a str,
    /// Signed (with a DS in the root) or not (an insecure delegation).
    pub signed: bool,
    /// Owner names (relative or absolute) whose signatures are spoiled after signing, except
    /// those over NSEC, NSEC3 and DNSKEY records: their records then validate as bogus.
    pub corrupt: &'a [&'a str],
}

/// The running server; dropping it stops NSD.
pub struct SignedDns {
    /// Where it answers (UDP and TCP).
    pub addr: SocketAddr,
    /// The root's key-signing key (a DNSKEY record): the only trust anchor.
    pub trust_anchor: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn run(dir: &Path, cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (tests/setup.sh installs nsd and ldnsutils)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn absolute(name: &str, origin: &str) -> String {
    let name = name.to_ascii_lowercase();
    if name.ends_with('.') {
        name
    } else if origin == "." {
        format!("{name}.")
    } else {
        format!("{name}.{origin}")
    }
}

fn file_name(origin: &str) -> String {
    if origin == "." {
        "root".to_owned()
    } else {
        origin.trim_end_matches('.').to_owned()
    }
}

/// Sign `origin`'s zone file `file` in `dir` with new keys; returns the signed file's name,
/// the KSK's DS record and the KSK's DNSKEY record.
fn sign(dir: &Path, origin: &str, file: &str, nsec3: bool) -> (String, String, String) {
    let ksk = run(dir, "ldns-keygen", &["-a", "ECDSAP256SHA256", "-k", origin]);
    let zsk = run(dir, "ldns-keygen", &["-a", "ECDSAP256SHA256", origin]);
    let (ksk, zsk) = (ksk.trim(), zsk.trim());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let inception = (now - 3600).to_string();
    let expiration = (now + 30 * 86400).to_string();
    let signed = format!("{file}.signed");
    let mut args = vec![
        "-i",
        &inception,
        "-e",
        &expiration,
        "-f",
        &signed,
        "-o",
        origin,
    ];
    if nsec3 {
        args.extend(["-n", "-t", "0"]);
    }
    args.extend([file, ksk, zsk]);
    run(dir, "ldns-signzone", &args);
    let ds = run(dir, "ldns-key2ds", &["-n", "-2", &format!("{ksk}.key")]);
    let dnskey = std::fs::read_to_string(dir.join(format!("{ksk}.key"))).unwrap();
    (signed, ds.trim().to_owned(), dnskey)
}

/// Spoil the signatures (not over NSEC, NSEC3, DNSKEY) of the owners `names` in `file`.
fn corrupt(file: &Path, names: &[String]) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = String::new();
    let mut spoiled = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 5
            && f[3] == "RRSIG"
            && !matches!(f[4], "NSEC" | "NSEC3" | "DNSKEY")
            && names.iter().any(|n| n.eq_ignore_ascii_case(f[0]))
        {
            let sig = f[f.len() - 1];
            let mut bytes = sig.as_bytes().to_vec();
            let i = bytes.len() / 2;
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let sig = String::from_utf8(bytes).unwrap();
            writeln!(out, "{} {sig}", f[..f.len() - 1].join(" ")).unwrap();
            spoiled += 1;
        } else {
            writeln!(out, "{line}").unwrap();
        }
    }
    assert!(
        spoiled > 0,
        "no signature of {names:?} in {}",
        file.display()
    );
    std::fs::write(file, out).unwrap();
}

/// A port free for both UDP and TCP on `ip`.
fn free_port(ip: &str) -> u16 {
    loop {
        let port = super::free_port();
        if std::net::UdpSocket::bind((ip, port)).is_ok()
            && std::net::TcpListener::bind((ip, port)).is_ok()
        {
            return port;
        }
    }
}

impl SignedDns {
    /// Sign `zones` (and a root zone delegating to them) and serve them on `ip` (a
    /// 127.0.0.x address).
    pub fn start(ip: &str, zones: &[Zone<'_>]) -> SignedDns {
        let mut dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let d = d.as_path();
        let mut root = format!(
            "$ORIGIN .\n$TTL 300\n. IN SOA ns. hostmaster.root. 1 3600 600 86400 300\n\
             . IN NS ns.\nns. IN A {ip}\n"
        );
        let mut nsd_zones = String::new();
        for z in zones {
            assert!(z.origin.ends_with('.') && z.origin != ".", "{}", z.origin);
            let origin = z.origin.to_ascii_lowercase();
            let name = file_name(&origin);
            let file = format!("{name}.zone");
            std::fs::write(
                d.join(&file),
                format!(
                    "$ORIGIN {origin}\n$TTL 300\n\
                     @ IN SOA ns.{origin} hostmaster.{origin} 1 3600 600 86400 300\n\
                     @ IN NS ns.{origin}\nns IN A {ip}\n{}\n",
                    z.records
                ),
            )
            .unwrap();
            writeln!(root, "{origin} IN NS ns.{origin}\nns.{origin} IN A {ip}").unwrap();
            let served = if z.signed {
                let (signed, ds, _) = sign(d, &origin, &file, true);
                writeln!(root, "{ds}").unwrap();
                if !z.corrupt.is_empty() {
                    let names: Vec<String> =
                        z.corrupt.iter().map(|n| absolute(n, &origin)).collect();
                    corrupt(&d.join(&signed), &names);
                }
                signed
            } else {
                assert!(z.corrupt.is_empty(), "only a signed zone can be corrupted");
                file
            };
            writeln!(
                nsd_zones,
                "zone:\n  name: \"{origin}\"\n  zonefile: \"{served}\""
            )
            .unwrap();
        }
        std::fs::write(d.join("root.zone"), root).unwrap();
        let (signed, _, dnskey) = sign(d, ".", "root.zone", false);
        writeln!(nsd_zones, "zone:\n  name: \".\"\n  zonefile: \"{signed}\"").unwrap();
        let trust_anchor = d.join("root.key");
        std::fs::write(&trust_anchor, dnskey).unwrap();

        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port(ip);
            let conf = d.join("nsd.conf");
            let p = |f: &str| d.join(f).display().to_string();
            std::fs::write(
                &conf,
                format!(
                    "server:\n  ip-address: {ip}@{port}\n  do-ip6: no\n  username: \"\"\n  \
                     chroot: \"\"\n  zonesdir: \"{}\"\n  pidfile: \"{}\"\n  database: \"\"\n  \
                     zonelistfile: \"{}\"\n  xfrdfile: \"{}\"\n  xfrdir: \"{}\"\n  \
                     logfile: \"{}\"\n  server-count: 1\n  verbosity: 1\n\
                     remote-control:\n  control-enable: no\n{nsd_zones}",
                    d.display(),
                    p("nsd.pid"),
                    p("zone.list"),
                    p("xfrd.state"),
                    d.display(),
                    p("nsd.log"),
                ),
            )
            .unwrap();
            let _ = std::fs::remove_file(d.join("nsd.log"));
            let child = Command::new("nsd")
                .arg("-d")
                .arg("-c")
                .arg(&conf)
                .current_dir(d)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("nsd.stderr")).unwrap())
                .process_group(0)
                .spawn()
                .expect("nsd (tests/setup.sh installs it)");
            let mut s = SignedDns {
                addr: SocketAddr::new(ip.parse().unwrap(), port),
                trust_anchor: trust_anchor.clone(),
                dir,
                child: Some(child),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if s.log().contains("nsd started") {
                    return s;
                }
                let exited = s.child.as_mut().unwrap().try_wait().unwrap();
                if exited.is_some() || Instant::now() > deadline {
                    last = s.log();
                    s.stop();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            // Port taken in the meantime (or a slow start): try another.
            dir = std::mem::replace(&mut s.dir, tempfile::tempdir().unwrap());
        }
        panic!("nsd did not start:\n{last}");
    }

    /// NSD's log.
    pub fn log(&self) -> String {
        let d = self.dir.path();
        let mut s = std::fs::read_to_string(d.join("nsd.log")).unwrap_or_default();
        s += &std::fs::read_to_string(d.join("nsd.stderr")).unwrap_or_default();
        s
    }

    /// The resolver settings of a node that asks only this server and trusts only its root.
    pub fn config(&self) -> mailnode::config::DnsConfig {
        mailnode::config::DnsConfig {
            nameservers: vec![self.addr],
            timeout_seconds: 1,
            trust_anchor_file: Some(self.trust_anchor.clone()),
        }
    }

    /// Stop NSD (and its child processes) now.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = format!("-{}", child.id());
        let signal = |sig: &str| {
            let _ = Command::new("kill")
                .args([sig, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        // NSD stops its server and xfrd processes itself on SIGTERM.
        signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        signal("-KILL");
        let _ = child.wait();
    }
}

impl Drop for SignedDns {
    fn drop(&mut self) {
        self.stop();
    }
}
