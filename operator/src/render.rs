//! `mailcluster-operator render FILE`: every object the operator would create for a
//! MailCluster, offline.

use std::net::IpAddr;
use std::path::Path;

use serde::Serialize;

use crate::builders::{
    BuildError, certificate, configmap, dnsendpoint, listener_service, networkpolicy, pdb,
    peer_service, secret, statefulset,
};
use crate::crd::MailCluster;

/// Errors of `render`.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a MailCluster.
    #[error("{path} is not a MailCluster manifest: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The YAML error.
        #[source]
        source: serde_yaml::Error,
    },
    /// The spec cannot be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// No randomness for the cluster key.
    #[error("cannot generate a cluster key: {0}")]
    Random(getrandom::Error),
    /// Serializing an object failed.
    #[error("cannot serialize: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// Reads a MailCluster manifest; `namespace` is used when it names none.
pub fn read(path: &Path, namespace: &str) -> Result<MailCluster, RenderError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RenderError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut mc: MailCluster = serde_yaml::from_str(&text).map_err(|source| RenderError::Parse {
        path: shown,
        source,
    })?;
    if mc.metadata.namespace.is_none() {
        mc.metadata.namespace = Some(namespace.to_string());
    }
    Ok(mc)
}

fn doc<T: Serialize>(out: &mut String, obj: &T) -> Result<(), RenderError> {
    out.push_str("---\n");
    out.push_str(&serde_yaml::to_string(obj)?);
    Ok(())
}

/// Every object for `mc` as a multi-document YAML stream. `addresses` stand in for load
/// balancer addresses (the DNSEndpoint is only rendered when there are some).
pub fn render(
    mc: &MailCluster,
    default_image: &str,
    addresses: &[String],
) -> Result<String, RenderError> {
    let mut out = String::new();
    let key = secret::generate_key().map_err(RenderError::Random)?;
    doc(&mut out, &secret::cluster_secret(mc, &key)?)?;
    let self_ips: Vec<IpAddr> = addresses.iter().filter_map(|a| a.parse().ok()).collect();
    let rendered = configmap::render(&configmap::node_config(mc, &self_ips)?)?;
    doc(&mut out, &configmap::config_map(mc, &rendered)?)?;
    doc(&mut out, &peer_service::peer_service(mc)?)?;
    for svc in listener_service::listener_services(mc)? {
        doc(&mut out, &svc)?;
    }
    let tls = certificate::tls_secret_name(mc)?;
    doc(
        &mut out,
        &statefulset::statefulset(mc, &rendered.restart_hash, tls.as_deref(), default_image)?,
    )?;
    doc(&mut out, &pdb::pdb(mc)?)?;
    doc(&mut out, &networkpolicy::network_policy(mc)?)?;
    if let Some(cert) = certificate::certificate(mc)? {
        doc(&mut out, &cert)?;
    }
    if let Some(ep) = dnsendpoint::dns_endpoint(mc, addresses)? {
        doc(&mut out, &ep)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;

    #[test]
    fn renders_every_kind() {
        let mut mc = sample();
        mc.metadata.uid = None;
        let out = render(&mc, "mailnode:test", &["192.0.2.7".into()]).unwrap();
        let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&out)
            .map(|d| {
                let v = serde_yaml::Value::deserialize(d).unwrap();
                v["kind"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "Secret",
                "ConfigMap",
                "Service",
                "Service",
                "Service",
                "Service",
                "StatefulSet",
                "PodDisruptionBudget",
                "NetworkPolicy",
                "DNSEndpoint"
            ]
        );
        assert!(
            !out.contains("ownerReferences"),
            "offline objects have no owner"
        );
    }

    #[test]
    fn reads_a_manifest_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mc.yaml");
        std::fs::write(
            &path,
            "apiVersion: mailcluster.dev/v1alpha1\nkind: MailCluster\nmetadata: {name: relay}\nspec:\n  hostname: smtp.example.com\n  listeners: [{name: smtp, port: 25}]\n",
        )
        .unwrap();
        let mc = read(&path, "mail").unwrap();
        assert_eq!(mc.metadata.namespace.as_deref(), Some("mail"));
        assert_eq!(mc.spec.replicas, 3);
        let out = render(&mc, "img", &[]).unwrap();
        assert!(out.contains("kind: StatefulSet") && !out.contains("DNSEndpoint"));
        let e = read(&dir.path().join("missing.yaml"), "x").unwrap_err();
        assert!(e.to_string().contains("missing.yaml"), "{e}");
    }

    use serde::Deserialize;
}
