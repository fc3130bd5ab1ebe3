//! Pure builders: a `MailCluster` (and what the controller observed) in, Kubernetes objects out.
//!
//! Nothing here talks to the API server, so every object the operator creates can be unit-tested
//! and printed offline (`mailcluster-operator render`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::MailCluster;

pub mod certificate;
pub mod configmap;
pub mod dnsendpoint;
pub mod drain_job;
pub mod listener_service;
pub mod networkpolicy;
pub mod pdb;
pub mod peer_service;
pub mod secret;
pub mod statefulset;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "mailcluster-operator";
/// Label with the name of the MailCluster that owns an object.
pub const CLUSTER_LABEL: &str = "mailcluster.dev/cluster";
/// Label that says which part of the cluster an object is (`listener`, `peers`, ...).
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Pod template annotation with the hash of the node configuration; a change rolls the members.
pub const CONFIG_HASH_ANNOTATION: &str = "mailcluster.dev/config-hash";
/// Annotation on listener Services naming the listener.
pub const LISTENER_ANNOTATION: &str = "mailcluster.dev/listener";

/// Errors of the builders: the spec asks for something that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The MailCluster has no namespace (it is a namespaced kind, so only a hand-written file
    /// given to `render` can lack one).
    #[error("MailCluster {0} has no metadata.namespace; set one")]
    MissingNamespace(String),
    /// The MailCluster has no name.
    #[error("MailCluster has no metadata.name; set one")]
    MissingName,
    /// A value the schema should have refused (for objects that bypassed validation).
    #[error("{field}: {message}")]
    Invalid {
        /// The spec field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The rendered node configuration is refused by mailnode's own validation.
    #[error("the rendered node configuration is invalid: {0}")]
    NodeConfig(#[from] mailnode_api::config::ConfigError),
    /// The node configuration cannot be serialized.
    #[error("cannot serialize the node configuration: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// Names of the children of one MailCluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The MailCluster's name, also the StatefulSet's.
    pub cluster: String,
    /// Namespace of the MailCluster and all children.
    pub namespace: String,
}

impl Names {
    /// Names for a MailCluster; fails without name or namespace.
    pub fn of(mc: &MailCluster) -> Result<Self, BuildError> {
        let cluster = mc.metadata.name.clone().ok_or(BuildError::MissingName)?;
        let namespace = mc
            .metadata
            .namespace
            .clone()
            .ok_or_else(|| BuildError::MissingNamespace(cluster.clone()))?;
        Ok(Self { cluster, namespace })
    }
    /// Label selector of this cluster's objects of one component (`listener`, `tls`, `dns`,
    /// `drain`): what the reconcile prunes among.
    pub fn component_selector(&self, component: &str) -> String {
        format!(
            "{CLUSTER_LABEL}={},{COMPONENT_LABEL}={component}",
            self.cluster
        )
    }
    /// StatefulSet, PodDisruptionBudget and DNSEndpoint name.
    pub fn statefulset(&self) -> String {
        self.cluster.clone()
    }
    /// ConfigMap with the node configuration.
    pub fn config_map(&self) -> String {
        format!("{}-config", self.cluster)
    }
    /// Secret with the cluster key.
    pub fn cluster_secret(&self) -> String {
        format!("{}-cluster", self.cluster)
    }
    /// Headless peer Service.
    pub fn peer_service(&self) -> String {
        format!("{}-peers", self.cluster)
    }
    /// Service of one listener.
    pub fn listener_service(&self, listener: &str) -> String {
        format!("{}-{}", self.cluster, listener)
    }
    /// NetworkPolicy.
    pub fn network_policy(&self) -> String {
        self.cluster.clone()
    }
    /// Certificate requested from cert-manager, and the Secret it writes.
    pub fn certificate(&self) -> String {
        format!("{}-tls", self.cluster)
    }
    /// DNS name of the peer Service, which resolves to every member.
    pub fn peer_dns(&self) -> String {
        format!("{}.{}.svc", self.peer_service(), self.namespace)
    }
}

/// Labels that select the members of a cluster (StatefulSet selector, PDB, NetworkPolicy).
pub fn selector_labels(names: &Names) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "mailnode".to_string()),
        (
            "app.kubernetes.io/instance".to_string(),
            names.cluster.clone(),
        ),
    ])
}

/// Labels of every child: the selector labels plus cluster, component and manager.
pub fn labels(names: &Names, component: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(names);
    l.insert(
        "app.kubernetes.io/managed-by".to_string(),
        FIELD_MANAGER.to_string(),
    );
    l.insert(CLUSTER_LABEL.to_string(), names.cluster.clone());
    l.insert(COMPONENT_LABEL.to_string(), component.to_string());
    l
}

/// A label selector for the members.
pub fn member_selector(names: &Names) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector_labels(names)),
        ..LabelSelector::default()
    }
}

/// The owner reference children carry, when the MailCluster came from the API server (one read
/// from a file for `render` has no uid and gets none).
pub fn owner_refs(mc: &MailCluster) -> Option<Vec<OwnerReference>> {
    mc.controller_owner_ref(&()).map(|o| vec![o])
}

/// Metadata of a child.
pub fn meta(mc: &MailCluster, names: &Names, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.clone()),
        labels: Some(labels(names, component)),
        owner_references: owner_refs(mc),
        ..ObjectMeta::default()
    }
}

/// Image of the relay container: the spec's, or the operator's default.
pub fn image<'a>(mc: &'a MailCluster, default_image: &'a str) -> &'a str {
    mc.spec.image.as_deref().unwrap_or(default_image)
}

/// Short description of a MailCluster for messages.
pub fn describe(mc: &MailCluster) -> String {
    format!("{}/{}", mc.namespace().unwrap_or_default(), mc.name_any())
}

#[cfg(test)]
pub(crate) mod testing {
    use crate::crd::{MailCluster, MailClusterSpec};

    /// The design's example manifest, as read from the API server (with a uid).
    pub fn sample() -> MailCluster {
        let spec: MailClusterSpec = serde_yaml::from_str(
            r#"
hostname: smtp.example.com
replicas: 3
listeners:
  - name: devices
    port: 25
    relay: {allowedSources: [10.20.0.0/16], recipientDomains: [example.com]}
  - name: apps
    port: 587
    tls: {mode: StartTLS, required: true}
    relay: {allowedSources: [10.30.0.0/16], requireAuth: true}
    loadBalancerSourceRanges: [10.30.0.0/16]
  - name: inbound-mx
    port: 2525
    acceptDomains: [example.com]
    exposure: ClusterIP
delivery:
  smarthosts:
    - {host: exchange.example.internal, port: 25, priority: 10}
    - {host: exchange-dr.example.internal, port: 25, priority: 20}
  retry: {first: 1m, max: 1h, lifetime: 5d}
storage: {size: 10Gi}
dns: {ttl: 300, mx: [{domain: example.com, priority: 20}]}
tls: {secretName: smtp-example-com}
auth: {secretName: smtp-users}
"#,
        )
        .expect("sample spec parses");
        let mut mc = MailCluster::new("relay", spec);
        mc.metadata.namespace = Some("mail".into());
        mc.metadata.uid = Some("0b7c2d1e-1111-2222-3333-444455556666".into());
        mc.metadata.generation = Some(1);
        mc
    }
}
