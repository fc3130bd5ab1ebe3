//! One reconcile of a MailCluster: build the desired children with the pure builders, apply
//! those that differ from the live objects, read back what is observable and write the status
//! only if it changed. A reconcile that finds everything as desired makes no write.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::apply::{self, ApplyError};
use crate::builders::{
    self, BuildError, CLUSTER_LABEL, COMPONENT_LABEL, FIELD_MANAGER, Names, certificate, configmap,
    dnsendpoint, drain_job, listener_service, networkpolicy, pdb, peer_service, secret,
    statefulset,
};
use crate::crd::{MailCluster, MailClusterStatus, OrphanedVolumePolicy, OrphanedVolumeStatus};
use crate::member_status::{self, MemberAddress};
use crate::metrics::Metrics;
use crate::status::{self, DEGRADED, Observed, Problem};

/// Errors of a reconcile; each says what failed and on which object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a child failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// A request to the API server failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The MailCluster lacks name or namespace.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// No randomness for the cluster key.
    #[error("cannot generate the cluster key: {0}")]
    Random(getrandom::Error),
    /// Status cannot be serialized.
    #[error("serializing the status: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl Error {
    /// A short class for the error metric.
    pub fn class(&self) -> &'static str {
        match self {
            Error::Apply(_) | Error::Kube { .. } => "kube",
            Error::Build(_) => "spec",
            Error::Random(_) => "random",
            Error::Serialize(_) => "serialize",
        }
    }
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Kube { what, source }
}

/// Settings of the operator that reconciles read.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Image of the relay node for clusters that name none.
    pub default_image: String,
    /// Requeue interval of a healthy cluster (drift of objects not watched, e.g. DNSEndpoint).
    pub resync: Duration,
    /// How often the member table (queue depth, loaded configuration, peers reached) is read
    /// again from every member's `/status`: nothing about a member's queue is watched.
    pub member_refresh: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            default_image: crate::DEFAULT_IMAGE.to_string(),
            resync: Duration::from_secs(300),
            member_refresh: Duration::from_secs(15),
        }
    }
}

/// Shared state of the reconciles.
#[derive(Clone)]
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Operator settings.
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Where a member's admin port is reached for its `/status`.
    pub member_address: MemberAddress,
    /// How long a member's `/status` may take.
    pub status_timeout: Duration,
    failures: Arc<Mutex<HashMap<ObjectRef<MailCluster>, u32>>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context; `instance` names this operator instance in events.
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>, instance: &str) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: Some(instance.to_string()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            member_address: member_status::pod_admin_address(),
            status_timeout: Duration::from_secs(2),
            failures: Arc::default(),
        }
    }

    /// The same context reaching members' admin ports through `address` (tests serve real
    /// or fake nodes on loopback, since fake pods' IPs are not reachable).
    pub fn with_member_address(mut self, address: MemberAddress) -> Self {
        self.member_address = address;
        self
    }

    /// Backoff after `n` consecutive failures: 2s doubling to 5 minutes.
    pub fn backoff(n: u32) -> Duration {
        let secs = 2u64.saturating_mul(1u64 << n.min(8));
        Duration::from_secs(secs.min(300))
    }

    fn record_failure(&self, mc: &MailCluster) -> u32 {
        let mut m = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ObjectRef::from(mc)).or_insert(0);
        *n += 1;
        *n
    }

    fn reset_failures(&self, mc: &MailCluster) {
        let mut m = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&ObjectRef::from(mc));
    }

    async fn event(&self, mc: &MailCluster, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &mc.object_ref(&())).await {
            tracing::warn!(error = %e, cluster = %builders::describe(mc), "cannot publish event");
        } else {
            self.metrics.writes.inc();
        }
    }
}

/// Reconciles one MailCluster (the controller's reconciler).
pub async fn reconcile(mc: Arc<MailCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let result = reconcile_inner(&mc, &ctx).await;
    ctx.metrics.observe(start.elapsed());
    match &result {
        Ok(_) => ctx.reset_failures(&mc),
        Err(e) => {
            ctx.metrics.error(e.class());
            tracing::warn!(cluster = %builders::describe(&mc), error = %e, "reconcile failed");
            // Tell a person once per distinct error: an event and the Degraded condition.
            let message = format!("reconcile failed, retrying with backoff: {e}");
            let old = mc
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == DEGRADED))
                .map(|c| c.message.clone());
            if old.as_deref() != Some(message.as_str()) {
                ctx.event(&mc, EventType::Warning, "ReconcileFailed", e.to_string())
                    .await;
                if let Err(pe) = patch_degraded(&mc, &ctx, &message).await {
                    tracing::warn!(error = %pe, "cannot write the Degraded condition");
                }
            }
        }
    }
    result
}

/// The controller's error policy: per-object exponential backoff.
pub fn error_policy(mc: Arc<MailCluster>, _e: &Error, ctx: Arc<Context>) -> Action {
    let n = ctx.record_failure(&mc);
    Action::requeue(Context::backoff(n))
}

async fn patch_degraded(mc: &MailCluster, ctx: &Context, message: &str) -> Result<(), Error> {
    let mut st = mc.status.clone().unwrap_or_default();
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now());
    st.conditions.retain(|c| c.type_ != DEGRADED);
    st.conditions
        .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: DEGRADED.to_string(),
            status: "True".to_string(),
            reason: "ReconcileFailed".to_string(),
            message: message.to_string(),
            observed_generation: mc.metadata.generation,
            last_transition_time: now,
        });
    write_status(mc, ctx, &st).await
}

async fn write_status(
    mc: &MailCluster,
    ctx: &Context,
    st: &MailClusterStatus,
) -> Result<(), Error> {
    let names = Names::of(mc)?;
    let api: Api<MailCluster> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let body = json!({
        "apiVersion": MailCluster::api_version(&()),
        "kind": MailCluster::kind(&()),
        "status": st,
    });
    api.patch_status(
        &names.cluster,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(kube_err(format!(
        "writing the status of MailCluster {}",
        names.cluster
    )))?;
    ctx.metrics.writes.inc();
    Ok(())
}

/// What a reconcile changed, for events.
#[derive(Debug, Default)]
struct Changes(Vec<String>);

impl Changes {
    fn note<K: Resource<DynamicType = ()>>(&mut self, obj: &K, changed: bool) {
        if changed {
            self.0.push(format!(
                "{} {}",
                K::kind(&()),
                obj.meta().name.clone().unwrap_or_default()
            ));
        }
    }
}

async fn apply_counted<K>(
    ctx: &Context,
    api: &Api<K>,
    desired: &K,
    changes: &mut Changes,
) -> Result<K, ApplyError>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let applied = apply::apply(api, desired).await?;
    if applied.changed {
        ctx.metrics.writes.inc();
    }
    changes.note(&applied.object, applied.changed);
    Ok(applied.object)
}

async fn reconcile_inner(mc: &MailCluster, ctx: &Context) -> Result<Action, Error> {
    let names = Names::of(mc)?;
    let client = ctx.client.clone();
    let ns = names.namespace.as_str();
    let mut changes = Changes::default();
    let mut observed = Observed {
        spec_valid: true,
        ..Observed::default()
    };

    // The cluster key: generated once, kept afterwards, rotated on request (see
    // `builders::secret`): a new key in front of the old one, the old one dropped once every
    // member rolled onto a pod template with the new key's hash.
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let live_sts = sts_api
        .get_opt(&names.statefulset())
        .await
        .map_err(kube_err("reading the StatefulSet"))?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let live_secret = secrets
        .get_opt(&names.cluster_secret())
        .await
        .map_err(kube_err(format!(
            "reading Secret {}",
            names.cluster_secret()
        )))?;
    let keys = live_secret
        .as_ref()
        .map(secret::existing_keys)
        .unwrap_or_default();
    let served = live_secret.as_ref().and_then(secret::served_request);
    let request = mc.annotations().get(secret::ROTATE_ANNOTATION).cloned();
    let rolled = keys
        .first()
        .is_some_and(|k| members_rolled(mc, live_sts.as_ref(), &secret::key_hash(k)));
    let step = secret::key_step(&keys, request.as_deref(), served.as_deref(), rolled);
    let keys = secret::apply_key_step(&keys, &step, secret::generate_key).map_err(Error::Random)?;
    let served = if step == secret::KeyStep::Add {
        request.or(served)
    } else {
        served
    };
    apply_counted(
        ctx,
        &secrets,
        &secret::cluster_secret_keys(mc, &keys, served.as_deref())?,
        &mut changes,
    )
    .await?;
    match step {
        secret::KeyStep::Add if keys.len() > 1 => {
            ctx.event(
                mc,
                EventType::Normal,
                "RotatingKey",
                "added a new cluster key; members accept the old and the new key until all of them restarted with it".to_string(),
            )
            .await;
        }
        secret::KeyStep::DropOld => {
            ctx.event(
                mc,
                EventType::Normal,
                "KeyRotated",
                "every member runs with the new cluster key; dropped the old key".to_string(),
            )
            .await;
        }
        _ => {}
    }
    let key_hash = keys
        .first()
        .map(|k| secret::key_hash(k))
        .unwrap_or_default();

    // Listener Services first: their load balancer addresses go into config and DNS.
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let mut live_listeners = Vec::new();
    let desired_listeners = listener_service::listener_services(mc)?;
    for svc in &desired_listeners {
        live_listeners.push(apply_counted(ctx, &services, svc, &mut changes).await?);
    }
    let wanted: BTreeSet<String> = desired_listeners.iter().map(|s| s.name_any()).collect();
    let selector = format!(
        "{CLUSTER_LABEL}={},{COMPONENT_LABEL}={}",
        names.cluster,
        listener_service::COMPONENT
    );
    let existing = services
        .list_metadata(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_err("listing listener Services"))?;
    for s in existing {
        let name = s.name_any();
        if !wanted.contains(&name) && apply::delete_if_exists(&services, &name).await? {
            ctx.metrics.writes.inc();
            changes.0.push(format!("deleted Service {name}"));
        }
    }
    observed.addresses = listener_service::ingress_addresses(&live_listeners);
    let self_ips: Vec<IpAddr> = observed
        .addresses
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();

    // Node configuration. A spec the node cannot run degrades the cluster until it is fixed;
    // nothing else is changed meanwhile, and there is no error loop.
    let rendered = match configmap::node_config(mc, &self_ips).and_then(|c| configmap::render(&c)) {
        Ok(r) => Some(r),
        Err(e) => {
            observed.spec_valid = false;
            observed.problems.push(Problem::new(
                "InvalidSpec",
                format!("{e}; fix the MailCluster spec"),
            ));
            None
        }
    };

    if let Some(rendered) = &rendered {
        observed.config_hash = Some(rendered.hash.clone());
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        apply_counted(
            ctx,
            &cms,
            &configmap::config_map(mc, rendered)?,
            &mut changes,
        )
        .await?;
        apply_counted(
            ctx,
            &services,
            &peer_service::peer_service(mc)?,
            &mut changes,
        )
        .await?;
        let tls_secret = certificate::tls_secret_name(mc)?;
        let mut sts = statefulset::statefulset(
            mc,
            &rendered.hash,
            tls_secret.as_deref(),
            &ctx.settings.default_image,
        )?;
        statefulset::annotate_template(&mut sts, secret::KEY_HASH_ANNOTATION, &key_hash);
        observed.statefulset = Some(apply_counted(ctx, &sts_api, &sts, &mut changes).await?);
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
        apply_counted(ctx, &pdbs, &pdb::pdb(mc)?, &mut changes).await?;
        let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
        apply_counted(ctx, &nps, &networkpolicy::network_policy(mc)?, &mut changes).await?;

        // cert-manager Certificate, when an issuer is given and cert-manager is installed.
        let certs: Api<certificate::Certificate> = Api::namespaced(client.clone(), ns);
        match certificate::certificate(mc)? {
            Some(cert) => match apply_counted(ctx, &certs, &cert, &mut changes).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => observed.problems.push(Problem::new(
                    "CertificateCRDMissing",
                    "spec.tls.issuerRef needs cert-manager, but the Certificate kind (cert-manager.io/v1) is not installed: install cert-manager or use spec.tls.secretName",
                )),
                Err(e) => return Err(e.into()),
            },
            None => delete_optional(ctx, &certs, &names.certificate(), &mut changes).await?,
        }
    } else {
        observed.statefulset = live_sts;
    }

    // DNS records, once load balancer addresses exist.
    let dns_api: Api<dnsendpoint::DNSEndpoint> = Api::namespaced(client.clone(), ns);
    match dnsendpoint::dns_endpoint(mc, &observed.addresses)? {
        Some(ep) => match apply_counted(ctx, &dns_api, &ep, &mut changes).await {
            Ok(_) => observed.dns_records = dnsendpoint::records(mc, &observed.addresses),
            Err(e) if e.is_not_found() => observed.problems.push(Problem::new(
                "DNSEndpointCRDMissing",
                "DNS records cannot be published: the DNSEndpoint kind (externaldns.k8s.io/v1alpha1) is not installed; install external-dns with its CRD source, or set spec.dns.enabled: false",
            )),
            Err(e) => return Err(e.into()),
        },
        None => delete_optional(ctx, &dns_api, &names.statefulset(), &mut changes).await?,
    }

    // Members.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let sel = builders::selector_labels(&names)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    observed.pods = pods
        .list(&ListParams::default().labels(&sel))
        .await
        .map_err(kube_err("listing member pods"))?
        .items;
    observed.reports = member_reports(ctx, &observed.pods).await;

    // Queue volumes of removed members.
    observed.orphaned_volumes = orphaned_volumes(mc, ctx, &observed.pods, &mut changes).await?;
    for v in &observed.orphaned_volumes {
        if v.phase == "Failed" {
            observed.problems.push(Problem::new(
                "DrainFailed",
                format!(
                    "the drain Job {} of the removed member's volume {} failed; see `kubectl logs job/{}`. The volume is kept; delete the Job to retry",
                    v.job.as_deref().unwrap_or_default(),
                    v.claim,
                    v.job.as_deref().unwrap_or_default()
                ),
            ));
        }
    }

    let new_status = status::compute(mc, &observed, Timestamp::now());
    if !changes.0.is_empty() {
        ctx.event(
            mc,
            EventType::Normal,
            "Applied",
            format!("applied {}", changes.0.join(", ")),
        )
        .await;
    }
    let old_status = mc.status.clone().unwrap_or_default();
    if new_status != old_status {
        announce_condition_changes(mc, ctx, &old_status, &new_status).await;
        write_status(mc, ctx, &new_status).await?;
    }
    let ready = new_status
        .conditions
        .iter()
        .any(|c| c.type_ == status::READY && c.status == "True");
    let draining = new_status
        .orphaned_volumes
        .iter()
        .any(|v| v.phase == "Draining" || v.phase == "Drained");
    if draining {
        // Job status changes are not watched.
        Ok(Action::requeue(Duration::from_secs(10)))
    } else if observed.spec_valid && !ready {
        // Watches on the StatefulSet and pods bring changes sooner; this is a safety net.
        Ok(Action::requeue(Duration::from_secs(30)))
    } else {
        Ok(Action::requeue(
            ctx.settings.member_refresh.min(ctx.settings.resync),
        ))
    }
}

/// Whether every member runs a pod template whose key hash is `key_hash` and is Ready: the
/// StatefulSet saw its current spec, has one revision and all replicas updated and ready.
fn members_rolled(mc: &MailCluster, sts: Option<&StatefulSet>, key_hash: &str) -> bool {
    let Some(sts) = sts else { return false };
    let template_has_key = sts
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(secret::KEY_HASH_ANNOTATION))
        .is_some_and(|h| h == key_hash);
    let Some(st) = sts.status.as_ref() else {
        return false;
    };
    let want = mc.spec.replicas;
    template_has_key
        && st.observed_generation.is_some()
        && st.observed_generation == sts.metadata.generation
        && st.current_revision.is_some()
        && st.current_revision == st.update_revision
        && st.updated_replicas.unwrap_or(0) >= want
        && st.ready_replicas.unwrap_or(0) >= want
}

/// Read `/status` of every ready member, concurrently, each with the context's timeout.
async fn member_reports(
    ctx: &Context,
    pods: &[Pod],
) -> std::collections::BTreeMap<String, Result<mailnode_api::status::StatusReport, String>> {
    let asks = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && status::pod_ready(p))
        .filter_map(|p| Some((p.name_any(), (ctx.member_address)(p)?)))
        .map(|(name, addr)| {
            let timeout = ctx.status_timeout;
            async move {
                let report = member_status::fetch(addr, timeout).await;
                if let Err(e) = &report {
                    tracing::debug!(pod = %name, error = %e, "cannot read member status");
                }
                (name, report)
            }
        });
    futures::future::join_all(asks).await.into_iter().collect()
}

/// Queue volumes of members at or above `spec.replicas` whose pod is gone: drained by a Job and
/// deleted once it succeeded (`Drain`), or kept (`Retain`). Drain Jobs of volumes that are no
/// longer orphaned (scaled up again) or gone are deleted.
async fn orphaned_volumes(
    mc: &MailCluster,
    ctx: &Context,
    pods: &[Pod],
    changes: &mut Changes,
) -> Result<Vec<OrphanedVolumeStatus>, Error> {
    let names = Names::of(mc)?;
    let ns = names.namespace.as_str();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let sel = builders::selector_labels(&names)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let claims: Vec<String> = pvcs
        .list_metadata(&ListParams::default().labels(&sel))
        .await
        .map_err(kube_err("listing queue volumes"))?
        .items
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .map(|c| c.name_any())
        .collect();
    let pod_names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
    let orphans = drain_job::orphaned_claims(&names, mc.spec.replicas, &claims, &pod_names);
    let policy = mc.spec.storage.orphaned_volume_policy;
    let mut out = Vec::new();
    for (ordinal, claim) in &orphans {
        if policy == OrphanedVolumePolicy::Retain {
            out.push(OrphanedVolumeStatus {
                claim: claim.clone(),
                job: None,
                phase: "Retained".to_string(),
            });
            continue;
        }
        let job_name = drain_job::job_name(&names, *ordinal);
        let job = match jobs
            .get_opt(&job_name)
            .await
            .map_err(kube_err(format!("reading Job {job_name}")))?
        {
            Some(j) => j,
            None => {
                let desired = drain_job::drain_job(mc, *ordinal, &ctx.settings.default_image)?;
                let created = apply_counted(ctx, &jobs, &desired, changes).await?;
                ctx.event(
                    mc,
                    EventType::Normal,
                    "DrainingVolume",
                    format!("started Job {job_name} to hand the mail on the removed member's volume {claim} to the members"),
                )
                .await;
                created
            }
        };
        let phase = if drain_job::succeeded(&job) {
            if apply::delete_if_exists(&pvcs, claim).await? {
                ctx.metrics.writes.inc();
                changes
                    .0
                    .push(format!("deleted PersistentVolumeClaim {claim}"));
                ctx.event(
                    mc,
                    EventType::Normal,
                    "VolumeDrained",
                    format!("Job {job_name} handed the mail on {claim} to the members; deleted the volume"),
                )
                .await;
            }
            "Drained"
        } else if drain_job::failed(&job) {
            "Failed"
        } else {
            "Draining"
        };
        out.push(OrphanedVolumeStatus {
            claim: claim.clone(),
            job: Some(job_name),
            phase: phase.to_string(),
        });
    }
    // Drain Jobs whose volume is gone (done) or belongs to a member again.
    let job_sel = drain_job::job_labels(&names)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let live_jobs = jobs
        .list_metadata(&ListParams::default().labels(&job_sel))
        .await
        .map_err(kube_err("listing drain Jobs"))?;
    for j in live_jobs {
        let name = j.name_any();
        let still_needed = orphans
            .iter()
            .any(|(o, claim)| drain_job::job_name(&names, *o) == name && claims.contains(claim))
            && policy == OrphanedVolumePolicy::Drain;
        if !still_needed
            && j.metadata.deletion_timestamp.is_none()
            && apply::delete_if_exists(&jobs, &name).await?
        {
            ctx.metrics.writes.inc();
            changes.0.push(format!("deleted Job {name}"));
        }
    }
    Ok(out)
}

async fn delete_optional<K>(
    ctx: &Context,
    api: &Api<K>,
    name: &str,
    changes: &mut Changes,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    match apply::delete_if_exists(api, name).await {
        Ok(true) => {
            ctx.metrics.writes.inc();
            changes.0.push(format!("deleted {} {name}", K::kind(&())));
            Ok(())
        }
        Ok(false) => Ok(()),
        // The kind is not installed: there is nothing to delete.
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn announce_condition_changes(
    mc: &MailCluster,
    ctx: &Context,
    old: &MailClusterStatus,
    new: &MailClusterStatus,
) {
    for c in &new.conditions {
        let before = old.conditions.iter().find(|o| o.type_ == c.type_);
        let changed = before.is_none_or(|b| b.status != c.status || b.reason != c.reason);
        if !changed {
            continue;
        }
        let warn = c.type_ == DEGRADED && c.status == "True";
        let interesting =
            warn || (c.type_ == status::READY && (c.status == "True" || before.is_some()));
        if interesting {
            ctx.event(
                mc,
                if warn {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                &c.reason,
                format!("{} is {}: {}", c.type_, c.status, c.message),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_minutes() {
        assert_eq!(Context::backoff(0), Duration::from_secs(2));
        assert_eq!(Context::backoff(1), Duration::from_secs(4));
        assert_eq!(Context::backoff(3), Duration::from_secs(16));
        assert_eq!(Context::backoff(20), Duration::from_secs(300));
    }
}
