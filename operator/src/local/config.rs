//! A member's node configuration: the operator's rendering of the manifest with what differs on
//! one machine changed (addresses, queue, peers, files, delivery to the sink).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use mailnode_api::config as node;

use crate::builders::{BuildError, configmap};
use crate::crd::MailCluster;

use super::{LocalError, MemberLayout, SharedFiles};

/// What `localize` changed that a person should know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adjustments {
    /// Listeners whose allowed sources got loopback added.
    pub loopback_added: Vec<String>,
}

/// The loopback network that may relay and use the peer channel locally.
fn loopback_net() -> ipnet::IpNet {
    ipnet::IpNet::V4(ipnet::Ipv4Net::new_assert(
        Ipv4Addr::LOCALHOST.to_bits().into(),
        8,
    ))
    .trunc()
}

fn has_loopback(nets: &[ipnet::IpNet]) -> bool {
    nets.iter()
        .any(|n| n.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)))
}

/// The configuration of member `index`: the operator's rendering of `mc` with the local
/// differences. `sink` is the SMTP sink that replaces the manifest's delivery, if any.
pub fn localize(
    mc: &MailCluster,
    members: &[MemberLayout],
    index: usize,
    files: &SharedFiles,
    sink: Option<SocketAddr>,
) -> Result<(node::Config, Adjustments), LocalError> {
    let distinct_ips = members.iter().map(|m| m.ip).collect::<HashSet<_>>().len() == members.len();
    // Member addresses are "self" (never a next hop), as the load balancer addresses are in
    // the cluster. With one shared address the exact listener sockets say it instead.
    let self_ips: Vec<IpAddr> = if distinct_ips {
        members.iter().map(|m| m.ip).collect()
    } else {
        Vec::new()
    };
    let mut c = configmap::node_config(mc, &self_ips)?;
    let me = members
        .get(index)
        .ok_or_else(|| LocalError::Unsupported(format!("no member {index}")))?;
    let mut adj = Adjustments::default();
    for l in &mut c.listeners {
        let addr = me.listener(&l.name).ok_or_else(|| {
            LocalError::Unsupported(format!("listener {} has no local port", l.name))
        })?;
        l.address = addr;
        if !l.relay.allowed_sources.is_empty() && !has_loopback(&l.relay.allowed_sources) {
            l.relay.allowed_sources.push(loopback_net());
            adj.loopback_added.push(l.name.clone());
        }
    }
    c.queue.path = me.dir.join("queue");
    // No balancer or kube-proxy in front of local members to wait for on shutdown.
    c.limits.shutdown_delay_seconds = 0;
    // Local members share the machine's file system: sync their own files, not all of it.
    c.queue.sync_filesystem = false;
    c.admin.address = me.admin();
    c.peers.address = Some(me.peer());
    c.peers.members = members
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != index)
        .map(|(_, m)| m.peer().to_string())
        .collect();
    c.peers.secret_file = Some(files.cluster_key.clone());
    // Members connect from 127.0.0.1 whatever address they listen on.
    c.peers.allowed_sources = vec![loopback_net()];
    if let Some(tls) = &mut c.tls
        && let Some((cert, key)) = &files.tls
    {
        tls.cert_file = cert.clone();
        tls.key_file = key.clone();
    }
    if let Some(auth) = &mut c.auth
        && let Some(users) = &files.users
    {
        auth.users_file = users.clone();
    }
    if let Some(sink) = sink {
        c.delivery.smarthosts = vec![node::Smarthost {
            host: sink.ip().to_string(),
            port: sink.port(),
            priority: 0,
        }];
        c.delivery.routes.clear();
    }
    c.validate().map_err(BuildError::from)?;
    Ok((c, adj))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::builders::testing::sample;
    use crate::local::files::testing::files;
    use crate::local::layout::testing::members;

    #[test]
    fn localize_changes_only_the_local_parts() {
        let mc = sample();
        let ms = members(3, true);
        let sink: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let (c, adj) = localize(&mc, &ms, 1, &files(), Some(sink)).unwrap();
        let base = configmap::node_config(&mc, &[]).unwrap();
        assert_eq!(c.hostname, base.hostname);
        assert_eq!(c.listeners.len(), base.listeners.len());
        assert_eq!(c.listeners[0].address, "127.0.0.11:10025".parse().unwrap());
        assert_eq!(c.listeners[2].address, "127.0.0.11:2525".parse().unwrap());
        assert_eq!(c.listeners[0].relay.recipient_domains, ["example.com"]);
        assert!(has_loopback(&c.listeners[0].relay.allowed_sources));
        assert!(
            c.listeners[2].relay.allowed_sources.is_empty(),
            "a listener that lets nobody relay stays so"
        );
        assert_eq!(adj.loopback_added, ["devices", "apps"]);
        assert_eq!(c.admin.address, "127.0.0.11:8025".parse().unwrap());
        assert_eq!(c.peers.members, ["127.0.0.10:7025", "127.0.0.12:7025"]);
        assert_eq!(c.peers.address, Some("127.0.0.11:7025".parse().unwrap()));
        assert_eq!(c.peers.self_addresses.len(), 3);
        assert_eq!(c.queue.path, PathBuf::from("/state/members/relay-1/queue"));
        assert_eq!(c.delivery.smarthosts.len(), 1);
        assert_eq!(c.delivery.smarthosts[0].port, 40000);
        assert_eq!(c.delivery.retry, base.delivery.retry);
        assert_eq!(
            c.tls.as_ref().unwrap().cert_file,
            PathBuf::from("/state/tls/tls.crt")
        );
        assert_eq!(
            c.auth.as_ref().unwrap().users_file,
            PathBuf::from("/state/auth/users")
        );
        // What mailnode reads is what was built.
        let back = node::Config::from_yaml(&c.to_yaml().unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn without_sink_the_manifest_delivery_stays() {
        let mc = sample();
        let (c, _) = localize(&mc, &members(2, true), 0, &files(), None).unwrap();
        assert_eq!(c.delivery.smarthosts[0].host, "exchange.example.internal");
    }

    #[test]
    fn one_address_for_all_members_is_not_self() {
        let mc = sample();
        let sink: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let (c, _) = localize(&mc, &members(2, false), 1, &files(), Some(sink)).unwrap();
        assert!(
            c.peers.self_addresses.is_empty(),
            "127.0.0.1 must stay a valid next hop (the sink)"
        );
        assert_eq!(c.peers.members, ["127.0.0.1:7025"]);
    }
}
