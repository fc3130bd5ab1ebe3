//! Node configuration: one YAML file, rendered by the operator from a `MailCluster`.
//!
//! Every struct denies unknown keys, so a typo is an error that names the full key path
//! (for example `listeners[1].relay.allowedSourcs`). All types implement [`Default`] and
//! serialize back to YAML that [`Config::from_yaml`] accepts, so the operator can build a
//! config in Rust and render it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Errors while loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML does not match the schema; `path` is the key path, e.g. `listeners[1].relay.allowedSourcs`.
    #[error("invalid config at `{path}`: {message}")]
    Parse {
        /// Key path of the error.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The YAML is well-formed but a value breaks a rule.
    #[error("invalid config at `{path}`: {message}")]
    Invalid {
        /// Key path of the bad value.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole node configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Config {
    /// The cluster hostname: used in the banner, the EHLO reply and Received headers.
    /// Every member presents the same name.
    pub hostname: String,
    /// SMTP listeners; each has its own relay policy.
    pub listeners: Vec<Listener>,
    /// The durable queue on the pod's volume.
    pub queue: QueueConfig,
    /// Session and protocol limits shared by all listeners.
    pub limits: Limits,
    /// TLS certificate and key files (PEM) for STARTTLS. Reloaded when the files change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// Users for SMTP AUTH (PLAIN and LOGIN, only after STARTTLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    /// Health, readiness and metrics HTTP endpoint.
    pub admin: AdminConfig,
    /// Cluster peers: the authenticated peer channel (queue hand-off, cluster-wide ETRN).
    pub peers: PeersConfig,
    /// Outbound delivery: routes, retries, TLS, DNS, what is "self".
    pub delivery: DeliveryConfig,
    /// How often the node checks its config file for changes, in seconds (`0`: never). A
    /// changed file is read and validated; the parts [`Config::restart_view`] leaves out are
    /// applied without a restart, a file with errors is refused and the old config kept.
    pub reload_interval_seconds: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hostname: "localhost".to_owned(),
            listeners: Vec::new(),
            queue: QueueConfig::default(),
            limits: Limits::default(),
            tls: None,
            auth: None,
            admin: AdminConfig::default(),
            peers: PeersConfig::default(),
            delivery: DeliveryConfig::default(),
            reload_interval_seconds: 5,
        }
    }
}

impl Config {
    /// The configuration without the parts a running node applies when its file changes:
    /// listeners' relay policy, accepted domains, message size, pipelining rule, rate
    /// limits, sender rewrites and Received header removal; the per-message limits
    /// `maxRecipients` and `maxErrors`; and where and how mail is delivered (`delivery`'s
    /// smarthosts, routes, sender routes, TLS, credentials, retry schedule, connect timeout,
    /// HELO name, hop limit, MX port, delay warnings, destination limits, throttling, DKIM
    /// signing and TLS reports). Two
    /// configs with the same restart view differ only in what a reload applies; a different
    /// restart view needs a restart (listener addresses, TLS files, queue, peers, session
    /// limits, DNS, delivery concurrency, ...).
    pub fn restart_view(&self) -> Config {
        let mut c = self.clone();
        for l in &mut c.listeners {
            l.relay = RelayPolicy::default();
            l.accept_domains = Vec::new();
            l.max_message_size = None;
            l.forbid_unauth_pipelining = None;
            l.rate_limits = Vec::new();
            l.sender_rewrites = Vec::new();
            l.remove_received = false;
        }
        let limits = Limits::default();
        c.limits.max_recipients = limits.max_recipients;
        c.limits.max_errors = limits.max_errors;
        let d = DeliveryConfig::default();
        c.delivery = DeliveryConfig {
            smarthosts: d.smarthosts,
            retry: d.retry,
            max_hops: d.max_hops,
            routes: d.routes,
            sender_routes: d.sender_routes,
            tls: d.tls,
            auth_file: d.auth_file,
            oauth2: d.oauth2,
            mx_port: d.mx_port,
            connect_timeout_seconds: d.connect_timeout_seconds,
            delay_warning_seconds: d.delay_warning_seconds,
            helo_name: d.helo_name,
            destination_limits: d.destination_limits,
            throttle_seconds: d.throttle_seconds,
            dkim: d.dkim,
            tls_reports: d.tls_reports,
            ..c.delivery
        };
        c
    }
}

/// One SMTP listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Listener {
    /// Name, shown in logs, metrics and the Received header.
    pub name: String,
    /// Address and port to bind, e.g. `0.0.0.0:25` or `[::]:587`.
    pub address: SocketAddr,
    /// Expect a PROXY protocol (v1 or v2) header from connections whose address is in
    /// `trustedProxies`; the client address is then the one in the header.
    pub proxy_protocol: bool,
    /// Proxies whose PROXY header is believed (CIDRs). A header from any other address,
    /// or on a listener without `proxyProtocol`, is a protocol error.
    pub trusted_proxies: Vec<IpNet>,
    /// STARTTLS settings of this listener.
    pub tls: ListenerTls,
    /// Who may relay through this listener. Default: nobody.
    pub relay: RelayPolicy,
    /// Domains this listener accepts mail for from anyone (inbound, as an MX does).
    pub accept_domains: Vec<String>,
    /// Maximum message size in bytes on this listener; defaults to `limits.maxMessageSize`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_size: Option<u64>,
    /// Close a session whose client sent input after a DATA that was refused, before it could
    /// have read the refusal (content pipelined ahead of the 354, RFC 2920), as Postfix's
    /// `smtpd_forbid_unauth_pipelining` does, instead of reading that content as commands.
    /// Default: on, except on listeners that only relay for `relay.allowedSources` (internal
    /// devices with simple SMTP stacks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forbid_unauth_pipelining: Option<bool>,
    /// Rate limits: a message (counted at MAIL FROM) or a recipient (at RCPT TO) beyond any of
    /// them gets `451 4.7.1` until that limit's window is over. With peers, a limit holds for
    /// the cluster: members report their counts to each other over the peer channel.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimit>,
    /// Sender rewriting, as Postfix's `sender_canonical_maps`: the first rule whose `from`
    /// matches rewrites the envelope sender and the addresses of the `From`, `Sender`,
    /// `Resent-From` and `Resent-Sender` headers. Relay policy and rate limits see the
    /// sender the client sent; routes, delivery and bounces the rewritten one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sender_rewrites: Vec<SenderRewrite>,
    /// Remove the Received headers a message arrives with (internal host names and
    /// addresses), except those a mailnode wrote, and write this member's own without the
    /// client's address and HELO name.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub remove_received: bool,
}

/// One sender rewriting rule of a listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SenderRewrite {
    /// Which senders: `user@domain` (that address), `@domain` (any address at that domain,
    /// not its subdomains) or `*` (any sender but the null one). Case is ignored.
    pub from: String,
    /// The new address: `user@domain`, or `@domain` to keep the local part.
    pub to: String,
}

/// What one rate limit counts together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RateKey {
    /// The client's address (after PROXY protocol); an IPv6 client by its `ipv6Prefix`.
    ClientAddress,
    /// The SMTP AUTH user; sessions without AUTH are not counted.
    User,
    /// The domain of the envelope sender; the null sender (bounces) is not counted.
    SenderDomain,
}

/// A rate limit of a listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimit {
    /// What is counted together.
    pub by: RateKey,
    /// Messages per window (MAIL commands accepted); unset: not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<u32>,
    /// Recipients per window (RCPT commands accepted); unset: not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients: Option<u32>,
    /// Length of the window in seconds; a key's window starts with its first message.
    #[serde(default = "default_window_seconds")]
    pub window_seconds: u64,
    /// For `clientAddress`: the IPv6 prefix length counted as one client (a site usually has a
    /// /64, or a /48).
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
}

/// `local@domain` with a DNS name as domain and no spaces or angle brackets.
fn is_mailbox(s: &str) -> bool {
    s.rsplit_once('@').is_some_and(|(local, domain)| {
        !local.is_empty()
            && !local.contains(|c: char| c.is_whitespace() || c == '<' || c == '>')
            && is_dns_name(domain)
    })
}

/// Dot-separated labels of letters, digits and '-' (a DKIM domain or selector).
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// `user@domain` or `@domain`, without spaces, angle brackets or quotes.
fn is_rewrite_address(a: &str) -> bool {
    let Some((local, domain)) = a.split_once('@') else {
        return false;
    };
    let plain = |s: &str| {
        !s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || "<>\"()[],;:@\\".contains(c))
    };
    plain(local)
        && !domain.is_empty()
        && plain(domain)
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
}

fn default_window_seconds() -> u64 {
    60
}

fn default_ipv6_prefix() -> u8 {
    64
}

impl Default for Listener {
    fn default() -> Self {
        Self {
            name: "smtp".to_owned(),
            address: SocketAddr::from(([0, 0, 0, 0], 25)),
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
            tls: ListenerTls::default(),
            relay: RelayPolicy::default(),
            accept_domains: Vec::new(),
            max_message_size: None,
            forbid_unauth_pipelining: None,
            rate_limits: Vec::new(),
            sender_rewrites: Vec::new(),
            remove_received: false,
        }
    }
}

impl Listener {
    /// Whether pipelined input after a refused DATA closes the session: as set, or on unless
    /// the listener serves only clients it lets relay by source address.
    pub fn forbids_unauth_pipelining(&self) -> bool {
        self.forbid_unauth_pipelining.unwrap_or_else(|| {
            let open_to_anyone = self
                .relay
                .allowed_sources
                .iter()
                .any(|n| n.prefix_len() == 0);
            self.relay.allowed_sources.is_empty()
                || open_to_anyone
                || !self.accept_domains.is_empty()
        })
    }

    /// A listener with a name and bind address, nothing allowed.
    pub fn new(name: impl Into<String>, address: SocketAddr) -> Self {
        Self {
            name: name.into(),
            address,
            ..Self::default()
        }
    }

    /// Builder: set the relay policy.
    #[must_use]
    pub fn with_relay(mut self, relay: RelayPolicy) -> Self {
        self.relay = relay;
        self
    }

    /// Builder: set the inbound accepted domains.
    #[must_use]
    pub fn with_accept_domains<I, S>(mut self, domains: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.accept_domains = domains.into_iter().map(Into::into).collect();
        self
    }

    /// Builder: enable the PROXY protocol from these proxies.
    #[must_use]
    pub fn with_proxy_protocol(mut self, trusted: Vec<IpNet>) -> Self {
        self.proxy_protocol = true;
        self.trusted_proxies = trusted;
        self
    }

    /// Builder: set the TLS settings.
    #[must_use]
    pub fn with_tls(mut self, tls: ListenerTls) -> Self {
        self.tls = tls;
        self
    }
}

/// STARTTLS settings of a listener.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ListenerTls {
    /// `none` (no STARTTLS offered) or `starttls` (offered when the node has `tls` files).
    pub mode: TlsMode,
    /// Refuse MAIL until the client has used STARTTLS.
    pub required: bool,
}

/// TLS mode of a listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TlsMode {
    /// No TLS on this listener.
    None,
    /// STARTTLS is offered (the default when the node has TLS files).
    #[default]
    Starttls,
}

/// Relay permission of a listener. Relaying is allowed only when the client address is in
/// `allowedSources` (or, with `requireAuth` and an empty `allowedSources`, from any address),
/// the client authenticated if `requireAuth` is set, and the recipient domain is in
/// `recipientDomains` (when that list is not empty). The default allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RelayPolicy {
    /// Client networks (IPv4/IPv6 CIDRs) that may relay.
    pub allowed_sources: Vec<IpNet>,
    /// Relaying needs SMTP AUTH (which is only offered after STARTTLS).
    pub require_auth: bool,
    /// Relay only to these recipient domains (exact match, case-insensitive). Empty: any domain.
    pub recipient_domains: Vec<String>,
    /// Allow an open relay: a `/0` in `allowedSources` without `requireAuth` or
    /// `recipientDomains` is refused at start-up unless this is true.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub open_relay: bool,
}

impl RelayPolicy {
    /// Every address may relay, to any domain, without authenticating.
    pub fn is_open(&self) -> bool {
        self.allowed_sources.iter().any(|n| n.prefix_len() == 0)
            && !self.require_auth
            && self.recipient_domains.is_empty()
    }
}

impl RelayPolicy {
    /// A policy allowing relay from these sources to any domain.
    pub fn from_sources(sources: Vec<IpNet>) -> Self {
        Self {
            allowed_sources: sources,
            ..Self::default()
        }
    }
}

/// The durable queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct QueueConfig {
    /// Directory of the queue (the pod's volume).
    pub path: PathBuf,
    /// fsync message files and directories before answering 250. Turn off only for tests.
    pub fsync: bool,
    /// Share fsyncs among concurrent sessions: a syncer thread syncs a batch of messages
    /// together (parallel fdatasync, one directory fsync).
    pub group_commit: bool,
    /// With `groupCommit`: make each batch durable with one `syncfs(2)` of the queue's file
    /// system instead of syncing every file and the directory. Faster when the queue has a
    /// volume of its own (as each member's PersistentVolumeClaim, where the operator turns it
    /// on): the kernel writes the batch's inodes once and flushes the disk once. On a shared
    /// file system it also writes out everyone else's dirty data, so it is off by default.
    pub sync_filesystem: bool,
    /// Not ready, and new mail refused with 452, when less than this many bytes are free.
    pub min_free_bytes: u64,
    /// Not ready, and new mail refused with 452, when less than this percentage is free.
    pub min_free_percent: u8,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/spool/mailnode"),
            fsync: true,
            group_commit: true,
            sync_filesystem: false,
            min_free_bytes: 256 * 1024 * 1024,
            min_free_percent: 5,
        }
    }
}

/// Limits shared by all listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Limits {
    /// Maximum concurrent SMTP sessions; more get `421` and are closed.
    pub max_sessions: usize,
    /// Maximum concurrent sessions from one client address (after PROXY protocol); more get
    /// `421 4.7.0`. Clients a listener lets relay by source (`relay.allowedSources`) are
    /// exempt, as Postfix exempts `mynetworks`. `0`: no limit.
    pub max_sessions_per_client: usize,
    /// Bytes of message content all sessions together may hold in memory, counted from the
    /// first byte received (DATA or BDAT) until the message is queued. A session whose
    /// content does not fit writes it to its queue file at once instead.
    pub max_in_flight_bytes: u64,
    /// Bytes of content one session holds in memory before it writes them to the message's
    /// queue file, where the rest follows as it arrives; smaller messages are written in one
    /// go when they are complete. At least 4096.
    pub content_spill_bytes: u64,
    /// Maximum recipients per message.
    pub max_recipients: usize,
    /// Maximum message size in bytes (announced with SIZE).
    pub max_message_size: u64,
    /// Maximum command line length in bytes, including CRLF (RFC 5321 minimum: 512).
    pub max_command_line: usize,
    /// Bad commands tolerated before the session is closed with `421`.
    pub max_errors: u32,
    /// Idle time waiting for a command or data, in seconds.
    pub command_timeout_seconds: u64,
    /// Total session time, in seconds.
    pub session_timeout_seconds: u64,
    /// Grace period on shutdown for sessions in DATA, in seconds.
    pub shutdown_grace_seconds: u64,
    /// After SIGTERM, how long the node goes on accepting mail as usual before it drains (new
    /// connections then get `421`), in seconds. A terminating pod's endpoint is no longer
    /// ready, so this gives load balancers and kube-proxy time to stop sending it new
    /// connections; those still on their way are served, and none reaches a pod that is gone.
    /// Not for drains by request (`POST /drain`). At most 60.
    pub shutdown_delay_seconds: u64,
    /// Password checks (SMTP AUTH) running at once; each holds its hash's memory while it runs
    /// (19 MiB for argon2id with `mailnode hash-password`'s defaults). More checks wait their
    /// turn. `0`: one per CPU core.
    pub auth_check_slots: usize,
    /// Password checks one client (an IPv4 address, or an IPv6 /64) may have waiting or
    /// running at once, so that one client's sessions cannot take every slot.
    pub auth_checks_per_client: usize,
    /// Failed AUTH attempts a client may make (within ten minutes) before its next attempts
    /// are delayed.
    pub auth_failures_before_delay: u32,
    /// Delay of the first attempt past `authFailuresBeforeDelay`, in milliseconds; it doubles
    /// with each further failure, up to 16 times this. A success clears the client's record.
    pub auth_failure_delay_ms: u64,
    /// TLS handshakes running at once (each costs a key exchange and a signature); more wait
    /// their turn. At least 1.
    pub max_tls_handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 1000,
            max_sessions_per_client: 50,
            max_in_flight_bytes: 256 * 1024 * 1024,
            content_spill_bytes: 256 * 1024,
            max_recipients: 100,
            max_message_size: 25 * 1024 * 1024,
            max_command_line: 2048,
            max_errors: 10,
            command_timeout_seconds: 300,
            session_timeout_seconds: 1800,
            shutdown_grace_seconds: 30,
            shutdown_delay_seconds: 0,
            auth_check_slots: 0,
            auth_checks_per_client: 1,
            auth_failures_before_delay: 3,
            auth_failure_delay_ms: 1000,
            max_tls_handshakes: 64,
        }
    }
}

/// TLS files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TlsFiles {
    /// PEM certificate chain for the cluster hostname.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// How often to check the files for changes, in seconds.
    pub reload_interval_seconds: u64,
}

/// SMTP AUTH users.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuthConfig {
    /// File of `user:hash` lines; hashes are argon2 (`$argon2id$...`) or bcrypt (`$2b$...`).
    /// Reloaded when it changes.
    pub users_file: PathBuf,
}

/// Admin HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AdminConfig {
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    pub address: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([0, 0, 0, 0], 8080)),
        }
    }
}

/// Cluster peers. The peer listener runs when `address` and `secretFile` are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PeersConfig {
    /// Address of the peer channel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
    /// Peer names or addresses (`host:port`).
    pub members: Vec<String>,
    /// File holding the cluster key(s) that authenticate peers: one key per line (the current
    /// and, during a rotation, the previous one). Re-read for every peer connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Addresses that are "self" (this cluster); never a next hop. They may also use the
    /// peer channel.
    pub self_addresses: Vec<IpAddr>,
    /// Further source networks allowed on the peer channel besides the members' resolved
    /// addresses and `selfAddresses` (e.g. the pod network, for the drain-from-volume Job).
    /// The cluster key is required regardless.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_sources: Vec<IpNet>,
}

/// Outbound delivery: where mail goes next, how often it is retried, and what is "self".
///
/// The default route is `smarthosts` when that list is not empty, otherwise MX lookup.
/// `routes` override it for listed recipient domains (e.g. a fallback MX delivering
/// `example.com` to the internal servers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DeliveryConfig {
    /// Deliver queued mail (default). `false`: accept and queue only; the queue is kept and
    /// delivered once this is `true` again (maintenance, accept benchmarks).
    pub enabled: bool,
    /// Smarthosts, tried by ascending priority; hosts of equal priority are rotated, a
    /// higher priority is the fallback. Empty: deliver by MX.
    pub smarthosts: Vec<Smarthost>,
    /// Retry schedule.
    pub retry: RetryConfig,
    /// Maximum Received headers before a message is treated as looping and bounced
    /// (default 50).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_hops: Option<u32>,
    /// Per-domain routes; the first route listing the recipient domain wins.
    pub routes: Vec<DomainRoute>,
    /// Routes chosen by who sent the message, for recipients no domain route matches: the
    /// first route listing the message's SMTP AUTH user, else the first listing the envelope
    /// sender's domain; otherwise the default `smarthosts` (or MX).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sender_routes: Vec<SenderRoute>,
    /// STARTTLS towards the default route.
    pub tls: OutboundTls,
    /// SMTP AUTH credentials for the default smarthosts, as a route's `authFile`. AUTH is only
    /// sent over TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_file: Option<PathBuf>,
    /// SMTP AUTH by OAuth2 (XOAUTH2 or OAUTHBEARER) for the default smarthosts, instead of
    /// `authFile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2>,
    /// Port used for hosts found by MX (or A/AAAA) lookup.
    pub mx_port: u16,
    /// Most concurrent connections to one destination (a route, or one domain by MX).
    pub concurrency_per_destination: usize,
    /// Messages per connection and per minute to the default smarthosts and to each MX
    /// destination; routes may set their own.
    pub destination_limits: DestinationLimits,
    /// When a next hop answers that it gets too much (a 4xx reply saying "too many", "rate
    /// limit", "throttled", ...), its destination gets no attempt for this many seconds,
    /// doubling with each such answer up to 16 times this; other destinations go on. `0`:
    /// never.
    pub throttle_seconds: u64,
    /// DKIM signing (RFC 6376, RFC 8463): mail whose `From` header is at one of these
    /// domains (or a subdomain) is signed for it as it leaves.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dkim: Vec<DkimDomain>,
    /// TLS reports (RFC 8460): each member counts, per recipient domain, the sessions that
    /// met or failed its MTA-STS or DANE policy, and once per interval sends the domains that
    /// ask for reports (a `_smtp._tls` TXT record) a report to their `rua`: by mail through the
    /// cluster, or by HTTPS POST. Unset: no reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_reports: Option<TlsReports>,
    /// Most messages being delivered at once, over all destinations.
    pub max_deliveries: usize,
    /// Timeout for connecting, in seconds.
    pub connect_timeout_seconds: u64,
    /// Timeout for each reply of the next hop, in seconds (RFC 5321 suggests minutes).
    pub command_timeout_seconds: u64,
    /// Keep an idle connection this many seconds for the next message to the same host
    /// (0: close after each message).
    pub idle_connection_seconds: u64,
    /// Send a delay warning (a DSN with action `delayed`) once a message has waited this
    /// many seconds. Unset: no warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_warning_seconds: Option<u64>,
    /// Host names that are this node or cluster besides `hostname` and the machine's own
    /// name; a next hop with one of these names is skipped.
    pub self_hostnames: Vec<String>,
    /// Name used in EHLO towards next hops; defaults to `hostname`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub helo_name: Option<String>,
    /// DNS resolver for MX and host lookups.
    pub dns: DnsConfig,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            smarthosts: Vec::new(),
            retry: RetryConfig::default(),
            max_hops: None,
            routes: Vec::new(),
            sender_routes: Vec::new(),
            tls: OutboundTls::default(),
            auth_file: None,
            oauth2: None,
            mx_port: 25,
            concurrency_per_destination: 20,
            destination_limits: DestinationLimits::default(),
            throttle_seconds: 60,
            dkim: Vec::new(),
            tls_reports: None,
            max_deliveries: 200,
            connect_timeout_seconds: 30,
            command_timeout_seconds: 300,
            idle_connection_seconds: 5,
            delay_warning_seconds: None,
            self_hostnames: Vec::new(),
            helo_name: None,
            dns: DnsConfig::default(),
        }
    }
}

/// TLS reporting (RFC 8460).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsReports {
    /// The `organization-name` of the reports, e.g. the company's name.
    pub organization_name: String,
    /// The `From` address of reports sent by mail (their envelope sender is empty, so that
    /// nothing bounces back), e.g. `tlsrpt-noreply@example.com`.
    pub from: String,
    /// The `contact-info` of the reports: an address receivers can write to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<String>,
    /// Seconds each report covers, aligned to UTC (default 86400: a day, as RFC 8460 asks;
    /// shorter only for tests).
    #[serde(default = "default_report_interval")]
    pub interval_seconds: u64,
}

fn default_report_interval() -> u64 {
    86_400
}

/// Default most Received headers before a message is treated as looping.
pub const DEFAULT_MAX_HOPS: u32 = 50;

/// A route for some recipient domains: smarthosts, or MX lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DomainRoute {
    /// Recipient domains of this route (exact, case-insensitive).
    pub domains: Vec<String>,
    /// Next hops by priority, as the top-level `smarthosts`. Empty: MX lookup.
    pub smarthosts: Vec<Smarthost>,
    /// STARTTLS towards this route; defaults to the top-level `tls`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<OutboundTls>,
    /// SMTP AUTH credentials for this route's smarthosts (only over TLS): a file whose first
    /// line is `user:password`, or a directory with `username` and `password` files (a
    /// mounted `kubernetes.io/basic-auth` Secret). Read at each connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_file: Option<PathBuf>,
    /// SMTP AUTH by OAuth2 for this route's smarthosts, instead of `authFile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2>,
    /// Messages per connection and per minute; defaults to `destinationLimits`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<DestinationLimits>,
}

/// SMTP AUTH to smarthosts with an OAuth2 access token (client credentials grant, RFC 6749
/// section 4.4), sent with XOAUTH2 or OAUTHBEARER (RFC 7628), as Microsoft 365 and Google
/// Workspace want instead of passwords. Tokens are cached and fetched again before they
/// expire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OAuth2 {
    /// The token endpoint, `https://...`, e.g.
    /// `https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token`.
    pub token_url: String,
    /// The application's client id.
    pub client_id: String,
    /// A file holding the client secret (a mounted Secret key); read at each token request.
    pub client_secret_file: PathBuf,
    /// The scope asked for, e.g. `https://outlook.office365.com/.default`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// The mailbox to authenticate as (the SASL user), e.g. `relay@example.com`.
    pub user: String,
    /// CA certificates (PEM) the token endpoint's certificate is checked against; default:
    /// the public web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// DKIM signing for one domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DkimDomain {
    /// The signing domain (`d=`): mail whose `From` header is at this domain or one of its
    /// subdomains is signed (relaxed DMARC alignment).
    pub domain: String,
    /// The keys; each signs every such message (two selectors during a rotation, or an RSA
    /// and an Ed25519 key side by side as RFC 8463 advises).
    pub keys: Vec<DkimKeyFile>,
    /// Listeners whose mail is signed; empty: every listener's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<String>,
    /// Header fields signed; empty: [`DKIM_DEFAULT_HEADERS`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

/// One DKIM key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DkimKeyFile {
    /// The selector (`s=`): the key's public half is published at
    /// `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// The private key, PEM: RSA (2048 to 4096 bits, PKCS#1 or PKCS#8) or Ed25519 (PKCS#8).
    /// Read again when the file changes (a rotated Secret).
    pub key_file: PathBuf,
}

/// Header fields signed by default (RFC 6376 section 5.4.1), those present in the message.
pub const DKIM_DEFAULT_HEADERS: [&str; 16] = [
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Resent-Date",
    "Resent-From",
    "Resent-To",
    "Resent-Cc",
    "In-Reply-To",
    "References",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// How much is sent to one destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DestinationLimits {
    /// Connections open at once to the destination (`0`: `concurrencyPerDestination`); more
    /// deliveries wait for one.
    pub connections: u32,
    /// Messages sent over one connection before it is closed (`0`: no limit).
    pub messages_per_connection: u32,
    /// Messages per minute (`0`: no limit); more wait, deferred, for a later attempt.
    pub messages_per_minute: u32,
}

/// A route for the mail of some senders (by SMTP AUTH user or envelope sender domain).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SenderRoute {
    /// Envelope sender domains (exact, case-insensitive).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sender_domains: Vec<String>,
    /// SMTP AUTH users (exact); a user's route wins over a sender domain's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Next hops by priority, as the top-level `smarthosts` (at least one).
    pub smarthosts: Vec<Smarthost>,
    /// STARTTLS towards this route; defaults to the top-level `tls`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<OutboundTls>,
    /// SMTP AUTH credentials for this route's smarthosts (only over TLS): a file whose first
    /// line is `user:password`, or a directory with `username` and `password` files (a
    /// mounted `kubernetes.io/basic-auth` Secret). Read at each connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_file: Option<PathBuf>,
    /// SMTP AUTH by OAuth2 for this route's smarthosts, instead of `authFile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2>,
    /// Messages per connection and per minute; defaults to `destinationLimits`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<DestinationLimits>,
}

/// STARTTLS policy towards a next hop.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct OutboundTls {
    /// `opportunistic` (default: STARTTLS when offered, certificate not checked), `required`
    /// (STARTTLS must succeed and the certificate must be valid for the next hop's name,
    /// else the hop is skipped and the mail deferred), `none`, `mta-sts` (delivery by MX
    /// only: the recipient domain's MTA-STS policy, RFC 8461, else opportunistic) or `dane`
    /// (DNSSEC-signed TLSA records, RFC 7672, where the next hop has them; else MTA-STS for
    /// delivery by MX; else opportunistic).
    pub mode: OutboundTlsMode,
    /// Extra CA certificates (PEM) trusted besides the public web PKI roots (for `required`,
    /// MTA-STS policy hosts and MX hosts under an MTA-STS policy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// STARTTLS mode towards a next hop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OutboundTlsMode {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered; the certificate is not verified.
    #[default]
    Opportunistic,
    /// STARTTLS required, with certificate and name verification.
    Required,
    /// For delivery by MX: the recipient domain's MTA-STS policy (RFC 8461). Under an
    /// `enforce` policy only the MX hosts it lists are used, over TLS with a certificate valid
    /// for the MX host's name, else the mail waits; `testing` or no policy: opportunistic.
    /// Routes with smarthosts that inherit it use opportunistic TLS.
    #[serde(rename = "mta-sts")]
    MtaSts,
    /// DANE (RFC 7672): where the next hop's TLSA records are DNSSEC-signed, TLS with a
    /// certificate they match is required, else the mail waits (a bogus signature too). For
    /// delivery by MX the MX records must be signed as well; without DANE the domain's
    /// MTA-STS policy applies; else opportunistic.
    Dane,
}

/// DNS resolver settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DnsConfig {
    /// Name servers (`ip:port`, UDP and TCP). Empty: the system resolver (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Timeout of one query, in seconds.
    pub timeout_seconds: u64,
    /// DNSSEC trust anchors for DANE (`delivery.tls.mode: dane`): a file of DNSKEY records
    /// (zone file format, e.g. `. 172800 IN DNSKEY 257 3 8 AwEAAa...`) used instead of the
    /// built-in keys of the DNS root, for a private DNSSEC root or tests. For a zone other
    /// than the root, list all of its DNSKEYs (each key is checked against this file). Unset:
    /// the root's keys (KSK-2017 and KSK-2024). A file that cannot be read or parsed stops
    /// the node from starting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_anchor_file: Option<PathBuf>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout_seconds: 5,
            trust_anchor_file: None,
        }
    }
}

/// A smarthost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Smarthost {
    /// Host name or address.
    pub host: String,
    pub port: u16,
    /// Lower is preferred.
    pub priority: u32,
}

/// Retry schedule: the n-th retry waits `first * factor^(n-1)`, at most `max`; after
/// `lifetime` in the queue the message bounces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RetryConfig {
    /// First retry delay, seconds.
    pub first_seconds: u64,
    /// Maximum retry delay, seconds.
    pub max_seconds: u64,
    /// Give up (bounce) after this many seconds in the queue.
    pub lifetime_seconds: u64,
    /// Growth factor of the delay between retries (at least 1).
    pub factor: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            first_seconds: 60,
            max_seconds: 3600,
            lifetime_seconds: 5 * 24 * 3600,
            factor: 2,
        }
    }
}

impl Config {
    /// Parse and validate YAML. Errors name the key path.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Parse {
                path,
                message: e.into_inner().to_string(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Render as YAML (accepted by [`Config::from_yaml`]).
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(self)
    }

    /// Rules beyond the schema.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |path: String, message: &str| ConfigError::Invalid {
            path,
            message: message.to_owned(),
        };
        if self.hostname.is_empty() || self.hostname.contains(char::is_whitespace) {
            return Err(invalid(
                "hostname".into(),
                "must be a host name without spaces",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if l.name.is_empty() {
                return Err(invalid(format!("listeners[{i}].name"), "must not be empty"));
            }
            if !names.insert(l.name.as_str()) {
                return Err(invalid(format!("listeners[{i}].name"), "duplicate name"));
            }
            if !l.trusted_proxies.is_empty() && !l.proxy_protocol {
                return Err(invalid(
                    format!("listeners[{i}].trustedProxies"),
                    "set only with proxyProtocol: true",
                ));
            }
            for (j, r) in l.rate_limits.iter().enumerate() {
                let at = |field: &str| format!("listeners[{i}].rateLimits[{j}].{field}");
                if r.messages.is_none() && r.recipients.is_none() {
                    return Err(invalid(at("messages"), "set messages, recipients or both"));
                }
                if r.messages == Some(0) {
                    return Err(invalid(at("messages"), "must be at least 1"));
                }
                if r.recipients == Some(0) {
                    return Err(invalid(at("recipients"), "must be at least 1"));
                }
                if !(1..=86_400).contains(&r.window_seconds) {
                    return Err(invalid(at("windowSeconds"), "must be 1 to 86400"));
                }
                if !(1..=128).contains(&r.ipv6_prefix) {
                    return Err(invalid(at("ipv6Prefix"), "must be 1 to 128"));
                }
            }
            for (j, r) in l.sender_rewrites.iter().enumerate() {
                let at = |field: &str| format!("listeners[{i}].senderRewrites[{j}].{field}");
                if r.from != "*" && !is_rewrite_address(&r.from) {
                    return Err(invalid(
                        at("from"),
                        "must be user@domain, @domain or * (any sender)",
                    ));
                }
                if !is_rewrite_address(&r.to) {
                    return Err(invalid(
                        at("to"),
                        "must be user@domain, or @domain to keep the local part",
                    ));
                }
            }
            if l.proxy_protocol && l.trusted_proxies.is_empty() {
                return Err(invalid(
                    format!("listeners[{i}].trustedProxies"),
                    "proxyProtocol needs at least one trusted proxy",
                ));
            }
            if l.relay.require_auth && (self.auth.is_none() || self.tls.is_none()) {
                return Err(invalid(
                    format!("listeners[{i}].relay.requireAuth"),
                    "needs top-level `auth` and `tls` (AUTH is only offered after STARTTLS)",
                ));
            }
            if l.relay.is_open() && !l.relay.open_relay {
                return Err(invalid(
                    format!("listeners[{i}].relay.allowedSources"),
                    "admits every address (a /0 range) without requireAuth or recipientDomains: an open relay; set openRelay: true if that is really meant",
                ));
            }
            if l.tls.required && (self.tls.is_none() || l.tls.mode == TlsMode::None) {
                return Err(invalid(
                    format!("listeners[{i}].tls.required"),
                    "needs top-level `tls` files and mode starttls",
                ));
            }
            for (j, d) in l
                .relay
                .recipient_domains
                .iter()
                .chain(l.accept_domains.iter())
                .enumerate()
            {
                if d.is_empty() || d.contains(['@', ' ', '%', '!', ':']) {
                    return Err(invalid(
                        format!("listeners[{i}] domain #{j} `{d}`"),
                        "not a domain name",
                    ));
                }
            }
        }
        if self.limits.max_command_line < 512 {
            return Err(invalid(
                "limits.maxCommandLine".into(),
                "must be at least 512 (RFC 5321)",
            ));
        }
        if self.limits.shutdown_delay_seconds > 60 {
            return Err(invalid(
                "limits.shutdownDelaySeconds".into(),
                "must be at most 60",
            ));
        }
        if self.limits.max_recipients == 0 {
            return Err(invalid("limits.maxRecipients".into(), "must be at least 1"));
        }
        if self.limits.auth_checks_per_client == 0 {
            return Err(invalid(
                "limits.authChecksPerClient".into(),
                "must be at least 1, or no client could authenticate",
            ));
        }
        if self.limits.max_tls_handshakes == 0 {
            return Err(invalid(
                "limits.maxTlsHandshakes".into(),
                "must be at least 1, or no client could start TLS",
            ));
        }
        if self.queue.min_free_percent > 100 {
            return Err(invalid("queue.minFreePercent".into(), "must be 0..=100"));
        }
        if self.limits.content_spill_bytes < 4096 {
            return Err(invalid(
                "limits.contentSpillBytes".into(),
                "must be at least 4096, or content would go to disk in tiny writes",
            ));
        }
        self.validate_delivery()?;
        if let Some(tls) = &self.tls
            && tls.reload_interval_seconds == 0
        {
            return Err(invalid(
                "tls.reloadIntervalSeconds".into(),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl Config {
    fn validate_delivery(&self) -> Result<(), ConfigError> {
        let invalid = |path: String, message: &str| ConfigError::Invalid {
            path,
            message: message.to_owned(),
        };
        let d = &self.delivery;
        let auths = std::iter::once((
            "delivery".to_owned(),
            d.auth_file.is_some(),
            d.oauth2.as_ref(),
        ))
        .chain(d.routes.iter().enumerate().map(|(i, r)| {
            (
                format!("delivery.routes[{i}]"),
                r.auth_file.is_some(),
                r.oauth2.as_ref(),
            )
        }))
        .chain(d.sender_routes.iter().enumerate().map(|(i, r)| {
            (
                format!("delivery.senderRoutes[{i}]"),
                r.auth_file.is_some(),
                r.oauth2.as_ref(),
            )
        }));
        for (at, has_file, oauth2) in auths {
            let Some(o) = oauth2 else { continue };
            if has_file {
                return Err(invalid(
                    format!("{at}.oauth2"),
                    "set authFile or oauth2, not both",
                ));
            }
            if o.token_url
                .strip_prefix("https://")
                .is_none_or(|rest| rest.is_empty())
            {
                return Err(invalid(
                    format!("{at}.oauth2.tokenUrl"),
                    "must be an https:// URL (the client secret is sent to it)",
                ));
            }
            if o.client_id.is_empty() {
                return Err(invalid(
                    format!("{at}.oauth2.clientId"),
                    "must not be empty",
                ));
            }
            if o.user.is_empty() {
                return Err(invalid(format!("{at}.oauth2.user"), "must not be empty"));
            }
        }
        let mut dkim_domains = std::collections::HashSet::new();
        for (i, k) in self.delivery.dkim.iter().enumerate() {
            let at = |field: &str| format!("delivery.dkim[{i}].{field}");
            if !is_dns_name(&k.domain) {
                return Err(invalid(at("domain"), "must be a domain like example.com"));
            }
            if !dkim_domains.insert(k.domain.to_ascii_lowercase()) {
                return Err(invalid(at("domain"), "duplicate domain"));
            }
            if k.keys.is_empty() {
                return Err(invalid(at("keys"), "needs at least one key"));
            }
            for (j, key) in k.keys.iter().enumerate() {
                if !is_dns_name(&key.selector) {
                    return Err(invalid(
                        at(&format!("keys[{j}].selector")),
                        "must be a DNS label (or labels) like mail2026",
                    ));
                }
            }
            for (j, l) in k.listeners.iter().enumerate() {
                if !self.listeners.iter().any(|x| &x.name == l) {
                    return Err(invalid(
                        at(&format!("listeners[{j}]")),
                        "names no listener of this config",
                    ));
                }
            }
            if !k.headers.is_empty() && !k.headers.iter().any(|h| h.eq_ignore_ascii_case("from")) {
                return Err(invalid(
                    at("headers"),
                    "must include From (RFC 6376 section 5.4)",
                ));
            }
        }
        if let Some(r) = &self.delivery.tls_reports {
            if r.organization_name.trim().is_empty() {
                return Err(invalid(
                    "delivery.tlsReports.organizationName".into(),
                    "must not be empty",
                ));
            }
            if !is_mailbox(&r.from) {
                return Err(invalid(
                    "delivery.tlsReports.from".into(),
                    "must be an address like tlsrpt-noreply@example.com",
                ));
            }
            if r.interval_seconds < 5 {
                return Err(invalid(
                    "delivery.tlsReports.intervalSeconds".into(),
                    "must be at least 5 (RFC 8460 reports cover a day: 86400)",
                ));
            }
        }
        let d = &self.delivery;
        let hosts = |path: &str, list: &[Smarthost]| -> Result<(), ConfigError> {
            for (i, h) in list.iter().enumerate() {
                if h.host.is_empty() || h.host.contains(char::is_whitespace) {
                    return Err(invalid(
                        format!("{path}[{i}].host"),
                        "must be a host name or address",
                    ));
                }
                if h.port == 0 {
                    return Err(invalid(format!("{path}[{i}].port"), "must not be 0"));
                }
            }
            Ok(())
        };
        hosts("delivery.smarthosts", &d.smarthosts)?;
        let sts_needs_mx = std::iter::once(("delivery.tls.mode".to_owned(), &d.tls, &d.smarthosts))
            .chain(d.routes.iter().enumerate().filter_map(|(i, r)| {
                let tls = r.tls.as_ref()?;
                Some((format!("delivery.routes[{i}].tls.mode"), tls, &r.smarthosts))
            }))
            .chain(d.sender_routes.iter().enumerate().filter_map(|(i, r)| {
                let tls = r.tls.as_ref()?;
                Some((
                    format!("delivery.senderRoutes[{i}].tls.mode"),
                    tls,
                    &r.smarthosts,
                ))
            }));
        for (at, tls, smarthosts) in sts_needs_mx {
            if tls.mode == OutboundTlsMode::MtaSts && !smarthosts.is_empty() {
                return Err(invalid(
                    at,
                    "mta-sts applies to delivery by MX only; towards smarthosts use required or dane",
                ));
            }
        }
        for (i, r) in d.routes.iter().enumerate() {
            if r.domains.is_empty() {
                return Err(invalid(
                    format!("delivery.routes[{i}].domains"),
                    "must not be empty",
                ));
            }
            for (j, dom) in r.domains.iter().enumerate() {
                if dom.is_empty() || dom.contains(['@', ' ', '%', '!', ':']) {
                    return Err(invalid(
                        format!("delivery.routes[{i}].domains[{j}]"),
                        "not a domain name",
                    ));
                }
            }
            hosts(&format!("delivery.routes[{i}].smarthosts"), &r.smarthosts)?;
        }
        for (i, r) in d.sender_routes.iter().enumerate() {
            let at = |field: &str| format!("delivery.senderRoutes[{i}].{field}");
            if r.sender_domains.is_empty() && r.users.is_empty() {
                return Err(invalid(
                    at("senderDomains"),
                    "set senderDomains, users or both",
                ));
            }
            for (j, dom) in r.sender_domains.iter().enumerate() {
                if dom.is_empty() || dom.contains(['@', ' ', '%', '!', ':']) {
                    return Err(invalid(
                        at(&format!("senderDomains[{j}]")),
                        "not a domain name",
                    ));
                }
            }
            if r.smarthosts.is_empty() {
                return Err(invalid(at("smarthosts"), "must not be empty"));
            }
            hosts(&at("smarthosts"), &r.smarthosts)?;
        }
        if d.retry.factor == 0 {
            return Err(invalid(
                "delivery.retry.factor".into(),
                "must be at least 1",
            ));
        }
        if d.retry.first_seconds == 0 {
            return Err(invalid(
                "delivery.retry.firstSeconds".into(),
                "must be at least 1",
            ));
        }
        if d.concurrency_per_destination == 0 {
            return Err(invalid(
                "delivery.concurrencyPerDestination".into(),
                "must be at least 1",
            ));
        }
        if d.max_deliveries == 0 {
            return Err(invalid(
                "delivery.maxDeliveries".into(),
                "must be at least 1",
            ));
        }
        if d.mx_port == 0 {
            return Err(invalid("delivery.mxPort".into(), "must not be 0"));
        }
        if d.dns
            .trust_anchor_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid(
                "delivery.dns.trustAnchorFile".into(),
                "must name a file of DNSKEY records (or be left out for the root's keys)",
            ));
        }
        Ok(())
    }
}

impl Default for TlsFiles {
    fn default() -> Self {
        Self {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            reload_interval_seconds: 10,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shutdown_delay_over_a_minute_is_refused_naming_the_key() {
        let mut c = Config::default();
        c.limits.shutdown_delay_seconds = 61;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("limits.shutdownDelaySeconds"), "{err}");
        c.limits.shutdown_delay_seconds = 60;
        c.validate().unwrap();
    }

    #[test]
    fn rate_limits_read_with_defaults_and_bad_ones_name_their_key() {
        let yaml = "listeners:\n  - name: devices\n    rateLimits:\n      - {by: clientAddress, messages: 10}\n      - {by: senderDomain, recipients: 0}\n";
        let c: Config = serde_yaml::from_str(yaml).unwrap();
        let r = &c.listeners[0].rate_limits;
        assert_eq!(
            (r[0].by, r[0].messages, r[0].recipients),
            (RateKey::ClientAddress, Some(10), None)
        );
        assert_eq!((r[0].window_seconds, r[0].ipv6_prefix), (60, 64));
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("listeners[0].rateLimits[1].recipients"),
            "{err}"
        );
        let mut c = c;
        c.listeners[0].rate_limits[1].recipients = None;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("set messages, recipients or both"), "{err}");
    }

    #[test]
    fn oauth2_needs_https_and_excludes_a_password_file() {
        let yaml = "delivery:\n  smarthosts: [{host: smtp.office365.com, port: 587}]\n  oauth2: {tokenUrl: \"https://login.example/t/token\", clientId: app, clientSecretFile: /s, user: relay@example.com}\n  senderRoutes:\n    - senderDomains: [b.example]\n      smarthosts: [{host: smtp.b.example, port: 587}]\n      authFile: /auth\n      oauth2: {tokenUrl: \"http://login.example/t\", clientId: app, clientSecretFile: /s, user: u}\n";
        let mut c: Config = serde_yaml::from_str(yaml).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("delivery.senderRoutes[0].oauth2")
                && err.contains("set authFile or oauth2"),
            "{err}"
        );
        c.delivery.sender_routes[0].auth_file = None;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("delivery.senderRoutes[0].oauth2.tokenUrl"),
            "{err}"
        );
        c.delivery.sender_routes[0].oauth2 = None;
        c.validate().unwrap();
    }

    #[test]
    fn mta_sts_is_for_delivery_by_mx_only() {
        let yaml = "delivery:\n  tls: {mode: mta-sts}\n  routes:\n    - domains: [partner.example]\n      smarthosts: [{host: mx.partner.example, port: 25}]\n    - domains: [b.example]\n      smarthosts: [{host: smtp.b.example, port: 25}]\n      tls: {mode: dane}\n";
        let mut c: Config = serde_yaml::from_str(yaml).unwrap();
        // Routes with smarthosts that inherit mta-sts use opportunistic TLS.
        c.validate().unwrap();
        assert_eq!(c.delivery.tls.mode, OutboundTlsMode::MtaSts);
        c.delivery.routes[1].tls = Some(OutboundTls {
            mode: OutboundTlsMode::MtaSts,
            ca_file: None,
        });
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("delivery.routes[1].tls.mode") && err.contains("delivery by MX"),
            "{err}"
        );
        c.delivery.routes.clear();
        c.delivery.smarthosts = vec![Smarthost {
            host: "smtp.example".into(),
            port: 25,
            priority: 0,
        }];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("delivery.tls.mode"), "{err}");
    }

    #[test]
    fn sender_rewrites_are_checked_and_bad_ones_name_their_key() {
        let yaml = "listeners:\n  - name: devices\n    removeReceived: true\n    senderRewrites:\n      - {from: \"*\", to: \"@example.com\"}\n      - {from: root@scanner01, to: scanner01@example.com}\n";
        let mut c: Config = serde_yaml::from_str(yaml).unwrap();
        c.validate().unwrap();
        assert!(c.listeners[0].remove_received);
        for (from, to, key) in [
            ("root", "a@example.com", "senderRewrites[1].from"),
            ("@", "a@example.com", "senderRewrites[1].from"),
            ("a@b", "<a@example.com>", "senderRewrites[1].to"),
            ("a@b", "*", "senderRewrites[1].to"),
            ("a@b", "x y@example.com", "senderRewrites[1].to"),
            ("a@b", "a@example..com", "senderRewrites[1].to"),
        ] {
            c.listeners[0].sender_rewrites[1] = SenderRewrite {
                from: from.into(),
                to: to.into(),
            };
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains(&format!("listeners[0].{key}")),
                "{from} {to}: {err}"
            );
        }
    }

    #[test]
    fn the_restart_view_leaves_out_exactly_what_a_reload_applies() {
        let yaml = "hostname: relay.example\nlisteners:\n  - {name: devices, address: \"0.0.0.0:25\", relay: {allowedSources: [10.0.0.0/8]}}\n";
        let base: Config = serde_yaml::from_str(yaml).unwrap();
        let mut policy = base.clone();
        policy.listeners[0]
            .relay
            .allowed_sources
            .push("10.1.0.0/16".parse().unwrap());
        policy.listeners[0].rate_limits.push(RateLimit {
            by: RateKey::User,
            messages: Some(5),
            recipients: None,
            window_seconds: 60,
            ipv6_prefix: 64,
        });
        policy.listeners[0].sender_rewrites.push(SenderRewrite {
            from: "*".into(),
            to: "@example.com".into(),
        });
        policy.listeners[0].remove_received = true;
        policy.limits.max_recipients = 20;
        policy.delivery.tls_reports = Some(TlsReports {
            organization_name: "Example".into(),
            from: "tlsrpt@example.com".into(),
            contact: None,
            interval_seconds: 86_400,
        });
        policy.delivery.smarthosts.push(Smarthost {
            host: "mx.example".into(),
            port: 25,
            priority: 0,
        });
        assert_ne!(policy, base);
        assert_eq!(policy.restart_view(), base.restart_view());
        let mut port = base.clone();
        port.listeners[0].address = "0.0.0.0:2525".parse().unwrap();
        assert_ne!(port.restart_view(), base.restart_view());
        let mut sessions = base.clone();
        sessions.limits.max_sessions = 10;
        assert_ne!(sessions.restart_view(), base.restart_view());
    }
}
