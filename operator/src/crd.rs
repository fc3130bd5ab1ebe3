//! The `MailCluster` custom resource (`mailcluster.dev/v1alpha1`).
//!
//! Doc comments on every field are what `kubectl explain mailcluster.spec...` shows, so they are
//! written for the person who writes the manifest. Validation lives in the schema (ranges,
//! patterns, list keys) and in CEL rules (`x-kubernetes-validations`), so that the apiserver
//! refuses a bad manifest with a message that names the field.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the `MailCluster` kind.
pub const GROUP: &str = "mailcluster.dev";
/// Port the node serves `/healthz`, `/readyz` and `/metrics` on; listeners may not use it.
pub const ADMIN_PORT: i32 = 8025;
/// Port of the peer channel between members; listeners may not use it.
pub const PEER_PORT: i32 = 7025;

/// A highly available SMTP relay cluster: members that share one configuration, one TLS
/// certificate and one hostname, published in DNS with every load balancer address.
// Every printer column repeats `type_ = "string"`, which this lint mistakes for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailcluster.dev",
    version = "v1alpha1",
    kind = "MailCluster",
    plural = "mailclusters",
    singular = "mailcluster",
    shortname = "mc",
    category = "mail",
    namespaced,
    status = "MailClusterStatus",
    derive = "PartialEq",
    validation = Rule::new("size(self.metadata.name) <= 40").message("metadata.name must be at most 40 characters: it prefixes the names of the Services (NAME-LISTENER), pods and volumes"),
    doc = "A highly available SMTP relay cluster: members that share one configuration, TLS certificate and hostname.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether every member is ready and the cluster serves mail"
    ),
    printcolumn(
        name = "Members",
        type_ = "string",
        json_path = ".status.membersReady",
        description = "Ready members / desired members"
    ),
    printcolumn(
        name = "Hostname",
        type_ = "string",
        json_path = ".spec.hostname",
        description = "The name clients and MX records use"
    ),
    printcolumn(
        name = "Addresses",
        type_ = "string",
        json_path = ".status.addresses",
        description = "Load balancer addresses of the exposed listeners"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("!self.listeners.exists(l, has(l.tls) && l.tls.mode != 'None') || has(self.tls)").message("a listener uses TLS: set spec.tls (secretName or issuerRef) so members have a certificate"),
    validation = Rule::new("!self.listeners.exists(l, has(l.relay) && has(l.relay.requireAuth) && l.relay.requireAuth) || (has(self.auth) && has(self.tls))").message("a listener sets relay.requireAuth: set spec.auth.secretName to the Secret with the users, and spec.tls (AUTH is offered only after STARTTLS)"),
    validation = Rule::new("!has(self.disruptionBudget) || !has(self.disruptionBudget.maxUnavailable) || self.disruptionBudget.maxUnavailable <= self.replicas").message("disruptionBudget.maxUnavailable cannot be larger than replicas")
)]
#[serde(rename_all = "camelCase")]
pub struct MailClusterSpec {
    /// Fully qualified host name of the cluster, e.g. `smtp.example.com`. Every member greets
    /// with it and presents a certificate for it; DNS A records of this name point at every
    /// load balancer address. Lowercase letters, digits, '-' and '.'.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\\\\.)+[a-z]([-a-z0-9]{0,61}[a-z0-9])?$')").message("must be a fully qualified lowercase DNS name like smtp.example.com"))]
    pub hostname: String,

    /// Number of members (relay pods). Members are added and removed one at a time; a removed
    /// member hands its queue to its peers first. At least 1; 3 or more for high availability.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,

    /// Container image of the relay node. When empty, the image the operator was started with
    /// (`--default-image`) is used, so upgrading the operator upgrades the clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// SMTP listeners of every member. Each has its own port, relay policy and exposure.
    /// Names and ports must be unique.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.all(l, self.exists_one(m, m.port == l.port))").message("listener ports must be unique")
    )]
    pub listeners: Vec<Listener>,

    /// Where accepted mail goes: smarthosts (by priority) or direct MX delivery, with optional
    /// per-domain routes and the retry schedule.
    #[serde(default)]
    pub delivery: Delivery,

    /// The persistent queue volume of each member.
    #[serde(default)]
    pub storage: Storage,

    /// DNS records published through external-dns (`DNSEndpoint` objects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,

    /// The TLS certificate every member presents for `hostname`: an existing Secret of type
    /// kubernetes.io/tls, or a cert-manager issuer to request one from. Required when a
    /// listener uses TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClusterTls>,

    /// SMTP AUTH users, required when a listener sets `relay.requireAuth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,

    /// CPU and memory requests and limits of the relay container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Where members may run. By default members are spread over nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<Scheduling>,

    /// Limits every member applies to its SMTP clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,

    /// How many members voluntary disruptions (node drains, upgrades) may take down at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption_budget: Option<DisruptionBudget>,

    /// The peer channel (port 7025) members use to hand queued mail to each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Peers>,
}

/// The peer channel between members.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Peers {
    /// Source networks (CIDRs), besides the members themselves, allowed to open the peer
    /// channel: the drain Job of an orphaned queue volume connects from a pod IP in this
    /// network. Set it to your pod network (e.g. `10.244.0.0/16`). When unset, the private
    /// ranges 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 and fc00::/7 are used; an empty list
    /// admits members only (drain Jobs cannot hand mail over). Every connection must also
    /// prove it holds the cluster key, and the NetworkPolicy admits only members and the
    /// cluster's drain Jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub allowed_sources: Option<Vec<Cidr>>,
}

/// Source networks allowed on the peer channel when `spec.peers.allowedSources` is unset.
pub const DEFAULT_PEER_SOURCES: [&str; 4] =
    ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"];

fn default_replicas() -> i32 {
    3
}

/// One SMTP listener of every member.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.port != 8025 && self.port != 7025").message("ports 8025 (admin) and 7025 (peer channel) are reserved"),
    validation = Rule::new("!has(self.trustedProxies) || size(self.trustedProxies) == 0 || (has(self.proxyProtocol) && self.proxyProtocol)").message("trustedProxies needs proxyProtocol: true"),
    validation = Rule::new("!(has(self.proxyProtocol) && self.proxyProtocol) || (has(self.trustedProxies) && size(self.trustedProxies) > 0)").message("proxyProtocol: true needs trustedProxies, the load balancer addresses allowed to send PROXY headers"),
    validation = Rule::new("!has(self.loadBalancerSourceRanges) || size(self.loadBalancerSourceRanges) == 0 || !has(self.exposure) || self.exposure == 'LoadBalancer'").message("loadBalancerSourceRanges needs exposure: LoadBalancer")
)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// Name of the listener, unique in the cluster; also the name of its Service port and
    /// part of its Service name. Lowercase letters, digits and '-', at most 15 characters,
    /// starting with a letter.
    #[schemars(length(min = 1, max = 15))]
    #[x_kube(
        validation = Rule::new("self.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("must start with a lowercase letter and contain only lowercase letters, digits and '-'"),
        validation = Rule::new("!(self in ['peers', 'admin', 'peer', 'config', 'cluster', 'tls'])").message("peers, peer, admin, config, cluster and tls are reserved for the cluster's own objects and ports")
    )]
    pub name: String,

    /// TCP port the members listen on and the listener's Service exposes (1-65535).
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// How clients reach the listener: `LoadBalancer` (a Service of type LoadBalancer with
    /// externalTrafficPolicy Local, so members see client source addresses), `ClusterIP`
    /// (reachable inside the cluster only) or `None` (no Service).
    #[serde(default)]
    pub exposure: Exposure,

    /// Source ranges (CIDRs) the cloud load balancer admits; empty admits all. Only for
    /// `exposure: LoadBalancer`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub load_balancer_source_ranges: Vec<Cidr>,

    /// TLS on this listener. Needs `spec.tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,

    /// Expect a PROXY protocol (v1 or v2) header from the load balancer, which carries the
    /// client's source address. Only peers in `trustedProxies` may send it.
    #[serde(default)]
    pub proxy_protocol: bool,

    /// Addresses (CIDRs) of the load balancers allowed to send PROXY protocol headers.
    /// Needs `proxyProtocol: true`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub trusted_proxies: Vec<Cidr>,

    /// Who may relay through this listener. Without it the listener only accepts mail for
    /// `acceptDomains`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayPolicy>,

    /// Domains this listener accepts mail for from anyone (inbound or fallback MX), e.g.
    /// `example.com`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub accept_domains: Vec<DomainName>,

    /// Largest message accepted, in bytes (advertised with the SIZE extension). Default
    /// 26214400 (25 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 1073741824))]
    pub max_message_size: Option<i64>,

    /// Disconnect a client that sends message content right behind a DATA that was refused,
    /// before it could have read the refusal (RFC 2920 forbids it), with `554 5.5.0`, as
    /// Postfix's `smtpd_forbid_unauth_pipelining` does; otherwise that content is read as
    /// commands and can smuggle a transaction in. Default: on, except on listeners that only
    /// relay for `relay.allowedSources` (devices with simple SMTP stacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forbid_unauth_pipelining: Option<bool>,

    /// Rate limits of this listener, so that one runaway client, application or sender cannot
    /// get the company's domain blocked: a message (counted at MAIL FROM) or recipient (at
    /// RCPT TO) beyond any limit gets `451 4.7.1` (try again later) until that limit's window
    /// is over; refused ones are not counted. A limit holds for the whole cluster: the members
    /// report their counts to each other over the peer channel every 50 ms and add the others'
    /// counts to their own; a member whose peers have been silent for 3 s counts for itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub rate_limits: Vec<RateLimit>,

    /// Rewrite the sender of mail from devices that send as addresses nobody can answer,
    /// such as `root@scanner01`, as Postfix's `sender_canonical_maps` does. The first rule
    /// whose `from` matches rewrites the envelope sender and the addresses in the `From`,
    /// `Sender`, `Resent-From` and `Resent-Sender` headers (`Reply-To` and recipient headers
    /// are kept). Relay policy and rate limits see the sender as the client sent it; routes
    /// (`delivery.senderRoutes`), delivery and bounces use the rewritten one. Applied without
    /// a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub sender_rewrites: Vec<SenderRewrite>,

    /// Remove the Received headers a message arrives with, which name internal hosts and
    /// addresses, before it leaves; those written by a mailnode stay, so that a mail loop
    /// through this cluster is still stopped by its hop count. The member's own Received
    /// header then leaves out the client's address and HELO name. Default false.
    #[serde(default)]
    pub remove_received: bool,
}

/// One sender rewriting rule of a listener.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SenderRewrite {
    /// Which senders: `user@host` (that address), `@host` (any address at that domain, not
    /// its subdomains) or `*` (any sender except the null sender of bounces). Case is
    /// ignored.
    pub from: SenderPattern,
    /// The new sender: `user@example.com`, or `@example.com` to keep the local part and
    /// change only the domain.
    pub to: RewriteAddress,
}

/// One rate limit of a listener.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("has(self.messages) || has(self.recipients)").message("set messages, recipients or both"),
    validation = Rule::new("!has(self.ipv6Prefix) || self.by == 'ClientAddress'").message("ipv6Prefix applies only to by: ClientAddress")
)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// What is counted together: `ClientAddress` (the client's IP address as the member sees
    /// it, after PROXY protocol; IPv6 clients by their `ipv6Prefix` network), `User` (the
    /// SMTP AUTH user; sessions without AUTH are not counted) or `SenderDomain` (the envelope
    /// sender's domain; bounces with the null sender are not counted).
    pub by: RateKey,
    /// Messages per window (1 to 1000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub messages: Option<i32>,
    /// Recipients per window (1 to 10000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub recipients: Option<i32>,
    /// Length of the window, from 1s to 1d, e.g. `1m` (the default) or `1h`. A window starts
    /// with the first message or recipient counted for a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<TimeSpan>,
    /// For `by: ClientAddress`: the IPv6 prefix length counted as one client (default 64;
    /// 48 counts a whole site as one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 128))]
    pub ipv6_prefix: Option<i32>,
}

/// What a rate limit counts together.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateKey {
    /// The client's address (an IPv6 client by its `ipv6Prefix` network).
    ClientAddress,
    /// The SMTP AUTH user.
    User,
    /// The envelope sender's domain.
    SenderDomain,
}

/// How a listener is reachable.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Exposure {
    /// A Service of type LoadBalancer with externalTrafficPolicy Local.
    #[default]
    LoadBalancer,
    /// A Service of type ClusterIP.
    ClusterIP,
    /// No Service.
    None,
}

/// TLS settings of a listener.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!(has(self.required) && self.required) || self.mode != 'None'").message("required: true needs mode StartTLS"))]
#[serde(rename_all = "camelCase")]
pub struct ListenerTls {
    /// `StartTLS` (STARTTLS offered on the plain connection, usual on 25 and 587; the
    /// default) or `None`.
    #[serde(default)]
    pub mode: TlsMode,
    /// Refuse mail (and AUTH) before the client has used STARTTLS. Only with mode StartTLS.
    #[serde(default)]
    pub required: bool,
}

/// TLS mode of a listener.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS.
    None,
    /// STARTTLS offered on a plain connection.
    #[default]
    StartTLS,
}

/// Who may relay (send to recipients outside `acceptDomains`) through a listener.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("!(has(self.allowedSources) && self.allowedSources.exists(s, cidr(s).prefixLength() == 0)) || (has(self.requireAuth) && self.requireAuth) || (has(self.recipientDomains) && size(self.recipientDomains) > 0) || (has(self.openRelay) && self.openRelay)").message("allowedSources admits every address (a /0 range) without requireAuth or recipientDomains: that is an open relay for the whole internet; set requireAuth, limit recipientDomains, or set openRelay: true if that is really meant")
)]
#[serde(rename_all = "camelCase")]
pub struct RelayPolicy {
    /// Client source addresses (CIDRs) allowed to relay, e.g. `10.20.0.0/16`. Empty means no
    /// address may relay unless it authenticates (`requireAuth`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub allowed_sources: Vec<Cidr>,
    /// Recipient domains relaying is limited to, e.g. `example.com` (exact match, so list
    /// subdomains too). Empty means any recipient domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub recipient_domains: Vec<DomainName>,
    /// Clients must also authenticate (SMTP AUTH against `spec.auth`) to relay.
    #[serde(default)]
    pub require_auth: bool,
    /// Allow an open relay: `allowedSources` with `0.0.0.0/0` or `::/0` and neither
    /// `requireAuth` nor `recipientDomains` lets anyone on the internet relay through the
    /// cluster, and is refused unless this is true. Only for a listener that no untrusted
    /// client can reach (e.g. `loadBalancerSourceRanges` or a private network).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub open_relay: bool,
}

/// Where accepted mail is delivered.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("!(has(self.smarthosts) && size(self.smarthosts) > 0 && has(self.mx))").message("smarthosts and mx are mutually exclusive: deliver through smarthosts or directly by MX, not both"),
    validation = Rule::new("!(has(self.authSecret) && has(self.oauth2))").message("set authSecret or oauth2, not both"),
    validation = Rule::new("!(has(self.tls) && self.tls.mode == 'MtaSts' && has(self.smarthosts) && size(self.smarthosts) > 0)").message("tls.mode MtaSts applies to delivery by MX; towards smarthosts use Required or Dane")
)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// Next hops for all mail not matched by a route, tried in ascending priority; hosts of
    /// equal priority share the load.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub smarthosts: Vec<Smarthost>,
    /// Deliver directly to the recipient domain's MX hosts. Mutually exclusive with
    /// smarthosts; when neither is given, MX delivery is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mx: Option<MxDelivery>,
    /// Per-domain next hops that win over smarthosts and MX for that domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["domain".into()]))]
    pub routes: Vec<Route>,
    /// Next hops chosen by who sends, for recipients no `routes` entry matches: the first
    /// sender route listing the message's SMTP AUTH user, else the first listing the envelope
    /// sender's domain; mail of other senders takes `smarthosts` (or MX). Use it to send each
    /// brand's or tenant's mail through its own provider account, e.g. a Microsoft 365 tenant
    /// per sender domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub sender_routes: Vec<SenderRoute>,
    /// DKIM signing (RFC 6376, RFC 8463) of mail as it leaves, so that receivers can tie it to
    /// the company's domain (DMARC): a message whose From header is at one of these domains,
    /// or a subdomain, is signed once with each of the domain's keys; mail already signed by
    /// the domain is not signed again. Applied without a restart; a rotated key Secret is
    /// used as soon as the members see it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub dkim: Vec<DkimSigning>,
    /// STARTTLS towards `smarthosts` and MX hosts, and towards routes that set none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<OutboundTls>,
    /// TLS reports (RFC 8460) to the recipient domains that ask for them: each member counts,
    /// per domain, the sessions that met or failed its MTA-STS or DANE policy (with
    /// `tls.mode` `MtaSts` or `Dane`) and sends a daily report to the domain's `rua` (by mail
    /// through the cluster, or by HTTPS). Each member reports for itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_reports: Option<TlsReports>,
    /// SMTP AUTH credentials for `smarthosts`: the name of a Secret of type
    /// kubernetes.io/basic-auth (keys `username` and `password`) in the cluster's namespace.
    /// Mounted into the members and read at each connection, so a changed password is used
    /// without a restart. Sent only over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret: Option<SecretName>,
    /// SMTP AUTH for `smarthosts` with an OAuth2 access token (XOAUTH2 or OAUTHBEARER)
    /// instead of a password, as Microsoft 365 and Google Workspace ask for. Exclusive with
    /// `authSecret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Auth>,
    /// How much `smarthosts`, and each recipient domain delivered by MX, are sent, e.g. the
    /// per-account limits of a provider. A next hop that answers that it gets too much (a
    /// temporary reply saying "too many", "rate limit", "throttled", ...) gets no attempt for
    /// a minute, doubling up to 16 minutes while it goes on; only its messages wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<DestinationLimits>,
    /// When to retry a deferred message and when to give up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

/// Next hops for the mail of some senders.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("(has(self.senderDomains) && size(self.senderDomains) > 0) || (has(self.users) && size(self.users) > 0)").message("set senderDomains, users or both"),
    validation = Rule::new("!(has(self.authSecret) && has(self.oauth2))").message("set authSecret or oauth2, not both"),
    validation = Rule::new("!(has(self.tls) && self.tls.mode == 'MtaSts')").message("tls.mode MtaSts applies to delivery by MX; towards smarthosts use Required or Dane")
)]
#[serde(rename_all = "camelCase")]
pub struct SenderRoute {
    /// Envelope sender domains whose mail takes this route (exact match), e.g.
    /// `brand-b.example`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub sender_domains: Vec<DomainName>,
    /// SMTP AUTH users whose mail takes this route; a user's route wins over a sender domain's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub users: Vec<String>,
    /// Next hops of this route, tried in ascending priority.
    #[schemars(length(min = 1, max = 16))]
    pub smarthosts: Vec<Smarthost>,
    /// STARTTLS towards these next hops; default: `delivery.tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<OutboundTls>,
    /// SMTP AUTH credentials for these next hops, as `delivery.authSecret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret: Option<SecretName>,
    /// SMTP AUTH for these next hops with an OAuth2 token, as `delivery.oauth2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Auth>,
    /// How much these next hops are sent; default: `delivery.limits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<DestinationLimits>,
}

/// SMTP AUTH with an OAuth2 access token from the client credentials grant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2Auth {
    /// The token endpoint, e.g.
    /// `https://login.microsoftonline.com/<tenant id>/oauth2/v2.0/token`.
    #[schemars(length(min = 9, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://')").message("must be an https:// URL (the client secret is sent to it)"))]
    pub token_url: String,
    /// The application (client) id registered with the provider.
    #[schemars(length(min = 1, max = 256))]
    pub client_id: String,
    /// Secret in the cluster's namespace whose key `clientSecret` holds the client secret;
    /// mounted into the members and read at each token request, so a rotated secret is used
    /// without a restart.
    pub secret_name: SecretName,
    /// The scope asked for, e.g. `https://outlook.office365.com/.default` (Microsoft 365) or
    /// `https://mail.google.com/` (Google).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub scope: Option<String>,
    /// The mailbox to authenticate as, e.g. `relay@example.com`.
    #[schemars(length(min = 1, max = 254))]
    pub user: String,
}

/// The Secret key that holds an OAuth2 client secret.
pub const OAUTH2_SECRET_KEY: &str = "clientSecret";

/// DKIM signing for one domain.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DkimSigning {
    /// The signing domain (`d=`), e.g. `example.com`: mail whose From header is at this domain
    /// or one of its subdomains is signed for it.
    pub domain: DomainName,
    /// The keys: each signs every such message. One key; two during a rotation (publish the
    /// new selector, add its key, remove the old one later), or an RSA and an Ed25519 key
    /// side by side as RFC 8463 advises. `mailnode dkim-record KEYFILE --selector S --domain
    /// D` prints the DNS record to publish for a key.
    #[schemars(length(min = 1, max = 4))]
    pub keys: Vec<DkimKeyRef>,
    /// Names of the listeners whose mail is signed; empty: every listener's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub listeners: Vec<String>,
    /// Header fields to sign; must include From. Default: From, Reply-To, Subject, Date, To,
    /// Cc, Resent-Date, Resent-From, Resent-To, Resent-Cc, In-Reply-To, References,
    /// Message-ID, MIME-Version, Content-Type and Content-Transfer-Encoding (those present).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("size(self) == 0 || self.exists(h, h.lowerAscii() == 'from')").message("must include From (RFC 6376 section 5.4)"))]
    pub headers: Vec<HeaderField>,
}

/// One DKIM key of a domain.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DkimKeyRef {
    /// The selector (`s=`): the public key is published at `<selector>._domainkey.<domain>`.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?$')").message("must be a DNS label like mail2026"))]
    pub selector: String,
    /// Secret in the cluster's namespace holding the private key (PEM): RSA of 2048 to 4096
    /// bits or Ed25519, e.g. `kubectl create secret generic dkim-example-com
    /// --from-file=private.key=dkim.pem`.
    pub secret_name: SecretName,
    /// The key in the Secret that holds the PEM. Default `private.key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[-._a-zA-Z0-9]+$')").message("must be a Secret data key: letters, digits, '-', '_' and '.'"))]
    pub key: Option<String>,
}

/// The Secret key that holds a DKIM private key by default.
pub const DKIM_SECRET_KEY: &str = "private.key";

/// How much one destination (a route, or a recipient domain delivered by MX) is sent.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DestinationLimits {
    /// Connections open at once to the destination, per member (Microsoft 365 and Google
    /// refuse more than a few per sender); more deliveries wait for one. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub connections: Option<i32>,
    /// Messages sent over one connection before it is closed and a new one opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub messages_per_connection: Option<i32>,
    /// Messages per minute; more wait for a later attempt (deferred, not refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub messages_per_minute: Option<i32>,
}

/// The sender of TLS reports.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsReports {
    /// The organization the reports come from (their `organization-name`), e.g. the
    /// company's name.
    #[schemars(length(min = 1, max = 200))]
    pub organization_name: String,
    /// The From address of reports sent by mail (their envelope sender is empty, so that
    /// nothing bounces back), e.g. `tlsrpt-noreply@example.com`.
    pub from: MailAddress,
    /// Where receivers can write about the reports (their `contact-info`), e.g.
    /// `postmaster@example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<MailAddress>,
}

/// STARTTLS towards next hops.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTls {
    /// `Opportunistic` (the default: STARTTLS when the next hop offers it, its certificate
    /// not checked), `Required` (STARTTLS with a certificate valid for the next hop's name,
    /// otherwise the mail waits and is retried), `None`, `MtaSts` (delivery by MX: the
    /// recipient domain's MTA-STS policy, RFC 8461) or `Dane` (DNSSEC-signed TLSA records,
    /// RFC 7672, where the next hop has them, else MTA-STS for delivery by MX). `Dane` is
    /// the strongest choice for mail to the internet; it needs a DNSSEC-validating view of
    /// DNS, which the members do themselves.
    #[serde(default)]
    pub mode: OutboundTlsMode,
}

/// STARTTLS mode towards next hops.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutboundTlsMode {
    /// STARTTLS when offered, certificate not checked.
    #[default]
    Opportunistic,
    /// STARTTLS with a valid certificate for the next hop's name, or no delivery.
    Required,
    /// No STARTTLS.
    None,
    /// For delivery by MX: under the recipient domain's MTA-STS policy in `enforce` mode,
    /// only the MX hosts it lists, over TLS with a valid certificate, or the mail waits; in
    /// `testing` mode or without a policy, as `Opportunistic`. Routes with smarthosts that
    /// inherit it use `Opportunistic`.
    MtaSts,
    /// Where the next hop's TLSA records are DNSSEC-signed (and, for delivery by MX, the MX
    /// records too): TLS with a certificate they match, or the mail waits, also when DNSSEC
    /// validation fails. Otherwise as `MtaSts`.
    Dane,
}

/// A next-hop SMTP server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Smarthost {
    /// Host name or IP address of the next hop.
    pub host: HostName,
    /// TCP port of the next hop (default 25).
    #[serde(default = "default_smtp_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Lower is tried first; hosts of equal priority share the load (default 0).
    #[serde(default)]
    #[schemars(range(min = 0, max = 65535))]
    pub priority: i32,
}

fn default_smtp_port() -> i32 {
    25
}

/// Direct delivery to the recipient domain's MX hosts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MxDelivery {
    /// TCP port used on MX hosts (default 25; other values only for testing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// Next hops for one recipient domain.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!(has(self.authSecret) && has(self.oauth2))").message("set authSecret or oauth2, not both"),
    validation = Rule::new("!(has(self.tls) && self.tls.mode == 'MtaSts')").message("tls.mode MtaSts applies to delivery by MX; towards smarthosts use Required or Dane")
)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Recipient domain this route applies to (exact match), e.g. `partner.example`.
    pub domain: DomainName,
    /// Next hops for this domain, tried in ascending priority.
    #[schemars(length(min = 1, max = 16))]
    pub smarthosts: Vec<Smarthost>,
    /// STARTTLS towards these next hops; default: `delivery.tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<OutboundTls>,
    /// SMTP AUTH credentials for these next hops, as `delivery.authSecret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret: Option<SecretName>,
    /// SMTP AUTH for these next hops with an OAuth2 token, as `delivery.oauth2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Auth>,
    /// How much these next hops are sent; default: `delivery.limits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<DestinationLimits>,
}

/// Retry schedule of deferred messages. Durations are a number with a unit s, m, h or d, e.g.
/// `90s`, `1m`, `1h`, `5d`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("(has(self.first) ? int(self.first.substring(0, size(self.first) - 1)) * {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}[self.first.substring(size(self.first) - 1)] : 60) <= (has(self.max) ? int(self.max.substring(0, size(self.max) - 1)) * {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}[self.max.substring(size(self.max) - 1)] : 3600) && (has(self.max) ? int(self.max.substring(0, size(self.max) - 1)) * {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}[self.max.substring(size(self.max) - 1)] : 3600) <= (has(self.lifetime) ? int(self.lifetime.substring(0, size(self.lifetime) - 1)) * {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}[self.lifetime.substring(size(self.lifetime) - 1)] : 432000)").message("first must be at most max, and max at most lifetime (defaults 1m, 1h and 5d)")
)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// Delay before the first retry (default 1m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<TimeSpan>,
    /// Longest delay between retries; delays double up to it (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<TimeSpan>,
    /// How long a message is retried before it is bounced to the sender (default 5d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<TimeSpan>,
}

/// The queue volume of each member.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Size of each member's queue volume, e.g. `10Gi` (default). Accepted mail is written to
    /// it before it is acknowledged.
    #[serde(default = "default_storage_size")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("must be a positive quantity like 10Gi"))]
    pub size: String,
    /// StorageClass of the queue volumes; empty uses the cluster default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
    /// What happens to the queue volume of a removed member (after a scale-down) once its pod
    /// is gone: `Drain` (the default) runs a Job that hands the mail left on the volume to
    /// the remaining members and deletes the volume after the Job succeeded; `Retain` keeps
    /// the volume untouched.
    #[serde(default)]
    pub orphaned_volume_policy: OrphanedVolumePolicy,
}

/// What happens to the queue volume of a removed member.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OrphanedVolumePolicy {
    /// Hand the queued mail to the members with a Job, then delete the volume.
    #[default]
    Drain,
    /// Keep the volume.
    Retain,
}

fn default_storage_size() -> String {
    "10Gi".to_string()
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
            orphaned_volume_policy: OrphanedVolumePolicy::default(),
        }
    }
}

/// DNS records published with external-dns.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Dns {
    /// Publish the records (default true). Needs external-dns with the DNSEndpoint (crd)
    /// source in the cluster.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// TTL of the records in seconds (default 300).
    #[serde(default = "default_ttl")]
    #[schemars(range(min = 1, max = 86400))]
    pub ttl: i64,
    /// MX records pointing at `hostname`, one per domain, e.g. a fallback MX with priority 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["domain".into()]))]
    pub mx: Vec<MxRecord>,
}

fn default_true() -> bool {
    true
}

fn default_ttl() -> i64 {
    300
}

impl Default for Dns {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl: default_ttl(),
            mx: Vec::new(),
        }
    }
}

/// An MX record `domain. MX priority hostname.`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MxRecord {
    /// The mail domain, e.g. `example.com`.
    pub domain: DomainName,
    /// MX preference: lower is tried first by senders (0-65535).
    #[schemars(range(min = 0, max = 65535))]
    pub priority: i32,
}

/// The certificate every member presents.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.secretName) != has(self.issuerRef)").message("set exactly one of secretName and issuerRef"))]
#[serde(rename_all = "camelCase")]
pub struct ClusterTls {
    /// Name of an existing Secret of type kubernetes.io/tls in the same namespace, with a
    /// certificate for `hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// A cert-manager issuer; the operator creates a Certificate for `hostname` and the
    /// members use the Secret cert-manager writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
}

/// Reference to a cert-manager Issuer or ClusterIssuer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Name of the issuer.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `Issuer` (same namespace, default) or `ClusterIssuer`.
    #[serde(default)]
    pub kind: IssuerKind,
    /// API group of the issuer (default cert-manager.io).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub group: Option<String>,
}

/// Kind of a cert-manager issuer.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IssuerKind {
    /// A namespaced Issuer.
    #[default]
    Issuer,
    /// A ClusterIssuer.
    ClusterIssuer,
}

/// SMTP AUTH users.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Auth {
    /// Secret in the same namespace whose key `users` holds one `name:hash` line per user
    /// (bcrypt or argon2 hashes, as `htpasswd -B` writes them).
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// Placement of members.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    /// Members run only on nodes with these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the members tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod affinity rules of the members, added to the spreading below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How members are spread over nodes: `Preferred` (default: spread when possible),
    /// `Required` (never two members on one node) or `Disabled`.
    #[serde(default)]
    pub spread: Spread,
}

/// Spreading of members over nodes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Spread {
    /// Spread over nodes when the scheduler can (ScheduleAnyway).
    #[default]
    Preferred,
    /// Never two members on one node (DoNotSchedule).
    Required,
    /// No spreading.
    Disabled,
}

/// Limits every member applies to its SMTP clients.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// SMTP sessions a member serves at once; more get `421` (try again later). Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_sessions: Option<i32>,
    /// Sessions one client address may hold open on a member; more get `421 4.7.0`. Clients
    /// that a listener lets relay by source address (`relay.allowedSources`) are exempt.
    /// 0 means no limit. Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub max_sessions_per_client: Option<i32>,
    /// Bytes of message content a member holds in memory, over all sessions, from the first
    /// byte received until the message is queued. Each session keeps at most 256 KiB of its
    /// message in memory and writes the rest to the message's queue file as it arrives; when
    /// this budget is spent, sessions write their content to disk at once. Messages are never
    /// refused for it; it bounds memory. Keep it under half the container's memory limit
    /// (buffers grow by doubling). Default 268435456 (256 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 68719476736_i64))]
    pub max_in_flight_bytes: Option<i64>,
}

/// The PodDisruptionBudget of the members.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudget {
    /// Members a voluntary disruption may take down at once (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_unavailable: Option<i32>,
}

/// Observed state of a MailCluster.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MailClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (every member ready and serving), `Progressing` (a rollout or scale is under
    /// way) and `Degraded` (something needs a person); reason and message say what to do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Members that are ready.
    #[serde(default)]
    pub ready_members: i32,
    /// `ready/desired`, e.g. `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_ready: Option<String>,
    /// Load balancer addresses of the exposed listeners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// DNS records published through external-dns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_records: Vec<DnsRecordStatus>,
    /// One row per member.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// Hash of the node configuration members should run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Queue volumes of removed members and what is being done with them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphaned_volumes: Vec<OrphanedVolumeStatus>,
    /// Settings that work but deserve a second look, e.g. relaying allowed from public
    /// addresses. Each names the field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A published DNS record.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DnsRecordStatus {
    /// Record name.
    pub name: String,
    /// Record type (A, AAAA or MX).
    #[serde(rename = "type")]
    pub record_type: String,
    /// Record values.
    pub targets: Vec<String>,
}

/// One member of the cluster.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Pod name.
    pub pod: String,
    /// Pod IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Node the pod runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Whether the pod is ready.
    pub ready: bool,
    /// Image of the relay container in the member's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Version of mailnode the member runs, as it reports it (its `/status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Whether the member runs the current configuration.
    pub config_in_sync: bool,
    /// Hash of the configuration the member loaded (its `/status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// When the member loaded its configuration (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_loaded_at: Option<String>,
    /// Messages in the member's queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<i64>,
    /// Age of the oldest queued message in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_message_age_seconds: Option<i64>,
    /// Peers this member reached over the peer channel at its last probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers_reachable: Option<i32>,
    /// Why the member's `/status` could not be read, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_error: Option<String>,
}

/// A queue volume of a removed member.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OrphanedVolumeStatus {
    /// The PersistentVolumeClaim.
    pub claim: String,
    /// The drain Job, if one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// What is happening to it: `Draining` (a Job hands the mail on it to the members),
    /// `Failed` (that Job failed; the volume is kept, delete the Job to retry), `Drained` (the
    /// volume is being deleted) or `Retained` (kept: `storage.orphanedVolumePolicy: Retain`).
    pub phase: VolumePhase,
}

/// What happens to a removed member's queue volume.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumePhase {
    /// A Job hands the mail on it to the members.
    Draining,
    /// The drain Job failed; the volume is kept. Delete the Job to retry.
    Failed,
    /// The mail was handed over; the volume is being deleted.
    Drained,
    /// Kept as it is (`storage.orphanedVolumePolicy: Retain`).
    Retained,
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident, $schema_name:literal, $max:literal, $rule:literal, $message:literal) => {
        $(#[$doc])*
        #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                $schema_name.into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "minLength": 1,
                    "maxLength": $max,
                    "x-kubernetes-validations": [{"rule": $rule, "message": $message}]
                })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }

        impl $name {
            /// The value as written in the manifest.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// An IPv4 or IPv6 network in CIDR notation, e.g. `10.20.0.0/16`.
    Cidr,
    "Cidr",
    43,
    "isCIDR(self)",
    "must be a CIDR like 10.20.0.0/16 or fd00::/8"
);
string_newtype!(
    /// A mail domain, e.g. `example.com`.
    DomainName,
    "DomainName",
    253,
    "self.matches('^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\\\\.)+[a-z]([-a-z0-9]{0,61}[a-z0-9])?$')",
    "must be a lowercase DNS domain like example.com"
);
string_newtype!(
    /// A sender to rewrite: `user@host`, `@host` or `*`.
    SenderPattern,
    "SenderPattern",
    254,
    "self == '*' || self.matches('^[-A-Za-z0-9._+=!#$%&*/?^{|}~]*@([A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?\\\\.)*[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?$')",
    "must be user@host, @host or * (any sender)"
);
string_newtype!(
    /// A new sender address: `user@domain`, or `@domain` to keep the local part.
    RewriteAddress,
    "RewriteAddress",
    254,
    "self.matches('^[-A-Za-z0-9._+=!#$%&*/?^{|}~]*@([A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?\\\\.)*[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?$')",
    "must be user@domain, or @domain to keep the local part"
);
string_newtype!(
    /// A mail address, `user@domain`.
    MailAddress,
    "MailAddress",
    254,
    "self.matches('^[-A-Za-z0-9._+=!#$%&*/?^{|}~]+@([A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?\\\\.)*[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?$')",
    "must be an address like tlsrpt-noreply@example.com"
);
string_newtype!(
    /// A header field name, e.g. `Subject`.
    HeaderField,
    "HeaderField",
    76,
    "self.matches('^[!-9;-~]+$')",
    "must be a header field name like Subject"
);
string_newtype!(
    /// A host name or IP address.
    HostName,
    "HostName",
    253,
    "isIP(self) || self.matches('^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)(\\\\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$')",
    "must be a lowercase host name like mx.example.com or an IP address"
);
string_newtype!(
    /// The name of a Secret in the cluster's namespace.
    SecretName,
    "SecretName",
    253,
    "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')",
    "must be a Secret name: lowercase letters, digits, '-' and '.'"
);

string_newtype!(
    /// A duration: a number and a unit s, m, h or d, e.g. `90s`, `5d`.
    TimeSpan,
    "TimeSpan",
    16,
    "self.matches('^[0-9]{1,9}[smhd]$')",
    "must be a number with a unit s, m, h or d, like 90s, 1m, 1h or 5d"
);

impl TimeSpan {
    /// The duration in seconds.
    pub fn seconds(&self) -> Option<u64> {
        let s = self.0.as_str();
        let (num, unit) = s.split_at(s.len().checked_sub(1)?);
        let n: u64 = num.parse().ok()?;
        let factor = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return None,
        };
        n.checked_mul(factor)
    }
}

impl MailClusterSpec {
    /// Maximum number of unavailable members for the disruption budget.
    pub fn max_unavailable(&self) -> i32 {
        self.disruption_budget
            .as_ref()
            .and_then(|d| d.max_unavailable)
            .unwrap_or(1)
    }

    /// DNS settings, defaults when absent.
    pub fn dns_or_default(&self) -> Dns {
        self.dns.clone().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;
    use serde_json::json;

    fn sample() -> serde_json::Value {
        json!({
            "apiVersion": "mailcluster.dev/v1alpha1",
            "kind": "MailCluster",
            "metadata": {"name": "relay", "namespace": "mail"},
            "spec": {
                "hostname": "smtp.example.com",
                "replicas": 3,
                "listeners": [
                    {"name": "devices", "port": 25,
                     "relay": {"allowedSources": ["10.20.0.0/16"], "recipientDomains": ["example.com"]}},
                    {"name": "apps", "port": 587, "tls": {"mode": "StartTLS", "required": true},
                     "relay": {"allowedSources": ["10.30.0.0/16"], "requireAuth": true}},
                    {"name": "inbound-mx", "port": 2525, "acceptDomains": ["example.com"]}
                ],
                "delivery": {
                    "smarthosts": [{"host": "exchange.example.internal", "port": 25, "priority": 10}],
                    "retry": {"first": "1m", "max": "1h", "lifetime": "5d"}
                },
                "storage": {"size": "10Gi"},
                "dns": {"ttl": 300, "mx": [{"domain": "example.com", "priority": 20}]},
                "tls": {"secretName": "smtp-example-com"},
                "auth": {"secretName": "smtp-users"}
            }
        })
    }

    fn check(v: &serde_json::Value) -> Result<(), String> {
        let mc: MailCluster = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        kube::core::cel::validate_cel(&mc).map_err(|e| format!("{e:?}"))
    }

    fn with(
        mut v: serde_json::Value,
        pointer: &str,
        value: serde_json::Value,
    ) -> serde_json::Value {
        if let Some(slot) = v.pointer_mut(pointer) {
            *slot = value;
        } else {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            v.pointer_mut(parent).unwrap()[key] = value;
        }
        v
    }

    #[test]
    fn committed_crd_matches_the_types() {
        let generated = crate::crd_yaml().unwrap();
        let committed = include_str!("../../crds/mailcluster.dev_mailclusters.yaml");
        assert!(
            generated == committed,
            "crds/mailcluster.dev_mailclusters.yaml is stale: run `cargo run -p mailcluster-operator -- crd > crds/mailcluster.dev_mailclusters.yaml`"
        );
    }

    #[test]
    fn crd_names_and_columns() {
        let crd = MailCluster::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("mailclusters.mailcluster.dev")
        );
        assert_eq!(crd.spec.names.short_names, Some(vec!["mc".to_string()]));
        let v = &crd.spec.versions[0];
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["Ready", "Members", "Hostname", "Addresses", "Age"]);
    }

    #[test]
    fn every_spec_field_has_a_description() {
        fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
                for (k, child) in props {
                    let p = format!("{path}.{k}");
                    if child.get("description").is_none() {
                        missing.push(p.clone());
                    }
                    walk(&p, child, missing);
                }
            }
            if let Some(items) = v.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
        }
        let crd = serde_json::to_value(MailCluster::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let mut missing = Vec::new();
        walk("spec", spec, &mut missing);
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:?}"
        );
    }

    #[test]
    fn sample_is_valid() {
        check(&sample()).unwrap();
        let mc: MailCluster = serde_json::from_value(sample()).unwrap();
        assert_eq!(mc.spec.listeners.len(), 3);
        assert_eq!(mc.spec.listeners[0].exposure, Exposure::LoadBalancer);
    }

    #[test]
    fn cel_rules_refuse_what_users_get_wrong() {
        let cases = [
            (
                "/spec/listeners/1/port",
                json!(25),
                "listener ports must be unique",
            ),
            (
                "/spec/listeners/0/relay/allowedSources",
                json!(["10.0.0.0/33"]),
                "CIDR",
            ),
            ("/spec/delivery/mx", json!({}), "mutually exclusive"),
            ("/spec/hostname", json!("Not A Host"), "fully qualified"),
            ("/spec/listeners/0/port", json!(8025), "reserved"),
            (
                "/spec/tls",
                json!({"secretName": "a", "issuerRef": {"name": "x"}}),
                "exactly one",
            ),
            ("/spec/delivery/retry/first", json!("5 minutes"), "unit"),
            ("/spec/storage/size", json!("ten gigs"), "quantity"),
            ("/spec/listeners/0/name", json!("Devices"), "lowercase"),
            ("/spec/listeners/0/name", json!("peers"), "reserved"),
            ("/metadata/name", json!("a".repeat(41)), "at most 40"),
        ];
        for (pointer, value, needle) in cases {
            let bad = with(sample(), pointer, value.clone());
            let err = check(&bad).expect_err(&format!("{pointer}={value} must be refused"));
            assert!(err.contains(needle), "{pointer}: {err}");
        }
    }

    #[test]
    fn cross_field_rules() {
        let mut v = sample();
        v["spec"].as_object_mut().unwrap().remove("tls");
        let err = check(&v).unwrap_err();
        assert!(err.contains("set spec.tls"), "{err}");

        let mut v = sample();
        v["spec"].as_object_mut().unwrap().remove("auth");
        let err = check(&v).unwrap_err();
        assert!(err.contains("spec.auth"), "{err}");

        let v = with(
            sample(),
            "/spec/listeners/0/trustedProxies",
            json!(["10.0.0.0/8"]),
        );
        let err = check(&v).unwrap_err();
        assert!(err.contains("proxyProtocol"), "{err}");
        let v = with(v, "/spec/listeners/0/proxyProtocol", json!(true));
        check(&v).unwrap();
        let v = with(v, "/spec/listeners/0/trustedProxies", json!([]));
        assert!(check(&v).unwrap_err().contains("needs trustedProxies"));

        let v = with(sample(), "/spec/listeners/0/exposure", json!("ClusterIP"));
        let v = with(
            v,
            "/spec/listeners/0/loadBalancerSourceRanges",
            json!(["10.0.0.0/8"]),
        );
        assert!(check(&v).unwrap_err().contains("needs exposure"));

        let v = with(
            sample(),
            "/spec/disruptionBudget",
            json!({"maxUnavailable": 4}),
        );
        assert!(check(&v).unwrap_err().contains("maxUnavailable"));
    }

    #[test]
    fn retry_durations() {
        assert_eq!(TimeSpan::from("90s").seconds(), Some(90));
        assert_eq!(TimeSpan::from("5d").seconds(), Some(432_000));
        assert_eq!(TimeSpan::from("1h").seconds(), Some(3600));
        assert_eq!(TimeSpan::from("h").seconds(), None);
        assert_eq!(TimeSpan::from("").seconds(), None);
    }

    #[test]
    fn reserved_ports_in_rule_match_constants() {
        let crd = serde_json::to_string(&MailCluster::crd()).unwrap();
        assert!(crd.contains(&format!(
            "self.port != {ADMIN_PORT} && self.port != {PEER_PORT}"
        )));
    }
}
