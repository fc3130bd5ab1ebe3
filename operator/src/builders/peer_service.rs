//! The headless peer Service: stable member names `NAME-0.NAME-peers.NAMESPACE.svc` and peer
//! discovery (its DNS name resolves to every member, ready or not).

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{BuildError, Names, meta, selector_labels};
use crate::crd::{MailCluster, PEER_PORT};

/// Name of the peer port on Services and containers.
pub const PEER_PORT_NAME: &str = "peer";

/// The headless peer Service.
pub fn peer_service(mc: &MailCluster) -> Result<Service, BuildError> {
    let names = Names::of(mc)?;
    Ok(Service {
        metadata: meta(mc, &names, names.peer_service(), "peers"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&names)),
            ports: Some(vec![ServicePort {
                name: Some(PEER_PORT_NAME.to_string()),
                port: PEER_PORT,
                target_port: Some(IntOrString::String(PEER_PORT_NAME.to_string())),
                protocol: Some("TCP".to_string()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;

    #[test]
    fn headless_and_publishes_not_ready_members() {
        let s = peer_service(&sample()).unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("relay-peers"));
        let spec = s.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.ports.unwrap()[0].port, PEER_PORT);
        assert_eq!(
            spec.selector.unwrap()["app.kubernetes.io/instance"],
            "relay"
        );
    }
}
