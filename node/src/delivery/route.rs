//! Route resolution (pure): which route a recipient domain takes, the order of its next
//! hops (smarthost priority with rotation, MX preference with shuffling, null MX), and
//! "self" detection so the node never delivers to itself or a cluster peer.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::config::{Config, DeliveryConfig, DestinationLimits, OAuth2, OutboundTls, Smarthost};

/// How a route finds its next hops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteKind {
    /// Fixed smarthosts by priority.
    Smarthosts(Vec<Smarthost>),
    /// MX lookup of the recipient domain.
    Mx,
}

/// The route of a recipient domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination key: pools, concurrency limits and metrics are per destination.
    /// `default`, `route:N` (smarthost routes) or `mx:DOMAIN`.
    pub destination: String,
    /// Smarthosts or MX.
    pub kind: RouteKind,
    /// STARTTLS policy.
    pub tls: OutboundTls,
    /// SMTP AUTH towards the route's smarthosts.
    pub auth: Option<RouteAuth>,
    /// Messages per connection and per minute.
    pub limits: DestinationLimits,
}

/// How a route authenticates to its smarthosts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RouteAuth {
    /// A password from a credentials file or directory (`authFile`).
    File(PathBuf),
    /// An OAuth2 access token (`oauth2`).
    OAuth2(OAuth2),
}

impl RouteAuth {
    /// The AUTH setting of a route, default route or sender route.
    fn of(file: Option<&PathBuf>, oauth2: Option<&OAuth2>) -> Option<Self> {
        match (file, oauth2) {
            (Some(f), _) => Some(Self::File(f.clone())),
            (None, Some(o)) => Some(Self::OAuth2(o.clone())),
            (None, None) => None,
        }
    }
}

/// Who sent a message, as far as routing is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Sender {
    /// The envelope sender's domain, lower case; empty for the null sender.
    pub domain: String,
    /// The SMTP AUTH user the message was submitted as.
    pub user: Option<String>,
}

impl Sender {
    /// The sender of a message with envelope sender `address` submitted as `user`.
    pub fn new(address: &str, user: Option<&str>) -> Self {
        Self {
            domain: domain_of(address),
            user: user.map(str::to_owned),
        }
    }
}

/// The route for a recipient in `domain` (lower case) of a message from `sender`. Precedence:
/// a domain route listing the recipient domain; then a sender route listing the sender's AUTH
/// user, then one listing the sender's domain (Postfix's `transport_maps` before
/// `sender_dependent_relayhost_maps`); then the default smarthosts, or MX.
pub fn route_for(cfg: &DeliveryConfig, sender: &Sender, domain: &str) -> Route {
    if let Some(route) = domain_route(cfg, domain) {
        return route;
    }
    let by_user = sender.user.as_deref().and_then(|u| {
        cfg.sender_routes
            .iter()
            .position(|r| r.users.iter().any(|x| x == u))
    });
    let by_domain = || {
        (!sender.domain.is_empty()).then(|| {
            cfg.sender_routes.iter().position(|r| {
                r.sender_domains
                    .iter()
                    .any(|d| d.eq_ignore_ascii_case(&sender.domain))
            })
        })?
    };
    if let Some(i) = by_user.or_else(by_domain) {
        let r = &cfg.sender_routes[i];
        return next_hops(
            format!("sender:{i}"),
            &r.smarthosts,
            domain,
            r.tls.as_ref().unwrap_or(&cfg.tls),
            RouteAuth::of(r.auth_file.as_ref(), r.oauth2.as_ref()),
            r.limits.unwrap_or(cfg.destination_limits),
        );
    }
    next_hops(
        "default".into(),
        &cfg.smarthosts,
        domain,
        &cfg.tls,
        RouteAuth::of(cfg.auth_file.as_ref(), cfg.oauth2.as_ref()),
        cfg.destination_limits,
    )
}

/// The domain route listing `domain`, if any.
fn domain_route(cfg: &DeliveryConfig, domain: &str) -> Option<Route> {
    let (i, r) = cfg
        .routes
        .iter()
        .enumerate()
        .find(|(_, r)| r.domains.iter().any(|d| d.eq_ignore_ascii_case(domain)))?;
    Some(next_hops(
        format!("route:{i}"),
        &r.smarthosts,
        domain,
        r.tls.as_ref().unwrap_or(&cfg.tls),
        RouteAuth::of(r.auth_file.as_ref(), r.oauth2.as_ref()),
        r.limits.unwrap_or(cfg.destination_limits),
    ))
}

/// A route through `smarthosts`, named `name`; without smarthosts, by MX to `domain` (named
/// `mx:DOMAIN`, without credentials: AUTH is for smarthosts).
fn next_hops(
    name: String,
    smarthosts: &[Smarthost],
    domain: &str,
    tls: &OutboundTls,
    auth: Option<RouteAuth>,
    limits: DestinationLimits,
) -> Route {
    if smarthosts.is_empty() {
        Route {
            destination: format!("mx:{domain}"),
            kind: RouteKind::Mx,
            tls: tls.clone(),
            auth: None,
            limits,
        }
    } else {
        Route {
            destination: name,
            kind: RouteKind::Smarthosts(smarthosts.to_vec()),
            tls: tls.clone(),
            auth,
            limits,
        }
    }
}

/// The domain of an address (lower case); empty for none.
pub fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
        .unwrap_or_default()
}

/// A next hop to try: a host name (or address literal) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// Host name or address.
    pub host: String,
    pub port: u16,
}

/// Smarthosts in the order to try: ascending priority; within one priority rotated by
/// `turn` so equal hosts share the load; a higher priority is the fallback.
pub fn order_smarthosts(hosts: &[Smarthost], turn: usize) -> Vec<Hop> {
    let mut prios: Vec<u32> = hosts.iter().map(|h| h.priority).collect();
    prios.sort_unstable();
    prios.dedup();
    let mut out = Vec::with_capacity(hosts.len());
    for p in prios {
        let group: Vec<&Smarthost> = hosts.iter().filter(|h| h.priority == p).collect();
        let n = group.len();
        for k in 0..n {
            let h = group[(turn + k) % n];
            out.push(Hop {
                host: h.host.clone(),
                port: h.port,
            });
        }
    }
    out
}

/// What an MX lookup says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxPlan {
    /// Hosts to try, in order.
    Hosts(Vec<Hop>),
    /// RFC 7505 null MX: the domain accepts no mail.
    NullMx,
}

/// Order MX records `(preference, exchange)`: ascending preference, equal ones shuffled
/// with `seed`. A single `.` exchange is a null MX. No records: the domain itself (A/AAAA).
pub fn order_mx(domain: &str, records: &[(u16, String)], port: u16, seed: u64) -> MxPlan {
    let is_null = |x: &str| x.is_empty() || x == ".";
    if records.iter().any(|(_, x)| is_null(x)) {
        return MxPlan::NullMx;
    }
    if records.is_empty() {
        return MxPlan::Hosts(vec![Hop {
            host: domain.to_owned(),
            port,
        }]);
    }
    let mut recs: Vec<(u16, u64, String)> = records
        .iter()
        .enumerate()
        .map(|(i, (p, x))| {
            (
                *p,
                mix(seed ^ (i as u64)),
                x.trim_end_matches('.').to_owned(),
            )
        })
        .collect();
    recs.sort();
    MxPlan::Hosts(
        recs.into_iter()
            .map(|(_, _, host)| Hop { host, port })
            .collect(),
    )
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// What is "self": never a next hop (as Postfix's `proxy_interfaces`, ZMailer's
/// SELFADDRESSES).
#[derive(Debug, Clone, Default)]
pub struct SelfSet {
    /// Cluster addresses (load balancers, peers): self on any port.
    pub addresses: HashSet<IpAddr>,
    /// Exact listener sockets of this node.
    pub sockets: HashSet<SocketAddr>,
    /// Ports of listeners bound to a wildcard address: self on loopback and `local_ips`.
    pub wildcard_ports: HashSet<u16>,
    /// This machine's own addresses (from its host name).
    pub local_ips: HashSet<IpAddr>,
    /// Host names (lower case, no trailing dot).
    pub names: HashSet<String>,
}

impl SelfSet {
    /// From the config and the machine's host name.
    pub fn from_config(cfg: &Config, machine_hostname: Option<&str>) -> Self {
        let mut s = SelfSet::default();
        s.addresses.extend(cfg.peers.self_addresses.iter().copied());
        for l in &cfg.listeners {
            if l.address.ip().is_unspecified() {
                s.wildcard_ports.insert(l.address.port());
            } else {
                s.sockets.insert(l.address);
            }
        }
        let mut names = vec![cfg.hostname.as_str()];
        names.extend(cfg.delivery.self_hostnames.iter().map(String::as_str));
        names.extend(cfg.delivery.helo_name.as_deref());
        names.extend(machine_hostname);
        for n in names {
            let n = n.trim_end_matches('.').to_ascii_lowercase();
            if !n.is_empty() && n != "localhost" {
                s.names.insert(n);
            }
        }
        s
    }

    /// Whether a next hop host name is self.
    pub fn is_self_name(&self, host: &str) -> bool {
        self.names
            .contains(&host.trim_end_matches('.').to_ascii_lowercase())
    }

    /// Whether a resolved next hop address is self.
    pub fn is_self_addr(&self, addr: SocketAddr) -> bool {
        let ip = crate::smtp::policy::canonical_ip(addr.ip());
        let addr = SocketAddr::new(ip, addr.port());
        self.addresses.contains(&ip)
            || self.sockets.contains(&addr)
            || (self.wildcard_ports.contains(&addr.port())
                && (ip.is_loopback() || self.local_ips.contains(&ip)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DomainRoute, Listener};

    fn sh(host: &str, prio: u32) -> Smarthost {
        Smarthost {
            host: host.into(),
            port: 25,
            priority: prio,
        }
    }

    #[test]
    fn smarthosts_by_priority_rotated_within_priority() {
        let hosts = [sh("b1", 20), sh("a1", 10), sh("a2", 10), sh("c", 30)];
        let names = |t| -> Vec<String> {
            order_smarthosts(&hosts, t)
                .into_iter()
                .map(|h| h.host)
                .collect()
        };
        assert_eq!(names(0), ["a1", "a2", "b1", "c"]);
        assert_eq!(names(1), ["a2", "a1", "b1", "c"]);
        assert_eq!(names(2), ["a1", "a2", "b1", "c"]);
    }

    #[test]
    fn mx_order_null_mx_and_implicit_mx() {
        let recs = vec![
            (20, "b.example.".to_owned()),
            (10, "a.example.".into()),
            (10, "a2.example".into()),
        ];
        let mut firsts = HashSet::new();
        for seed in 0..32 {
            let MxPlan::Hosts(h) = order_mx("d.example", &recs, 25, seed) else {
                panic!("not hosts")
            };
            assert_eq!(h[2].host, "b.example");
            firsts.insert(h[0].host.clone());
        }
        assert_eq!(firsts.len(), 2, "equal preferences are shuffled");
        assert_eq!(
            order_mx("d.example", &[(0, ".".into())], 25, 1),
            MxPlan::NullMx
        );
        assert_eq!(
            order_mx("d.example", &[], 2525, 1),
            MxPlan::Hosts(vec![Hop {
                host: "d.example".into(),
                port: 2525
            }])
        );
    }

    #[test]
    fn routes_by_domain_then_default() {
        let mut cfg = DeliveryConfig::default();
        let anyone = Sender::default();
        assert_eq!(route_for(&cfg, &anyone, "x.example").kind, RouteKind::Mx);
        assert_eq!(
            route_for(&cfg, &anyone, "x.example").destination,
            "mx:x.example"
        );
        cfg.smarthosts = vec![sh("relay", 10)];
        cfg.routes = vec![
            DomainRoute {
                domains: vec!["Example.com".into()],
                smarthosts: vec![sh("internal", 10)],
                ..Default::default()
            },
            DomainRoute {
                domains: vec!["mx.example".into()],
                ..Default::default()
            },
        ];
        assert_eq!(
            route_for(&cfg, &anyone, "example.com").destination,
            "route:0"
        );
        assert_eq!(route_for(&cfg, &anyone, "mx.example").kind, RouteKind::Mx);
        assert_eq!(
            route_for(&cfg, &anyone, "other.example").destination,
            "default"
        );
        assert_eq!(domain_of("a@B.Example."), "b.example");
    }

    #[test]
    fn sender_routes_come_after_domain_routes_and_a_user_before_a_sender_domain() {
        let cfg = DeliveryConfig {
            smarthosts: vec![sh("relay", 10)],
            routes: vec![DomainRoute {
                domains: vec!["internal.example".into()],
                smarthosts: vec![sh("exchange", 10)],
                ..Default::default()
            }],
            sender_routes: vec![
                crate::config::SenderRoute {
                    sender_domains: vec!["Brand-B.example".into()],
                    smarthosts: vec![sh("brand-b.mail.protection.outlook.com", 10)],
                    tls: Some(OutboundTls {
                        mode: crate::config::OutboundTlsMode::Required,
                        ca_file: None,
                    }),
                    auth_file: Some("/auth/brand-b".into()),
                    ..Default::default()
                },
                crate::config::SenderRoute {
                    users: vec!["billing-app".into()],
                    smarthosts: vec![sh("smtp.billing-provider.example", 10)],
                    ..Default::default()
                },
            ],
            ..DeliveryConfig::default()
        };
        let brand_b = Sender::new("news@brand-b.EXAMPLE", None);
        let r = route_for(&cfg, &brand_b, "customer.example");
        assert_eq!(r.destination, "sender:0");
        assert_eq!(r.tls.mode, crate::config::OutboundTlsMode::Required);
        assert_eq!(r.auth, Some(RouteAuth::File("/auth/brand-b".into())));
        // A domain route wins: internal mail stays internal whoever sends it.
        assert_eq!(
            route_for(&cfg, &brand_b, "internal.example").destination,
            "route:0"
        );
        // The user's route wins over the sender domain's.
        let billing = Sender::new("invoices@brand-b.example", Some("billing-app"));
        assert_eq!(
            route_for(&cfg, &billing, "customer.example").destination,
            "sender:1"
        );
        // Anyone else, and bounces (null sender), take the default.
        let other = Sender::new("a@brand-a.example", Some("someone"));
        assert_eq!(
            route_for(&cfg, &other, "customer.example").destination,
            "default"
        );
        assert_eq!(
            route_for(&cfg, &Sender::new("", None), "customer.example").destination,
            "default"
        );
    }

    #[test]
    fn self_detection() {
        let mut cfg = Config {
            hostname: "smtp.example.com".into(),
            ..Config::default()
        };
        cfg.listeners = vec![
            Listener::new("a", "127.0.0.1:2525".parse().unwrap()),
            Listener::new("b", "0.0.0.0:25".parse().unwrap()),
        ];
        cfg.peers.self_addresses = vec!["10.0.0.5".parse().unwrap()];
        let s = SelfSet::from_config(&cfg, Some("pod-0"));
        assert!(s.is_self_name("SMTP.example.com."));
        assert!(s.is_self_name("pod-0"));
        assert!(!s.is_self_name("other.example.com"));
        assert!(s.is_self_addr("10.0.0.5:587".parse().unwrap()));
        assert!(s.is_self_addr("127.0.0.1:2525".parse().unwrap()));
        assert!(!s.is_self_addr("127.0.0.1:2526".parse().unwrap()));
        assert!(s.is_self_addr("127.0.0.9:25".parse().unwrap()));
        assert!(s.is_self_addr("[::ffff:10.0.0.5]:25".parse().unwrap()));
        assert!(!s.is_self_addr("192.0.2.1:25".parse().unwrap()));
    }
}
