//! DNS lookups for delivery: MX records and host addresses, with hickory-resolver,
//! pointed at the configured name servers or the system resolver.

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

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
}

/// The resolver.
#[derive(Clone)]
pub struct Dns {
    resolver: TokioResolver,
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
    /// From config: the given name servers, or the system configuration.
    pub fn new(cfg: &DnsConfig) -> Result<Self, DnsError> {
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
        let resolver = builder
            .build()
            .map_err(|e| DnsError::Setup(e.to_string()))?;
        Ok(Self { resolver })
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
}
