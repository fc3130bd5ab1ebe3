//! One reconcile of a MailCluster, as a pipeline: observe what the build needs (the
//! StatefulSet, the cluster key, the listener Services' load balancer addresses), build the
//! desired children with the pure builders, apply those that differ from the live objects and
//! prune those no longer wanted (one [`Applier`] does every write), observe the members, and
//! write the status (computed by [`status::compute`], the one place conditions are made) only
//! if it changed. A reconcile that finds everything as desired makes no write.

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

use crate::applier::Applier;
use crate::apply::ApplyError;
use crate::builders::{
    self, BuildError, FIELD_MANAGER, Names, certificate, configmap, dnsendpoint, drain_job,
    listener_service, networkpolicy, pdb, peer_service, secret, statefulset,
};
use crate::crd::{
    MailCluster, MailClusterStatus, OrphanedVolumePolicy, OrphanedVolumeStatus, VolumePhase,
};
use crate::member_status::{self, MemberAddress};
use crate::metrics::Metrics;
use crate::reasons::Reason;
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

    async fn event(&self, mc: &MailCluster, type_: EventType, reason: Reason, note: String) {
        self.publish(mc, type_, reason.as_str(), note).await;
    }

    async fn publish(&self, mc: &MailCluster, type_: EventType, reason: &str, note: String) {
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
                ctx.event(
                    &mc,
                    EventType::Warning,
                    Reason::ReconcileFailed,
                    e.to_string(),
                )
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
    let st = status::with_reconcile_failure(mc, message.to_string(), Timestamp::now());
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

/// One reconcile, in the order of the data it needs: observe what the build depends on (the
/// StatefulSet, the cluster key, the listener Services' load balancer addresses), build the
/// children, apply them and prune what is no longer wanted, observe the members, and write the
/// status. Every write goes through one [`Applier`].
async fn reconcile_inner(mc: &MailCluster, ctx: &Context) -> Result<Action, Error> {
    let names = Names::of(mc)?;
    let ns = names.namespace.as_str();
    let mut applier = Applier::new(&ctx.metrics.writes);
    let mut observed = Observed {
        spec_valid: true,
        ..Observed::default()
    };

    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let live_sts = sts_api
        .get_opt(&names.statefulset())
        .await
        .map_err(kube_err("reading the StatefulSet"))?;
    let key_hash = cluster_key(mc, ctx, &names, live_sts.as_ref(), &mut applier).await?;
    observed.addresses = listener_services(mc, ctx, &names, &mut applier).await?;
    let self_ips: Vec<IpAddr> = observed
        .addresses
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();

    // A spec the node cannot run degrades the cluster until it is fixed; nothing else is
    // changed meanwhile, and there is no error loop.
    match configmap::node_config(mc, &self_ips).and_then(|c| configmap::render(&c)) {
        Ok(rendered) => {
            let desired = Desired::build(mc, &rendered, &key_hash, &ctx.settings.default_image)?;
            observed.config_hash = Some(rendered.hash);
            observed.restart_hash = Some(rendered.restart_hash);
            observed.statefulset = Some(
                desired
                    .apply(ctx, &names, &mut applier, &mut observed)
                    .await?,
            );
        }
        Err(e) => {
            observed.spec_valid = false;
            observed.problems.push(Problem::new(
                Reason::InvalidSpec,
                format!("{e}; fix the MailCluster spec"),
            ));
            observed.statefulset = live_sts;
        }
    }
    dns_records(mc, ctx, &names, &mut applier, &mut observed).await?;
    // The Secrets the members mount for next hops and signing: each must exist and hold its keys.
    let needed = configmap::smarthost_auth_secrets(&mc.spec)
        .into_iter()
        .map(|s| (s, SecretUse::Smarthost))
        .chain(
            configmap::oauth2_secrets(&mc.spec)
                .into_iter()
                .map(|s| (s, SecretUse::OAuth2)),
        )
        .chain(
            configmap::dkim_secrets(&mc.spec)
                .into_iter()
                .map(|(s, keys)| (s, SecretUse::Dkim(keys))),
        );
    for (secret, usage) in needed {
        let live = Api::<Secret>::namespaced(ctx.client.clone(), ns)
            .get_opt(&secret)
            .await
            .map_err(kube_err(format!("reading Secret {secret}")))?;
        let live = live.as_ref();
        let (reason, problem) = match &usage {
            SecretUse::Smarthost => (
                Reason::SmarthostSecretInvalid,
                smarthost_secret_problem(&secret, live),
            ),
            SecretUse::OAuth2 => (
                Reason::SmarthostSecretInvalid,
                oauth2_secret_problem(&secret, live),
            ),
            SecretUse::Dkim(keys) => (
                Reason::DkimSecretInvalid,
                dkim_secret_problem(&secret, keys, live),
            ),
        };
        if let Some(message) = problem {
            observed.problems.push(Problem::new(reason, message));
        }
    }

    // The members, and the queue volumes of removed members.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
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
    observed.orphaned_volumes = orphaned_volumes(mc, ctx, &observed.pods, &mut applier).await?;
    for v in &observed.orphaned_volumes {
        if v.phase == VolumePhase::Failed {
            observed.problems.push(Problem::new(
                Reason::DrainFailed,
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
    if let Some(applied) = applier.summary() {
        ctx.event(mc, EventType::Normal, Reason::Applied, applied)
            .await;
    }
    let old_status = mc.status.clone().unwrap_or_default();
    if new_status != old_status {
        announce_condition_changes(mc, ctx, &old_status, &new_status).await;
        write_status(mc, ctx, &new_status).await?;
    }
    Ok(Action::requeue(next_reconcile(
        &new_status,
        observed.spec_valid,
        &ctx.settings,
    )))
}

/// What is wrong with a smarthost credentials Secret the spec names, if anything: members
/// cannot start without it, and cannot authenticate without both keys.
fn smarthost_secret_problem(name: &str, secret: Option<&Secret>) -> Option<String> {
    let Some(secret) = secret else {
        return Some(format!(
            "the smarthost credentials Secret {name} does not exist; members cannot start until it does: `kubectl create secret generic {name} --type=kubernetes.io/basic-auth --from-literal=username=... --from-literal=password=...`"
        ));
    };
    let missing = missing_keys(secret, &["username", "password"]);
    (!missing.is_empty()).then(|| {
        format!(
            "the smarthost credentials Secret {name} has no {}; SMTP AUTH to its next hops fails until it does",
            missing.join(" and no ")
        )
    })
}

/// What a Secret the spec names is for.
enum SecretUse {
    /// Smarthost credentials (`username`, `password`).
    Smarthost,
    /// An OAuth2 client secret (`clientSecret`).
    OAuth2,
    /// DKIM private keys, under these keys.
    Dkim(Vec<String>),
}

/// What is wrong with an OAuth2 client secret Secret, if anything.
fn oauth2_secret_problem(name: &str, secret: Option<&Secret>) -> Option<String> {
    let key = crate::crd::OAUTH2_SECRET_KEY;
    let Some(secret) = secret else {
        return Some(format!(
            "the OAuth2 client secret Secret {name} does not exist; members cannot start until it does: `kubectl create secret generic {name} --from-literal={key}=...`"
        ));
    };
    (!missing_keys(secret, &[key]).is_empty()).then(|| {
        format!(
            "the OAuth2 client secret Secret {name} has no {key}; SMTP AUTH to its next hops fails until it does"
        )
    })
}

/// What is wrong with a DKIM key Secret that should hold `keys`, if anything.
fn dkim_secret_problem(name: &str, keys: &[String], secret: Option<&Secret>) -> Option<String> {
    let Some(secret) = secret else {
        return Some(format!(
            "the DKIM key Secret {name} does not exist; members cannot start until it does: `kubectl create secret generic {name} --from-file={}=dkim.pem`",
            keys.first()
                .map_or(crate::crd::DKIM_SECRET_KEY, String::as_str)
        ));
    };
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let missing = missing_keys(secret, &keys);
    (!missing.is_empty()).then(|| {
        format!(
            "the DKIM key Secret {name} has no {}; members refuse the config (mail waits, unsigned mail is not sent) until it does",
            missing.join(" and no ")
        )
    })
}

/// The keys of `keys` the Secret has no non-empty value for.
fn missing_keys<'a>(secret: &Secret, keys: &[&'a str]) -> Vec<&'a str> {
    let has = |key: &str| {
        secret
            .data
            .as_ref()
            .is_some_and(|d| d.get(key).is_some_and(|v| !v.0.is_empty()))
            || secret
                .string_data
                .as_ref()
                .is_some_and(|d| d.get(key).is_some_and(|v| !v.is_empty()))
    };
    keys.iter().copied().filter(|k| !has(k)).collect()
}

/// When to look again without a watch event.
fn next_reconcile(st: &MailClusterStatus, spec_valid: bool, settings: &Settings) -> Duration {
    let ready = st
        .conditions
        .iter()
        .any(|c| c.type_ == status::READY && c.status == "True");
    let draining = st
        .orphaned_volumes
        .iter()
        .any(|v| matches!(v.phase, VolumePhase::Draining | VolumePhase::Drained));
    if draining {
        // Job status changes are not watched.
        Duration::from_secs(10)
    } else if spec_valid && !ready {
        // Watches on the StatefulSet and pods bring changes sooner; this is a safety net. A
        // member's own report (a peer reachable again, a config loaded) is only seen by asking
        // it, so not later than the member refresh.
        Duration::from_secs(30).min(settings.member_refresh)
    } else {
        settings.member_refresh.min(settings.resync)
    }
}

/// The cluster key (see `builders::secret`): generated once, kept afterwards, rotated on
/// request: a new key in front of the old one, the old one dropped once every member rolled
/// onto a pod template with the new key's hash. Applies the Secret and returns the hash of the
/// key members run with.
async fn cluster_key(
    mc: &MailCluster,
    ctx: &Context,
    names: &Names,
    live_sts: Option<&StatefulSet>,
    applier: &mut Applier<'_>,
) -> Result<String, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &names.namespace);
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
        .is_some_and(|k| members_rolled(mc, live_sts, &secret::key_hash(k)));
    let step = secret::key_step(&keys, request.as_deref(), served.as_deref(), rolled);
    let keys = secret::apply_key_step(&keys, &step, secret::generate_key).map_err(Error::Random)?;
    let served = if step == secret::KeyStep::Add {
        request.or(served)
    } else {
        served
    };
    applier
        .apply(
            &secrets,
            &secret::cluster_secret_keys(mc, &keys, served.as_deref())?,
        )
        .await?;
    match step {
        secret::KeyStep::Add if keys.len() > 1 => {
            ctx.event(
                mc,
                EventType::Normal,
                Reason::RotatingKey,
                "added a new cluster key; members accept the old and the new key until all of them restarted with it".to_string(),
            )
            .await;
        }
        secret::KeyStep::DropOld => {
            ctx.event(
                mc,
                EventType::Normal,
                Reason::KeyRotated,
                "every member runs with the new cluster key; dropped the old key".to_string(),
            )
            .await;
        }
        _ => {}
    }
    Ok(keys
        .first()
        .map(|k| secret::key_hash(k))
        .unwrap_or_default())
}

/// The listener Services, first of the children: their load balancer addresses go into the
/// node configuration and DNS. Services of listeners no longer in the spec are deleted.
/// Returns the load balancer addresses.
async fn listener_services(
    mc: &MailCluster,
    ctx: &Context,
    names: &Names,
    applier: &mut Applier<'_>,
) -> Result<Vec<String>, Error> {
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let desired = listener_service::listener_services(mc)?;
    let mut live = Vec::with_capacity(desired.len());
    for svc in &desired {
        live.push(applier.apply(&services, svc).await?);
    }
    let wanted: BTreeSet<String> = desired.iter().map(|s| s.name_any()).collect();
    applier
        .prune(
            &services,
            &names.component_selector(listener_service::COMPONENT),
            |name| wanted.contains(name),
        )
        .await?;
    Ok(listener_service::ingress_addresses(&live))
}

/// The children built from a spec the node can run (pure builders, see `builders`).
struct Desired {
    config_map: ConfigMap,
    peer_service: Service,
    statefulset: StatefulSet,
    pdb: PodDisruptionBudget,
    network_policy: NetworkPolicy,
    /// With `spec.tls.issuerRef`: the cert-manager Certificate.
    certificate: Option<certificate::Certificate>,
}

impl Desired {
    fn build(
        mc: &MailCluster,
        rendered: &configmap::RenderedConfig,
        key_hash: &str,
        default_image: &str,
    ) -> Result<Self, BuildError> {
        let tls_secret = certificate::tls_secret_name(mc)?;
        let mut sts = statefulset::statefulset(
            mc,
            &rendered.restart_hash,
            tls_secret.as_deref(),
            default_image,
        )?;
        statefulset::annotate_template(&mut sts, secret::KEY_HASH_ANNOTATION, key_hash);
        Ok(Self {
            config_map: configmap::config_map(mc, rendered)?,
            peer_service: peer_service::peer_service(mc)?,
            statefulset: sts,
            pdb: pdb::pdb(mc)?,
            network_policy: networkpolicy::network_policy(mc)?,
            certificate: certificate::certificate(mc)?,
        })
    }

    /// Applies the children (the ConfigMap before the StatefulSet that rolls on its hash) and
    /// deletes a Certificate no longer wanted; returns the StatefulSet as applied.
    async fn apply(
        self,
        ctx: &Context,
        names: &Names,
        applier: &mut Applier<'_>,
        observed: &mut Observed,
    ) -> Result<StatefulSet, Error> {
        let (client, ns) = (&ctx.client, names.namespace.as_str());
        applier
            .apply(&Api::namespaced(client.clone(), ns), &self.config_map)
            .await?;
        applier
            .apply(&Api::namespaced(client.clone(), ns), &self.peer_service)
            .await?;
        let sts = applier
            .apply(&Api::namespaced(client.clone(), ns), &self.statefulset)
            .await?;
        applier
            .apply(&Api::namespaced(client.clone(), ns), &self.pdb)
            .await?;
        applier
            .apply(&Api::namespaced(client.clone(), ns), &self.network_policy)
            .await?;
        // cert-manager Certificate, when an issuer is given and cert-manager is installed.
        let certs: Api<certificate::Certificate> = Api::namespaced(client.clone(), ns);
        if let Some(cert) = &self.certificate {
            match applier.apply(&certs, cert).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => observed.problems.push(Problem::new(
                    Reason::CertificateCRDMissing,
                    "spec.tls.issuerRef needs cert-manager, but the Certificate kind (cert-manager.io/v1) is not installed: install cert-manager or use spec.tls.secretName",
                )),
                Err(e) => return Err(e.into()),
            }
        }
        if self.certificate.is_none() {
            applier
                .delete_optional(&certs, &names.certificate())
                .await?;
        }
        Ok(sts)
    }
}

/// The DNSEndpoint with the cluster's records, once load balancer addresses exist; deleted
/// when DNS is disabled.
async fn dns_records(
    mc: &MailCluster,
    ctx: &Context,
    names: &Names,
    applier: &mut Applier<'_>,
    observed: &mut Observed,
) -> Result<(), Error> {
    let api: Api<dnsendpoint::DNSEndpoint> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let desired = dnsendpoint::dns_endpoint(mc, &observed.addresses)?;
    if let Some(ep) = &desired {
        match applier.apply(&api, ep).await {
            Ok(_) => observed.dns_records = dnsendpoint::records(mc, &observed.addresses),
            Err(e) if e.is_not_found() => observed.problems.push(Problem::new(
                Reason::DNSEndpointCRDMissing,
                "DNS records cannot be published: the DNSEndpoint kind (externaldns.k8s.io/v1alpha1) is not installed; install external-dns with its CRD source, or set spec.dns.enabled: false",
            )),
            Err(e) => return Err(e.into()),
        }
    }
    if desired.is_none() {
        applier.delete_optional(&api, &names.statefulset()).await?;
    }
    Ok(())
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
    template_has_key
        && status::rolled_out(sts, mc.spec.replicas)
        && sts
            .status
            .as_ref()
            .is_some_and(|st| st.ready_replicas.unwrap_or(0) >= mc.spec.replicas)
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
    applier: &mut Applier<'_>,
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
                phase: VolumePhase::Retained,
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
                let created = applier.apply(&jobs, &desired).await?;
                ctx.event(
                    mc,
                    EventType::Normal,
                    Reason::DrainingVolume,
                    format!("started Job {job_name} to hand the mail on the removed member's volume {claim} to the members"),
                )
                .await;
                created
            }
        };
        let phase = if drain_job::succeeded(&job) {
            if applier.delete(&pvcs, claim).await? {
                ctx.event(
                    mc,
                    EventType::Normal,
                    Reason::VolumeDrained,
                    format!("Job {job_name} handed the mail on {claim} to the members; deleted the volume"),
                )
                .await;
            }
            VolumePhase::Drained
        } else if drain_job::failed(&job) {
            VolumePhase::Failed
        } else {
            VolumePhase::Draining
        };
        out.push(OrphanedVolumeStatus {
            claim: claim.clone(),
            job: Some(job_name),
            phase,
        });
    }
    // Drain Jobs whose volume is gone (done) or belongs to a member again.
    applier
        .prune(
            &jobs,
            &names.component_selector(drain_job::COMPONENT),
            |name| {
                policy == OrphanedVolumePolicy::Drain
                    && orphans.iter().any(|(o, claim)| {
                        drain_job::job_name(&names, *o) == name && claims.contains(claim)
                    })
            },
        )
        .await?;
    Ok(out)
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
            // The condition's reason, as status::compute wrote it.
            ctx.publish(
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

    fn status_with(ready: bool, volumes: &[VolumePhase]) -> MailClusterStatus {
        let mut mc = crate::builders::testing::sample();
        mc.status = None;
        let mut st = status::with_reconcile_failure(&mc, "x".into(), Timestamp::now());
        st.conditions
            .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: status::READY.into(),
                status: if ready { "True" } else { "False" }.into(),
                reason: Reason::AllMembersReady.to_string(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    Timestamp::now(),
                ),
            });
        st.orphaned_volumes = volumes
            .iter()
            .map(|&phase| OrphanedVolumeStatus {
                claim: "queue-relay-3".into(),
                job: None,
                phase,
            })
            .collect();
        st
    }

    #[test]
    fn looks_again_soon_while_draining_or_not_ready_else_at_the_member_refresh() {
        let settings = Settings {
            member_refresh: Duration::from_secs(60),
            resync: Duration::from_secs(300),
            ..Settings::default()
        };
        let next = |ready, volumes: &[VolumePhase], valid| {
            next_reconcile(&status_with(ready, volumes), valid, &settings)
        };
        assert_eq!(next(true, &[], true), Duration::from_secs(60));
        assert_eq!(next(false, &[], true), Duration::from_secs(30));
        let quick = Settings {
            member_refresh: Duration::from_secs(5),
            ..settings.clone()
        };
        assert_eq!(
            next_reconcile(&status_with(false, &[]), true, &quick),
            Duration::from_secs(5),
            "not ready: asked again at the member refresh when that is sooner"
        );
        assert_eq!(
            next(false, &[], false),
            Duration::from_secs(60),
            "an invalid spec waits for an edit"
        );
        assert_eq!(
            next(true, &[VolumePhase::Draining], true),
            Duration::from_secs(10)
        );
        assert_eq!(
            next(true, &[VolumePhase::Retained], true),
            Duration::from_secs(60)
        );
        assert_eq!(
            next(true, &[VolumePhase::Failed], true),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn the_desired_children_carry_the_config_and_key_hashes() {
        let mc = crate::builders::testing::sample();
        let config = configmap::node_config(&mc, &[]).unwrap();
        let rendered = configmap::render(&config).unwrap();
        let d = Desired::build(&mc, &rendered, "key-hash-1", "mailnode:test").unwrap();
        let template = d
            .statefulset
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .unwrap();
        assert_eq!(template[secret::KEY_HASH_ANNOTATION], "key-hash-1");
        assert_eq!(
            template[builders::CONFIG_HASH_ANNOTATION],
            rendered.restart_hash.as_str(),
            "the template rolls only for what members cannot reload"
        );
        assert_eq!(
            d.config_map.data.as_ref().unwrap().values().next(),
            Some(&rendered.yaml)
        );
        assert!(
            d.certificate.is_none(),
            "the sample names a Secret, no issuer"
        );
    }

    #[test]
    fn a_missing_or_incomplete_smarthost_secret_is_a_problem_that_says_what_to_do() {
        use k8s_openapi::ByteString;
        let e = smarthost_secret_problem("m365", None).unwrap();
        assert!(
            e.contains("does not exist") && e.contains("kubectl create secret generic m365"),
            "{e}"
        );
        let mut s = Secret {
            data: Some(std::collections::BTreeMap::from([(
                "username".to_string(),
                ByteString(b"relay@example.com".to_vec()),
            )])),
            ..Secret::default()
        };
        let e = smarthost_secret_problem("m365", Some(&s)).unwrap();
        assert!(e.contains("has no password"), "{e}");
        s.data
            .as_mut()
            .unwrap()
            .insert("password".into(), ByteString(b"x".to_vec()));
        assert_eq!(smarthost_secret_problem("m365", Some(&s)), None);
    }

    #[test]
    fn a_missing_or_incomplete_dkim_secret_is_a_problem_that_says_what_to_do() {
        use k8s_openapi::ByteString;
        let keys = vec!["rsa.key".to_string(), "ed.key".to_string()];
        let e = dkim_secret_problem("dkim-example", &keys, None).unwrap();
        assert!(
            e.contains("does not exist")
                && e.contains("kubectl create secret generic dkim-example --from-file=rsa.key="),
            "{e}"
        );
        let mut s = Secret {
            data: Some(std::collections::BTreeMap::from([(
                "rsa.key".to_string(),
                ByteString(b"-----BEGIN PRIVATE KEY-----".to_vec()),
            )])),
            ..Secret::default()
        };
        let e = dkim_secret_problem("dkim-example", &keys, Some(&s)).unwrap();
        assert!(
            e.contains("has no ed.key") && e.contains("mail waits"),
            "{e}"
        );
        s.data
            .as_mut()
            .unwrap()
            .insert("ed.key".into(), ByteString(b"x".to_vec()));
        assert_eq!(dkim_secret_problem("dkim-example", &keys, Some(&s)), None);
    }
}
