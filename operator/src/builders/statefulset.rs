//! The StatefulSet of the members: one queue volume per pod, OrderedReady (members are added
//! and removed one at a time), the config hash on the pod template (a config change rolls the
//! members), probes on the admin port, non-root with a read-only root filesystem, a termination
//! grace long enough to drain, and spreading over nodes.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretVolumeSource, SecurityContext, Sysctl, TopologySpreadConstraint, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::configmap::{
    AUTH_DIR, CLUSTER_SECRET_DIR, CONFIG_DIR, DKIM_DIR, OAUTH2_DIR, QUEUE_DIR,
    SHUTDOWN_DELAY_SECONDS, SHUTDOWN_GRACE_SECONDS, TLS_DIR, auth_path, config_path, dkim_secrets,
    oauth2_secrets, smarthost_auth_secrets,
};
use super::peer_service::PEER_PORT_NAME;
use super::{
    BuildError, CONFIG_HASH_ANNOTATION, Names, image, labels, member_selector, meta,
    selector_labels,
};
use crate::crd::{ADMIN_PORT, MailCluster, PEER_PORT, Spread};

/// Name of the relay container.
pub const CONTAINER: &str = "mailnode";
/// Name of the admin port.
pub const ADMIN_PORT_NAME: &str = "admin";
/// Name of the queue volume claim template.
pub const QUEUE_VOLUME: &str = "queue";
/// User and group the node runs as.
pub const RUN_AS: i64 = 65532;
/// Seconds a member gets to finish sessions and hand its queue to its peers on shutdown:
/// the node's delay before it drains, its grace for sessions in DATA, and time for the
/// hand-over.
pub const TERMINATION_GRACE_SECONDS: i64 =
    (SHUTDOWN_DELAY_SECONDS + SHUTDOWN_GRACE_SECONDS) as i64 + 90;

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

fn secret_volume(name: &str, secret: String) -> Volume {
    Volume {
        name: name.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(ADMIN_PORT_NAME.to_string()),
            scheme: Some("HTTP".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn env_from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The StatefulSet. `config_hash` is the hash of the rendered node configuration and
/// `default_image` the operator's image for clusters that name none.
pub fn statefulset(
    mc: &MailCluster,
    config_hash: &str,
    tls_secret: Option<&str>,
    default_image: &str,
) -> Result<StatefulSet, BuildError> {
    let names = Names::of(mc)?;
    let spec = &mc.spec;

    let mut ports: Vec<ContainerPort> = spec
        .listeners
        .iter()
        .map(|l| ContainerPort {
            name: Some(l.name.clone()),
            container_port: l.port,
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        })
        .collect();
    ports.push(ContainerPort {
        name: Some(ADMIN_PORT_NAME.to_string()),
        container_port: ADMIN_PORT,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    });
    ports.push(ContainerPort {
        name: Some(PEER_PORT_NAME.to_string()),
        container_port: PEER_PORT,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    });

    let mut volumes = vec![
        Volume {
            name: "config".to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        secret_volume("cluster-key", names.cluster_secret()),
        Volume {
            name: "tmp".to_string(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("64Mi".to_string())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        mount("config", CONFIG_DIR),
        mount("cluster-key", CLUSTER_SECRET_DIR),
        VolumeMount {
            name: "tmp".to_string(),
            mount_path: "/tmp".to_string(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: QUEUE_VOLUME.to_string(),
            mount_path: QUEUE_DIR.to_string(),
            ..VolumeMount::default()
        },
    ];
    if let Some(tls) = tls_secret {
        volumes.push(secret_volume("tls", tls.to_string()));
        mounts.push(mount("tls", TLS_DIR));
    }
    if let Some(auth) = &spec.auth {
        volumes.push(secret_volume("auth", auth.secret_name.clone()));
        mounts.push(mount("auth", AUTH_DIR));
    }
    // Smarthost credentials: one volume per Secret, mounted where the rendered config says.
    for (i, secret) in smarthost_auth_secrets(spec).into_iter().enumerate() {
        let volume = format!("smarthost-auth-{i}");
        let path = auth_path(&secret.as_str().into());
        volumes.push(secret_volume(&volume, secret));
        mounts.push(mount(&volume, &path.to_string_lossy()));
    }
    // DKIM keys and OAuth2 client secrets: one volume per Secret, in their directories.
    let dirs = dkim_secrets(spec)
        .into_iter()
        .map(|(secret, _)| ("dkim", DKIM_DIR, secret))
        .chain(
            oauth2_secrets(spec)
                .into_iter()
                .map(|secret| ("oauth2", OAUTH2_DIR, secret)),
        );
    let mut counts = BTreeMap::new();
    for (kind, dir, secret) in dirs {
        let n = counts.entry(kind).or_insert(0);
        let volume = format!("{kind}-{n}");
        *n += 1;
        let path = format!("{dir}/{secret}");
        volumes.push(secret_volume(&volume, secret));
        mounts.push(mount(&volume, &path));
    }

    let resources = spec.resources.clone().unwrap_or_else(|| {
        k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("100m".to_string())),
                ("memory".to_string(), Quantity("128Mi".to_string())),
            ])),
            ..Default::default()
        }
    });

    let container = Container {
        name: CONTAINER.to_string(),
        image: Some(image(mc, default_image).to_string()),
        args: Some(vec![
            "serve".to_string(),
            "--config".to_string(),
            config_path(),
        ]),
        env: Some(vec![
            env_from_field("POD_NAME", "metadata.name"),
            env_from_field("POD_NAMESPACE", "metadata.namespace"),
            env_from_field("POD_IP", "status.podIP"),
        ]),
        ports: Some(ports),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 10, 6)),
        startup_probe: Some(probe("/healthz", 2, 60)),
        resources: Some(resources),
        security_context: Some(locked_down_container()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };

    let scheduling = spec.scheduling.clone().unwrap_or_default();
    let spread = match scheduling.spread {
        Spread::Disabled => None,
        Spread::Preferred | Spread::Required => Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".to_string(),
            when_unsatisfiable: if scheduling.spread == Spread::Required {
                "DoNotSchedule".to_string()
            } else {
                "ScheduleAnyway".to_string()
            },
            label_selector: Some(member_selector(&names)),
            ..TopologySpreadConstraint::default()
        }]),
    };

    let pod_labels = labels(&names, "member");
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(BTreeMap::from([(
                CONFIG_HASH_ANNOTATION.to_string(),
                config_hash.to_string(),
            )])),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
            enable_service_links: Some(false),
            automount_service_account_token: Some(false),
            security_context: Some(PodSecurityContext {
                // Lets the non-root node bind port 25 without any capability.
                sysctls: Some(vec![Sysctl {
                    name: "net.ipv4.ip_unprivileged_port_start".to_string(),
                    value: "0".to_string(),
                }]),
                ..non_root_pod_security()
            }),
            node_selector: (!scheduling.node_selector.is_empty())
                .then(|| scheduling.node_selector.clone()),
            tolerations: (!scheduling.tolerations.is_empty())
                .then(|| scheduling.tolerations.clone()),
            affinity: scheduling.affinity.clone(),
            topology_spread_constraints: spread,
            ..PodSpec::default()
        }),
    };

    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(QUEUE_VOLUME.to_string()),
            labels: Some(selector_labels(&names)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(spec.storage.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };

    Ok(StatefulSet {
        metadata: meta(mc, &names, names.statefulset(), "members"),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.replicas),
            service_name: Some(names.peer_service()),
            pod_management_policy: Some("OrderedReady".to_string()),
            selector: member_selector(&names),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".to_string()),
                rolling_update: Some(RollingUpdateStatefulSetStrategy {
                    partition: Some(0),
                    ..RollingUpdateStatefulSetStrategy::default()
                }),
            }),
            template,
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    })
}

/// Set an annotation on the pod template (a change rolls the members).
pub fn annotate_template(sts: &mut StatefulSet, key: &str, value: &str) {
    if let Some(spec) = sts.spec.as_mut() {
        spec.template
            .metadata
            .get_or_insert_with(ObjectMeta::default)
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(key.to_string(), value.to_string());
    }
}

/// The container security of every `mailnode` container: no privilege escalation, a read-only
/// root filesystem, no capabilities.
pub(crate) fn locked_down_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// The pod security of every pod that runs `mailnode` (members and drain Jobs): non-root as
/// [`RUN_AS`], volumes group-owned by it, the runtime's default seccomp profile.
pub(crate) fn non_root_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;
    use crate::crd::Scheduling;

    fn build() -> StatefulSet {
        statefulset(
            &sample(),
            "abc123",
            Some("smtp-example-com"),
            "mailnode:test",
        )
        .unwrap()
    }

    #[test]
    fn ordered_ready_with_hash_and_queue_volume() {
        let sts = build();
        let spec = sts.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("OrderedReady"));
        assert_eq!(spec.service_name.as_deref(), Some("relay-peers"));
        let ann = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap();
        assert_eq!(ann[CONFIG_HASH_ANNOTATION], "abc123");
        let claims = spec.volume_claim_templates.unwrap();
        assert_eq!(claims[0].metadata.name.as_deref(), Some(QUEUE_VOLUME));
        let req = claims[0]
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap();
        assert_eq!(req["storage"], Quantity("10Gi".into()));
        // Template labels must match the selector.
        let tl = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        for (k, v) in spec.selector.match_labels.unwrap() {
            assert_eq!(tl[&k], v);
        }
    }

    #[test]
    fn probes_on_admin_port_and_hardened() {
        let sts = build();
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("mailnode:test"));
        assert_eq!(c.args.as_ref().unwrap()[0], "serve");
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(ready.port, IntOrString::String(ADMIN_PORT_NAME.into()));
        let live = c
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(live.path.as_deref(), Some("/healthz"));
        let admin = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .find(|p| p.name.as_deref() == Some(ADMIN_PORT_NAME))
            .unwrap();
        assert_eq!(admin.container_port, ADMIN_PORT);
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            pod.security_context.as_ref().unwrap().run_as_user,
            Some(RUN_AS)
        );
        assert!(pod.termination_grace_period_seconds.unwrap() > SHUTDOWN_GRACE_SECONDS as i64);
        let mounts: Vec<_> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert!(
            mounts.contains(&QUEUE_DIR) && mounts.contains(&TLS_DIR) && mounts.contains(&AUTH_DIR)
        );
        let ports: Vec<_> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [25, 587, 2525, ADMIN_PORT, PEER_PORT]);
    }

    #[test]
    fn spreads_over_nodes_by_default() {
        let pod = build().spec.unwrap().template.spec.unwrap();
        let tsc = &pod.topology_spread_constraints.unwrap()[0];
        assert_eq!(tsc.topology_key, "kubernetes.io/hostname");
        assert_eq!(tsc.when_unsatisfiable, "ScheduleAnyway");
        let mut mc = sample();
        mc.spec.scheduling = Some(Scheduling {
            spread: Spread::Required,
            ..Default::default()
        });
        let pod = statefulset(&mc, "h", None, "i")
            .unwrap()
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        assert_eq!(
            pod.topology_spread_constraints.unwrap()[0].when_unsatisfiable,
            "DoNotSchedule"
        );
        mc.spec.scheduling = Some(Scheduling {
            spread: Spread::Disabled,
            ..Default::default()
        });
        let pod = statefulset(&mc, "h", None, "i")
            .unwrap()
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        assert!(pod.topology_spread_constraints.is_none());
    }

    #[test]
    fn image_from_spec_wins() {
        let mut mc = sample();
        mc.spec.image = Some("registry.example/mailnode:1.2".into());
        let pod = statefulset(&mc, "h", None, "default")
            .unwrap()
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some("registry.example/mailnode:1.2")
        );
    }

    #[test]
    fn smarthost_credentials_secrets_are_mounted_read_only_where_the_config_points() {
        let mut mc = sample();
        mc.spec.delivery.auth_secret = Some("m365-relay".into());
        mc.spec
            .delivery
            .sender_routes
            .push(crate::crd::SenderRoute {
                sender_domains: vec!["brand-b.example".into()],
                users: Vec::new(),
                smarthosts: mc.spec.delivery.smarthosts.clone(),
                tls: None,
                auth_secret: Some("m365-brand-b".into()),
                oauth2: None,
                limits: None,
            });
        let sts = statefulset(&mc, "h", None, "img").unwrap();
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let volumes = pod.volumes.unwrap();
        let secret_of = |name: &str| {
            volumes
                .iter()
                .find(|v| v.name == name)
                .and_then(|v| v.secret.as_ref())
                .and_then(|s| s.secret_name.clone())
        };
        assert_eq!(
            secret_of("smarthost-auth-0").as_deref(),
            Some("m365-brand-b")
        );
        assert_eq!(secret_of("smarthost-auth-1").as_deref(), Some("m365-relay"));
        let mounts = pod.containers[0].volume_mounts.clone().unwrap();
        let m = mounts
            .iter()
            .find(|m| m.name == "smarthost-auth-1")
            .unwrap();
        assert_eq!(m.mount_path, "/etc/mailnode/smarthost-auth/m365-relay");
        assert_eq!(m.read_only, Some(true));
    }

    #[test]
    fn dkim_key_secrets_are_mounted_once_each_where_the_config_points() {
        let mut mc = sample();
        let key = |selector: &str, secret: &str, key: Option<&str>| crate::crd::DkimKeyRef {
            selector: selector.into(),
            secret_name: secret.into(),
            key: key.map(Into::into),
        };
        mc.spec.delivery.dkim.push(crate::crd::DkimSigning {
            domain: "example.com".into(),
            keys: vec![
                key("rsa2026", "dkim-example", None),
                key("ed2026", "dkim-example", Some("ed.key")),
            ],
            listeners: Vec::new(),
            headers: Vec::new(),
        });
        mc.spec.delivery.dkim.push(crate::crd::DkimSigning {
            domain: "brand-b.example".into(),
            keys: vec![key("s1", "dkim-brand-b", None)],
            listeners: Vec::new(),
            headers: Vec::new(),
        });
        let sts = statefulset(&mc, "h", None, "img").unwrap();
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let volumes = pod.volumes.unwrap();
        let dkim: Vec<_> = volumes
            .iter()
            .filter(|v| v.name.starts_with("dkim-"))
            .filter_map(|v| v.secret.as_ref().and_then(|s| s.secret_name.clone()))
            .collect();
        assert_eq!(dkim, ["dkim-brand-b", "dkim-example"]);
        let mounts = pod.containers[0].volume_mounts.clone().unwrap();
        let m = mounts.iter().find(|m| m.name == "dkim-1").unwrap();
        assert_eq!(m.mount_path, "/etc/mailnode/dkim/dkim-example");
        assert_eq!(m.read_only, Some(true));
        let c = crate::builders::configmap::node_config(&mc, &[]).unwrap();
        let files: Vec<_> = c.delivery.dkim[0]
            .keys
            .iter()
            .map(|k| k.key_file.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            files,
            [
                "/etc/mailnode/dkim/dkim-example/private.key",
                "/etc/mailnode/dkim/dkim-example/ed.key"
            ]
        );
    }
}
