//! The NetworkPolicy: the peer port is reachable only from members; listener ports and the
//! admin port (probes, metrics) stay open.

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{BuildError, Names, member_selector, meta};
use crate::crd::{ADMIN_PORT, MailCluster, PEER_PORT};

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_string()),
        ..NetworkPolicyPort::default()
    }
}

/// The NetworkPolicy of the members.
pub fn network_policy(mc: &MailCluster) -> Result<NetworkPolicy, BuildError> {
    let names = Names::of(mc)?;
    let mut open: Vec<NetworkPolicyPort> = mc.spec.listeners.iter().map(|l| tcp(l.port)).collect();
    open.push(tcp(ADMIN_PORT));
    Ok(NetworkPolicy {
        metadata: meta(mc, &names, names.network_policy(), "members"),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(member_selector(&names)),
            policy_types: Some(vec!["Ingress".to_string()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![
                        NetworkPolicyPeer {
                            pod_selector: Some(member_selector(&names)),
                            ..NetworkPolicyPeer::default()
                        },
                        // The drain Jobs of orphaned queue volumes hand their mail over.
                        NetworkPolicyPeer {
                            pod_selector: Some(super::drain_job::pod_selector(&names)),
                            ..NetworkPolicyPeer::default()
                        },
                    ]),
                    ports: Some(vec![tcp(PEER_PORT)]),
                },
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(open),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;

    #[test]
    fn peer_port_only_from_members() {
        let np = network_policy(&sample()).unwrap();
        let spec = np.spec.unwrap();
        let rules = spec.ingress.unwrap();
        let peer_rule = rules
            .iter()
            .find(|r| {
                r.ports
                    .as_ref()
                    .unwrap()
                    .iter()
                    .any(|p| p.port == Some(IntOrString::Int(PEER_PORT)))
            })
            .unwrap();
        assert_eq!(peer_rule.ports.as_ref().unwrap().len(), 1);
        let from = peer_rule.from.as_ref().unwrap();
        assert_eq!(from.len(), 2);
        assert_eq!(from[0].pod_selector, spec.pod_selector);
        assert_eq!(
            from[1]
                .pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()[crate::builders::COMPONENT_LABEL],
            "drain"
        );
        assert!(from[1].namespace_selector.is_none());
        assert!(from[0].namespace_selector.is_none() && from[0].ip_block.is_none());
        let open = rules.iter().find(|r| r.from.is_none()).unwrap();
        let ports: Vec<_> = open
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.port.clone())
            .collect();
        assert!(ports.contains(&Some(IntOrString::Int(25))));
        assert!(ports.contains(&Some(IntOrString::Int(ADMIN_PORT))));
        assert!(!ports.contains(&Some(IntOrString::Int(PEER_PORT))));
    }
}
