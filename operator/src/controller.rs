//! The controller: watches MailClusters and their children and runs [`reconcile`] — thin I/O
//! around the pure builders, behind leader election.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::builders::{CLUSTER_LABEL, FIELD_MANAGER};
use crate::crd::MailCluster;
use crate::leader::Elector;
use crate::reconcile::{Context, error_policy, reconcile};

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Resolves when `rx` says stop (or its sender is gone).
pub async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Runs the controller until `stop` says so; reconciles in flight finish first.
pub async fn run_controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    stop: watch::Receiver<bool>,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let owned = watcher::Config::default()
        .labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"))
        .any_semantic();
    Controller::new(
        api::<MailCluster>(&client, ns),
        watcher::Config::default().any_semantic(),
    )
    .owns(api::<StatefulSet>(&client, ns), owned.clone())
    .owns(api::<ConfigMap>(&client, ns), owned.clone())
    .owns(api::<Secret>(&client, ns), owned.clone())
    .owns(api::<Service>(&client, ns), owned.clone())
    .owns(api::<PodDisruptionBudget>(&client, ns), owned.clone())
    .owns(api::<NetworkPolicy>(&client, ns), owned.clone())
    // Drain Jobs of orphaned queue volumes: their completion lets the volume go.
    .owns(api::<Job>(&client, ns), owned.clone())
    .watches(api::<Pod>(&client, ns), owned, |pod: Pod| {
        let cluster = pod.labels().get(CLUSTER_LABEL)?.clone();
        Some(ObjectRef::<MailCluster>::new(&cluster).within(&pod.namespace()?))
    })
    .graceful_shutdown_on(stopped(stop))
    .run(reconcile, error_policy, ctx)
    .for_each(|res| async move {
        match res {
            Ok((obj, _)) => tracing::debug!(cluster = %obj, "reconciled"),
            Err(e) => tracing::debug!(error = %e, "reconcile"),
        }
    })
    .await;
}

/// Runs the controller while this instance is the leader (or always, without an elector),
/// until `shutdown` says stop. Leadership lost means the controller stops and this instance
/// stands by again; on shutdown the lease is given up so a standby takes over at once.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    elector: Option<Elector>,
    shutdown: watch::Receiver<bool>,
) {
    ctx.metrics.set_ready(true);
    loop {
        if let Some(el) = &elector {
            tracing::info!(identity = %el.settings().identity, "waiting for leadership");
            tokio::select! {
                () = el.acquire() => {}
                () = stopped(shutdown.clone()) => return,
            }
            tracing::info!(identity = %el.settings().identity, "became the leader");
            ctx.metrics.leader.set(1);
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let controller = run_controller(ctx.clone(), namespace.clone(), stop_rx);
        tokio::pin!(controller);
        let keep = async {
            match &elector {
                Some(el) => el.keep().await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut controller => {
                tracing::warn!("controller stopped by itself");
            }
            () = keep => {
                tracing::warn!("lost leadership; stopping the controller");
                let _ = stop_tx.send(true);
                controller.await;
                ctx.metrics.leader.set(0);
                continue;
            }
            () = stopped(shutdown.clone()) => {
                tracing::info!("shutting down: finishing reconciles in flight");
                let _ = stop_tx.send(true);
                controller.await;
            }
        }
        ctx.metrics.leader.set(0);
        if let Some(el) = &elector
            && let Err(e) = el.release().await
        {
            tracing::warn!(error = %e, "giving up the lease");
        }
        return;
    }
}
