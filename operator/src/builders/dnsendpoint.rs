//! external-dns `DNSEndpoint` (externaldns.k8s.io/v1alpha1): A/AAAA records of the cluster
//! hostname with every load balancer address (resolvers rotate them: round robin) and MX records
//! of the accepted domains. Built only once addresses exist.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{BuildError, Names, meta};
use crate::crd::{DnsRecordStatus, MailCluster};

/// Component label of the DNSEndpoint.
pub const COMPONENT: &str = "dns";

/// Spec of an external-dns DNSEndpoint.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "externaldns.k8s.io",
    version = "v1alpha1",
    kind = "DNSEndpoint",
    plural = "dnsendpoints",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct DNSEndpointSpec {
    /// The records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
}

/// One DNS record set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Record name.
    pub dns_name: String,
    /// Record values.
    pub targets: Vec<String>,
    pub record_type: String,
    /// TTL in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "recordTTL")]
    pub record_ttl: Option<i64>,
    /// Provider labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The records of a cluster whose load balancers have `addresses`. Host-name addresses (as
/// some clouds give) cannot be A records and are left out.
pub fn records(mc: &MailCluster, addresses: &[String]) -> Vec<DnsRecordStatus> {
    let dns = mc.spec.dns_or_default();
    if !dns.enabled {
        return Vec::new();
    }
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for a in addresses {
        match a.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => v4.push(a.clone()),
            Ok(IpAddr::V6(_)) => v6.push(a.clone()),
            Err(_) => {}
        }
    }
    if v4.is_empty() && v6.is_empty() {
        return Vec::new();
    }
    let host = mc.spec.hostname.clone();
    let mut out = Vec::new();
    if !v4.is_empty() {
        out.push(DnsRecordStatus {
            name: host.clone(),
            record_type: "A".into(),
            targets: v4,
        });
    }
    if !v6.is_empty() {
        out.push(DnsRecordStatus {
            name: host.clone(),
            record_type: "AAAA".into(),
            targets: v6,
        });
    }
    for mx in &dns.mx {
        out.push(DnsRecordStatus {
            name: mx.domain.0.clone(),
            record_type: "MX".into(),
            targets: vec![format!("{} {}", mx.priority, host)],
        });
    }
    out
}

/// The DNSEndpoint for the cluster, or `None` when DNS is disabled or no load balancer has an
/// address yet.
pub fn dns_endpoint(
    mc: &MailCluster,
    addresses: &[String],
) -> Result<Option<DNSEndpoint>, BuildError> {
    let names = Names::of(mc)?;
    let recs = records(mc, addresses);
    if recs.is_empty() {
        return Ok(None);
    }
    let ttl = mc.spec.dns_or_default().ttl;
    let endpoints = recs
        .into_iter()
        .map(|r| Endpoint {
            dns_name: r.name,
            targets: r.targets,
            record_type: r.record_type,
            record_ttl: Some(ttl),
            labels: BTreeMap::new(),
        })
        .collect();
    Ok(Some(DNSEndpoint {
        metadata: meta(mc, &names, names.statefulset(), COMPONENT),
        spec: DNSEndpointSpec { endpoints },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;

    #[test]
    fn nothing_before_addresses_exist() {
        assert!(dns_endpoint(&sample(), &[]).unwrap().is_none());
        assert!(
            dns_endpoint(&sample(), &["lb.example.net".into()])
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_records_for_every_address_and_mx_with_priority() {
        let addrs = vec![
            "192.0.2.1".to_string(),
            "192.0.2.2".into(),
            "2001:db8::1".into(),
        ];
        let d = dns_endpoint(&sample(), &addrs).unwrap().unwrap();
        assert_eq!(d.metadata.name.as_deref(), Some("relay"));
        let e = &d.spec.endpoints;
        assert_eq!(e[0].dns_name, "smtp.example.com");
        assert_eq!(e[0].record_type, "A");
        assert_eq!(e[0].targets, ["192.0.2.1", "192.0.2.2"]);
        assert_eq!(e[0].record_ttl, Some(300));
        assert_eq!(e[1].record_type, "AAAA");
        assert_eq!(e[2].dns_name, "example.com");
        assert_eq!(e[2].record_type, "MX");
        assert_eq!(e[2].targets, ["20 smtp.example.com"]);
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["apiVersion"], "externaldns.k8s.io/v1alpha1");
        assert_eq!(json["spec"]["endpoints"][0]["recordTTL"], 300);
    }

    #[test]
    fn disabled_dns_publishes_nothing() {
        let mut mc = sample();
        mc.spec.dns.as_mut().unwrap().enabled = false;
        assert!(dns_endpoint(&mc, &["192.0.2.1".into()]).unwrap().is_none());
    }
}
