//! DANE (RFC 7672) through the real parts: the validating lookups of `Dns` (`mx_dnssec`,
//! `tlsa`) against NSD serving DNSSEC-signed zones on loopback, and TLS handshakes checked
//! by `dane::client_config` with the TLSA records that came from that DNS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::dnssec::{SignedDns, Zone};
use mailnode::delivery::dane::{self, Tlsa};
use mailnode::delivery::dns::{Dns, DnsError, TlsaLookup};
use rcgen::PublicKeyData as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A key and a certificate for `host`, self-signed or issued by `ca`.
struct Cert {
    chain: Vec<CertificateDer<'static>>,
    key: rcgen::KeyPair,
}

fn cert(
    host: &str,
    ca: Option<&(
        rcgen::Issuer<'static, rcgen::KeyPair>,
        CertificateDer<'static>,
    )>,
) -> Cert {
    let mut params = rcgen::CertificateParams::new(vec![host.to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let chain = match ca {
        Some((issuer, der)) => vec![
            params.signed_by(&key, issuer).unwrap().der().clone(),
            der.clone(),
        ],
        None => vec![params.self_signed(&key).unwrap().der().clone()],
    };
    Cert { chain, key }
}

fn ca() -> (
    rcgen::Issuer<'static, rcgen::KeyPair>,
    CertificateDer<'static>,
) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "DANE test CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let der = params.self_signed(&key).unwrap().der().clone();
    (rcgen::Issuer::new(params, key), der)
}

/// The zones most tests use: `dane.test.` (signed) and `plain.test.` (an insecure
/// delegation), with `tlsa` the data of `_25._tcp.mx.dane.test.` (3 1 1).
fn bed(ip: &str, tlsa: &str) -> SignedDns {
    let signed = format!(
        "@ MX 10 mx\n\
         mx A 127.0.0.1\n\
         _25._tcp.mx TLSA 3 1 1 {tlsa}\n\
         nodane A 127.0.0.1\n\
         v6only AAAA ::1\n\
         _25._tcp.v6only TLSA 3 1 1 {tlsa}\n\
         pkix A 127.0.0.1\n\
         _25._tcp.pkix TLSA 1 1 1 {tlsa}\n\
         _25._tcp.pkix TLSA 0 0 1 {tlsa}\n\
         bad A 127.0.0.1\n\
         _25._tcp.bad TLSA 3 1 1 {tlsa}\n\
         badaddr A 127.0.0.1\n\
         _25._tcp.badaddr TLSA 3 1 1 {tlsa}\n\
         bogusmx MX 10 mx\n"
    );
    let plain = format!(
        "@ MX 10 mx\n\
         mx A 127.0.0.1\n\
         _25._tcp.mx TLSA 3 1 1 {tlsa}\n"
    );
    SignedDns::start(
        ip,
        &[
            Zone {
                origin: "dane.test.",
                records: &signed,
                signed: true,
                corrupt: &["_25._tcp.bad", "badaddr", "bogusmx"],
            },
            Zone {
                origin: "plain.test.",
                records: &plain,
                signed: false,
                corrupt: &[],
            },
        ],
    )
}

const DATA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn data() -> Vec<u8> {
    (0..32)
        .map(|i| u8::from_str_radix(&DATA[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

#[tokio::test]
async fn signed_records_and_signed_denials() {
    if !common::dnssec::available() {
        return;
    }
    let dns_server = bed("127.0.0.61", DATA);
    let dns = Dns::new(&dns_server.config()).unwrap();
    let log = || dns_server.log();

    assert_eq!(
        dns.mx_dnssec("dane.test").await.unwrap(),
        (vec![(10, "mx.dane.test.".to_owned())], true),
        "{}",
        log()
    );
    let want = Tlsa {
        usage: 3,
        selector: 1,
        matching: 1,
        data: data(),
    };
    assert_eq!(
        dns.tlsa("mx.dane.test", 25).await.unwrap(),
        TlsaLookup::Records(vec![want.clone()])
    );
    assert_eq!(
        dns.tlsa("mx.dane.test.", 25).await.unwrap(),
        TlsaLookup::Records(vec![want.clone()])
    );
    // A host with only AAAA records: its signed NODATA for A says the zone is signed.
    assert_eq!(
        dns.tlsa("v6only.dane.test", 25).await.unwrap(),
        TlsaLookup::Records(vec![want])
    );
    // Signed NXDOMAIN (NSEC3) for the TLSA name: no DANE.
    assert_eq!(
        dns.tlsa("mx.dane.test", 587).await.unwrap(),
        TlsaLookup::None
    );
    assert_eq!(
        dns.tlsa("nodane.dane.test", 25).await.unwrap(),
        TlsaLookup::None
    );
    // Only PKIX-TA/EE records: unusable for SMTP.
    assert_eq!(
        dns.tlsa("pkix.dane.test", 25).await.unwrap(),
        TlsaLookup::None
    );
    // A host that does not exist (signed NXDOMAIN), and an address literal.
    assert_eq!(
        dns.tlsa("nohost.dane.test", 25).await.unwrap(),
        TlsaLookup::None
    );
    assert_eq!(dns.tlsa("127.0.0.1", 25).await.unwrap(), TlsaLookup::None);
    assert_eq!(dns.tlsa("[::1]", 25).await.unwrap(), TlsaLookup::None);
    // MX: signed NODATA and signed NXDOMAIN.
    assert_eq!(
        dns.mx_dnssec("mx.dane.test").await.unwrap(),
        (Vec::new(), true)
    );
    assert!(matches!(
        dns.mx_dnssec("nxdomain.dane.test").await,
        Err(DnsError::NotFound { .. })
    ));
    // The plain lookups are as before.
    assert_eq!(
        dns.mx("dane.test").await.unwrap(),
        vec![(10, "mx.dane.test.".to_owned())]
    );
}

#[tokio::test]
async fn an_unsigned_zone_is_insecure() {
    if !common::dnssec::available() {
        return;
    }
    let dns_server = bed("127.0.0.62", DATA);
    let dns = Dns::new(&dns_server.config()).unwrap();
    assert_eq!(
        dns.mx_dnssec("plain.test").await.unwrap(),
        (vec![(10, "mx.plain.test.".to_owned())], false),
        "{}",
        dns_server.log()
    );
    // Its TLSA records exist but are not signed: no DANE.
    assert_eq!(
        dns.tlsa("mx.plain.test", 25).await.unwrap(),
        TlsaLookup::None
    );
    assert_eq!(
        dns.mx_dnssec("mx.plain.test").await.unwrap(),
        (Vec::new(), false)
    );
    assert!(matches!(
        dns.mx_dnssec("nxdomain.plain.test").await,
        Err(DnsError::NotFound { .. })
    ));
}

#[tokio::test]
async fn bad_signatures_are_bogus() {
    if !common::dnssec::available() {
        return;
    }
    let dns_server = bed("127.0.0.63", DATA);
    let dns = Dns::new(&dns_server.config()).unwrap();
    for (what, r) in [
        ("TLSA", dns.tlsa("bad.dane.test", 25).await.map(|_| ())),
        ("A", dns.tlsa("badaddr.dane.test", 25).await.map(|_| ())),
        ("MX", dns.mx_dnssec("bogusmx.dane.test").await.map(|_| ())),
    ] {
        match r {
            Err(DnsError::Bogus { name, message }) => {
                assert!(name.contains("dane.test"), "{name}");
                assert!(!message.is_empty());
                eprintln!("{what}: {name}: {message}");
            }
            other => panic!("{what}: {other:?}\n{}", dns_server.log()),
        }
    }
    // The good records next to them still validate.
    assert!(matches!(
        dns.tlsa("mx.dane.test", 25).await,
        Ok(TlsaLookup::Records(_))
    ));
}

#[tokio::test]
async fn another_trust_anchor_makes_everything_signed_bogus() {
    if !common::dnssec::available() {
        return;
    }
    let dns_server = bed("127.0.0.64", DATA);
    let other = bed("127.0.0.65", DATA);
    let mut cfg = dns_server.config();
    cfg.trust_anchor_file = Some(other.trust_anchor.clone());
    let dns = Dns::new(&cfg).unwrap();
    assert!(
        matches!(
            dns.mx_dnssec("dane.test").await,
            Err(DnsError::Bogus { .. })
        ),
        "{}",
        dns_server.log()
    );
    assert!(matches!(
        dns.tlsa("mx.dane.test", 25).await,
        Err(DnsError::Bogus { .. })
    ));
}

#[tokio::test]
async fn a_server_that_does_not_answer_is_a_temporary_failure() {
    if !common::dnssec::available() {
        return;
    }
    let mut dns_server = bed("127.0.0.66", DATA);
    let dns = Dns::new(&dns_server.config()).unwrap();
    // The address of mx.dane.test is now known (cached) to be signed.
    assert!(matches!(
        dns.tlsa("mx.dane.test", 25).await,
        Ok(TlsaLookup::Records(_))
    ));
    dns_server.stop();
    let started = std::time::Instant::now();
    let (tlsa, addr, mx) = tokio::join!(
        // The host is signed, its TLSA lookup fails: never without DANE.
        dns.tlsa("mx.dane.test", 465),
        // The host's address lookup fails.
        dns.tlsa("nodane.dane.test", 25),
        dns.mx_dnssec("dane.test"),
    );
    for r in [tlsa.map(|_| ()), addr.map(|_| ()), mx.map(|_| ())] {
        match r {
            Err(e @ DnsError::Temporary { .. }) => eprintln!("{e}"),
            other => panic!("{other:?}"),
        }
    }
    eprintln!("failed in {:?}", started.elapsed());
}

#[test]
fn a_trust_anchor_file_that_cannot_be_used_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("missing", None),
        ("garbage", Some("this is not a zone file\n")),
        ("empty", Some("; nothing\n")),
        (
            "ds",
            Some(
                ". 3600 IN DS 20326 8 2 e06d44b80b8f1d39a95c0b0d7c65d08458e880409bbc683457104237c7f8ec8d\n",
            ),
        ),
    ];
    for (name, text) in cases {
        let path = dir.path().join(name);
        if let Some(t) = text {
            std::fs::write(&path, t).unwrap();
        }
        let cfg = mailnode::config::DnsConfig {
            trust_anchor_file: Some(path.clone()),
            ..Default::default()
        };
        let e = Dns::new(&cfg).unwrap_err().to_string();
        assert!(
            e.starts_with("delivery.dns.trustAnchorFile: ") && e.contains(&*path.to_string_lossy()),
            "{name}: {e}"
        );
    }
    // The config's own check names the key too.
    let mut c = mailnode::config::Config::default();
    c.delivery.dns.trust_anchor_file = Some(std::path::PathBuf::new());
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("delivery.dns.trustAnchorFile"), "{e}");
    let c = mailnode::config::Config::from_yaml(
        "delivery:\n  dns:\n    trustAnchorFile: /etc/mailnode/root.key\n",
    )
    .unwrap();
    assert_eq!(
        c.delivery.dns.trust_anchor_file.as_deref(),
        Some(std::path::Path::new("/etc/mailnode/root.key"))
    );
}

/// A TLS server on `ip` presenting `cert` to one client; returns its port.
async fn tls_server(ip: &str, cert: Cert) -> u16 {
    let key = PrivateKeyDer::Pkcs8(cert.key.serialize_der().into());
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(cert.chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"hello").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    port
}

/// Look up the TLSA records of `host` and connect to `ip:port` with DANE.
async fn dane_connect(
    dns: &Dns,
    host: &str,
    ip: &str,
    port: u16,
) -> Result<String, std::io::Error> {
    let TlsaLookup::Records(records) = dns.tlsa(host, 25).await.unwrap() else {
        panic!("no TLSA records for {host}");
    };
    let cfg = dane::client_config(records, vec![host.to_owned()]).unwrap();
    let tcp = tokio::net::TcpStream::connect((ip, port)).await.unwrap();
    let name = ServerName::try_from(host.to_owned()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    let mut got = String::new();
    tls.read_to_string(&mut got).await?;
    Ok(got)
}

#[tokio::test]
async fn tls_handshakes_checked_against_tlsa_records_from_dns() {
    if !common::dnssec::available() {
        return;
    }
    let server_cert = cert("mx.dane.test", None);
    let spki = server_cert.key.subject_public_key_info();
    let other = rcgen::KeyPair::generate()
        .unwrap()
        .subject_public_key_info();
    let ca = ca();
    let ta_cert = cert("ta.dane.test", Some(&ca));
    let records = format!(
        "mx A 127.0.0.1\n\
         _25._tcp.mx TLSA 3 1 1 {}\n\
         wrong A 127.0.0.1\n\
         _25._tcp.wrong TLSA 3 1 1 {}\n\
         ta A 127.0.0.1\n\
         _25._tcp.ta TLSA 2 0 1 {}\n\
         notta A 127.0.0.1\n\
         _25._tcp.notta TLSA 2 0 1 {}\n",
        sha256_hex(&spki),
        sha256_hex(&other),
        sha256_hex(&ca.1),
        sha256_hex(&ca.1),
    );
    let dns_server = SignedDns::start(
        "127.0.0.67",
        &[Zone {
            origin: "dane.test.",
            records: &records,
            signed: true,
            corrupt: &[],
        }],
    );
    let dns = Dns::new(&dns_server.config()).unwrap();
    let ip = "127.0.0.67";
    let port = tls_server(ip, server_cert).await;

    // DANE-EE(3): the key matches.
    assert_eq!(
        dane_connect(&dns, "mx.dane.test", ip, port).await.unwrap(),
        "hello"
    );
    // Another key's record: the handshake fails and says why.
    let e = dane_connect(&dns, "wrong.dane.test", ip, port)
        .await
        .unwrap_err();
    let inner = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("{e:?}"));
    let m = dane::mismatch(inner).unwrap_or_else(|| panic!("{inner:?}"));
    let msg = m.to_string();
    assert!(
        msg.starts_with(&format!(
            "no TLSA record matches the certificate of wrong.dane.test (3 1 1 {}",
            sha256_hex(&other)
        )),
        "{msg}"
    );
    assert!(e.to_string().contains("no TLSA record matches"), "{e}");

    // DANE-TA(2): the CA the server sends matches and its certificate is for the name.
    let ta_port = tls_server(ip, ta_cert).await;
    assert_eq!(
        dane_connect(&dns, "ta.dane.test", ip, ta_port)
            .await
            .unwrap(),
        "hello"
    );
    // The same CA, but the certificate is not for this name.
    let e = dane_connect(&dns, "notta.dane.test", ip, ta_port)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no TLSA record matches the certificate of notta.dane.test")
            && e.contains("not valid for name"),
        "{e}"
    );
}
