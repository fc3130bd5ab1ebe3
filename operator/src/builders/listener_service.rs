//! One Service per exposed listener. `LoadBalancer` listeners use
//! `externalTrafficPolicy: Local`, so members see the client's real source address (relay
//! permission depends on it), and carry the listener's `loadBalancerSourceRanges`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{BuildError, LISTENER_ANNOTATION, Names, meta, selector_labels};
use crate::crd::{Exposure, Listener, MailCluster};

/// Component label value of listener Services.
pub const COMPONENT: &str = "listener";

fn service(mc: &MailCluster, names: &Names, l: &Listener) -> Option<Service> {
    let (type_, etp, ranges) = match l.exposure {
        Exposure::None => return None,
        Exposure::ClusterIP => ("ClusterIP", None, None),
        Exposure::LoadBalancer => (
            "LoadBalancer",
            Some("Local".to_string()),
            (!l.load_balancer_source_ranges.is_empty()).then(|| {
                l.load_balancer_source_ranges
                    .iter()
                    .map(|c| c.0.clone())
                    .collect()
            }),
        ),
    };
    let mut metadata = meta(mc, names, names.listener_service(&l.name), COMPONENT);
    metadata.annotations = Some(BTreeMap::from([(
        LISTENER_ANNOTATION.to_string(),
        l.name.clone(),
    )]));
    Some(Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(type_.to_string()),
            external_traffic_policy: etp,
            load_balancer_source_ranges: ranges,
            selector: Some(selector_labels(names)),
            ports: Some(vec![ServicePort {
                name: Some(l.name.clone()),
                port: l.port,
                target_port: Some(IntOrString::String(l.name.clone())),
                protocol: Some("TCP".to_string()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// The Services of every exposed listener, in listener order.
pub fn listener_services(mc: &MailCluster) -> Result<Vec<Service>, BuildError> {
    let names = Names::of(mc)?;
    Ok(mc
        .spec
        .listeners
        .iter()
        .filter_map(|l| service(mc, &names, l))
        .collect())
}

/// Load balancer ingress addresses (IPs or host names) of the LoadBalancer Services, sorted and
/// without duplicates.
pub fn ingress_addresses(services: &[Service]) -> Vec<String> {
    let mut out: Vec<String> = services
        .iter()
        .filter(|s| s.spec.as_ref().and_then(|sp| sp.type_.as_deref()) == Some("LoadBalancer"))
        .filter_map(|s| s.status.as_ref()?.load_balancer.as_ref()?.ingress.as_ref())
        .flatten()
        .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};

    #[test]
    fn one_service_per_exposed_listener() {
        let mut mc = sample();
        mc.spec.listeners[2].exposure = Exposure::None;
        let svcs = listener_services(&mc).unwrap();
        let names: Vec<_> = svcs
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["relay-devices", "relay-apps"]);
    }

    #[test]
    fn load_balancers_keep_the_source_address() {
        let svcs = listener_services(&sample()).unwrap();
        let apps = svcs[1].spec.as_ref().unwrap();
        assert_eq!(apps.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(apps.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(
            apps.load_balancer_source_ranges,
            Some(vec!["10.30.0.0/16".to_string()])
        );
        let ports = apps.ports.as_ref().unwrap();
        assert_eq!(ports[0].port, 587);
        assert_eq!(ports[0].name.as_deref(), Some("apps"));
        let devices = svcs[0].spec.as_ref().unwrap();
        assert_eq!(devices.load_balancer_source_ranges, None);
        let inbound = svcs[2].spec.as_ref().unwrap();
        assert_eq!(inbound.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(inbound.external_traffic_policy, None);
    }

    #[test]
    fn addresses_from_load_balancer_status() {
        let mut svcs = listener_services(&sample()).unwrap();
        let ing = |ip: &str| LoadBalancerIngress {
            ip: Some(ip.into()),
            ..Default::default()
        };
        svcs[0].status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![ing("192.0.2.2"), ing("192.0.2.1")]),
            }),
            ..Default::default()
        });
        svcs[1].status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![ing("192.0.2.1")]),
            }),
            ..Default::default()
        });
        // A ClusterIP service never contributes.
        svcs[2].status = svcs[1].status.clone().map(|mut s| {
            s.load_balancer.as_mut().unwrap().ingress = Some(vec![ing("198.51.100.9")]);
            s
        });
        assert_eq!(ingress_addresses(&svcs), ["192.0.2.1", "192.0.2.2"]);
    }
}
