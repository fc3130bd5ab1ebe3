//! The mailcluster operator: the `MailCluster` custom resource, pure builders that turn its spec
//! into Kubernetes objects, and the controller that applies them and reports status.

// Tests may unwrap: a panic is how they fail.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod applier;
pub mod apply;
pub mod builders;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod local;
pub mod member_status;
pub mod metrics;
pub mod reasons;
pub mod reconcile;
pub mod reference;
pub mod render;
pub mod status;
pub mod warnings;

/// Image of the relay node when neither the MailCluster nor `--default-image` names one.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/mailcluster/mailnode:", env!("CARGO_PKG_VERSION"));

/// The CRD of `MailCluster` as YAML, as `mailcluster-operator crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&crd::MailCluster::crd())
}
