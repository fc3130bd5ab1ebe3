//! The drain Job of an orphaned queue volume: after a scale-down the StatefulSet keeps the queue
//! volume (`queue-NAME-N`) of a removed member. Mail left on it (the member could not hand
//! everything over before it stopped) would never be delivered, so a Job mounts the volume and
//! runs `mailnode drain --queue-dir`, which hands every message to the remaining members over
//! the peer channel and exits 0 only when the directory is empty. The controller deletes the
//! volume only after the Job succeeded.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec,
    SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use super::configmap::{CLUSTER_SECRET_DIR, CONFIG_DIR, QUEUE_DIR, config_path};
use super::statefulset::{CONTAINER, QUEUE_VOLUME, locked_down_container, non_root_pod_security};
use super::{BuildError, CLUSTER_LABEL, COMPONENT_LABEL, FIELD_MANAGER, Names, image, owner_refs};
use crate::crd::MailCluster;

/// Component label of drain Jobs and their pods.
pub const COMPONENT: &str = "drain";
/// Annotation on a drain Job naming the volume it drains.
pub const CLAIM_ANNOTATION: &str = "mailcluster.dev/claim";
/// Seconds `mailnode drain` tries before it gives up (the Job then retries).
pub const DRAIN_TIMEOUT_SECONDS: u64 = 600;

/// Name of the queue volume claim of member `ordinal`.
pub fn claim_name(names: &Names, ordinal: u32) -> String {
    format!("{QUEUE_VOLUME}-{}-{ordinal}", names.statefulset())
}

/// The ordinal of a queue volume claim of this cluster, or None for any other claim.
pub fn claim_ordinal(names: &Names, claim: &str) -> Option<u32> {
    let rest = claim.strip_prefix(&format!("{QUEUE_VOLUME}-{}-", names.statefulset()))?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// Name of the drain Job of member `ordinal`'s volume.
pub fn job_name(names: &Names, ordinal: u32) -> String {
    format!("{}-drain-{ordinal}", names.cluster)
}

/// Labels of drain Jobs and their pods. They deliberately do not carry the member selector
/// labels: a drain pod is no member (no Service sends it mail, the PDB does not count it).
pub fn job_labels(names: &Names) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "mailnode-drain".to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            names.cluster.clone(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            FIELD_MANAGER.to_string(),
        ),
        (CLUSTER_LABEL.to_string(), names.cluster.clone()),
        (COMPONENT_LABEL.to_string(), COMPONENT.to_string()),
    ])
}

/// Selector of this cluster's drain pods (the NetworkPolicy admits them on the peer port).
pub fn pod_selector(names: &Names) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([
            (CLUSTER_LABEL.to_string(), names.cluster.clone()),
            (COMPONENT_LABEL.to_string(), COMPONENT.to_string()),
        ])),
        ..LabelSelector::default()
    }
}

/// Queue volume claims (names) of members at or above `replicas` whose pod is gone: those the
/// controller drains. `claims` are the cluster's claim names, `pods` its member pod names.
pub fn orphaned_claims(
    names: &Names,
    replicas: i32,
    claims: &[String],
    pods: &[String],
) -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = claims
        .iter()
        .filter_map(|c| claim_ordinal(names, c).map(|o| (o, c.clone())))
        .filter(|(o, _)| i64::from(*o) >= i64::from(replicas))
        .filter(|(o, _)| {
            let pod = format!("{}-{o}", names.statefulset());
            !pods.contains(&pod)
        })
        .collect();
    out.sort();
    out
}

fn ro_mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The Job draining member `ordinal`'s queue volume.
pub fn drain_job(mc: &MailCluster, ordinal: u32, default_image: &str) -> Result<Job, BuildError> {
    let names = Names::of(mc)?;
    let claim = claim_name(&names, ordinal);
    let labels = job_labels(&names);
    let container = Container {
        name: CONTAINER.to_string(),
        image: Some(image(mc, default_image).to_string()),
        args: Some(vec![
            "drain".to_string(),
            "--config".to_string(),
            config_path(),
            "--queue-dir".to_string(),
            QUEUE_DIR.to_string(),
            "--timeout".to_string(),
            DRAIN_TIMEOUT_SECONDS.to_string(),
        ]),
        volume_mounts: Some(vec![
            ro_mount("config", CONFIG_DIR),
            ro_mount("cluster-key", CLUSTER_SECRET_DIR),
            VolumeMount {
                name: QUEUE_VOLUME.to_string(),
                mount_path: QUEUE_DIR.to_string(),
                ..VolumeMount::default()
            },
        ]),
        security_context: Some(locked_down_container()),
        ..Container::default()
    };
    let volumes = vec![
        Volume {
            name: "config".to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "cluster-key".to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.cluster_secret()),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: QUEUE_VOLUME.to_string(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(false),
            }),
            ..Volume::default()
        },
    ];
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job_name(&names, ordinal)),
            namespace: Some(names.namespace.clone()),
            labels: Some(labels.clone()),
            annotations: Some(BTreeMap::from([(CLAIM_ANNOTATION.to_string(), claim)])),
            owner_references: owner_refs(mc),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(6),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    restart_policy: Some("Never".to_string()),
                    enable_service_links: Some(false),
                    automount_service_account_token: Some(false),
                    security_context: Some(non_root_pod_security()),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    })
}

/// Whether a Job finished successfully (the Complete condition, or a succeeded pod).
pub fn succeeded(job: &Job) -> bool {
    job.status.as_ref().is_some_and(|s| {
        s.succeeded.unwrap_or(0) > 0
            || s.conditions.as_ref().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Complete" && c.status == "True")
            })
    })
}

/// Whether a Job failed for good (the Failed condition).
pub fn failed(job: &Job) -> bool {
    job.status.as_ref().is_some_and(|s| {
        s.conditions
            .as_ref()
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Failed" && c.status == "True"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;
    use crate::builders::{selector_labels, statefulset};

    #[test]
    fn claim_names_and_ordinals() {
        let names = Names::of(&sample()).unwrap();
        assert_eq!(claim_name(&names, 2), "queue-relay-2");
        assert_eq!(claim_ordinal(&names, "queue-relay-2"), Some(2));
        assert_eq!(claim_ordinal(&names, "queue-relay-x"), None);
        assert_eq!(claim_ordinal(&names, "queue-relay-"), None);
        assert_eq!(claim_ordinal(&names, "queue-relay-other-1"), None);
        assert_eq!(claim_ordinal(&names, "queue-other-1"), None);
    }

    #[test]
    fn orphans_are_claims_above_replicas_without_pod() {
        let names = Names::of(&sample()).unwrap();
        let claims: Vec<String> = [
            "queue-relay-0",
            "queue-relay-1",
            "queue-relay-2",
            "queue-relay-3",
            "other",
        ]
        .map(String::from)
        .to_vec();
        let pods: Vec<String> = ["relay-0", "relay-1", "relay-2"].map(String::from).to_vec();
        assert_eq!(
            orphaned_claims(&names, 2, &claims, &pods),
            [(3, "queue-relay-3".to_string())],
            "relay-2 still runs (it is handing its queue over)"
        );
        let pods: Vec<String> = ["relay-0", "relay-1"].map(String::from).to_vec();
        assert_eq!(orphaned_claims(&names, 2, &claims, &pods).len(), 2);
        assert!(orphaned_claims(&names, 4, &claims, &pods).is_empty());
    }

    #[test]
    fn job_mounts_the_claim_and_runs_drain() {
        let mc = sample();
        let job = drain_job(&mc, 2, "mailnode:test").unwrap();
        assert_eq!(job.metadata.name.as_deref(), Some("relay-drain-2"));
        assert_eq!(
            job.metadata.owner_references.as_ref().unwrap()[0].kind,
            "MailCluster"
        );
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        let args = c.args.as_ref().unwrap();
        assert_eq!(
            args[..5],
            [
                "drain",
                "--config",
                "/etc/mailnode/config/mailnode.yaml",
                "--queue-dir",
                QUEUE_DIR
            ]
        );
        let claim = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find_map(|v| v.persistent_volume_claim.as_ref())
            .unwrap();
        assert_eq!(claim.claim_name, "queue-relay-2");
        // Same paths as the members.
        let sts = statefulset::statefulset(&mc, "h", None, "img").unwrap();
        let member = &sts.spec.unwrap().template.spec.unwrap().containers[0];
        for m in c.volume_mounts.as_ref().unwrap() {
            assert!(
                member
                    .volume_mounts
                    .as_ref()
                    .unwrap()
                    .iter()
                    .any(|mm| mm.name == m.name && mm.mount_path == m.mount_path),
                "{} at {}",
                m.name,
                m.mount_path
            );
        }
        // A drain pod is no member.
        let labels = job.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        let names = Names::of(&mc).unwrap();
        assert!(
            !selector_labels(&names)
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        );
        for (k, v) in pod_selector(&names).match_labels.unwrap() {
            assert_eq!(labels[&k], v);
        }
    }
}
