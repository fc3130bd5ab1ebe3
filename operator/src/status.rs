//! Status of a MailCluster, computed from what the controller observed: a pure function, so the
//! conditions and their messages are unit-tested.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::builders::CONFIG_HASH_ANNOTATION;
use crate::builders::statefulset::CONTAINER;
use std::collections::BTreeMap;

use crate::crd::{
    DnsRecordStatus, MailCluster, MailClusterStatus, MemberStatus, OrphanedVolumeStatus,
};
use crate::reasons::Reason;
use mailnode_api::status::StatusReport;

/// Condition types.
pub const READY: &str = "Ready";
/// A rollout or scale is under way.
pub const PROGRESSING: &str = "Progressing";
/// Something needs a person.
pub const DEGRADED: &str = "Degraded";

/// Something that degrades the cluster and needs a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The Degraded condition's reason.
    pub reason: Reason,
    /// What is wrong and what to do.
    pub message: String,
}

impl Problem {
    /// A problem.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// What the controller observed in one reconcile.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The StatefulSet, if it exists.
    pub statefulset: Option<StatefulSet>,
    /// The member pods.
    pub pods: Vec<Pod>,
    /// Hash of the configuration members should run (None when the spec could not be rendered).
    pub config_hash: Option<String>,
    /// Hash of its restart view, on the pod template (None when the spec could not be
    /// rendered).
    pub restart_hash: Option<String>,
    /// Load balancer addresses.
    pub addresses: Vec<String>,
    /// DNS records published.
    pub dns_records: Vec<DnsRecordStatus>,
    /// Problems that need a person.
    pub problems: Vec<Problem>,
    /// Whether the spec could be turned into objects (if not, `problems` says why).
    pub spec_valid: bool,
    /// What ready members reported on `/status`, by pod name (an error when it could not be
    /// read). Members not in the map were not asked.
    pub reports: BTreeMap<String, Result<StatusReport, String>>,
    /// Queue volumes of removed members.
    pub orphaned_volumes: Vec<OrphanedVolumeStatus>,
}

/// Whether the StatefulSet has rolled its current spec out to `replicas` members: its
/// controller saw this generation, there is one revision, and that many members run it
/// (ready or not).
pub fn rolled_out(sts: &StatefulSet, replicas: i32) -> bool {
    let Some(st) = sts.status.as_ref() else {
        return false;
    };
    st.observed_generation.is_some()
        && st.observed_generation == sts.metadata.generation
        && st.current_revision.is_some()
        && st.current_revision == st.update_revision
        && st.updated_replicas.unwrap_or(0) >= replicas
}

/// Whether a pod has the Ready condition.
pub fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn ordinal(name: &str) -> u64 {
    name.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

/// The member table: what the pods say, completed with what the members reported.
pub fn members(
    pods: &[Pod],
    config_hash: Option<&str>,
    restart_hash: Option<&str>,
    reports: &BTreeMap<String, Result<StatusReport, String>>,
) -> Vec<MemberStatus> {
    let mut rows: Vec<MemberStatus> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let status = p.status.as_ref();
            let image = p
                .spec
                .as_ref()
                .and_then(|s| s.containers.iter().find(|c| c.name == CONTAINER))
                .and_then(|c| c.image.clone());
            // Without a report: the pod template has the restart view of the current config.
            let template_in_sync = restart_hash.is_some()
                && p.annotations()
                    .get(CONFIG_HASH_ANNOTATION)
                    .map(String::as_str)
                    == restart_hash;
            let mut row = MemberStatus {
                pod: p.name_any(),
                ip: status.and_then(|s| s.pod_ip.clone()),
                node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
                ready: pod_ready(p),
                image,
                version: None,
                config_in_sync: template_in_sync,
                config_hash: None,
                config_loaded_at: None,
                queue_depth: None,
                oldest_message_age_seconds: None,
                peers_reachable: None,
                status_error: None,
            };
            match reports.get(&row.pod) {
                Some(Ok(r)) => {
                    if !r.version.is_empty() {
                        row.version = Some(r.version.clone());
                    }
                    // What the member loaded wins over what its pod template says.
                    row.config_in_sync = config_hash.is_some_and(|h| r.runs_config(h));
                    row.config_hash = (!r.config_hash.is_empty()).then(|| r.config_hash.clone());
                    row.config_loaded_at = r.config_loaded_at.clone();
                    row.queue_depth = Some(r.queue_depth);
                    row.oldest_message_age_seconds = Some(r.oldest_message_age_seconds);
                    row.peers_reachable =
                        Some(i32::try_from(r.peers_reachable).unwrap_or(i32::MAX));
                }
                Some(Err(e)) => row.status_error = Some(e.clone()),
                None => {}
            }
            row
        })
        .collect();
    rows.sort_by_key(|m| ordinal(&m.pod));
    rows
}

fn condition(
    old: Option<&MailClusterStatus>,
    type_: &str,
    status: bool,
    reason: Reason,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last = old
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: last,
    }
}

/// The status of `mc` given what was observed. Transition times of conditions whose status did
/// not change are kept, so the same observation gives the same status.
pub fn compute(mc: &MailCluster, o: &Observed, now: Timestamp) -> MailClusterStatus {
    let old = mc.status.as_ref();
    let generation = mc.metadata.generation;
    let desired = mc.spec.replicas;
    let name = mc.name_any();
    let members = members(
        &o.pods,
        o.config_hash.as_deref(),
        o.restart_hash.as_deref(),
        &o.reports,
    );
    let ready_members =
        i32::try_from(members.iter().filter(|m| m.ready).count()).unwrap_or(i32::MAX);
    let in_sync = members.iter().filter(|m| m.config_in_sync).count();

    let rolled_out = o
        .statefulset
        .as_ref()
        .is_some_and(|s| rolled_out(s, desired));
    let member_count = i32::try_from(members.len()).unwrap_or(i32::MAX);

    let disagreement = member_disagreement(o);
    let (ready, ready_reason, ready_msg) = if !o.spec_valid {
        (
            false,
            Reason::InvalidSpec,
            "the spec cannot be turned into a cluster; see the Degraded condition".to_string(),
        )
    } else if ready_members >= desired
        && member_count == desired
        && rolled_out
        && let Some((reason, message)) = disagreement
    {
        (false, reason, message)
    } else if ready_members >= desired && member_count == desired && rolled_out {
        (
            true,
            Reason::AllMembersReady,
            format!(
                "{ready_members}/{desired} members ready and running the current configuration"
            ),
        )
    } else if o.statefulset.is_none() {
        (
            false,
            Reason::Creating,
            "the members are being created".to_string(),
        )
    } else {
        let waiting: Vec<&str> = members
            .iter()
            .filter(|m| !m.ready)
            .map(|m| m.pod.as_str())
            .collect();
        let msg = if waiting.is_empty() {
            format!(
                "{ready_members}/{desired} members ready; waiting for the StatefulSet {name} to create or update members"
            )
        } else {
            format!(
                "{ready_members}/{desired} members ready; not ready: {}. See `kubectl describe pod` and the pod logs",
                waiting.join(", ")
            )
        };
        (false, Reason::MembersNotReady, msg)
    };

    let (progressing, prog_reason, prog_msg) = if !o.spec_valid {
        (
            false,
            Reason::InvalidSpec,
            "nothing is rolled out until the spec is fixed".to_string(),
        )
    } else if o.statefulset.is_none() {
        (true, Reason::Creating, "creating the members".to_string())
    } else if member_count != desired {
        (
            true,
            Reason::Scaling,
            format!("scaling from {member_count} to {desired} members, one at a time"),
        )
    } else if rolled_out && in_sync < members.len() {
        (
            true,
            Reason::Reloading,
            format!(
                "members load the changed configuration without a restart: {in_sync}/{} run it (a mounted ConfigMap reaches the pods within about a minute)",
                members.len()
            ),
        )
    } else if !rolled_out {
        (
            true,
            Reason::RollingOut,
            format!(
                "rolling out the current configuration: {in_sync}/{} members updated, one at a time",
                members.len()
            ),
        )
    } else {
        (
            false,
            Reason::Stable,
            "no rollout or scale in progress".to_string(),
        )
    };

    // Members that refuse the configuration file they were given keep running the old one.
    let refused: Vec<Problem> = o
        .reports
        .iter()
        .filter_map(|(pod, r)| {
            let error = r.as_ref().ok()?.config_error.as_deref()?;
            Some(Problem::new(
                Reason::ConfigRefused,
                format!("{pod} refuses its configuration file and keeps running the previous one: {error}"),
            ))
        })
        .collect();
    let problems: Vec<&Problem> = o.problems.iter().chain(&refused).collect();
    let (degraded, deg_reason, deg_msg) = match problems.as_slice() {
        [] => (
            false,
            Reason::AsExpected,
            "nothing needs attention".to_string(),
        ),
        [one] => (true, one.reason, one.message.clone()),
        many => (
            true,
            many[0].reason,
            many.iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };

    MailClusterStatus {
        observed_generation: generation,
        conditions: vec![
            condition(old, READY, ready, ready_reason, ready_msg, generation, now),
            condition(
                old,
                PROGRESSING,
                progressing,
                prog_reason,
                prog_msg,
                generation,
                now,
            ),
            condition(
                old, DEGRADED, degraded, deg_reason, deg_msg, generation, now,
            ),
        ],
        ready_members,
        members_ready: Some(format!("{ready_members}/{desired}")),
        addresses: o.addresses.clone(),
        dns_records: o.dns_records.clone(),
        members,
        config_hash: o.config_hash.clone(),
        orphaned_volumes: o.orphaned_volumes.clone(),
        warnings: crate::warnings::spec_warnings(&mc.spec),
    }
}

/// The status of `mc` as it was, with the Degraded condition saying that reconciling failed
/// (`message`); its transition time is kept when the cluster already was degraded.
pub fn with_reconcile_failure(
    mc: &MailCluster,
    message: String,
    now: Timestamp,
) -> MailClusterStatus {
    let old = mc.status.as_ref();
    let degraded = condition(
        old,
        DEGRADED,
        true,
        Reason::ReconcileFailed,
        message,
        mc.metadata.generation,
        now,
    );
    let mut st = old.cloned().unwrap_or_default();
    match st.conditions.iter_mut().find(|c| c.type_ == DEGRADED) {
        Some(c) => *c = degraded,
        None => st.conditions.push(degraded),
    }
    st
}

/// Why members that are all ready still do not form a healthy cluster: they run different
/// configurations or versions, or cannot reach each other. From the members' own `/status`.
fn member_disagreement(o: &Observed) -> Option<(Reason, String)> {
    let reports: Vec<(&String, &StatusReport)> = o
        .reports
        .iter()
        .filter_map(|(pod, r)| r.as_ref().ok().map(|r| (pod, r)))
        .collect();
    if let Some(hash) = o.config_hash.as_deref() {
        let stale: Vec<String> = reports
            .iter()
            .filter(|(_, r)| !r.runs_config(hash))
            .map(|(pod, r)| format!("{pod} runs {}", short(&r.config_hash)))
            .collect();
        if !stale.is_empty() {
            return Some((
                Reason::ConfigMismatch,
                format!(
                    "members run different configurations: {} instead of {hash}; members load a changed configuration within about a minute (when the mounted ConfigMap reaches the pod), and a member that refuses it says why in the Degraded condition",
                    stale.join(", ")
                ),
            ));
        }
    }
    let mut versions: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (pod, r) in &reports {
        versions
            .entry(r.version.as_str())
            .or_default()
            .push(pod.as_str());
    }
    if versions.len() > 1 {
        let list: Vec<String> = versions
            .iter()
            .map(|(v, pods)| format!("{v} on {}", pods.join(", ")))
            .collect();
        return Some((
            Reason::VersionMismatch,
            format!("members run different versions: {}", list.join("; ")),
        ));
    }
    let unreachable: Vec<String> = reports
        .iter()
        .flat_map(|(pod, r)| {
            r.unreachable_peers().into_iter().map(move |p| {
                format!(
                    "{pod} cannot reach {} ({})",
                    if p.address.is_empty() {
                        &p.member
                    } else {
                        &p.address
                    },
                    p.error.as_deref().unwrap_or("no answer")
                )
            })
        })
        .collect();
    if !unreachable.is_empty() {
        return Some((
            Reason::PeersUnreachable,
            format!(
                "members cannot reach each other on the peer channel (port {}): {}; check the NetworkPolicy and the cluster key Secret",
                crate::crd::PEER_PORT,
                unreachable.join(", ")
            ),
        ));
    }
    None
}

fn short(hash: &str) -> &str {
    hash.get(..16).unwrap_or(hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;
    use k8s_openapi::api::apps::v1::StatefulSetStatus;
    use k8s_openapi::api::core::v1::{Container, PodCondition, PodSpec, PodStatus};
    use mailnode_api::status::PeerStatus;
    use std::collections::BTreeMap;

    fn pod(i: usize, ready: bool, hash: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(format!("relay-{i}"));
        p.metadata.annotations = Some(BTreeMap::from([(
            CONFIG_HASH_ANNOTATION.to_string(),
            hash.to_string(),
        )]));
        p.spec = Some(PodSpec {
            node_name: Some(format!("node-{i}")),
            containers: vec![Container {
                name: CONTAINER.into(),
                image: Some("mailnode:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        });
        p.status = Some(PodStatus {
            pod_ip: Some(format!("10.0.0.{i}")),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        p
    }

    fn sts(replicas: i32, updated: i32, same_rev: bool) -> StatefulSet {
        let mut s = StatefulSet::default();
        s.metadata.generation = Some(2);
        s.status = Some(StatefulSetStatus {
            observed_generation: Some(2),
            replicas,
            ready_replicas: Some(replicas),
            updated_replicas: Some(updated),
            current_revision: Some("r1".into()),
            update_revision: Some(if same_rev { "r1" } else { "r2" }.into()),
            ..Default::default()
        });
        s
    }

    fn cond<'a>(s: &'a MailClusterStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn all_ready() {
        let mc = sample();
        let o = Observed {
            statefulset: Some(sts(3, 3, true)),
            pods: vec![pod(2, true, "h"), pod(0, true, "h"), pod(1, true, "h")],
            config_hash: Some("h".into()),
            restart_hash: Some("h".into()),
            spec_valid: true,
            ..Default::default()
        };
        let s = compute(&mc, &o, Timestamp::now());
        assert_eq!(cond(&s, READY).status, "True");
        assert_eq!(cond(&s, PROGRESSING).status, "False");
        assert_eq!(cond(&s, DEGRADED).status, "False");
        assert_eq!(s.members_ready.as_deref(), Some("3/3"));
        assert_eq!(s.observed_generation, Some(1));
        let pods: Vec<_> = s.members.iter().map(|m| m.pod.as_str()).collect();
        assert_eq!(pods, ["relay-0", "relay-1", "relay-2"]);
        assert_eq!(s.members[1].ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(s.members[1].node.as_deref(), Some("node-1"));
        assert_eq!(s.members[1].image.as_deref(), Some("mailnode:1"));
        assert!(s.members.iter().all(|m| m.config_in_sync));
    }

    #[test]
    fn rollout_names_the_members_that_wait() {
        let mc = sample();
        let o = Observed {
            statefulset: Some(sts(3, 1, false)),
            pods: vec![
                pod(0, true, "old"),
                pod(1, true, "old"),
                pod(2, false, "new"),
            ],
            config_hash: Some("new".into()),
            restart_hash: Some("new".into()),
            spec_valid: true,
            ..Default::default()
        };
        let s = compute(&mc, &o, Timestamp::now());
        let r = cond(&s, READY);
        assert_eq!(r.status, "False");
        assert!(r.message.contains("relay-2"), "{}", r.message);
        let p = cond(&s, PROGRESSING);
        assert_eq!(
            (p.status.as_str(), p.reason.as_str()),
            ("True", "RollingOut")
        );
        assert!(!s.members[0].config_in_sync && s.members[2].config_in_sync);
    }

    #[test]
    fn problems_degrade_with_their_message() {
        let mc = sample();
        let o = Observed {
            statefulset: Some(sts(3, 3, true)),
            pods: vec![pod(0, true, "h"), pod(1, true, "h"), pod(2, true, "h")],
            config_hash: Some("h".into()),
            restart_hash: Some("h".into()),
            spec_valid: true,
            problems: vec![Problem::new(
                Reason::DNSEndpointCRDMissing,
                "install external-dns",
            )],
            ..Default::default()
        };
        let s = compute(&mc, &o, Timestamp::now());
        let d = cond(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "DNSEndpointCRDMissing")
        );
        assert_eq!(cond(&s, READY).status, "True", "mail still flows");
    }

    fn report(version: &str, hash: &str, reachable: bool) -> Result<StatusReport, String> {
        Ok(StatusReport {
            version: version.into(),
            config_hash: format!("{hash}0123456789abcdef"),
            queue_depth: 4,
            oldest_message_age_seconds: 60,
            config_loaded_at: Some("2026-01-01T00:00:00Z".into()),
            peers_reachable: i64::from(reachable),
            peers: vec![PeerStatus {
                member: "relay-peers.mail.svc:7025".into(),
                address: "10.0.0.9:7025".into(),
                reachable,
                error: (!reachable).then(|| "connection refused".into()),
                ..PeerStatus::default()
            }],
            ..Default::default()
        })
    }

    fn healthy(reports: [Result<StatusReport, String>; 3]) -> Observed {
        Observed {
            statefulset: Some(sts(3, 3, true)),
            pods: vec![pod(0, true, "h"), pod(1, true, "h"), pod(2, true, "h")],
            config_hash: Some("h".into()),
            restart_hash: Some("h".into()),
            spec_valid: true,
            reports: reports
                .into_iter()
                .enumerate()
                .map(|(i, r)| (format!("relay-{i}"), r))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn member_reports_fill_the_table() {
        let o = healthy([
            report("0.2.0", "h", true),
            report("0.2.0", "h", true),
            Err("timeout".into()),
        ]);
        let s = compute(&sample(), &o, Timestamp::now());
        assert_eq!(cond(&s, READY).status, "True");
        let m = &s.members[0];
        assert_eq!(m.version.as_deref(), Some("0.2.0"));
        assert_eq!(m.image.as_deref(), Some("mailnode:1"));
        assert_eq!(m.queue_depth, Some(4));
        assert_eq!(m.oldest_message_age_seconds, Some(60));
        assert_eq!(m.peers_reachable, Some(1));
        assert!(m.config_in_sync && m.config_hash.as_deref().unwrap().starts_with('h'));
        assert_eq!(s.members[2].status_error.as_deref(), Some("timeout"));
        assert_eq!(s.members[2].image.as_deref(), Some("mailnode:1"));
        assert_eq!(s.members[2].version, None, "no /status, no version");
    }

    #[test]
    fn members_that_disagree_are_not_ready() {
        let o = healthy([
            report("0.2.0", "h", true),
            report("0.2.0", "old", true),
            report("0.2.0", "h", true),
        ]);
        let s = compute(&sample(), &o, Timestamp::now());
        let r = cond(&s, READY);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", "ConfigMismatch")
        );
        assert!(r.message.contains("relay-1 runs old"), "{}", r.message);
        assert!(!s.members[1].config_in_sync);

        let o = healthy([
            report("0.2.0", "h", true),
            report("0.3.0", "h", true),
            report("0.2.0", "h", true),
        ]);
        let r = compute(&sample(), &o, Timestamp::now());
        let r = cond(&r, READY);
        assert_eq!(r.reason, "VersionMismatch");
        assert!(r.message.contains("0.3.0 on relay-1"), "{}", r.message);

        let o = healthy([
            report("0.2.0", "h", true),
            report("0.2.0", "h", false),
            report("0.2.0", "h", true),
        ]);
        let r = compute(&sample(), &o, Timestamp::now());
        let r = cond(&r, READY);
        assert_eq!(r.reason, "PeersUnreachable");
        assert!(
            r.message.contains("relay-1 cannot reach 10.0.0.9:7025"),
            "{}",
            r.message
        );
    }

    #[test]
    fn same_observation_same_status() {
        let mut mc = sample();
        let o = Observed {
            spec_valid: true,
            ..Default::default()
        };
        let first = compute(&mc, &o, Timestamp::UNIX_EPOCH);
        mc.status = Some(first.clone());
        let second = compute(&mc, &o, Timestamp::now());
        assert_eq!(first, second, "transition times are kept");
    }

    #[test]
    fn a_reconcile_failure_degrades_and_keeps_the_time_it_first_did() {
        let mut mc = sample();
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let o = Observed {
            statefulset: Some(sts(3, 3, true)),
            pods: vec![pod(0, true, "h"), pod(1, true, "h"), pod(2, true, "h")],
            config_hash: Some("h".into()),
            restart_hash: Some("h".into()),
            spec_valid: true,
            ..Default::default()
        };
        mc.status = Some(compute(&mc, &o, t0));
        let t1 = Timestamp::from_second(1_700_000_100).unwrap();
        let first = with_reconcile_failure(&mc, "reconcile failed: a".into(), t1);
        let d = cond(&first, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "ReconcileFailed")
        );
        assert_eq!(d.last_transition_time.0, t1);
        assert_eq!(first.conditions.len(), 3, "replaced, not added");
        assert_eq!(
            cond(&first, READY).status,
            "True",
            "the other conditions stay"
        );
        mc.status = Some(first);
        let t2 = Timestamp::from_second(1_700_000_200).unwrap();
        let second = with_reconcile_failure(&mc, "reconcile failed: b".into(), t2);
        let d = cond(&second, DEGRADED);
        assert_eq!(d.message, "reconcile failed: b");
        assert_eq!(d.last_transition_time.0, t1, "still degraded since t1");
    }

    #[test]
    fn members_reloading_a_changed_config_and_one_refusing_it() {
        let mc = sample();
        let report = |hash: &str, error: Option<&str>| {
            Ok(StatusReport {
                config_hash: hash.into(),
                config_error: error.map(str::to_owned),
                version: "1".into(),
                ..StatusReport::default()
            })
        };
        // The template is current (same restart view); members run "old" until they reload.
        let mut o = Observed {
            statefulset: Some(sts(3, 3, true)),
            pods: vec![pod(0, true, "r"), pod(1, true, "r"), pod(2, true, "r")],
            config_hash: Some("new".into()),
            restart_hash: Some("r".into()),
            spec_valid: true,
            reports: BTreeMap::from([
                ("relay-0".to_string(), report("new", None)),
                ("relay-1".to_string(), report("old", None)),
                (
                    "relay-2".to_string(),
                    report("old", Some("listeners[0].rateLimit: unknown field")),
                ),
            ]),
            ..Default::default()
        };
        let s = compute(&mc, &o, Timestamp::now());
        let p = cond(&s, PROGRESSING);
        assert_eq!(
            (p.status.as_str(), p.reason.as_str()),
            ("True", "Reloading")
        );
        assert!(p.message.contains("1/3 run it"), "{}", p.message);
        let d = cond(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "ConfigRefused")
        );
        assert!(
            d.message.contains("relay-2 refuses its configuration file")
                && d.message.contains("rateLimit"),
            "{}",
            d.message
        );
        // All reloaded: stable, nothing degraded.
        for r in o.reports.values_mut() {
            *r = report("new", None);
        }
        let s = compute(&mc, &o, Timestamp::now());
        assert_eq!(cond(&s, PROGRESSING).reason, "Stable");
        assert_eq!(cond(&s, DEGRADED).status, "False");
        assert_eq!(cond(&s, READY).status, "True");
    }
}
