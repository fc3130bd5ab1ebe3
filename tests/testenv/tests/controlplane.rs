//! Proof that the test control plane is real: pinned apiserver version, StatefulSet pods scheduled
//! onto kwok nodes and Ready, garbage collection through owner references, a CRD served and listed
//! with kubectl, and no process left behind.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use mailcluster_testenv::{ControlPlane, KUBERNETES_VERSION, Options, eventually};

#[tokio::test]
async fn apiserver_reports_the_pinned_version() {
    let cp = ControlPlane::shared();
    let client = cp.client().await.expect("client");
    let version = client.apiserver_version().await.expect("version");
    println!(
        "kube-apiserver version: {} ({})",
        version.git_version,
        cp.server()
    );
    assert_eq!(version.git_version, KUBERNETES_VERSION);
    let out = cp.kubectl(&["version", "-o", "json"]).expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["clientVersion"]["gitVersion"], KUBERNETES_VERSION);
    assert_eq!(v["serverVersion"]["gitVersion"], KUBERNETES_VERSION);
}

fn statefulset(name: &str, replicas: i32, owner: &ConfigMap) -> StatefulSet {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": name,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "ConfigMap",
                "name": owner.metadata.name, "uid": owner.metadata.uid,
            }],
        },
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "example.invalid/none:1"}]},
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "queue"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            }],
        },
    }))
    .expect("statefulset manifest")
}

#[tokio::test]
async fn statefulset_pods_become_ready_and_are_garbage_collected() {
    let cp = ControlPlane::shared();
    let client = cp.client().await.expect("client");
    let ns = cp.new_namespace("sts").await.expect("namespace");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let owner = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some("owner".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("owner");
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    sets.create(&PostParams::default(), &statefulset("web", 3, &owner))
        .await
        .expect("create");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    eventually(cp, &ns, "3 ready pods", Duration::from_secs(90), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels("app=web")).await?;
            let ready = list.items.iter().filter(|p| is_ready(p)).count();
            Ok(ready == 3)
        }
    })
    .await;
    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("pods");
    for p in &list.items {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        assert!(
            cp.fake_nodes().contains(&node),
            "pod scheduled on a kwok node, got {node:?}"
        );
    }
    eventually(
        cp,
        &ns,
        "statefulset status readyReplicas=3",
        Duration::from_secs(60),
        || {
            let sets = sets.clone();
            async move {
                let s = sets.get("web").await?;
                Ok(s.status.and_then(|s| s.ready_replicas) == Some(3))
            }
        },
    )
    .await;

    // Deleting the owner garbage-collects the StatefulSet (and through it, the pods).
    cms.delete("owner", &DeleteParams::background())
        .await
        .expect("delete owner");
    eventually(
        cp,
        &ns,
        "statefulset garbage-collected",
        Duration::from_secs(60),
        || {
            let sets = sets.clone();
            async move { Ok(sets.get_opt("web").await?.is_none()) }
        },
    )
    .await;
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test]
async fn a_crd_is_served_and_listed_by_kubectl() {
    let cp = ControlPlane::shared();
    let client = cp.client().await.expect("client");
    let ns = cp.new_namespace("crd").await.expect("namespace");
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.testenv.mailcluster.dev"},
        "spec": {
            "group": "testenv.mailcluster.dev",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"size": {"type": "integer", "minimum": 1}}},
                }}},
            }],
        },
    }))
    .expect("crd manifest");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("create crd");
    eventually(cp, &ns, "crd established", Duration::from_secs(30), || {
        let crds = crds.clone();
        async move {
            let c = crds.get("widgets.testenv.mailcluster.dev").await?;
            Ok(c.status.and_then(|s| s.conditions).is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            }))
        }
    })
    .await;

    let gvk = GroupVersionKind::gvk("testenv.mailcluster.dev", "v1", "Widget");
    let ar = ApiResource::from_gvk(&gvk);
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    let mut w = DynamicObject::new("w1", &ar);
    w.data = serde_json::json!({"spec": {"size": 3}});
    // The apiserver may need a moment after Established before it serves the new resource.
    eventually(cp, &ns, "widget created", Duration::from_secs(30), || {
        let widgets = widgets.clone();
        let w = w.clone();
        async move { Ok(widgets.create(&PostParams::default(), &w).await.is_ok()) }
    })
    .await;
    let mut bad = DynamicObject::new("w2", &ar);
    bad.data = serde_json::json!({"spec": {"size": 0}});
    let err = widgets
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("schema refuses size 0");
    assert!(err.to_string().contains("spec.size"), "{err}");

    let out = cp
        .kubectl(&["get", "widgets", "-n", &ns, "-o", "name"])
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "widget.testenv.mailcluster.dev/w1"
    );
}

#[test]
fn a_dropped_control_plane_leaves_no_process() {
    let cp = ControlPlane::start(Options::bare()).expect("bare control plane");
    let pids: Vec<String> = ["etcd", "kube-apiserver"]
        .iter()
        .map(|n| cp.bin_dir().join(n).display().to_string())
        .collect();
    let dir = cp.scratch_dir().to_path_buf();
    let out = cp.kubectl(&["get", "--raw=/readyz"]).expect("kubectl");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    drop(cp);
    assert!(!dir.exists(), "scratch dir removed");
    for p in pids {
        let out = std::process::Command::new("pgrep")
            .args(["-f", &format!("{p} .*{}", dir.display())])
            .output()
            .expect("pgrep");
        assert!(
            out.stdout.is_empty(),
            "left running: {p}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
