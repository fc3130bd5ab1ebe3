//! The operator under the chart's RBAC: `helm install` the chart, then run the controller
//! in-process with a client that impersonates the chart's ServiceAccount, so any permission the
//! operator uses but the chart does not grant fails here as Forbidden. The MailCluster must
//! become Ready with every child and no reconcile error; then one verb is taken from the
//! ClusterRole and the reconcile must fail with Forbidden (the check can fail).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{chart, ensure_crd, ensure_optional_crds, helm, unique};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use mailcluster_operator::crd::MailCluster;
use mailcluster_operator::leader::{Elector, LeaseSettings};
use mailcluster_operator::metrics::Metrics;
use mailcluster_operator::reconcile::{Context, Settings};
use mailcluster_testenv::ControlPlane;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(180);

/// A client of the control plane that acts as `user` (with the groups every ServiceAccount has).
async fn impersonating(cp: &ControlPlane, user: &str, namespace: &str) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(cp.kubeconfig_path()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some(user.to_string());
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".to_string(),
        format!("system:serviceaccounts:{namespace}"),
        "system:authenticated".to_string(),
    ]);
    Client::try_from(config).unwrap()
}

fn mailcluster(name: &str, ns: &str) -> MailCluster {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailcluster.dev/v1alpha1",
        "kind": "MailCluster",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "hostname": "smtp.example.com",
            "replicas": 2,
            "listeners": [
                {"name": "devices", "port": 25,
                 "relay": {"allowedSources": ["10.20.0.0/16"], "recipientDomains": ["example.com"]}},
                {"name": "inbound-mx", "port": 2525, "acceptDomains": ["example.com"],
                 "exposure": "ClusterIP"}
            ],
            "delivery": {"smarthosts": [{"host": "exchange.example.internal", "port": 25, "priority": 10}]},
            "storage": {"size": "1Gi"},
            "dns": {"ttl": 300, "mx": [{"domain": "example.com", "priority": 20}]}
        }
    }))
    .unwrap()
}

fn ready(mc: &MailCluster) -> Option<(String, String)> {
    mc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.message.clone()))
}

fn errors(ctx: &Context) -> String {
    ctx.metrics
        .encode()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("mailcluster_operator_reconcile_errors_total"))
        .filter(|l| !l.ends_with(" 0"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_works_with_exactly_the_charts_rbac() {
    let cp = ControlPlane::shared();
    ensure_crd(cp);
    ensure_optional_crds(cp);
    let admin = cp.client().await.unwrap();
    let ns = cp.new_namespace("rbac-operator").await.unwrap();
    let tenant = cp.new_namespace("rbac-tenant").await.unwrap();
    let release = unique("oprbac");
    let fullname = format!("{release}-mailcluster-operator");
    let chart = chart();
    // Leader election on, as with several replicas: the Lease Role is part of what is tested.
    helm(
        cp,
        &[
            "install",
            &release,
            &chart,
            "-n",
            &ns,
            "--skip-crds",
            "--set",
            "leaderElection.enabled=true",
        ],
    );
    let sa = format!("system:serviceaccount:{ns}:{fullname}");
    let client = impersonating(cp, &sa, &ns).await;

    // The controller as the Deployment runs it: all namespaces, leader election on the chart's
    // Lease, but with the ServiceAccount's permissions only.
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            Settings {
                default_image: "mailnode:test".into(),
                ..Settings::default()
            },
            Arc::new(Metrics::default()),
            "rbac-test",
        )
        // kwok's pod IPs are not on this machine: members' /status is not asked for here (the
        // operator tests serve it on loopback), so no connection leaves loopback.
        .with_member_address(Arc::new(|_: &k8s_openapi::api::core::v1::Pod| None)),
    );
    let elector = Elector::new(
        client.clone(),
        LeaseSettings {
            namespace: ns.clone(),
            name: fullname.clone(),
            identity: "rbac-test".into(),
            lease_duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(2),
        },
    );
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(mailcluster_operator::controller::run(
        ctx.clone(),
        None,
        Some(elector),
        stop_rx,
    ));

    let mcs: Api<MailCluster> = Api::namespaced(admin.clone(), &tenant);
    mcs.create(&PostParams::default(), &mailcluster("relay", &tenant))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let mc = mcs.get("relay").await.unwrap();
        let e = errors(&ctx);
        assert!(
            e.is_empty(),
            "reconcile errors under the chart's RBAC:\n{e}\n{}",
            cp.diagnostics(&tenant)
        );
        if ready(&mc).is_some_and(|(s, _)| s == "True") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "MailCluster not Ready under the chart's RBAC: {:?}\n{}",
            ready(&mc),
            cp.diagnostics(&tenant)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Every child is there (made by the impersonated client).
    Api::<StatefulSet>::namespaced(admin.clone(), &tenant)
        .get("relay")
        .await
        .unwrap();
    Api::<ConfigMap>::namespaced(admin.clone(), &tenant)
        .get("relay-config")
        .await
        .unwrap();
    Api::<Secret>::namespaced(admin.clone(), &tenant)
        .get("relay-cluster")
        .await
        .unwrap();
    let svcs: Vec<String> = Api::<Service>::namespaced(admin.clone(), &tenant)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|s| s.name_any())
        .collect();
    for want in ["relay-peers", "relay-devices", "relay-inbound-mx"] {
        assert!(svcs.iter().any(|s| s == want), "{want} missing: {svcs:?}");
    }
    Api::<PodDisruptionBudget>::namespaced(admin.clone(), &tenant)
        .get("relay")
        .await
        .unwrap();
    Api::<NetworkPolicy>::namespaced(admin.clone(), &tenant)
        .get("relay")
        .await
        .unwrap();
    let e = errors(&ctx);
    assert!(e.is_empty(), "{e}");
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("controller stops")
        .unwrap();

    // Negative: without `patch` on StatefulSets (server-side apply is a PATCH) the reconcile of
    // a new MailCluster fails with Forbidden.
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let mut role = roles.get(&fullname).await.unwrap();
    let mut removed = false;
    for rule in role.rules.iter_mut().flatten() {
        if rule
            .resources
            .as_ref()
            .is_some_and(|r| r.iter().any(|x| x == "statefulsets"))
        {
            rule.verbs.retain(|v| v != "patch");
            removed = true;
        }
    }
    assert!(removed, "the ClusterRole has a StatefulSet rule");
    roles
        .replace(&fullname, &PostParams::default(), &role)
        .await
        .unwrap();
    let created = mcs
        .create(&PostParams::default(), &mailcluster("forbidden", &tenant))
        .await
        .unwrap();
    let created = Arc::new(created);
    let deadline = Instant::now() + Duration::from_secs(60);
    let message = loop {
        // RBAC changes reach the authorizer through an informer: retry until they do.
        match mailcluster_operator::reconcile::reconcile(created.clone(), ctx.clone()).await {
            Err(e)
                if format!("{e:?}").contains("Forbidden")
                    || e.to_string().contains("forbidden") =>
            {
                break e.to_string();
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "reconcile without patch on statefulsets did not fail with Forbidden: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    assert!(message.to_lowercase().contains("statefulset"), "{message}");

    helm(
        cp,
        &[
            "uninstall",
            &release,
            "-n",
            &ns,
            "--wait",
            "--timeout",
            "120s",
        ],
    );
}
