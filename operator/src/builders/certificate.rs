//! A cert-manager `Certificate` (cert-manager.io/v1) for the cluster hostname, when
//! `spec.tls.issuerRef` is given. cert-manager writes the Secret the members mount.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{BuildError, Names, meta};
use crate::crd::{IssuerKind, MailCluster};

/// Component label of the Certificate.
pub const COMPONENT: &str = "tls";

/// Spec of a cert-manager Certificate (the fields the operator sets).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "cert-manager.io",
    version = "v1",
    kind = "Certificate",
    plural = "certificates",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct CertificateSpec {
    /// Secret cert-manager writes the key pair to.
    pub secret_name: String,
    /// Names in the certificate.
    pub dns_names: Vec<String>,
    /// Issuer to ask.
    pub issuer_ref: CertIssuerRef,
}

/// cert-manager's issuer reference.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct CertIssuerRef {
    /// Issuer name.
    pub name: String,
    /// `Issuer` or `ClusterIssuer`.
    pub kind: String,
    /// API group of the issuer.
    pub group: String,
}

/// Name of the Secret the members mount for TLS, if the cluster has TLS.
pub fn tls_secret_name(mc: &MailCluster) -> Result<Option<String>, BuildError> {
    let names = Names::of(mc)?;
    Ok(mc
        .spec
        .tls
        .as_ref()
        .map(|t| match (&t.secret_name, &t.issuer_ref) {
            (Some(s), _) => s.clone(),
            (None, _) => names.certificate(),
        }))
}

/// The Certificate to request, or `None` without an issuerRef.
pub fn certificate(mc: &MailCluster) -> Result<Option<Certificate>, BuildError> {
    let names = Names::of(mc)?;
    let Some(issuer) = mc.spec.tls.as_ref().and_then(|t| t.issuer_ref.as_ref()) else {
        return Ok(None);
    };
    Ok(Some(Certificate {
        metadata: meta(mc, &names, names.certificate(), COMPONENT),
        spec: CertificateSpec {
            secret_name: names.certificate(),
            dns_names: vec![mc.spec.hostname.clone()],
            issuer_ref: CertIssuerRef {
                name: issuer.name.clone(),
                kind: match issuer.kind {
                    IssuerKind::Issuer => "Issuer",
                    IssuerKind::ClusterIssuer => "ClusterIssuer",
                }
                .to_string(),
                group: issuer
                    .group
                    .clone()
                    .unwrap_or_else(|| "cert-manager.io".to_string()),
            },
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;
    use crate::crd::{ClusterTls, IssuerRef};

    #[test]
    fn none_for_a_given_secret() {
        let mc = sample();
        assert!(certificate(&mc).unwrap().is_none());
        assert_eq!(
            tls_secret_name(&mc).unwrap().as_deref(),
            Some("smtp-example-com")
        );
    }

    #[test]
    fn certificate_for_the_hostname_from_the_issuer() {
        let mut mc = sample();
        mc.spec.tls = Some(ClusterTls {
            secret_name: None,
            issuer_ref: Some(IssuerRef {
                name: "letsencrypt".into(),
                kind: IssuerKind::ClusterIssuer,
                group: None,
            }),
        });
        let c = certificate(&mc).unwrap().unwrap();
        assert_eq!(c.metadata.name.as_deref(), Some("relay-tls"));
        assert_eq!(c.spec.dns_names, ["smtp.example.com"]);
        assert_eq!(c.spec.secret_name, "relay-tls");
        assert_eq!(c.spec.issuer_ref.kind, "ClusterIssuer");
        assert_eq!(c.spec.issuer_ref.group, "cert-manager.io");
        assert_eq!(tls_secret_name(&mc).unwrap().as_deref(), Some("relay-tls"));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["apiVersion"], "cert-manager.io/v1");
    }
}
