//! The cluster Secret: a random key that authenticates peer-to-peer traffic. It is generated
//! once; the controller keeps the existing key on every later reconcile.
//!
//! Rotation: setting the annotation `mailcluster.dev/rotate-key` on the MailCluster to a new
//! value makes the controller put a new key in front of the current one (`new\nold`: members
//! accept both, the file is re-read for every peer connection). The hash of the current key is
//! on the pod template, so the members roll; once all are rolled and Ready, the old key is
//! dropped. The Secret remembers which request it served (`mailcluster.dev/rotated-for`).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::{BuildError, Names, meta};
use crate::crd::MailCluster;

/// Key of the cluster key in the Secret.
pub const KEY: &str = "cluster-key";
/// Random bytes in a cluster key.
pub const KEY_BYTES: usize = 32;

/// Annotation on the MailCluster that requests a new cluster key: any value not served yet.
pub const ROTATE_ANNOTATION: &str = "mailcluster.dev/rotate-key";
/// Annotation on the cluster Secret with the rotation request it served.
pub const ROTATED_FOR_ANNOTATION: &str = "mailcluster.dev/rotated-for";
/// Pod template annotation with the hash of the current cluster key: a new key rolls the members.
pub const KEY_HASH_ANNOTATION: &str = "mailcluster.dev/key-hash";

/// What the controller does with the cluster key file in one reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStep {
    /// Leave the keys as they are.
    Keep,
    /// Put a new key in front of the current one (first key, or a rotation request).
    Add,
    /// Every member runs with the new key: drop the previous one.
    DropOld,
}

/// The next step of the key file `keys` (current first). `request` is the MailCluster's
/// rotation annotation, `served` the request the Secret has served, `rolled` whether every
/// member runs a pod template with the current key's hash and is Ready.
pub fn key_step(
    keys: &[String],
    request: Option<&str>,
    served: Option<&str>,
    rolled: bool,
) -> KeyStep {
    // No key yet, or a rotation request not served yet.
    if keys.is_empty() || (request.is_some() && request != served) {
        KeyStep::Add
    } else if keys.len() > 1 && rolled {
        KeyStep::DropOld
    } else {
        KeyStep::Keep
    }
}

/// The keys after `step`; `new_key` is called only for [`KeyStep::Add`]. A rotation keeps only
/// the current key as the previous one (a rotation requested during another one drops the
/// oldest key).
pub fn apply_key_step<E>(
    keys: &[String],
    step: &KeyStep,
    new_key: impl FnOnce() -> Result<String, E>,
) -> Result<Vec<String>, E> {
    Ok(match step {
        KeyStep::Keep => keys.to_vec(),
        KeyStep::Add => {
            let mut out = vec![new_key()?];
            out.extend(keys.first().cloned());
            out
        }
        KeyStep::DropOld => keys.iter().take(1).cloned().collect(),
    })
}

/// Short hash of a key, for the pod template (never the key itself).
pub fn key_hash(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(key.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The keys of an existing cluster Secret (current first), leaving out unusable lines.
pub fn existing_keys(secret: &Secret) -> Vec<String> {
    let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(KEY)) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&bytes.0)
        .lines()
        .map(str::trim)
        .filter(|k| k.len() >= 2 * KEY_BYTES)
        .map(str::to_string)
        .collect()
}

/// The rotation request an existing cluster Secret served.
pub fn served_request(secret: &Secret) -> Option<String> {
    secret
        .metadata
        .annotations
        .as_ref()?
        .get(ROTATED_FOR_ANNOTATION)
        .cloned()
}

/// The cluster Secret holding `keys` (current first), having served rotation `request`.
pub fn cluster_secret_keys(
    mc: &MailCluster,
    keys: &[String],
    request: Option<&str>,
) -> Result<Secret, BuildError> {
    let mut s = cluster_secret(mc, &keys.join("\n"))?;
    if let Some(r) = request {
        s.metadata.annotations = Some(BTreeMap::from([(
            ROTATED_FOR_ANNOTATION.to_string(),
            r.to_string(),
        )]));
    }
    Ok(s)
}

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
#[allow(clippy::cloned_ref_to_slice_refs)]
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
    fn key_file_transitions() {
        let (a, b, c) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        let gen_b = || Ok::<_, ()>(b.clone());
        let gen_c = || Ok::<_, ()>(c.clone());
        // A new cluster gets one key.
        assert_eq!(key_step(&[], None, None, false), KeyStep::Add);
        assert_eq!(
            apply_key_step(&[], &KeyStep::Add, || Ok::<_, ()>(a.clone())).unwrap(),
            [a.clone()]
        );
        let one = vec![a.clone()];
        assert_eq!(key_step(&one, None, None, true), KeyStep::Keep);
        // A request adds a key in front; the old one stays until the members rolled.
        assert_eq!(key_step(&one, Some("1"), None, true), KeyStep::Add);
        let two = apply_key_step(&one, &KeyStep::Add, gen_b).unwrap();
        assert_eq!(two, [b.clone(), a.clone()]);
        assert_eq!(key_step(&two, Some("1"), Some("1"), false), KeyStep::Keep);
        assert_eq!(key_step(&two, Some("1"), Some("1"), true), KeyStep::DropOld);
        assert_eq!(
            apply_key_step(&two, &KeyStep::DropOld, gen_c).unwrap(),
            [b.clone()]
        );
        // A served request does nothing more; removing the annotation neither.
        assert_eq!(
            key_step(&[b.clone()], Some("1"), Some("1"), true),
            KeyStep::Keep
        );
        assert_eq!(key_step(&[b.clone()], None, Some("1"), true), KeyStep::Keep);
        // A request during a rotation drops the oldest key.
        assert_eq!(key_step(&two, Some("2"), Some("1"), false), KeyStep::Add);
        assert_eq!(
            apply_key_step(&two, &KeyStep::Add, gen_c).unwrap(),
            [c.clone(), b.clone()]
        );
        assert_ne!(key_hash(&a), key_hash(&b));
        assert_eq!(key_hash(&a).len(), 16);
    }

    #[test]
    fn key_file_round_trips_through_the_secret() {
        let mc = sample();
        let keys = vec![generate_key().unwrap(), generate_key().unwrap()];
        let s = cluster_secret_keys(&mc, &keys, Some("r1")).unwrap();
        assert_eq!(existing_keys(&s), keys);
        assert_eq!(served_request(&s).as_deref(), Some("r1"));
        let text = String::from_utf8(s.data.unwrap()[KEY].0.clone()).unwrap();
        assert_eq!(text.lines().count(), 2);
        let s = cluster_secret_keys(&mc, &keys[..1], None).unwrap();
        assert_eq!(existing_keys(&s), keys[..1]);
        assert_eq!(served_request(&s), None);
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
