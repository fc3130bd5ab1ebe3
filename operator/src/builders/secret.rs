//! The cluster Secret: a random key that authenticates peer-to-peer traffic. It is generated
//! once; the controller keeps the existing key on every later reconcile.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::{BuildError, Names, meta};
use crate::crd::MailCluster;

/// Key of the cluster key in the Secret.
pub const KEY: &str = "cluster-key";
/// Random bytes in a cluster key.
pub const KEY_BYTES: usize = 32;

/// A new random cluster key, hex encoded.
pub fn generate_key() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; KEY_BYTES];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The key held by an existing cluster Secret, if it has a usable one.
pub fn existing_key(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(KEY)?;
    let key = String::from_utf8(bytes.0.clone()).ok()?;
    (key.len() >= 2 * KEY_BYTES).then_some(key)
}

/// The cluster Secret holding `key`.
pub fn cluster_secret(mc: &MailCluster, key: &str) -> Result<Secret, BuildError> {
    let names = Names::of(mc)?;
    Ok(Secret {
        metadata: meta(mc, &names, names.cluster_secret(), "cluster-key"),
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(
            KEY.to_string(),
            ByteString(key.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;

    #[test]
    fn keys_are_random_and_long() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }

    #[test]
    fn an_existing_key_is_kept() {
        let mc = sample();
        let key = generate_key().unwrap();
        let s = cluster_secret(&mc, &key).unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("relay-cluster"));
        assert_eq!(existing_key(&s).as_deref(), Some(key.as_str()));
        let mut short = s.clone();
        short
            .data
            .as_mut()
            .unwrap()
            .insert(KEY.into(), ByteString(b"abc".to_vec()));
        assert_eq!(existing_key(&short), None, "a too short key is replaced");
    }
}
