//! Relay policy of a listener: a pure decision from client address, authentication and
//! recipient to accept or refuse.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::Listener;
use crate::smtp::address::{Address, Path};
use crate::smtp::reply::Reply;

/// Why a recipient was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// The domain is in `acceptDomains` (inbound, anyone may send).
    Inbound,
    /// Relay permitted by `relay`.
    Relay,
}

/// Why a recipient was refused; `as_str` is the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Relay trick in the address.
    RelayTrick(crate::smtp::address::RelayTrick),
    /// Client address not allowed to relay.
    RelaySourceDenied,
    /// Relay needs authentication.
    AuthRequired,
    /// Recipient domain not in `recipientDomains`.
    RecipientDomainDenied,
    /// No local mailboxes (e.g. bare `postmaster`).
    NoLocalMailbox,
}

impl Refusal {
    /// Metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::RelayTrick(t) => t.as_str(),
            Refusal::RelaySourceDenied => "relay_source_denied",
            Refusal::AuthRequired => "auth_required",
            Refusal::RecipientDomainDenied => "recipient_domain_denied",
            Refusal::NoLocalMailbox => "no_local_mailbox",
        }
    }

    /// The SMTP reply for this refusal.
    pub fn reply(self) -> Reply {
        match self {
            Refusal::RelayTrick(t) => Reply::new(
                550,
                "5.7.1",
                format!(
                    "Relaying denied: address form not accepted ({})",
                    t.as_str()
                ),
            ),
            Refusal::RelaySourceDenied => Reply::new(550, "5.7.1", "Relaying denied"),
            Refusal::AuthRequired => {
                Reply::new(550, "5.7.1", "Relaying denied: authentication required")
            }
            Refusal::RecipientDomainDenied => Reply::new(
                550,
                "5.7.1",
                "Relaying denied: recipient domain not allowed",
            ),
            Refusal::NoLocalMailbox => Reply::new(550, "5.1.1", "No local mailboxes here"),
        }
    }
}

/// A listener's compiled policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    allowed_sources: Vec<IpNet>,
    require_auth: bool,
    recipient_domains: Vec<String>,
    accept_domains: Vec<String>,
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes IPv4, so CIDRs match either form.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn normalize_domain(d: &str) -> String {
    d.trim_end_matches('.').to_lowercase()
}

impl Policy {
    /// Compile from a listener's config.
    pub fn from_listener(l: &Listener) -> Self {
        Self {
            allowed_sources: l.relay.allowed_sources.clone(),
            require_auth: l.relay.require_auth,
            recipient_domains: l
                .relay
                .recipient_domains
                .iter()
                .map(|d| normalize_domain(d))
                .collect(),
            accept_domains: l
                .accept_domains
                .iter()
                .map(|d| normalize_domain(d))
                .collect(),
        }
    }

    /// Whether relaying is possible at all for this client (used to decide what to offer).
    pub fn source_may_relay(&self, client: IpAddr) -> bool {
        let client = canonical_ip(client);
        if self.allowed_sources.is_empty() {
            self.require_auth
        } else {
            self.allowed_sources.iter().any(|n| n.contains(&client))
        }
    }

    /// Decide on one recipient.
    pub fn check_rcpt(
        &self,
        client: IpAddr,
        authenticated: bool,
        rcpt: &Path,
    ) -> Result<Accept, Refusal> {
        let addr: &Address = match rcpt {
            Path::Mailbox(a) => a,
            Path::Postmaster | Path::Null => return Err(Refusal::NoLocalMailbox),
        };
        if let Some(trick) = addr.relay_trick() {
            return Err(Refusal::RelayTrick(trick));
        }
        let domain = addr.domain_lower();
        if !addr.is_literal() && self.accept_domains.contains(&domain) {
            return Ok(Accept::Inbound);
        }
        if !self.source_may_relay(client) {
            return Err(Refusal::RelaySourceDenied);
        }
        if self.require_auth && !authenticated {
            return Err(Refusal::AuthRequired);
        }
        if !self.recipient_domains.is_empty()
            && (addr.is_literal() || !self.recipient_domains.contains(&domain))
        {
            return Err(Refusal::RecipientDomainDenied);
        }
        Ok(Accept::Relay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RelayPolicy;
    use crate::smtp::address::parse_path;

    fn rcpt(s: &str) -> Path {
        parse_path(s).unwrap().0
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_is_closed() {
        let p = Policy::from_listener(&Listener::default());
        assert_eq!(
            p.check_rcpt(ip("127.0.0.1"), true, &rcpt("<a@b.example>")),
            Err(Refusal::RelaySourceDenied)
        );
    }

    #[test]
    fn matrix() {
        let mut l = Listener::default().with_accept_domains(["Example.COM"]);
        l.relay = RelayPolicy {
            allowed_sources: vec!["127.0.0.2/32".parse().unwrap(), "fd00::/8".parse().unwrap()],
            require_auth: false,
            recipient_domains: vec!["internal.example".into()],
            open_relay: false,
        };
        let p = Policy::from_listener(&l);
        let allowed = ip("127.0.0.2");
        let denied = ip("127.0.0.3");
        assert_eq!(
            p.check_rcpt(denied, false, &rcpt("<x@example.com>")),
            Ok(Accept::Inbound)
        );
        assert_eq!(
            p.check_rcpt(allowed, false, &rcpt("<x@Internal.Example>")),
            Ok(Accept::Relay)
        );
        assert_eq!(
            p.check_rcpt(ip("::ffff:127.0.0.2"), false, &rcpt("<x@internal.example>")),
            Ok(Accept::Relay)
        );
        assert_eq!(
            p.check_rcpt(ip("fd00::1"), false, &rcpt("<x@internal.example>")),
            Ok(Accept::Relay)
        );
        assert_eq!(
            p.check_rcpt(allowed, false, &rcpt("<x@gmail.example>")),
            Err(Refusal::RecipientDomainDenied)
        );
        assert_eq!(
            p.check_rcpt(allowed, false, &rcpt("<x@[127.0.0.1]>")),
            Err(Refusal::RecipientDomainDenied)
        );
        assert_eq!(
            p.check_rcpt(denied, false, &rcpt("<x@internal.example>")),
            Err(Refusal::RelaySourceDenied)
        );
        assert!(matches!(
            p.check_rcpt(denied, false, &rcpt("<x%evil.example@example.com>")),
            Err(Refusal::RelayTrick(_))
        ));
        assert!(matches!(
            p.check_rcpt(allowed, false, &rcpt("<@example.com:x@evil.example>")),
            Err(Refusal::RelayTrick(_))
        ));
        assert_eq!(
            p.check_rcpt(allowed, false, &rcpt("<postmaster>")),
            Err(Refusal::NoLocalMailbox)
        );
    }

    #[test]
    fn auth_required() {
        let mut l = Listener::default();
        l.relay.require_auth = true;
        let p = Policy::from_listener(&l);
        assert_eq!(
            p.check_rcpt(ip("127.0.0.9"), false, &rcpt("<x@any.example>")),
            Err(Refusal::AuthRequired)
        );
        assert_eq!(
            p.check_rcpt(ip("127.0.0.9"), true, &rcpt("<x@any.example>")),
            Ok(Accept::Relay)
        );
        l.relay.allowed_sources = vec!["127.0.0.2/32".parse().unwrap()];
        let p = Policy::from_listener(&l);
        assert_eq!(
            p.check_rcpt(ip("127.0.0.9"), true, &rcpt("<x@any.example>")),
            Err(Refusal::RelaySourceDenied)
        );
    }
}
