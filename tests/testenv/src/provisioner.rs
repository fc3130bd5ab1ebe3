//! A test-only volume provisioner: every PersistentVolumeClaim without a volume gets a hostPath
//! PersistentVolume of its size and class, pre-bound to it through `claimRef`, so that
//! kube-controller-manager's binder binds them and StatefulSets with volumeClaimTemplates are
//! scheduled. It stands in for the CSI provisioner a real cluster has; no data is ever written.

use std::path::PathBuf;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::oneshot;

use crate::{Result, io, kubeconfig};

/// The running provisioner; dropping it stops it.
#[derive(Debug)]
pub struct Handle {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the provisioner on a thread of its own.
pub fn start(kubeconfig: PathBuf) -> Result<Handle> {
    let (stop, stopped) = oneshot::channel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting the provisioner's runtime"))?;
    let thread = std::thread::Builder::new()
        .name("testenv-provisioner".into())
        .spawn(move || {
            rt.block_on(async move {
                tokio::select! {
                    _ = stopped => {}
                    result = run(kubeconfig) => {
                        if let Err(e) = result {
                            tracing::error!(error = %e, "test volume provisioner stopped");
                        }
                    }
                }
            });
        })
        .map_err(io("starting the provisioner thread"))?;
    Ok(Handle {
        stop: Some(stop),
        thread: Some(thread),
    })
}

async fn run(kubeconfig: PathBuf) -> Result<()> {
    let client = kube::Client::try_from(kubeconfig::client_config(&kubeconfig).await?)?;
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let volumes: Api<PersistentVolume> = Api::all(client);
    let mut events = watcher(claims, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(claim) = events.try_next().await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "provisioner watch");
        None
    }) {
        if claim.spec.as_ref().is_some_and(|s| s.volume_name.is_some()) {
            continue;
        }
        let Some(pv) = volume_for(&claim) else {
            continue;
        };
        match volumes.create(&PostParams::default(), &pv).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => tracing::warn!(error = %e, "provisioner could not create a volume"),
        }
    }
    Ok(())
}

/// The PersistentVolume for a claim, or None for a claim that cannot be satisfied (no size).
fn volume_for(claim: &PersistentVolumeClaim) -> Option<PersistentVolume> {
    let ns = claim.metadata.namespace.as_deref()?;
    let name = claim.metadata.name.as_deref()?;
    let uid = claim.metadata.uid.as_deref()?;
    let spec = claim.spec.as_ref()?;
    let size = spec.resources.as_ref()?.requests.as_ref()?.get("storage")?;
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": format!("testenv-{uid}"), "labels": {"testenv.mailcluster.dev/namespace": ns}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": spec.access_modes.clone().unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
            "storageClassName": spec.storage_class_name.clone().unwrap_or_default(),
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": format!("/nonexistent/testenv/{uid}"), "type": ""},
            "claimRef": {"namespace": ns, "name": name, "uid": uid, "kind": "PersistentVolumeClaim", "apiVersion": "v1"},
        },
    }))
    .ok()
}
