//! Server-side apply that skips objects already as desired, so that a reconcile that changes
//! nothing makes no write request.

use std::fmt::Debug;

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::builders::FIELD_MANAGER;

/// Whether every field set in `desired` has the same value in `live`. Fields the apiserver or
/// other controllers add to `live` (defaults, status, cluster IPs) do not count; lists must have
/// the same length and match element by element.
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, dv)| {
            l.get(k).is_some_and(|lv| is_subset(dv, lv)) || is_empty(dv) && l.get(k).is_none()
        }),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(dv, lv)| is_subset(dv, lv))
        }
        (Value::Number(d), Value::Number(l)) => d.as_f64() == l.as_f64(),
        _ => desired == live,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Whether `live` already carries everything in `desired` (metadata's server-set fields aside).
pub fn up_to_date<K: Serialize>(desired: &K, live: &K) -> Result<bool, serde_json::Error> {
    let d = serde_json::to_value(desired)?;
    let l = serde_json::to_value(live)?;
    Ok(is_subset(&d, &l))
}

/// Errors of [`apply`].
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The request failed.
    #[error("{verb} {kind} {name}: {source}")]
    Kube {
        /// What was being done.
        verb: &'static str,
        /// Kind of the object.
        kind: String,
        /// Name of the object.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The object cannot be serialized.
    #[error("serializing {kind} {name}: {source}")]
    Serialize {
        /// Kind of the object.
        kind: String,
        /// Name of the object.
        name: String,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
}

impl ApplyError {
    /// Whether the API answered 404 for the kind itself (its CRD is not installed).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApplyError::Kube { source: kube::Error::Api(s), .. } if s.code == 404)
    }
}

/// Outcome of [`apply`].
#[derive(Debug)]
pub struct Applied<K> {
    /// The object as the API server has it.
    pub object: K,
    /// Whether a write was made.
    pub changed: bool,
}

/// Annotation with the hash of what the operator last applied to an object. A field dropped from
/// the desired object changes the hash, so the apply that removes it is not skipped.
pub const APPLIED_HASH_ANNOTATION: &str = "mailcluster.dev/applied-hash";

/// `desired` with its [`APPLIED_HASH_ANNOTATION`] set.
pub fn with_applied_hash<K>(desired: &K) -> Result<K, serde_json::Error>
where
    K: Resource + Clone + Serialize,
{
    let text = serde_json::to_string(desired)?;
    let digest = Sha256::digest(text.as_bytes());
    let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let mut out = desired.clone();
    out.annotations_mut()
        .insert(APPLIED_HASH_ANNOTATION.to_string(), hash);
    Ok(out)
}

/// Reads the object, and server-side applies `desired` only when the live object differs.
pub async fn apply<K>(api: &Api<K>, desired: &K) -> Result<Applied<K>, ApplyError>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let kind = K::kind(&()).to_string();
    let name = desired.name_any();
    let desired = &with_applied_hash(desired).map_err(|source| ApplyError::Serialize {
        kind: kind.clone(),
        name: name.clone(),
        source,
    })?;
    let err = |verb: &'static str| {
        let (kind, name) = (kind.clone(), name.clone());
        move |source| ApplyError::Kube {
            verb,
            kind,
            name,
            source,
        }
    };
    let live = api.get_opt(&name).await.map_err(err("reading"))?;
    if let Some(live) = live {
        let same = up_to_date(desired, &live).map_err(|source| ApplyError::Serialize {
            kind: kind.clone(),
            name: name.clone(),
            source,
        })?;
        if same {
            return Ok(Applied {
                object: live,
                changed: false,
            });
        }
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let object = api
        .patch(&name, &pp, &Patch::Apply(desired))
        .await
        .map_err(err("applying"))?;
    Ok(Applied {
        object,
        changed: true,
    })
}

/// Deletes an object if it exists; returns whether a delete was sent.
pub async fn delete_if_exists<K>(api: &Api<K>, name: &str) -> Result<bool, ApplyError>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
{
    let kind = K::kind(&()).to_string();
    let err = |verb: &'static str| {
        let (kind, name) = (kind.clone(), name.to_string());
        move |source| ApplyError::Kube {
            verb,
            kind,
            name,
            source,
        }
    };
    if api.get_opt(name).await.map_err(err("reading"))?.is_none() {
        return Ok(false);
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(err("deleting")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_added_fields_do_not_count() {
        let desired = json!({"spec": {"type": "LoadBalancer", "ports": [{"port": 25}]}});
        let live = json!({"spec": {"type": "LoadBalancer", "clusterIP": "10.0.0.1",
            "ports": [{"port": 25, "protocol": "TCP", "targetPort": 25}]}, "status": {}});
        assert!(is_subset(&desired, &live));
    }

    #[test]
    fn changed_values_and_lists_count() {
        let desired = json!({"spec": {"ports": [{"port": 26}]}});
        let live = json!({"spec": {"ports": [{"port": 25}]}});
        assert!(!is_subset(&desired, &live));
        let desired = json!({"spec": {"ports": [{"port": 25}, {"port": 587}]}});
        assert!(!is_subset(&desired, &live));
        let desired = json!({"metadata": {"annotations": {"a": "1"}}});
        assert!(!is_subset(&desired, &json!({"metadata": {}})));
        assert!(is_subset(
            &json!({"metadata": {"annotations": {}}}),
            &json!({"metadata": {}})
        ));
    }

    #[test]
    fn a_dropped_field_changes_the_applied_hash() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some("x".into());
        cm.data = Some([("a".to_string(), "1".to_string()), ("b".into(), "2".into())].into());
        let full = with_applied_hash(&cm).unwrap();
        cm.data.as_mut().unwrap().remove("b");
        let smaller = with_applied_hash(&cm).unwrap();
        let live = serde_json::to_value(&full).unwrap();
        // The smaller object is a subset of the live one, but its hash differs.
        assert!(!is_subset(&serde_json::to_value(&smaller).unwrap(), &live));
    }
}
