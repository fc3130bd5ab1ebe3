//! DNS lookups for delivery: MX records and host addresses, with hickory-resolver,
//! pointed at the configured name servers or the system resolver.
//!
//! For DANE (RFC 7672) a second resolver asks the same servers and validates DNSSEC itself,
//! from the root's keys or `delivery.dns.trustAnchorFile`: [`Dns::mx_dnssec`] and
//! [`Dns::tlsa`]. The other lookups do not validate.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as HickoryDnsError, NetError};
use hickory_resolver::proto::dnssec::rdata::DNSSECRData;
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, Record, RecordType};

use super::dane::{self, Tlsa};

use crate::config::DnsConfig;

/// DNS errors.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The name does not exist (NXDOMAIN) or has no records of the type.
    #[error("{name}: no such domain or no records")]
    NotFound {
        /// Queried name.
        name: String,
    },
    /// Temporary failure (timeout, SERVFAIL, ...).
    #[error("{name}: DNS lookup failed: {message}")]
    Temporary {
        /// Queried name.
        name: String,
        /// Cause.
        message: String,
    },
    /// The resolver could not be set up.
    #[error("DNS resolver: {0}")]
    Setup(String),
    /// DNSSEC validation failed (a bad signature, a broken chain of trust, or the proofs
    /// could not be had): the answer must not be used; DANE defers, never delivers.
    #[error("{name}: DNSSEC validation failed: {message}")]
    Bogus {
        /// Queried name.
        name: String,
        /// Cause.
        message: String,
    },
    /// `delivery.dns.trustAnchorFile` cannot be read or parsed.
    #[error("delivery.dns.trustAnchorFile: cannot use {path} as DNSSEC trust anchors: {why}")]
    TrustAnchor {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// The resolvers: one plain, one validating DNSSEC (for DANE only).
#[derive(Clone)]
pub struct Dns {
    resolver: TokioResolver,
    secure: TokioResolver,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns").finish_non_exhaustive()
    }
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') || name.parse::<IpAddr>().is_ok() {
        name.to_owned()
    } else {
        format!("{name}.")
    }
}

impl Dns {
    /// From config: the given name servers, or the system configuration. Reads
    /// `trustAnchorFile` if set.
    pub fn new(cfg: &DnsConfig) -> Result<Self, DnsError> {
        let anchors = match &cfg.trust_anchor_file {
            Some(p) => read_trust_anchors(p)?,
            None => TrustAnchors::default(),
        };
        Ok(Self {
            resolver: Self::resolver(cfg, None)?,
            secure: Self::resolver(cfg, Some(Arc::new(anchors)))?,
        })
    }

    /// A resolver after `cfg`, validating DNSSEC from `anchors` if given.
    fn resolver(
        cfg: &DnsConfig,
        anchors: Option<Arc<TrustAnchors>>,
    ) -> Result<TokioResolver, DnsError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if cfg.nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(|e| DnsError::Setup(e.to_string()))?
        } else {
            let servers = cfg
                .nameservers
                .iter()
                .map(|s| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = s.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = s.port();
                    NameServerConfig::new(s.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts = builder.options_mut();
        opts.timeout = Duration::from_secs(cfg.timeout_seconds.max(1));
        opts.attempts = 2;
        if let Some(anchors) = anchors {
            // `ResolverOpts::trust_anchor` (a path) only turns validation on: the keys
            // themselves must be handed to the builder.
            opts.validate = true;
            builder = builder.with_trust_anchor(anchors);
        }
        builder.build().map_err(|e| DnsError::Setup(e.to_string()))
    }

    fn error(name: &str, e: &hickory_resolver::net::NetError) -> DnsError {
        if e.is_no_records_found() || e.is_nx_domain() {
            DnsError::NotFound {
                name: name.to_owned(),
            }
        } else {
            DnsError::Temporary {
                name: name.to_owned(),
                message: e.to_string(),
            }
        }
    }

    /// MX records `(preference, exchange)`; `Ok(empty)` when the domain exists without MX.
    /// `Err(NotFound)` when the domain does not exist.
    pub async fn mx(&self, domain: &str) -> Result<Vec<(u16, String)>, DnsError> {
        match self.resolver.mx_lookup(fqdn(domain)).await {
            Ok(l) => Ok(l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.to_utf8())),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_no_records_found() && !e.is_nx_domain() => Ok(Vec::new()),
            Err(e) => Err(Self::error(domain, &e)),
        }
    }

    /// Addresses of a host (A and AAAA); an address literal is returned as is.
    pub async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        let h = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = h.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        match self.resolver.lookup_ip(fqdn(host)).await {
            Ok(l) => Ok(l.iter().collect()),
            Err(e) => Err(Self::error(host, &e)),
        }
    }

    /// TXT records of `name`, each record's strings joined (MTA-STS, TLS-RPT).
    pub async fn txt(&self, name: &str) -> Result<Vec<Vec<u8>>, DnsError> {
        match self.resolver.txt_lookup(fqdn(name)).await {
            Ok(l) => Ok(l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => {
                        Some(t.txt_data.iter().flat_map(|s| s.iter().copied()).collect())
                    }
                    _ => None,
                })
                .collect()),
            Err(e) => Err(Self::error(name, &e)),
        }
    }
}

/// Read the DNSKEY records of a trust anchor file (`delivery.dns.trustAnchorFile`).
fn read_trust_anchors(path: &Path) -> Result<TrustAnchors, DnsError> {
    use hickory_resolver::proto::serialize::txt::trust_anchor::Parser;
    let bad = |why: String| DnsError::TrustAnchor {
        path: path.to_owned(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let keys = Parser::new(text.as_str())
        .parse()
        .map_err(|e| bad(format!("not a file of DNSKEY records: {e}")))?;
    if keys.is_empty() {
        return Err(bad("it holds no DNSKEY record".to_owned()));
    }
    text.parse::<TrustAnchors>()
        .map_err(|e| bad(format!("not a file of DNSKEY records: {e}")))
}

/// The TLSA records of a next hop, for DANE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsaLookup {
    /// DNSSEC-signed (secure) records, at least one usable for SMTP ([`dane::usable`]); only
    /// the usable ones.
    Records(Vec<Tlsa>),
    /// No usable secure TLSA records: the host's address records or the TLSA records are
    /// not signed (insecure), their absence is proven (secure NXDOMAIN or NODATA), or only
    /// unusable records exist. DANE does not apply.
    None,
}

/// An answer of the validating resolver.
enum Checked {
    /// The records of the queried type (through CNAMEs), and whether every record of the
    /// answer is secure (else insecure: neither bogus nor indeterminate ones get here).
    Records(Vec<Record>, bool),
    /// No records of the type; `nx`: the name does not exist; `secure`: proven by signed
    /// NSEC or NSEC3 records.
    Empty {
        /// NXDOMAIN (else NODATA).
        nx: bool,
        /// The denial is signed.
        secure: bool,
    },
}

fn bogus(name: &str, message: impl Into<String>) -> DnsError {
    DnsError::Bogus {
        name: name.to_owned(),
        message: message.into(),
    }
}

impl Dns {
    /// MX records `(preference, exchange)` through the validating resolver, and whether
    /// they are DNSSEC-signed (secure). As [`Dns::mx`]: `Ok` empty when the domain exists
    /// without MX (`secure` then says whether that is proven), `Err(NotFound)` when it does
    /// not exist. `Err(Bogus)` when validation fails, `Err(Temporary)` when the lookup does.
    pub async fn mx_dnssec(&self, domain: &str) -> Result<(Vec<(u16, String)>, bool), DnsError> {
        match self.checked(domain, RecordType::MX).await? {
            Checked::Records(records, secure) => Ok((
                records
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.to_utf8())),
                        _ => None,
                    })
                    .collect(),
                secure,
            )),
            Checked::Empty { nx: true, .. } => Err(DnsError::NotFound {
                name: domain.to_owned(),
            }),
            Checked::Empty { nx: false, secure } => Ok((Vec::new(), secure)),
        }
    }

    /// The usable TLSA records at `_{port}._tcp.{host}` (RFC 7672 section 2.2), through
    /// the validating resolver. They are looked up only when the host's address records are
    /// secure (its A records, or the proof it has none); an insecure host, an address
    /// literal and a host proven not to exist give [`TlsaLookup::None`], as do unsigned TLSA
    /// records and a proven absence. A validation failure (of the address or TLSA lookup)
    /// is `Err(Bogus)`; a lookup that fails (SERVFAIL, timeout) is `Err(Temporary)`: the
    /// caller must not fall back to TLS without DANE, nor to plaintext.
    pub async fn tlsa(&self, host: &str, port: u16) -> Result<TlsaLookup, DnsError> {
        let h = host.trim_start_matches('[').trim_end_matches(']');
        if h.parse::<IpAddr>().is_ok() {
            return Ok(TlsaLookup::None);
        }
        match self.checked(host, RecordType::A).await? {
            Checked::Records(_, true)
            | Checked::Empty {
                nx: false,
                secure: true,
            } => {}
            Checked::Records(_, false) | Checked::Empty { .. } => return Ok(TlsaLookup::None),
        }
        let name = format!("_{port}._tcp.{}", fqdn(host));
        let records = match self.checked(&name, RecordType::TLSA).await? {
            Checked::Records(records, true) => records,
            Checked::Records(_, false) | Checked::Empty { .. } => return Ok(TlsaLookup::None),
        };
        let usable = dane::usable(
            records
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TLSA(t) => Some(Tlsa {
                        usage: t.cert_usage.into(),
                        selector: t.selector.into(),
                        matching: t.matching.into(),
                        data: t.cert_data.clone(),
                    }),
                    _ => None,
                })
                .collect(),
        );
        Ok(if usable.is_empty() {
            TlsaLookup::None
        } else {
            TlsaLookup::Records(usable)
        })
    }

    /// Look up `name`/`rtype` through the validating resolver and sort the answer by its
    /// DNSSEC proof: bogus and indeterminate are `Err(Bogus)`.
    async fn checked(&self, name: &str, rtype: RecordType) -> Result<Checked, DnsError> {
        let lookup = match self.secure.lookup(fqdn(name), rtype).await {
            Ok(l) => l,
            Err(e) => return Self::checked_error(name, rtype, e),
        };
        let mut secure = true;
        for r in lookup.answers() {
            if r.record_type() == RecordType::RRSIG {
                continue;
            }
            match r.proof {
                Proof::Secure => {}
                Proof::Insecure => secure = false,
                Proof::Bogus | Proof::Indeterminate => {
                    return Err(bogus(
                        name,
                        format!("{} {} record is {}", r.name, r.record_type(), r.proof),
                    ));
                }
            }
        }
        Ok(Checked::Records(
            lookup
                .answers()
                .iter()
                .filter(|r| r.record_type() == rtype)
                .cloned()
                .collect(),
            secure,
        ))
    }

    /// A failed lookup of the validating resolver: a negative answer (secure or not),
    /// `Bogus` or `Temporary`.
    fn checked_error(name: &str, rtype: RecordType, e: NetError) -> Result<Checked, DnsError> {
        match e {
            NetError::Dns(HickoryDnsError::NoRecordsFound(nr)) => {
                // Hickory returns a negative answer only when its proof is secure or the
                // zone is provably insecure; the signed NSEC/NSEC3 records tell which.
                let secure = nr.authorities.as_deref().is_some_and(|a| {
                    a.iter().any(|r| {
                        r.proof == Proof::Secure
                            && matches!(
                                r.data,
                                RData::DNSSEC(DNSSECRData::NSEC(_) | DNSSECRData::NSEC3(_))
                            )
                    })
                });
                Ok(Checked::Empty {
                    nx: nr.response_code == ResponseCode::NXDomain,
                    secure,
                })
            }
            NetError::Dns(HickoryDnsError::Nsec {
                response, proof, ..
            }) => match proof {
                Proof::Insecure => Ok(Checked::Empty {
                    nx: response.response_code == ResponseCode::NXDomain,
                    secure: false,
                }),
                _ => Err(bogus(
                    name,
                    format!("the proof that there is no {rtype} record is {proof}"),
                )),
            },
            NetError::Dns(HickoryDnsError::DnssecBogus) => Err(bogus(
                name,
                format!("the {rtype} answer is bogus (a bad signature or a broken chain of trust)"),
            )),
            e => Err(DnsError::Temporary {
                name: name.to_owned(),
                message: e.to_string(),
            }),
        }
    }
}
