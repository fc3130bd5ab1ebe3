//! DANE for SMTP (RFC 7672, RFC 6698, RFC 7671): TLSA records and the TLS certificate check
//! they stand for.
//!
//! Only DANE-TA(2) and DANE-EE(3) records are usable for SMTP (RFC 7672 section 3.1.3), with
//! selector 0 (the whole certificate) or 1 (its SubjectPublicKeyInfo) and matching type 0
//! (exact), 1 (SHA-256) or 2 (SHA-512); [`usable`] keeps those.
//!
//! - DANE-EE(3): the server's own certificate matches; its names and dates are not checked
//!   (RFC 7672 section 3.1.1).
//! - DANE-TA(2): a certificate the server sent in its chain, other than its own, matches; it
//!   is then the only trust anchor, and the chain from the server's certificate to it must
//!   verify (signatures, validity dates) with the server's certificate valid for one of the
//!   reference names (the MX host name, RFC 7672 section 3.2.2).
//!
//! [`client_config`] is a rustls client configuration that accepts a server only so.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::Digest as _;

/// Certificate usage DANE-TA(2): the record names a trust anchor of the server's chain.
pub const DANE_TA: u8 = 2;
/// Certificate usage DANE-EE(3): the record names the server's own certificate or key.
pub const DANE_EE: u8 = 3;

/// A TLSA record (RFC 6698 section 2.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    /// Certificate usage: 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE.
    pub usage: u8,
    /// Selector: 0 the whole certificate, 1 its SubjectPublicKeyInfo.
    pub selector: u8,
    /// Matching type: 0 exact, 1 SHA-256, 2 SHA-512.
    pub matching: u8,
    /// Certificate association data.
    pub data: Vec<u8>,
}

impl fmt::Display for Tlsa {
    /// Presentation format, the data in hex (shortened after 32 bytes).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} ", self.usage, self.selector, self.matching)?;
        for b in self.data.iter().take(32) {
            write!(f, "{b:02x}")?;
        }
        if self.data.len() > 32 {
            f.write_str("...")?;
        }
        Ok(())
    }
}

impl Tlsa {
    /// Whether SMTP may use the record: DANE-TA(2) or DANE-EE(3), selector 0 or 1, matching
    /// type 0, 1 or 2 with data of the digest's length (RFC 7672 section 3.1.3).
    pub fn is_usable(&self) -> bool {
        matches!(self.usage, DANE_TA | DANE_EE)
            && matches!(self.selector, 0 | 1)
            && match self.matching {
                0 => !self.data.is_empty(),
                1 => self.data.len() == 32,
                2 => self.data.len() == 64,
                _ => false,
            }
    }

    /// Whether the record's selector and matching type applied to `cert` (DER) give its
    /// data. A certificate whose SubjectPublicKeyInfo cannot be found matches no selector 1
    /// record.
    pub fn matches(&self, cert: &[u8]) -> bool {
        let selected = match self.selector {
            0 => cert,
            1 => match spki(cert) {
                Some(s) => s,
                None => return false,
            },
            _ => return false,
        };
        match self.matching {
            0 => selected == self.data.as_slice(),
            1 => sha2::Sha256::digest(selected).as_slice() == self.data.as_slice(),
            2 => sha2::Sha512::digest(selected).as_slice() == self.data.as_slice(),
            _ => false,
        }
    }
}

/// The records of `records` that SMTP may use ([`Tlsa::is_usable`]), in order.
pub fn usable(records: Vec<Tlsa>) -> Vec<Tlsa> {
    records.into_iter().filter(Tlsa::is_usable).collect()
}

/// One DER element (tag and length of at most 4 bytes).
struct Der<'a> {
    tag: u8,
    /// The whole element, header included.
    whole: &'a [u8],
    /// What follows it.
    rest: &'a [u8],
    /// Its contents.
    contents: &'a [u8],
}

/// The DER element at the start of `input`.
fn der_element(input: &[u8]) -> Option<Der<'_>> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    Some(Der {
        tag,
        whole: &input[..header + len],
        contents: &rest[..len],
        rest: &rest[len..],
    })
}

/// The DER SubjectPublicKeyInfo of a DER X.509 certificate (RFC 5280 section 4.1).
pub fn spki(cert: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    let sequence = |input| der_element(input).filter(|e| e.tag == SEQUENCE);
    let certificate = sequence(cert)?;
    let tbs = sequence(certificate.contents)?;
    let mut rest = tbs.contents;
    // version [0] EXPLICIT (optional), serialNumber, signature, issuer, validity, subject.
    let first = der_element(rest)?;
    if first.tag == 0xa0 {
        rest = first.rest;
    }
    for want in [0x02, SEQUENCE, SEQUENCE, SEQUENCE, SEQUENCE] {
        let e = der_element(rest).filter(|e| e.tag == want)?;
        rest = e.rest;
    }
    Some(sequence(rest)?.whole)
}

/// The server's certificate chain matches no TLSA record.
#[derive(Clone, thiserror::Error)]
#[error("no TLSA record matches the certificate of {host} ({records})")]
pub struct Mismatch {
    /// The host (the first reference name).
    pub host: String,
    /// The records, with why a DANE-TA record that matched a certificate still failed.
    pub records: String,
}

/// As [`fmt::Display`]: rustls shows a certificate error's `Debug` in its own message.
impl fmt::Debug for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Check a server's chain (`end_entity` first, then `intermediates` as sent) against
/// `records` at time `now`; `names` are the reference names for DANE-TA(2) (the MX host
/// name first). Returns the record that matched. Records that are not [`Tlsa::is_usable`]
/// are ignored.
pub fn verify(
    records: &[Tlsa],
    names: &[String],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<Tlsa, Mismatch> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    verify_with(&provider, records, names, end_entity, intermediates, now)
}

/// [`verify`] with a given crypto provider.
fn verify_with(
    provider: &Arc<CryptoProvider>,
    records: &[Tlsa],
    names: &[String],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<Tlsa, Mismatch> {
    let mut notes = Vec::new();
    for r in records.iter().filter(|r| r.is_usable()) {
        match r.usage {
            DANE_EE => {
                if r.matches(end_entity) {
                    return Ok(r.clone());
                }
                notes.push(r.to_string());
            }
            DANE_TA => {
                let mut why = None;
                let candidates = intermediates
                    .iter()
                    .filter(|c| c.as_ref() != end_entity.as_ref() && r.matches(c));
                for ta in candidates {
                    match verify_to_anchor(provider, ta, names, end_entity, intermediates, now) {
                        Ok(()) => return Ok(r.clone()),
                        Err(e) => why = Some(e),
                    }
                }
                notes.push(match why {
                    Some(e) => format!(
                        "{r}: matches a certificate of the chain, which does not verify to it: {e}"
                    ),
                    None => r.to_string(),
                });
            }
            _ => {}
        }
    }
    Err(Mismatch {
        host: names.first().cloned().unwrap_or_default(),
        records: if notes.is_empty() {
            "no usable TLSA records".to_owned()
        } else {
            notes.join("; ")
        },
    })
}

/// Verify `end_entity` (with `intermediates`) up to `anchor` as the only trust anchor, valid
/// at `now` for one of `names`.
fn verify_to_anchor(
    provider: &Arc<CryptoProvider>,
    anchor: &CertificateDer<'_>,
    names: &[String],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(anchor.clone().into_owned())
        .map_err(|e| format!("the matching certificate is no trust anchor: {e}"))?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(provider),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let mut errors = Vec::new();
    for name in names {
        let Ok(server_name) = ServerName::try_from(name.trim_end_matches('.')) else {
            errors.push(format!("{name} is not a host name"));
            continue;
        };
        match verifier.verify_server_cert(end_entity, intermediates, &server_name, &[], now) {
            Ok(_) => return Ok(()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if errors.is_empty() {
        return Err("no reference name to check the certificate for".to_owned());
    }
    Err(errors.join("; "))
}

/// The [`Mismatch`] inside a handshake error of a [`client_config`] connection, if that is
/// why it failed.
pub fn mismatch(e: &rustls::Error) -> Option<&Mismatch> {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
            o.0.downcast_ref::<Mismatch>()
        }
        _ => None,
    }
}

/// A rustls client configuration (ring, the safe default protocol versions) that accepts a
/// server only if its certificate chain matches one of `records` as [`verify`] checks it,
/// with `names` the reference names (the MX host name first). Unusable records are dropped;
/// none left is an error. A mismatch fails the handshake with
/// `rustls::Error::InvalidCertificate` carrying a [`Mismatch`] (see [`mismatch`]).
pub fn client_config(
    records: Vec<Tlsa>,
    names: Vec<String>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let records = usable(records);
    if records.is_empty() {
        return Err(
            "no usable TLSA records (usage 2 or 3, selector 0 or 1, matching type 0, 1 or 2)"
                .to_owned(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(DaneVerifier {
            records,
            names,
            provider,
        }))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The certificate check of [`client_config`].
#[derive(Debug)]
struct DaneVerifier {
    records: Vec<Tlsa>,
    names: Vec<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match verify_with(
            &self.provider,
            &self.records,
            &self.names,
            end_entity,
            intermediates,
            now,
        ) {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(mut e) => {
                if e.host.is_empty() {
                    e.host = server_name.to_str().into_owned();
                }
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Other(rustls::OtherError(Arc::new(e))),
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData as _;

    /// A CA: its certificate and what signs with it.
    struct Ca {
        der: CertificateDer<'static>,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    fn ca(name: &str, parent: Option<&Ca>) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = match parent {
            Some(p) => params.signed_by(&key, &p.issuer).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        Ca {
            der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A server certificate for `host` (self-signed without `ca`), and its SPKI.
    fn leaf(host: &str, ca: Option<&Ca>, expired: bool) -> (CertificateDer<'static>, Vec<u8>) {
        let mut params = rcgen::CertificateParams::new(vec![host.to_owned()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = match ca {
            Some(c) => params.signed_by(&key, &c.issuer).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (cert.der().clone(), key.subject_public_key_info())
    }

    fn rec(usage: u8, selector: u8, matching: u8, of: &[u8]) -> Tlsa {
        let data = match matching {
            0 => of.to_vec(),
            1 => sha2::Sha256::digest(of).to_vec(),
            _ => sha2::Sha512::digest(of).to_vec(),
        };
        Tlsa {
            usage,
            selector,
            matching,
            data,
        }
    }

    fn names() -> Vec<String> {
        vec!["mx.example".to_owned()]
    }

    #[test]
    fn spki_is_the_keys_subject_public_key_info() {
        let (cert, spki_der) = leaf("mx.example", None, false);
        assert_eq!(spki(&cert), Some(spki_der.as_slice()));
        let root = ca("Root", None);
        let (cert, spki_der) = leaf("mx.example", Some(&root), false);
        assert_eq!(spki(&cert), Some(spki_der.as_slice()));
        assert_eq!(spki(b"\x30\x03\x02\x01\x01"), None);
        assert_eq!(spki(&cert[..cert.len() / 2]), None);
    }

    #[test]
    fn dane_ee_spki_sha256_matches_and_another_key_does_not() {
        let (cert, spki_der) = leaf("mx.example", None, false);
        let (_, other) = leaf("mx.example", None, false);
        let now = UnixTime::now();
        let good = rec(3, 1, 1, &spki_der);
        assert_eq!(
            verify(std::slice::from_ref(&good), &names(), &cert, &[], now).unwrap(),
            good
        );
        let bad = rec(3, 1, 1, &other);
        let e = verify(std::slice::from_ref(&bad), &names(), &cert, &[], now).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("no TLSA record matches the certificate of mx.example (3 1 1 "),
            "{msg}"
        );
        assert!(msg.contains(&hex(&bad.data)), "{msg}");
        // The second record matches.
        verify(&[bad, good], &names(), &cert, &[], now).unwrap();
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn dane_ee_other_selectors_and_matching_types() {
        let (cert, spki_der) = leaf("mx.example", None, false);
        let now = UnixTime::now();
        for r in [
            rec(3, 0, 1, &cert),
            rec(3, 1, 2, &spki_der),
            rec(3, 1, 0, &spki_der),
            rec(3, 0, 0, &cert),
            rec(3, 0, 2, &cert),
        ] {
            verify(std::slice::from_ref(&r), &names(), &cert, &[], now)
                .unwrap_or_else(|e| panic!("{r}: {e}"));
            // Selector 0 and 1 are not interchangeable.
            let swapped = Tlsa {
                selector: 1 - r.selector,
                ..r.clone()
            };
            verify(&[swapped], &names(), &cert, &[], now).unwrap_err();
        }
    }

    #[test]
    fn dane_ee_ignores_names_and_dates() {
        let (cert, spki_der) = leaf("other.example", None, true);
        verify(
            &[rec(3, 1, 1, &spki_der)],
            &names(),
            &cert,
            &[],
            UnixTime::now(),
        )
        .unwrap();
    }

    #[test]
    fn dane_ta_on_an_intermediate_or_root_needs_a_chain_valid_for_a_reference_name() {
        let root = ca("Root", None);
        let inter = ca("Intermediate", Some(&root));
        let (cert, _) = leaf("mx.example", Some(&inter), false);
        let chain = [inter.der.clone(), root.der.clone()];
        let now = UnixTime::now();
        for r in [rec(2, 0, 1, &inter.der), rec(2, 0, 1, &root.der), {
            rec(2, 1, 1, spki(&inter.der).unwrap())
        }] {
            verify(std::slice::from_ref(&r), &names(), &cert, &chain, now)
                .unwrap_or_else(|e| panic!("{r}: {e}"));
            // Another of the reference names will do.
            verify(
                std::slice::from_ref(&r),
                &["example.net".to_owned(), "mx.example.".to_owned()],
                &cert,
                &chain,
                now,
            )
            .unwrap();
            let e = verify(
                std::slice::from_ref(&r),
                &["mx.example.net".to_owned()],
                &cert,
                &chain,
                now,
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("matches a certificate of the chain")
                    && e.contains("not valid for name"),
                "{e}"
            );
        }
        // The root alone (the intermediate not sent) does not verify.
        verify(
            &[rec(2, 0, 1, &root.der)],
            &names(),
            &cert,
            &chain[1..],
            now,
        )
        .unwrap_err();
    }

    #[test]
    fn dane_ta_checks_dates_and_never_matches_the_server_certificate_itself() {
        let root = ca("Root", None);
        let (expired, _) = leaf("mx.example", Some(&root), true);
        let e = verify(
            &[rec(2, 0, 1, &root.der)],
            &names(),
            &expired,
            std::slice::from_ref(&root.der),
            UnixTime::now(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("expired"), "{e}");
        let (own, _) = leaf("mx.example", None, false);
        verify(
            &[rec(2, 0, 1, &own)],
            &names(),
            &own,
            std::slice::from_ref(&own),
            UnixTime::now(),
        )
        .unwrap_err();
    }

    #[test]
    fn unusable_records_are_ignored() {
        let root = ca("Root", None);
        let (cert, spki_der) = leaf("mx.example", Some(&root), false);
        let pkix = vec![
            rec(0, 0, 1, &root.der),
            rec(1, 1, 1, &spki_der),
            rec(3, 1, 3, &spki_der),
            rec(3, 2, 1, &spki_der),
            Tlsa {
                data: vec![1, 2, 3],
                ..rec(3, 1, 1, &spki_der)
            },
        ];
        assert!(pkix.iter().all(|r| !r.is_usable()));
        assert!(usable(pkix.clone()).is_empty());
        let e = verify(
            &pkix,
            &names(),
            &cert,
            std::slice::from_ref(&root.der),
            UnixTime::now(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no usable TLSA records"), "{e}");
        assert!(client_config(pkix.clone(), names()).is_err());
        let mut mixed = pkix;
        mixed.push(rec(3, 1, 1, &spki_der));
        assert_eq!(usable(mixed.clone()).len(), 1);
        client_config(mixed, names()).unwrap();
    }

    #[test]
    fn presentation_format() {
        let r = Tlsa {
            usage: 3,
            selector: 1,
            matching: 1,
            data: vec![0xab; 40],
        };
        assert_eq!(r.to_string(), format!("3 1 1 {}...", "ab".repeat(32)));
    }
}
