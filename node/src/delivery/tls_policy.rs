//! Which TLS each next hop must have: the route's mode (`none`, `opportunistic`,
//! `required`, `mta-sts`, `dane`), the recipient domain's MTA-STS policy (RFC 8461) and the
//! hop's DNSSEC-signed TLSA records (RFC 7672). DANE wins over MTA-STS for a hop that has
//! TLSA records; a hop whose TLSA lookup fails is not used (never plaintext instead).

use std::sync::{Arc, Mutex};

use crate::config::OutboundTlsMode;

use mail_auth::report::tlsrpt::{PolicyDetails, ResultType};

use super::client::TlsFailure;
use super::dns::{Dns, DnsError, TlsaLookup};
use super::mta_sts::{Mode, Policy};

/// The policy a hop is held to, for metrics, logs and the connection pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// No STARTTLS.
    None,
    /// STARTTLS when offered, certificate not checked.
    Opportunistic,
    /// STARTTLS with a certificate valid for the hop's name (`required`).
    Required,
    /// An `enforce` MTA-STS policy: as `Required`, and the hop is one the policy lists.
    MtaSts,
    /// A `testing` MTA-STS policy: opportunistic, with the certificate checked and the result
    /// only reported.
    MtaStsTesting,
    /// DANE: STARTTLS with a certificate the TLSA records match.
    Dane,
}

impl Kind {
    /// The label of metrics.
    pub fn label(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::Opportunistic => "opportunistic",
            Kind::Required => "required",
            Kind::MtaSts => "mta-sts",
            Kind::MtaStsTesting => "mta-sts-testing",
            Kind::Dane => "dane",
        }
    }
}

/// The certificate check of a `testing` policy: why it failed, read once the connection is
/// open.
pub type Observed = Arc<Mutex<Option<(String, TlsFailure)>>>;

/// The TLS of one hop.
#[derive(Clone)]
pub struct HopTls {
    /// The policy.
    pub kind: Kind,
    /// The TLS client configuration and whether TLS is required; `None`: no STARTTLS.
    pub tls: Option<(Arc<rustls::ClientConfig>, bool)>,
    /// For [`Kind::MtaStsTesting`]: where the certificate check's failure is written.
    pub observed: Option<Observed>,
    /// The policy TLS reports count this hop's sessions under (delivery by MX under
    /// `mta-sts` or `dane`).
    pub report: Option<Arc<PolicyDetails>>,
}

impl std::fmt::Debug for HopTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HopTls")
            .field("kind", &self.kind)
            .field("required", &self.tls.as_ref().map(|t| t.1))
            .finish_non_exhaustive()
    }
}

/// Verifying TLS with one set of trusted roots (the web PKI's and a `caFile`'s).
#[derive(Debug, Clone)]
pub struct Verified {
    /// The client configuration.
    pub config: Arc<rustls::ClientConfig>,
    /// Its certificate check.
    pub verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
}

impl Verified {
    /// Trusting the web PKI roots and `ca`'s certificates.
    pub fn new(ca: Option<&std::path::Path>) -> Result<Self, String> {
        let verifier = super::client::webpki_verifier(ca)?;
        Ok(Self {
            config: super::client::with_verifier(Arc::clone(&verifier))?,
            verifier,
        })
    }
}

/// What the decision needs: the resolver and the TLS client configurations.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// The recipient domain.
    pub domain: &'a str,
    /// The resolver (TLSA lookups).
    pub dns: &'a Dns,
    /// Opportunistic TLS.
    pub any: &'a Arc<rustls::ClientConfig>,
    /// Verifying TLS (web PKI roots and the route's `caFile`).
    pub verified: &'a Verified,
}

/// Why a hop is not used.
#[derive(Debug, Clone)]
pub struct Skip {
    /// The policy that was not met.
    pub kind: Kind,
    /// For a person.
    pub why: String,
    /// In the terms of TLS reports.
    pub result: ResultType,
    /// The policy that was not met, for TLS reports (delivery by MX only).
    pub report: Option<Arc<PolicyDetails>>,
}

/// A TLSA record in presentation form (`3 1 1 <hex>`), as TLS reports show it.
fn tlsa_text(t: &super::dane::Tlsa) -> String {
    let hex: String = t.data.iter().map(|b| format!("{b:02x}")).collect();
    format!("{} {} {} {hex}", t.usage, t.selector, t.matching)
}

/// The TLS of hop `host:port`, or why it is not to be used. `mx` is the domain's MX
/// lookup for delivery by MX (`Some(secure)`: whether the MX records were DNSSEC-signed),
/// `None` for smarthosts; `sts` the domain's MTA-STS policy in force, if any.
pub async fn for_hop(
    mode: OutboundTlsMode,
    mx: Option<bool>,
    sts: Option<&Policy>,
    host: &str,
    port: u16,
    i: &Inputs<'_>,
) -> Result<HopTls, Skip> {
    let plain = |kind, tls: Option<&Arc<rustls::ClientConfig>>, required, report| HopTls {
        kind,
        tls: tls.map(|c| (Arc::clone(c), required)),
        observed: None,
        report,
    };
    match mode {
        OutboundTlsMode::None => return Ok(plain(Kind::None, None, false, None)),
        OutboundTlsMode::Opportunistic => {
            return Ok(plain(Kind::Opportunistic, Some(i.any), false, None));
        }
        OutboundTlsMode::Required => {
            return Ok(plain(Kind::Required, Some(&i.verified.config), true, None));
        }
        OutboundTlsMode::MtaSts | OutboundTlsMode::Dane => {}
    }
    // Reports are about recipient domains: delivery by MX only.
    let report_of = |p: PolicyDetails| mx.is_some().then(|| Arc::new(p));
    // DANE applies to smarthosts, and to MX hosts found by a signed MX lookup.
    if mode == OutboundTlsMode::Dane
        && mx != Some(false)
        && host.parse::<std::net::IpAddr>().is_err()
    {
        let tlsa_report =
            |records: &[String]| report_of(crate::tls_report::tlsa_policy(i.domain, host, records));
        match i.dns.tlsa(host, port).await {
            Ok(TlsaLookup::Records(records)) => {
                let texts: Vec<String> = records.iter().map(tlsa_text).collect();
                let c =
                    super::dane::client_config(records, vec![host.to_owned()]).map_err(|e| {
                        Skip {
                            kind: Kind::Dane,
                            why: format!("DANE TLS settings for {host}: {e}"),
                            result: ResultType::TlsaInvalid,
                            report: tlsa_report(&texts),
                        }
                    })?;
                return Ok(HopTls {
                    kind: Kind::Dane,
                    tls: Some((c, true)),
                    observed: None,
                    report: tlsa_report(&texts),
                });
            }
            Ok(TlsaLookup::None) => {}
            Err(e @ (DnsError::Bogus { .. } | DnsError::Temporary { .. })) => {
                return Err(Skip {
                    kind: Kind::Dane,
                    why: format!(
                        "the TLSA records of {host} cannot be had ({e}); not used without DANE"
                    ),
                    result: ResultType::DnssecInvalid,
                    report: tlsa_report(&[]),
                });
            }
            Err(e) => {
                return Err(Skip {
                    kind: Kind::Dane,
                    why: format!("TLSA lookup for {host}: {e}"),
                    result: ResultType::DnssecInvalid,
                    report: tlsa_report(&[]),
                });
            }
        }
    }
    match (mx, sts) {
        (Some(_), Some(p)) if p.mode == Mode::Enforce => {
            let report = report_of(crate::tls_report::sts_policy(i.domain, p));
            if p.allows(host) {
                Ok(plain(Kind::MtaSts, Some(&i.verified.config), true, report))
            } else {
                Err(Skip {
                    kind: Kind::MtaSts,
                    why: format!(
                        "{host} is not an MX host of the MTA-STS policy (mx: {})",
                        p.mx.join(", ")
                    ),
                    result: ResultType::ValidationFailure,
                    report,
                })
            }
        }
        (Some(_), Some(p)) if p.mode == Mode::Testing => {
            let observed: Observed = Arc::new(Mutex::new(None));
            let note = if p.allows(host) {
                None
            } else {
                Some(format!("{host} is not in the MTA-STS policy"))
            };
            let c =
                observing(&i.verified.verifier, Arc::clone(&observed), note).map_err(|why| {
                    Skip {
                        kind: Kind::MtaStsTesting,
                        why,
                        result: ResultType::ValidationFailure,
                        report: None,
                    }
                })?;
            Ok(HopTls {
                kind: Kind::MtaStsTesting,
                tls: Some((c, false)),
                observed: Some(observed),
                report: report_of(crate::tls_report::sts_policy(i.domain, p)),
            })
        }
        _ => Ok(plain(
            Kind::Opportunistic,
            Some(i.any),
            false,
            report_of(crate::tls_report::no_policy(i.domain)),
        )),
    }
}

/// TLS that accepts any certificate but writes why `verifier`'s check failed
/// (and `note`, an MX outside the policy) into `slot`.
fn observing(
    verifier: &Arc<dyn rustls::client::danger::ServerCertVerifier>,
    slot: Observed,
    note: Option<String>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    super::client::with_verifier(Arc::new(Observing {
        inner: Arc::clone(verifier),
        slot,
        note,
    }))
}

#[derive(Debug)]
struct Observing {
    inner: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    slot: Observed,
    note: Option<String>,
}

impl rustls::client::danger::ServerCertVerifier for Observing {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let why = match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_) => self.note.clone().map(|n| (n, TlsFailure::Validation)),
            Err(e) => Some((e.to_string(), TlsFailure::of_rustls(&e))),
        };
        *self
            .slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
