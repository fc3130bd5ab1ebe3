//! The ConfigMap with the node configuration (`mailnode_api::config::Config` rendered as YAML).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::ConfigMap;
use mailnode_api::config as node;
use sha2::{Digest, Sha256};

use super::{BuildError, Names, meta};
use crate::crd::{self, ADMIN_PORT, Cidr, MailCluster, PEER_PORT};

/// Key of the node configuration in the ConfigMap.
pub const CONFIG_KEY: &str = "mailnode.yaml";
/// Directory the ConfigMap is mounted at.
pub const CONFIG_DIR: &str = "/etc/mailnode/config";
/// Directory the cluster Secret is mounted at.
pub const CLUSTER_SECRET_DIR: &str = "/etc/mailnode/cluster";
/// Directory the TLS Secret is mounted at.
pub const TLS_DIR: &str = "/etc/mailnode/tls";
/// Directory the auth Secret is mounted at.
pub const AUTH_DIR: &str = "/etc/mailnode/auth";
/// Mount path of the smarthost credentials Secrets, one directory per Secret.
pub const SMARTHOST_AUTH_DIR: &str = "/etc/mailnode/smarthost-auth";
/// Where DKIM key Secrets are mounted, one directory per Secret.
pub const DKIM_DIR: &str = "/etc/mailnode/dkim";
/// Where OAuth2 client secret Secrets are mounted, one directory per Secret.
pub const OAUTH2_DIR: &str = "/etc/mailnode/oauth2";
/// Key of the users file in the auth Secret.
pub const AUTH_USERS_KEY: &str = "users";
/// Mount path of the queue volume.
pub const QUEUE_DIR: &str = "/var/spool/mailnode";
/// Seconds the node waits for sessions in DATA on shutdown.
pub const SHUTDOWN_GRACE_SECONDS: u64 = 30;
/// Seconds the node goes on accepting mail after SIGTERM before it drains, while kube-proxy
/// and load balancers stop sending new connections to the terminating pod.
pub const SHUTDOWN_DELAY_SECONDS: u64 = 5;

/// Path of the rendered configuration inside the pod.
pub fn config_path() -> String {
    format!("{CONFIG_DIR}/{CONFIG_KEY}")
}

fn port(field: String, p: i32) -> Result<u16, BuildError> {
    u16::try_from(p).map_err(|_| BuildError::Invalid {
        field,
        message: format!("port {p} is not in 1-65535"),
    })
}

fn nets(field: String, cidrs: &[Cidr]) -> Result<Vec<ipnet::IpNet>, BuildError> {
    cidrs
        .iter()
        .map(|c| {
            c.as_str().parse().map_err(|e| BuildError::Invalid {
                field: field.clone(),
                message: format!("{c} is not a CIDR: {e}"),
            })
        })
        .collect()
}

fn next_hops(field: &str, hosts: &[crd::Smarthost]) -> Result<Vec<node::Smarthost>, BuildError> {
    hosts
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Ok(node::Smarthost {
                host: s.host.0.clone(),
                port: port(format!("{field}[{i}].port"), s.port)?,
                priority: u32::try_from(s.priority).map_err(|_| BuildError::Invalid {
                    field: format!("{field}[{i}].priority"),
                    message: "must be 0 or more".into(),
                })?,
            })
        })
        .collect()
}

/// The node's limits: `spec.limits` over the node defaults (negative values cannot pass the
/// schema and fall back to the defaults).
fn limits(spec: Option<&crd::Limits>) -> node::Limits {
    let d = node::Limits::default();
    let spec = spec.cloned().unwrap_or_default();
    let size =
        |v: Option<i32>, default: usize| v.and_then(|n| usize::try_from(n).ok()).unwrap_or(default);
    node::Limits {
        shutdown_grace_seconds: SHUTDOWN_GRACE_SECONDS,
        shutdown_delay_seconds: SHUTDOWN_DELAY_SECONDS,
        max_sessions: size(spec.max_sessions, d.max_sessions),
        max_sessions_per_client: size(spec.max_sessions_per_client, d.max_sessions_per_client),
        max_in_flight_bytes: spec
            .max_in_flight_bytes
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(d.max_in_flight_bytes),
        ..d
    }
}

/// Source networks besides the members allowed on the peer channel: `spec.peers.allowedSources`,
/// or the private ranges when unset.
pub fn peer_sources(mc: &MailCluster) -> Result<Vec<ipnet::IpNet>, BuildError> {
    match mc
        .spec
        .peers
        .as_ref()
        .and_then(|p| p.allowed_sources.as_ref())
    {
        Some(cidrs) => nets("spec.peers.allowedSources".into(), cidrs),
        None => {
            let defaults: Vec<Cidr> = crd::DEFAULT_PEER_SOURCES
                .iter()
                .map(|s| Cidr::from(*s))
                .collect();
            nets("default peer sources".into(), &defaults)
        }
    }
}

/// The node configuration of a MailCluster. `self_addresses` are the load balancer addresses of
/// its listeners: a node never delivers to them.
pub fn node_config(
    mc: &MailCluster,
    self_addresses: &[IpAddr],
) -> Result<node::Config, BuildError> {
    let names = super::Names::of(mc)?;
    let spec = &mc.spec;
    let tls = spec.tls.as_ref().map(|_| node::TlsFiles {
        cert_file: PathBuf::from(format!("{TLS_DIR}/tls.crt")),
        key_file: PathBuf::from(format!("{TLS_DIR}/tls.key")),
        ..node::TlsFiles::default()
    });
    let auth = spec.auth.as_ref().map(|_| node::AuthConfig {
        users_file: PathBuf::from(format!("{AUTH_DIR}/{AUTH_USERS_KEY}")),
    });
    let mut listeners = Vec::with_capacity(spec.listeners.len());
    for (i, l) in spec.listeners.iter().enumerate() {
        let p = port(format!("spec.listeners[{i}].port"), l.port)?;
        let relay = match &l.relay {
            Some(r) => node::RelayPolicy {
                allowed_sources: nets(
                    format!("spec.listeners[{i}].relay.allowedSources"),
                    &r.allowed_sources,
                )?,
                require_auth: r.require_auth,
                recipient_domains: r.recipient_domains.iter().map(|d| d.0.clone()).collect(),
                open_relay: r.open_relay,
            },
            None => node::RelayPolicy::default(),
        };
        let ltls = match &l.tls {
            Some(t) => node::ListenerTls {
                mode: match t.mode {
                    crd::TlsMode::None => node::TlsMode::None,
                    crd::TlsMode::StartTLS => node::TlsMode::Starttls,
                },
                required: t.required,
            },
            // STARTTLS is offered whenever the cluster has a certificate.
            None if tls.is_some() => node::ListenerTls {
                mode: node::TlsMode::Starttls,
                required: false,
            },
            None => node::ListenerTls {
                mode: node::TlsMode::None,
                required: false,
            },
        };
        listeners.push(node::Listener {
            name: l.name.clone(),
            address: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), p),
            proxy_protocol: l.proxy_protocol,
            trusted_proxies: nets(
                format!("spec.listeners[{i}].trustedProxies"),
                &l.trusted_proxies,
            )?,
            tls: ltls,
            relay,
            accept_domains: l.accept_domains.iter().map(|d| d.0.clone()).collect(),
            max_message_size: l.max_message_size.and_then(|m| u64::try_from(m).ok()),
            forbid_unauth_pipelining: l.forbid_unauth_pipelining,
            rate_limits: l
                .rate_limits
                .iter()
                .enumerate()
                .map(|(j, r)| rate_limit(&format!("spec.listeners[{i}].rateLimits[{j}]"), r))
                .collect::<Result<_, _>>()?,
            sender_rewrites: l
                .sender_rewrites
                .iter()
                .map(|r| node::SenderRewrite {
                    from: r.from.0.clone(),
                    to: r.to.0.clone(),
                })
                .collect(),
            remove_received: l.remove_received,
        });
    }
    let smarthosts = next_hops("spec.delivery.smarthosts", &spec.delivery.smarthosts)?;
    let mut routes = Vec::with_capacity(spec.delivery.routes.len());
    for (i, r) in spec.delivery.routes.iter().enumerate() {
        routes.push(node::DomainRoute {
            domains: vec![r.domain.0.clone()],
            smarthosts: next_hops(
                &format!("spec.delivery.routes[{i}].smarthosts"),
                &r.smarthosts,
            )?,
            tls: r.tls.as_ref().map(outbound_tls),
            auth_file: r.auth_secret.as_ref().map(auth_path),
            oauth2: r.oauth2.as_ref().map(oauth2),
            limits: r.limits.as_ref().map(destination_limits),
        });
    }
    let mut sender_routes = Vec::with_capacity(spec.delivery.sender_routes.len());
    for (i, r) in spec.delivery.sender_routes.iter().enumerate() {
        sender_routes.push(node::SenderRoute {
            sender_domains: r.sender_domains.iter().map(|d| d.0.clone()).collect(),
            users: r.users.clone(),
            smarthosts: next_hops(
                &format!("spec.delivery.senderRoutes[{i}].smarthosts"),
                &r.smarthosts,
            )?,
            tls: r.tls.as_ref().map(outbound_tls),
            auth_file: r.auth_secret.as_ref().map(auth_path),
            oauth2: r.oauth2.as_ref().map(oauth2),
            limits: r.limits.as_ref().map(destination_limits),
        });
    }
    let mx_port = match spec.delivery.mx.as_ref().and_then(|m| m.port) {
        Some(p) => port("spec.delivery.mx.port".into(), p)?,
        None => node::DeliveryConfig::default().mx_port,
    };
    let mut retry = node::RetryConfig::default();
    if let Some(r) = &spec.delivery.retry {
        let secs = |field: &str, d: &Option<crd::TimeSpan>, default: u64| match d {
            None => Ok(default),
            Some(d) => d.seconds().ok_or_else(|| BuildError::Invalid {
                field: format!("spec.delivery.retry.{field}"),
                message: format!("{d} is not a duration like 1m, 1h or 5d"),
            }),
        };
        retry.first_seconds = secs("first", &r.first, retry.first_seconds)?;
        retry.max_seconds = secs("max", &r.max, retry.max_seconds)?;
        retry.lifetime_seconds = secs("lifetime", &r.lifetime, retry.lifetime_seconds)?;
    }
    let mut self_addresses = self_addresses.to_vec();
    self_addresses.sort();
    self_addresses.dedup();
    let config = node::Config {
        hostname: spec.hostname.clone(),
        listeners,
        queue: node::QueueConfig {
            path: PathBuf::from(QUEUE_DIR),
            // The queue is each member's own PersistentVolumeClaim: one syncfs per batch
            // writes only the queue's data.
            sync_filesystem: true,
            ..node::QueueConfig::default()
        },
        limits: limits(spec.limits.as_ref()),
        tls,
        auth,
        admin: node::AdminConfig {
            address: SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                port("admin port".into(), ADMIN_PORT)?,
            ),
        },
        peers: node::PeersConfig {
            address: Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                port("peer port".into(), PEER_PORT)?,
            )),
            // One name that resolves to every member: scaling does not change the config.
            members: vec![format!("{}:{PEER_PORT}", names.peer_dns())],
            secret_file: Some(PathBuf::from(format!(
                "{CLUSTER_SECRET_DIR}/{}",
                super::secret::KEY
            ))),
            self_addresses,
            allowed_sources: peer_sources(mc)?,
        },
        delivery: node::DeliveryConfig {
            // Empty smarthosts: the node delivers by MX.
            smarthosts,
            routes,
            sender_routes,
            tls: spec
                .delivery
                .tls
                .as_ref()
                .map(outbound_tls)
                .unwrap_or_default(),
            auth_file: spec.delivery.auth_secret.as_ref().map(auth_path),
            oauth2: spec.delivery.oauth2.as_ref().map(oauth2),
            destination_limits: spec
                .delivery
                .limits
                .as_ref()
                .map(destination_limits)
                .unwrap_or_default(),
            retry,
            mx_port,
            dkim: dkim(spec)?,
            tls_reports: spec
                .delivery
                .tls_reports
                .as_ref()
                .map(|r| node::TlsReports {
                    organization_name: r.organization_name.clone(),
                    from: r.from.to_string(),
                    contact: r.contact.as_ref().map(ToString::to_string),
                    interval_seconds: 86_400,
                }),
            // Peer names are "self" too: a member never relays to a peer as a next hop.
            self_hostnames: vec![
                names.peer_dns(),
                format!("{}.cluster.local", names.peer_dns()),
            ],
            ..node::DeliveryConfig::default()
        },
        // Members apply a changed ConfigMap themselves; the pod template only carries the
        // hash of what they cannot reload (`RenderedConfig::restart_hash`).
        reload_interval_seconds: node::Config::default().reload_interval_seconds,
    };
    config.validate()?;
    Ok(config)
}

/// The node configuration rendered as YAML, and its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedConfig {
    /// The YAML the members read.
    pub yaml: String,
    /// Hex SHA-256 prefix of `yaml`: what the members report once they run it.
    pub hash: String,
    /// Hex SHA-256 prefix of the config's restart view (`Config::restart_view`): on the pod
    /// template, so that only changes a member cannot reload roll the members.
    pub restart_hash: String,
}

/// STARTTLS towards next hops as the node reads it.
fn outbound_tls(t: &crd::OutboundTls) -> node::OutboundTls {
    node::OutboundTls {
        mode: match t.mode {
            crd::OutboundTlsMode::Opportunistic => node::OutboundTlsMode::Opportunistic,
            crd::OutboundTlsMode::Required => node::OutboundTlsMode::Required,
            crd::OutboundTlsMode::None => node::OutboundTlsMode::None,
            crd::OutboundTlsMode::MtaSts => node::OutboundTlsMode::MtaSts,
            crd::OutboundTlsMode::Dane => node::OutboundTlsMode::Dane,
        },
        ca_file: None,
    }
}

/// A destination's limits as the node reads them (the CRD's ranges keep them positive).
fn destination_limits(l: &crd::DestinationLimits) -> node::DestinationLimits {
    let n = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    node::DestinationLimits {
        connections: n(l.connections),
        messages_per_connection: n(l.messages_per_connection),
        messages_per_minute: n(l.messages_per_minute),
    }
}

/// `spec.delivery.dkim` as the node reads it: each key's file in its mounted Secret.
fn dkim(spec: &crd::MailClusterSpec) -> Result<Vec<node::DkimDomain>, BuildError> {
    let mut out = Vec::with_capacity(spec.delivery.dkim.len());
    for (i, d) in spec.delivery.dkim.iter().enumerate() {
        for (j, l) in d.listeners.iter().enumerate() {
            if !spec.listeners.iter().any(|x| &x.name == l) {
                return Err(BuildError::Invalid {
                    field: format!("spec.delivery.dkim[{i}].listeners[{j}]"),
                    message: format!("{l} is not the name of a listener in spec.listeners"),
                });
            }
        }
        out.push(node::DkimDomain {
            domain: d.domain.0.clone(),
            keys: d
                .keys
                .iter()
                .map(|k| node::DkimKeyFile {
                    selector: k.selector.clone(),
                    key_file: dkim_path(k),
                })
                .collect(),
            listeners: d.listeners.clone(),
            headers: d.headers.iter().map(|h| h.0.clone()).collect(),
        });
    }
    Ok(out)
}

/// Where a DKIM key is in a member.
pub fn dkim_path(k: &crd::DkimKeyRef) -> PathBuf {
    Path::new(DKIM_DIR)
        .join(&k.secret_name.0)
        .join(k.key.as_deref().unwrap_or(crd::DKIM_SECRET_KEY))
}

/// The DKIM key Secrets the spec names, sorted, each once, with the keys each must hold.
pub fn dkim_secrets(spec: &crd::MailClusterSpec) -> Vec<(String, Vec<String>)> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for k in spec.delivery.dkim.iter().flat_map(|d| &d.keys) {
        let keys = out.entry(k.secret_name.0.clone()).or_default();
        let key = k
            .key
            .clone()
            .unwrap_or_else(|| crd::DKIM_SECRET_KEY.to_owned());
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    out.into_iter().collect()
}

/// An `oauth2` setting as the node reads it, its client secret in the mounted Secret.
fn oauth2(o: &crd::OAuth2Auth) -> node::OAuth2 {
    node::OAuth2 {
        token_url: o.token_url.clone(),
        client_id: o.client_id.clone(),
        client_secret_file: Path::new(OAUTH2_DIR)
            .join(&o.secret_name.0)
            .join(crd::OAUTH2_SECRET_KEY),
        scope: o.scope.clone().unwrap_or_default(),
        user: o.user.clone(),
        ca_file: None,
    }
}

/// The OAuth2 client secret Secrets the spec names, sorted, each once.
pub fn oauth2_secrets(spec: &crd::MailClusterSpec) -> Vec<String> {
    let d = &spec.delivery;
    let mut names: Vec<String> = d
        .oauth2
        .iter()
        .chain(d.routes.iter().filter_map(|r| r.oauth2.as_ref()))
        .chain(d.sender_routes.iter().filter_map(|r| r.oauth2.as_ref()))
        .map(|o| o.secret_name.0.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Where a smarthost credentials Secret is mounted in a member.
pub fn auth_path(secret: &crd::SecretName) -> PathBuf {
    Path::new(SMARTHOST_AUTH_DIR).join(&secret.0)
}

/// The smarthost credentials Secrets the spec names, sorted, each once: the StatefulSet
/// mounts them at [`auth_path`].
pub fn smarthost_auth_secrets(spec: &crd::MailClusterSpec) -> Vec<String> {
    let d = &spec.delivery;
    let mut names: Vec<String> = d
        .auth_secret
        .iter()
        .chain(d.routes.iter().filter_map(|r| r.auth_secret.as_ref()))
        .chain(
            d.sender_routes
                .iter()
                .filter_map(|r| r.auth_secret.as_ref()),
        )
        .map(|s| s.0.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A listener's rate limit as the node reads it.
fn rate_limit(field: &str, r: &crd::RateLimit) -> Result<node::RateLimit, BuildError> {
    let invalid = |name: &str, message: &str| BuildError::Invalid {
        field: format!("{field}.{name}"),
        message: message.to_string(),
    };
    let count = |name: &str, v: Option<i32>| {
        v.map(|n| u32::try_from(n).map_err(|_| invalid(name, "must be positive")))
            .transpose()
    };
    let window_seconds = match &r.window {
        None => 60,
        Some(w) => w
            .seconds()
            .filter(|s| (1..=86_400).contains(s))
            .ok_or_else(|| invalid("window", "must be from 1s to 1d"))?,
    };
    Ok(node::RateLimit {
        by: match r.by {
            crd::RateKey::ClientAddress => node::RateKey::ClientAddress,
            crd::RateKey::User => node::RateKey::User,
            crd::RateKey::SenderDomain => node::RateKey::SenderDomain,
        },
        messages: count("messages", r.messages)?,
        recipients: count("recipients", r.recipients)?,
        window_seconds,
        ipv6_prefix: match r.ipv6_prefix {
            None => 64,
            Some(p) => u8::try_from(p)
                .ok()
                .filter(|p| (1..=128).contains(p))
                .ok_or_else(|| invalid("ipv6Prefix", "must be 1 to 128"))?,
        },
    })
}

/// Render a node configuration.
pub fn render(config: &node::Config) -> Result<RenderedConfig, BuildError> {
    let short = |text: &str| -> String {
        let digest = Sha256::digest(text.as_bytes());
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    };
    let yaml = config.to_yaml()?;
    let hash = short(&yaml);
    let restart_hash = short(&config.restart_view().to_yaml()?);
    Ok(RenderedConfig {
        yaml,
        hash,
        restart_hash,
    })
}

/// The ConfigMap holding the rendered node configuration.
pub fn config_map(mc: &MailCluster, rendered: &RenderedConfig) -> Result<ConfigMap, BuildError> {
    let names = Names::of(mc)?;
    Ok(ConfigMap {
        metadata: meta(mc, &names, names.config_map(), "config"),
        data: Some(BTreeMap::from([(
            CONFIG_KEY.to_string(),
            rendered.yaml.clone(),
        )])),
        ..ConfigMap::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;

    #[test]
    fn renders_listeners_policy_and_delivery() {
        let mc = sample();
        let c = node_config(&mc, &[]).unwrap();
        assert_eq!(c.hostname, "smtp.example.com");
        assert_eq!(c.listeners.len(), 3);
        assert_eq!(c.listeners[0].address.port(), 25);
        assert_eq!(
            c.listeners[0].relay.allowed_sources[0].to_string(),
            "10.20.0.0/16"
        );
        assert_eq!(c.listeners[0].relay.recipient_domains, ["example.com"]);
        assert!(c.listeners[1].relay.require_auth);
        assert!(c.listeners[1].tls.required);
        assert_eq!(c.listeners[2].accept_domains, ["example.com"]);
        assert_eq!(c.delivery.smarthosts.len(), 2);
        assert_eq!(c.delivery.smarthosts[1].priority, 20);
        assert_eq!(c.delivery.retry.lifetime_seconds, 5 * 86400);
        assert_eq!(c.admin.address.port() as i32, ADMIN_PORT);
        assert_eq!(c.peers.members, ["relay-peers.mail.svc:7025"]);
        assert!(c.tls.is_some() && c.auth.is_some());
        assert_eq!(c.queue.path, PathBuf::from(QUEUE_DIR));
        assert!(
            c.queue.sync_filesystem,
            "each member's queue has a volume of its own"
        );
    }

    #[test]
    fn limits_default_to_the_node_defaults_and_follow_the_spec() {
        let d = node::Limits::default();
        let c = node_config(&sample(), &[]).unwrap();
        assert_eq!(c.limits.max_sessions_per_client, d.max_sessions_per_client);
        assert_eq!(c.limits.max_in_flight_bytes, d.max_in_flight_bytes);
        assert_eq!(c.limits.shutdown_grace_seconds, SHUTDOWN_GRACE_SECONDS);
        assert_eq!(c.limits.shutdown_delay_seconds, SHUTDOWN_DELAY_SECONDS);
        let mut mc = sample();
        mc.spec.limits = Some(crd::Limits {
            max_sessions: Some(200),
            max_sessions_per_client: Some(0),
            max_in_flight_bytes: Some(64 << 20),
        });
        let c = node_config(&mc, &[]).unwrap();
        assert_eq!(c.limits.max_sessions, 200);
        assert_eq!(c.limits.max_sessions_per_client, 0);
        assert_eq!(c.limits.max_in_flight_bytes, 64 << 20);
        assert_eq!(c.limits.max_recipients, d.max_recipients);
    }

    #[test]
    fn rendered_yaml_round_trips_through_the_node_parser() {
        let c = node_config(&sample(), &["192.0.2.10".parse().unwrap()]).unwrap();
        let r = render(&c).unwrap();
        let back = node::Config::from_yaml(&r.yaml).unwrap();
        assert_eq!(back, c);
        assert_eq!(r.hash.len(), 16);
    }

    #[test]
    fn hash_follows_the_config() {
        let mc = sample();
        let a = render(&node_config(&mc, &[]).unwrap()).unwrap();
        let b = render(&node_config(&mc, &[]).unwrap()).unwrap();
        assert_eq!(a.hash, b.hash, "same spec, same hash");
        let mut changed = sample();
        changed.spec.listeners[0].port = 26;
        let c = render(&node_config(&changed, &[]).unwrap()).unwrap();
        assert_ne!(a.hash, c.hash, "a listener change changes the hash");
        let mut scaled = sample();
        scaled.spec.replicas = 5;
        let d = render(&node_config(&scaled, &[]).unwrap()).unwrap();
        assert_eq!(a.hash, d.hash, "scaling does not roll the members");
        assert_ne!(
            a.restart_hash, c.restart_hash,
            "a port change needs a restart"
        );
        // A relay policy or delivery change is reloaded: a new config, the same restart view.
        let mut policy = sample();
        policy.spec.listeners[0]
            .relay
            .as_mut()
            .unwrap()
            .allowed_sources
            .push("10.99.0.0/16".into());
        policy.spec.delivery.smarthosts[0].priority = 99;
        let e = render(&node_config(&policy, &[]).unwrap()).unwrap();
        assert_ne!(a.hash, e.hash);
        assert_eq!(a.restart_hash, e.restart_hash, "members reload it");
    }

    #[test]
    fn self_addresses_are_sorted_and_unique() {
        let ips: Vec<IpAddr> = ["192.0.2.2", "192.0.2.1", "192.0.2.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let c = node_config(&sample(), &ips).unwrap();
        assert_eq!(c.peers.self_addresses, [ips[1], ips[0]]);
    }

    #[test]
    fn routes_and_mx_delivery() {
        let mut mc = sample();
        mc.spec.delivery.routes.push(crd::Route {
            domain: "partner.example".into(),
            smarthosts: vec![crd::Smarthost {
                host: "mx.partner.example".into(),
                port: 2525,
                priority: 5,
            }],
            tls: None,
            auth_secret: None,
            oauth2: None,
            limits: None,
        });
        let c = node_config(&mc, &[]).unwrap();
        assert_eq!(c.delivery.routes.len(), 1);
        assert_eq!(c.delivery.routes[0].domains, ["partner.example"]);
        assert_eq!(c.delivery.routes[0].smarthosts[0].port, 2525);
        assert!(
            c.delivery
                .self_hostnames
                .contains(&"relay-peers.mail.svc".to_string())
        );

        mc.spec.delivery.smarthosts.clear();
        mc.spec.delivery.mx = Some(crd::MxDelivery { port: Some(2526) });
        let c = node_config(&mc, &[]).unwrap();
        assert!(
            c.delivery.smarthosts.is_empty(),
            "no smarthosts: delivery by MX"
        );
        assert_eq!(c.delivery.mx_port, 2526);
        node::Config::from_yaml(&render(&c).unwrap().yaml).unwrap();
    }

    #[test]
    fn rate_limits_are_rendered_with_their_defaults_and_a_long_window_names_its_field() {
        let mut mc = sample();
        mc.spec.listeners[0].rate_limits = vec![
            crd::RateLimit {
                by: crd::RateKey::ClientAddress,
                messages: Some(100),
                recipients: None,
                window: None,
                ipv6_prefix: Some(48),
            },
            crd::RateLimit {
                by: crd::RateKey::SenderDomain,
                messages: None,
                recipients: Some(1000),
                window: Some("1h".into()),
                ipv6_prefix: None,
            },
        ];
        let c = node_config(&mc, &[]).unwrap();
        let r = &c.listeners[0].rate_limits;
        assert_eq!(
            (
                r[0].by,
                r[0].messages,
                r[0].window_seconds,
                r[0].ipv6_prefix
            ),
            (node::RateKey::ClientAddress, Some(100), 60, 48)
        );
        assert_eq!(
            (
                r[1].by,
                r[1].recipients,
                r[1].window_seconds,
                r[1].ipv6_prefix
            ),
            (node::RateKey::SenderDomain, Some(1000), 3600, 64)
        );
        assert!(c.listeners[1].rate_limits.is_empty());
        node::Config::from_yaml(&render(&c).unwrap().yaml).unwrap();

        mc.spec.listeners[0].rate_limits[1].window = Some("2d".into());
        let e = node_config(&mc, &[]).unwrap_err().to_string();
        assert!(e.contains("spec.listeners[0].rateLimits[1].window"), "{e}");
    }

    #[test]
    fn sender_rewrites_and_received_removal_are_rendered_and_reloaded_not_restarted() {
        let mut mc = sample();
        mc.spec.listeners[0].sender_rewrites = vec![
            crd::SenderRewrite {
                from: "root@scanner01".into(),
                to: "scanner01@example.com".into(),
            },
            crd::SenderRewrite {
                from: "*".into(),
                to: "@example.com".into(),
            },
        ];
        mc.spec.listeners[0].remove_received = true;
        let c = node_config(&mc, &[]).unwrap();
        let l = &c.listeners[0];
        assert!(l.remove_received);
        assert_eq!(
            l.sender_rewrites,
            [
                node::SenderRewrite {
                    from: "root@scanner01".into(),
                    to: "scanner01@example.com".into()
                },
                node::SenderRewrite {
                    from: "*".into(),
                    to: "@example.com".into()
                }
            ]
        );
        assert!(c.listeners[1].sender_rewrites.is_empty() && !c.listeners[1].remove_received);
        let with = render(&c).unwrap();
        node::Config::from_yaml(&with.yaml).unwrap();
        let without = render(&node_config(&sample(), &[]).unwrap()).unwrap();
        assert_ne!(with.hash, without.hash);
        assert_eq!(with.restart_hash, without.restart_hash);
    }

    #[test]
    fn oauth2_is_rendered_with_its_mounted_secret_and_reloaded() {
        let mut mc = sample();
        mc.spec.delivery.oauth2 = Some(crd::OAuth2Auth {
            token_url: "https://login.microsoftonline.com/t/oauth2/v2.0/token".into(),
            client_id: "app-id".into(),
            secret_name: "m365-oauth".into(),
            scope: Some("https://outlook.office365.com/.default".into()),
            user: "relay@example.com".into(),
        });
        let with = render(&node_config(&mc, &[]).unwrap()).unwrap();
        let c = node::Config::from_yaml(&with.yaml).unwrap();
        let o = c.delivery.oauth2.unwrap();
        assert_eq!(
            o.client_secret_file,
            PathBuf::from("/etc/mailnode/oauth2/m365-oauth/clientSecret")
        );
        assert_eq!(o.scope, "https://outlook.office365.com/.default");
        assert_eq!(oauth2_secrets(&mc.spec), ["m365-oauth"]);
        let without = render(&node_config(&sample(), &[]).unwrap()).unwrap();
        assert_eq!(
            with.restart_hash, without.restart_hash,
            "reloaded, not rolled"
        );
        let sts = super::super::statefulset::statefulset(&mc, "h", None, "img").unwrap();
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let mounts = pod.containers[0].volume_mounts.clone().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m.name == "oauth2-0" && m.mount_path == "/etc/mailnode/oauth2/m365-oauth")
        );
    }

    #[test]
    fn tls_policies_and_reports_are_rendered_and_reloaded() {
        let mut mc = sample();
        mc.spec.delivery.smarthosts.clear();
        mc.spec.delivery.tls = Some(crd::OutboundTls {
            mode: crd::OutboundTlsMode::Dane,
        });
        mc.spec.delivery.tls_reports = Some(crd::TlsReports {
            organization_name: "Example Inc.".into(),
            from: "tlsrpt-noreply@example.com".into(),
            contact: Some("postmaster@example.com".into()),
        });
        let with = render(&node_config(&mc, &[]).unwrap()).unwrap();
        let c = node::Config::from_yaml(&with.yaml).unwrap();
        assert_eq!(c.delivery.tls.mode, node::OutboundTlsMode::Dane);
        let r = c.delivery.tls_reports.unwrap();
        assert_eq!(
            (r.from.as_str(), r.contact.as_deref(), r.interval_seconds),
            (
                "tlsrpt-noreply@example.com",
                Some("postmaster@example.com"),
                86_400
            )
        );
        let mut plain = mc.clone();
        plain.spec.delivery.tls = None;
        plain.spec.delivery.tls_reports = None;
        let without = render(&node_config(&plain, &[]).unwrap()).unwrap();
        assert_eq!(
            with.restart_hash, without.restart_hash,
            "reloaded, not rolled"
        );
    }

    #[test]
    fn dkim_is_rendered_reloadable_and_an_unknown_listener_names_its_field() {
        let mut mc = sample();
        mc.spec.delivery.dkim.push(crd::DkimSigning {
            domain: "example.com".into(),
            keys: vec![crd::DkimKeyRef {
                selector: "mail2026".into(),
                secret_name: "dkim-example".into(),
                key: None,
            }],
            listeners: vec![mc.spec.listeners[0].name.clone()],
            headers: Vec::new(),
        });
        let with = render(&node_config(&mc, &[]).unwrap()).unwrap();
        let c = node::Config::from_yaml(&with.yaml).unwrap();
        assert_eq!(c.delivery.dkim[0].domain, "example.com");
        assert_eq!(c.delivery.dkim[0].keys[0].selector, "mail2026");
        let without = render(&node_config(&sample(), &[]).unwrap()).unwrap();
        assert_eq!(
            with.restart_hash, without.restart_hash,
            "a DKIM change is reloaded"
        );
        assert_eq!(
            dkim_secrets(&mc.spec),
            [("dkim-example".to_string(), vec!["private.key".to_string()])]
        );
        mc.spec.delivery.dkim[0].listeners = vec!["nosuch".into()];
        let e = node_config(&mc, &[]).unwrap_err().to_string();
        assert!(e.contains("spec.delivery.dkim[0].listeners[0]"), "{e}");
    }

    #[test]
    fn sender_routes_tls_and_credentials_are_rendered_and_each_secret_mounted_once() {
        let mut mc = sample();
        let d = &mut mc.spec.delivery;
        d.tls = Some(crd::OutboundTls {
            mode: crd::OutboundTlsMode::Required,
        });
        d.auth_secret = Some("m365-relay".into());
        d.limits = Some(crd::DestinationLimits {
            connections: Some(3),
            messages_per_connection: None,
            messages_per_minute: Some(30),
        });
        d.sender_routes.push(crd::SenderRoute {
            sender_domains: vec!["brand-b.example".into()],
            users: vec!["billing".into()],
            smarthosts: vec![crd::Smarthost {
                host: "smtp.office365.com".into(),
                port: 587,
                priority: 0,
            }],
            tls: None,
            auth_secret: Some("m365-brand-b".into()),
            oauth2: None,
            limits: None,
        });
        d.routes.push(crd::Route {
            domain: "partner.example".into(),
            smarthosts: vec![crd::Smarthost {
                host: "mx.partner.example".into(),
                port: 25,
                priority: 0,
            }],
            tls: Some(crd::OutboundTls {
                mode: crd::OutboundTlsMode::None,
            }),
            auth_secret: Some("m365-relay".into()),
            oauth2: None,
            limits: None,
        });
        let c = node_config(&mc, &[]).unwrap();
        assert_eq!(c.delivery.tls.mode, node::OutboundTlsMode::Required);
        assert_eq!(
            c.delivery.destination_limits,
            node::DestinationLimits {
                connections: 3,
                messages_per_connection: 0,
                messages_per_minute: 30
            }
        );
        assert_eq!(
            c.delivery.sender_routes[0].limits, None,
            "the default applies"
        );
        assert_eq!(
            c.delivery.auth_file,
            Some(PathBuf::from("/etc/mailnode/smarthost-auth/m365-relay"))
        );
        let s = &c.delivery.sender_routes[0];
        assert_eq!(
            (s.sender_domains.as_slice(), s.users.as_slice()),
            (
                &["brand-b.example".to_string()][..],
                &["billing".to_string()][..]
            )
        );
        assert_eq!(s.smarthosts[0].port, 587);
        assert_eq!(s.tls, None, "the route follows delivery.tls");
        assert_eq!(
            s.auth_file,
            Some(PathBuf::from("/etc/mailnode/smarthost-auth/m365-brand-b"))
        );
        let r = &c.delivery.routes[0];
        assert_eq!(r.tls.as_ref().unwrap().mode, node::OutboundTlsMode::None);
        node::Config::from_yaml(&render(&c).unwrap().yaml).unwrap();
        assert_eq!(
            smarthost_auth_secrets(&mc.spec),
            ["m365-brand-b", "m365-relay"]
        );
    }

    #[test]
    fn peer_channel_is_rendered() {
        let mut mc = sample();
        let c = node_config(&mc, &[]).unwrap();
        assert_eq!(c.peers.address.unwrap().port() as i32, PEER_PORT);
        assert!(c.peers.address.unwrap().ip().is_unspecified());
        assert_eq!(
            c.peers.secret_file.as_deref(),
            Some(std::path::Path::new("/etc/mailnode/cluster/cluster-key"))
        );
        let defaults: Vec<String> = c
            .peers
            .allowed_sources
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(defaults, crd::DEFAULT_PEER_SOURCES);
        mc.spec.peers = Some(crd::Peers {
            allowed_sources: Some(vec!["10.244.0.0/16".into()]),
        });
        let c = node_config(&mc, &[]).unwrap();
        assert_eq!(c.peers.allowed_sources[0].to_string(), "10.244.0.0/16");
        mc.spec.peers = Some(crd::Peers {
            allowed_sources: Some(vec![]),
        });
        assert!(
            node_config(&mc, &[])
                .unwrap()
                .peers
                .allowed_sources
                .is_empty()
        );
        mc.spec.peers = Some(crd::Peers {
            allowed_sources: Some(vec!["nonsense".into()]),
        });
        assert!(node_config(&mc, &[]).is_err());
    }

    #[test]
    fn config_map_carries_the_yaml() {
        let mc = sample();
        let r = render(&node_config(&mc, &[]).unwrap()).unwrap();
        let cm = config_map(&mc, &r).unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("relay-config"));
        assert_eq!(cm.data.unwrap()[CONFIG_KEY], r.yaml);
        assert_eq!(cm.metadata.owner_references.unwrap()[0].kind, "MailCluster");
    }
}
