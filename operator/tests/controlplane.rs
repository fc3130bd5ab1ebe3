//! The operator against a real control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kwok): the CRD is accepted, bad manifests are refused naming the field, a
//! MailCluster gets every child and becomes Ready, changes reach the children, a no-op reconcile
//! writes nothing, deleting it removes its children, and leader election hands over.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use mailcluster_operator::builders::{CONFIG_HASH_ANNOTATION, dnsendpoint::DNSEndpoint};
use mailcluster_operator::crd::{MailCluster, VolumePhase};
use mailcluster_operator::leader::{Elector, LeaseSettings};
use mailcluster_operator::status::{DEGRADED, READY};
use serde_json::{Value, json};

#[tokio::test]
async fn invalid_manifests_are_refused_naming_the_field() {
    let (cp, client) = setup().await;
    let ns = cp.new_namespace("invalid").await.unwrap();
    let api: Api<MailCluster> = Api::namespaced(client, &ns);
    let base = manifest("bad", &ns);
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "duplicate ports",
            set(base.clone(), "/spec/listeners/1/port", json!(25)),
            &["spec.listeners", "listener ports must be unique"],
        ),
        (
            "duplicate names",
            set(base.clone(), "/spec/listeners/1/name", json!("devices")),
            &["spec.listeners[1]", "Duplicate value"],
        ),
        (
            "bad CIDR",
            set(
                base.clone(),
                "/spec/listeners/0/relay/allowedSources",
                json!(["10.20.0.0/40"]),
            ),
            &["spec.listeners[0].relay.allowedSources[0]", "CIDR"],
        ),
        (
            "bad source range",
            set(
                base.clone(),
                "/spec/listeners/1/loadBalancerSourceRanges",
                json!(["not-a-cidr"]),
            ),
            &["spec.listeners[1].loadBalancerSourceRanges[0]", "CIDR"],
        ),
        (
            "replicas 0",
            set(base.clone(), "/spec/replicas", json!(0)),
            &["spec.replicas", "greater than or equal to 1"],
        ),
        (
            "port out of range",
            set(base.clone(), "/spec/listeners/0/port", json!(70000)),
            &["spec.listeners[0].port", "less than or equal to 65535"],
        ),
        (
            "reserved port",
            set(base.clone(), "/spec/listeners/0/port", json!(7025)),
            &["spec.listeners[0]", "reserved"],
        ),
        (
            "smarthosts and mx",
            set(base.clone(), "/spec/delivery/mx", json!({})),
            &["spec.delivery", "mutually exclusive"],
        ),
        (
            "bad hostname",
            set(base.clone(), "/spec/hostname", json!("smtp_example")),
            &["spec.hostname", "fully qualified"],
        ),
        (
            "negative priority",
            set(
                base.clone(),
                "/spec/delivery/smarthosts/0/priority",
                json!(-1),
            ),
            &["spec.delivery.smarthosts[0].priority"],
        ),
        (
            "negative MX priority",
            set(base.clone(), "/spec/dns/mx/0/priority", json!(-5)),
            &["spec.dns.mx[0].priority"],
        ),
        (
            "bad accept domain",
            set(
                base.clone(),
                "/spec/listeners/2/acceptDomains",
                json!(["Example..com"]),
            ),
            &["spec.listeners[2].acceptDomains[0]", "domain"],
        ),
        (
            "secretName and issuerRef",
            set(
                base.clone(),
                "/spec/tls",
                json!({"secretName": "a", "issuerRef": {"name": "le"}}),
            ),
            &["spec.tls", "exactly one"],
        ),
        (
            "TLS listener without certificate",
            {
                let mut v = base.clone();
                v["spec"].as_object_mut().unwrap().remove("tls");
                v
            },
            &["spec", "set spec.tls"],
        ),
        (
            "trustedProxies without proxyProtocol",
            set(
                base.clone(),
                "/spec/listeners/0/trustedProxies",
                json!(["10.0.0.0/8"]),
            ),
            &["spec.listeners[0]", "needs proxyProtocol"],
        ),
        (
            "bad retry duration",
            set(base.clone(), "/spec/delivery/retry/first", json!("soon")),
            &["spec.delivery.retry.first", "unit"],
        ),
        (
            "bad storage size",
            set(base.clone(), "/spec/storage/size", json!("lots")),
            &["spec.storage.size", "quantity"],
        ),
        (
            "no listeners",
            set(base.clone(), "/spec/listeners", json!([])),
            &["spec.listeners", "at least 1"],
        ),
        (
            "in-flight memory below its minimum",
            set(
                base.clone(),
                "/spec/limits",
                json!({"maxInFlightBytes": 100}),
            ),
            &["spec.limits.maxInFlightBytes", "1024"],
        ),
        (
            "open relay: every IPv4 source, any domain, no AUTH",
            set(
                base.clone(),
                "/spec/listeners/0/relay",
                json!({"allowedSources": ["10.20.0.0/16", "0.0.0.0/0"]}),
            ),
            &["spec.listeners[0].relay", "open relay"],
        ),
        (
            "open relay: every IPv6 source",
            set(
                base.clone(),
                "/spec/listeners/0/relay",
                json!({"allowedSources": ["::/0"]}),
            ),
            &["spec.listeners[0].relay", "openRelay: true"],
        ),
        (
            "retry first after max",
            set(
                base.clone(),
                "/spec/delivery/retry",
                json!({"first": "2h", "max": "1m"}),
            ),
            &["spec.delivery.retry", "first must be at most max"],
        ),
        (
            "retry max after lifetime (default 5d)",
            set(base.clone(), "/spec/delivery/retry", json!({"max": "6d"})),
            &["spec.delivery.retry", "max at most lifetime"],
        ),
        (
            "rate limit without a number",
            set(
                base.clone(),
                "/spec/listeners/0/rateLimits",
                json!([{"by": "ClientAddress"}]),
            ),
            &[
                "spec.listeners[0].rateLimits[0]",
                "set messages, recipients or both",
            ],
        ),
        (
            "rate limit of zero messages",
            set(
                base.clone(),
                "/spec/listeners/0/rateLimits",
                json!([{"by": "User", "messages": 0}]),
            ),
            &[
                "spec.listeners[0].rateLimits[0].messages",
                "greater than or equal to 1",
            ],
        ),
        (
            "ipv6Prefix on a user limit",
            set(
                base.clone(),
                "/spec/listeners/0/rateLimits",
                json!([{"by": "User", "messages": 5, "ipv6Prefix": 48}]),
            ),
            &["spec.listeners[0].rateLimits[0]", "ipv6Prefix applies only"],
        ),
        (
            "rate limit window without a unit",
            set(
                base.clone(),
                "/spec/listeners/0/rateLimits",
                json!([{"by": "SenderDomain", "recipients": 5, "window": "60"}]),
            ),
            &["spec.listeners[0].rateLimits[0].window", "unit"],
        ),
        (
            "OAuth2 over plain HTTP",
            set(
                base.clone(),
                "/spec/delivery/oauth2",
                json!({"tokenUrl": "http://login.example/token", "clientId": "a", "secretName": "s", "user": "u@example.com"}),
            ),
            &["spec.delivery.oauth2.tokenUrl", "must be an https:// URL"],
        ),
        (
            "OAuth2 and a password together",
            set(
                set(
                    base.clone(),
                    "/spec/delivery/oauth2",
                    json!({"tokenUrl": "https://login.example/token", "clientId": "a", "secretName": "s", "user": "u@example.com"}),
                ),
                "/spec/delivery/authSecret",
                json!("basic"),
            ),
            &["spec.delivery", "set authSecret or oauth2, not both"],
        ),
        (
            "MTA-STS towards smarthosts",
            set(
                base.clone(),
                "/spec/delivery/tls",
                json!({"mode": "MtaSts"}),
            ),
            &["spec.delivery", "MtaSts applies to delivery by MX"],
        ),
        (
            "TLS reports from something that is not an address",
            set(
                base.clone(),
                "/spec/delivery/tlsReports",
                json!({"organizationName": "Example", "from": "tlsrpt at example.com"}),
            ),
            &["spec.delivery.tlsReports.from", "must be an address"],
        ),
        (
            "DKIM selector with a dot-less space",
            set(
                base.clone(),
                "/spec/delivery/dkim",
                json!([{"domain": "example.com", "keys": [{"selector": "mail 2026", "secretName": "dkim"}]}]),
            ),
            &[
                "spec.delivery.dkim[0].keys[0].selector",
                "must be a DNS label",
            ],
        ),
        (
            "DKIM headers without From",
            set(
                base.clone(),
                "/spec/delivery/dkim",
                json!([{"domain": "example.com", "keys": [{"selector": "s1", "secretName": "dkim"}], "headers": ["Subject"]}]),
            ),
            &["spec.delivery.dkim[0].headers", "must include From"],
        ),
        (
            "sender rewrite from a bare name",
            set(
                base.clone(),
                "/spec/listeners/0/senderRewrites",
                json!([{"from": "root", "to": "@example.com"}]),
            ),
            &[
                "spec.listeners[0].senderRewrites[0].from",
                "must be user@host, @host or *",
            ],
        ),
        (
            "sender rewrite to a catch-all",
            set(
                base.clone(),
                "/spec/listeners/0/senderRewrites",
                json!([{"from": "@scanner.lan", "to": "*"}]),
            ),
            &[
                "spec.listeners[0].senderRewrites[0].to",
                "must be user@domain, or @domain",
            ],
        ),
        (
            "sender route without senders",
            set(
                base.clone(),
                "/spec/delivery/senderRoutes",
                json!([{"smarthosts": [{"host": "smtp.office365.com", "port": 587}]}]),
            ),
            &[
                "spec.delivery.senderRoutes[0]",
                "set senderDomains, users or both",
            ],
        ),
        (
            "smarthost credentials Secret with a bad name",
            set(
                base.clone(),
                "/spec/delivery/authSecret",
                json!("M365_relay"),
            ),
            &["spec.delivery.authSecret", "Secret name"],
        ),
        (
            "negative per-client limit",
            set(
                base.clone(),
                "/spec/limits",
                json!({"maxSessionsPerClient": -1}),
            ),
            &[
                "spec.limits.maxSessionsPerClient",
                "greater than or equal to 0",
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (what, v, needles) in cases {
        match create(&api, &v).await {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(kube::Error::Api(s)) => {
                if s.code != 422 || !needles.iter().all(|n| s.message.contains(n)) {
                    failures.push(format!("{what}: {} {}", s.code, s.message));
                }
            }
            Err(e) => failures.push(format!("{what}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "not refused as expected:\n{}",
        failures.join("\n")
    );
    // What the rules must still let through: an open relay said out loud, a /0 that must
    // authenticate or is limited to internal domains, and a retry schedule in order.
    let allowed = [
        set(
            base.clone(),
            "/spec/listeners/0/relay",
            json!({"allowedSources": ["0.0.0.0/0"], "openRelay": true}),
        ),
        set(
            base.clone(),
            "/spec/listeners/0/relay",
            json!({"allowedSources": ["0.0.0.0/0"], "recipientDomains": ["example.com"]}),
        ),
        set(
            base.clone(),
            "/spec/listeners/0/rateLimits",
            json!([
                {"by": "ClientAddress", "messages": 100, "recipients": 500, "ipv6Prefix": 48},
                {"by": "SenderDomain", "recipients": 1000, "window": "1h"}
            ]),
        ),
        set(
            base.clone(),
            "/spec/delivery/retry",
            json!({"first": "90s", "max": "90s", "lifetime": "2d"}),
        ),
    ];
    for (i, v) in allowed.iter().enumerate() {
        let v = set(v.clone(), "/metadata/name", json!(format!("ok-{i}")));
        create(&api, &v)
            .await
            .unwrap_or_else(|e| panic!("case {i} refused: {e}"));
    }
    // Field docs reach `kubectl explain`.
    let out = cp
        .kubectl(&["explain", "mailcluster.spec.listeners.relay.allowedSources"])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Client source addresses (CIDRs) allowed to relay"),
        "{text}"
    );
    // The valid manifest is accepted.
    create(&api, &base)
        .await
        .expect("the valid manifest is accepted");
}

#[tokio::test]
async fn a_mailcluster_becomes_a_ready_relay_cluster() {
    let (cp, client) = setup().await;
    let ns = cp.new_namespace("lifecycle").await.unwrap();
    let (op_client, writes) = counting_client(cp).await;
    let op = Operator::start(op_client, &ns, None, "test-operator");
    let api: Api<MailCluster> = Api::namespaced(client.clone(), &ns);
    create(&api, &manifest("relay", &ns)).await.unwrap();

    // Every child, with the fields that matter.
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let svc_api: Api<Service> = Api::namespaced(client.clone(), &ns);
    eventually(cp, &ns, "the StatefulSet", TIMEOUT, || async {
        Ok(sts_api.get_opt("relay").await?.is_some())
    })
    .await;
    let sts = sts_api.get("relay").await.unwrap();
    let owner = &sts.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("MailCluster", Some(true))
    );
    let spec = sts.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("OrderedReady"));
    assert_eq!(
        spec.volume_claim_templates.as_ref().unwrap()[0]
            .metadata
            .name
            .as_deref(),
        Some("queue")
    );
    let hash1 = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()[CONFIG_HASH_ANNOTATION]
        .clone();
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let config = cm.get("relay-config").await.unwrap().data.unwrap()["mailnode.yaml"].clone();
    mailnode_api::config::Config::from_yaml(&config)
        .expect("the rendered config is valid for mailnode");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let key1 = secrets.get("relay-cluster").await.unwrap().data.unwrap()["cluster-key"].clone();
    let peers = svc_api.get("relay-peers").await.unwrap().spec.unwrap();
    assert_eq!(peers.cluster_ip.as_deref(), Some("None"));
    for (name, type_) in [
        ("relay-devices", "LoadBalancer"),
        ("relay-apps", "LoadBalancer"),
        ("relay-inbound-mx", "LoadBalancer"),
    ] {
        let s = svc_api.get(name).await.unwrap().spec.unwrap();
        assert_eq!(s.type_.as_deref(), Some(type_), "{name}");
        assert_eq!(
            s.external_traffic_policy.as_deref(),
            Some("Local"),
            "{name}"
        );
    }
    let apps = svc_api.get("relay-apps").await.unwrap().spec.unwrap();
    assert_eq!(
        apps.load_balancer_source_ranges,
        Some(vec!["10.30.0.0/16".to_string()])
    );
    let pdb: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    assert!(pdb.get("relay").await.is_ok());
    let np: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    assert!(np.get("relay").await.is_ok());

    // Pods scheduled on kwok nodes become Ready; so does the MailCluster, with its member table.
    eventually(
        cp,
        &ns,
        "MailCluster Ready with 3 members",
        Duration::from_secs(240),
        || async {
            let mc = api.get("relay").await?;
            let ready = condition(&mc, READY).is_some_and(|c| c.0 == "True");
            let st = mc.status.unwrap_or_default();
            Ok(ready
                && st.members.len() == 3
                && st
                    .members
                    .iter()
                    .all(|m| m.ready && m.config_in_sync && m.ip.is_some() && m.node.is_some()))
        },
    )
    .await;
    let mc = api.get("relay").await.unwrap();
    let st = mc.status.clone().unwrap();
    assert_eq!(st.members_ready.as_deref(), Some("3/3"));
    assert_eq!(st.observed_generation, mc.metadata.generation);
    assert_eq!(st.members[0].image.as_deref(), Some("mailnode:test"));
    let nodes: std::collections::BTreeSet<_> = st.members.iter().map(|m| m.node.clone()).collect();
    assert_eq!(
        nodes.len(),
        3,
        "members are spread over the nodes: {:?}",
        st.members
    );

    // A no-op reconcile writes nothing: poke the object (a label from another manager), wait for
    // reconciles, count the operator's writes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_writes = writes.load(Ordering::SeqCst);
    let before = op.reconciles();
    for i in 0..3 {
        api.patch(
            "relay",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"poke": i.to_string()}}})),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    eventually(cp, &ns, "reconciles after the pokes", TIMEOUT, || async {
        Ok(op.reconciles() >= before + 3)
    })
    .await;
    let noop_reconciles = op.reconciles() - before;
    let noop_writes = writes.load(Ordering::SeqCst) - before_writes;
    eprintln!("no-op: {noop_reconciles} reconciles, {noop_writes} write requests");
    assert_eq!(
        noop_writes, 0,
        "{noop_reconciles} no-op reconciles made {noop_writes} writes"
    );

    // DNS: the DNSEndpoint kind is not installed yet. A load balancer address makes the operator
    // say so in a condition and an event, and carry on.
    let lb_status = json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}});
    svc_api
        .patch_status(
            "relay-devices",
            &PatchParams::default(),
            &Patch::Merge(&lb_status),
        )
        .await
        .unwrap();
    eventually(
        cp,
        &ns,
        "Degraded DNSEndpointCRDMissing",
        TIMEOUT,
        || async {
            let mc = api.get("relay").await?;
            Ok(condition(&mc, DEGRADED)
                .is_some_and(|c| c.0 == "True" && c.1 == "DNSEndpointCRDMissing")
                && mc.status.unwrap_or_default().addresses == ["192.0.2.10"])
        },
    )
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually(
        cp,
        &ns,
        "an event about the missing CRD",
        TIMEOUT,
        || async {
            let evs = events.list(&ListParams::default()).await?;
            Ok(evs
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("DNSEndpointCRDMissing")))
        },
    )
    .await;
    // No error loop: once settled, nothing more is written and no reconcile fails.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (calm_writes, calm_errors) = (writes.load(Ordering::SeqCst), errors(&op));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        writes.load(Ordering::SeqCst),
        calm_writes,
        "writes while the CRD is missing"
    );
    assert_eq!(
        errors(&op),
        calm_errors,
        "failed reconciles while the CRD is missing"
    );
    assert_eq!(calm_errors, 0);

    // With the CRD installed, the records are published: A with the address, MX with priority.
    let dns_crd: CustomResourceDefinition = serde_yaml::from_str(include_str!(
        "fixtures/dnsendpoints.externaldns.k8s.io.yaml"
    ))
    .unwrap();
    install_crd(&client, &dns_crd).await;
    // A second address on another listener: both go into the round robin A record.
    let lb2 = json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.11"}]}}});
    svc_api
        .patch_status("relay-apps", &PatchParams::default(), &Patch::Merge(&lb2))
        .await
        .unwrap();
    let dns: Api<DNSEndpoint> = Api::namespaced(client.clone(), &ns);
    eventually(
        cp,
        &ns,
        "the DNSEndpoint with both addresses",
        TIMEOUT,
        || async {
            let Some(ep) = dns.get_opt("relay").await? else {
                return Ok(false);
            };
            let a = ep.spec.endpoints.iter().find(|e| e.record_type == "A");
            let mx = ep.spec.endpoints.iter().find(|e| e.record_type == "MX");
            Ok(a.is_some_and(|a| {
                a.dns_name == "smtp.example.com" && a.targets == ["192.0.2.10", "192.0.2.11"]
            }) && mx.is_some_and(|m| {
                m.dns_name == "example.com" && m.targets == ["20 smtp.example.com"]
            }))
        },
    )
    .await;
    eventually(
        cp,
        &ns,
        "DNS records in status and Degraded cleared",
        TIMEOUT,
        || async {
            let mc = api.get("relay").await?;
            Ok(condition(&mc, DEGRADED).is_some_and(|c| c.0 == "False")
                && mc.status.unwrap_or_default().dns_records.len() == 2)
        },
    )
    .await;

    // The addresses joined the config (as "self"), so the members rolled; wait until done.
    eventually(cp, &ns, "Ready again after the roll", TIMEOUT, || async {
        let mc = api.get("relay").await?;
        Ok(condition(&mc, READY).is_some_and(|c| c.0 == "True"))
    })
    .await;
    // What a person sees: `kubectl get mc` with the printer columns.
    let out = cp.kubectl(&["get", "mc", "-n", &ns]).unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{table}");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "MEMBERS", "HOSTNAME", "ADDRESSES", "AGE"]
    );
    let row = table.lines().nth(1).unwrap();
    for cell in [
        "relay",
        "True",
        "3/3",
        "smtp.example.com",
        "192.0.2.10",
        "192.0.2.11",
    ] {
        assert!(
            row.contains(cell),
            "{cell} missing from `kubectl get mc`:\n{table}"
        );
    }

    // A listener change rolls the config hash; the cluster key stays.
    let hash_before = sts_api
        .get("relay")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap()[CONFIG_HASH_ANNOTATION]
        .clone();
    assert_ne!(
        hash_before, hash1,
        "the load balancer addresses are in the config (self addresses)"
    );
    api.patch(
        "relay",
        &PatchParams::default(),
        &Patch::Json::<()>(
            serde_json::from_value(json!([
                {"op": "replace", "path": "/spec/listeners/2/port", "value": 2526}
            ]))
            .unwrap(),
        ),
    )
    .await
    .unwrap();
    eventually(
        cp,
        &ns,
        "a new config hash on the pod template",
        TIMEOUT,
        || async {
            let sts = sts_api.get("relay").await?;
            let tpl = sts.spec.unwrap().template;
            let h = tpl.metadata.unwrap().annotations.unwrap()[CONFIG_HASH_ANNOTATION].clone();
            let ports: Vec<i32> = tpl.spec.unwrap().containers[0]
                .ports
                .clone()
                .unwrap_or_default()
                .iter()
                .map(|p| p.container_port)
                .collect();
            Ok(h != hash_before && ports.contains(&2526))
        },
    )
    .await;
    let key2 = secrets.get("relay-cluster").await.unwrap().data.unwrap()["cluster-key"].clone();
    assert_eq!(key1, key2, "the cluster key is never regenerated");

    // A replica change reaches the StatefulSet.
    api.patch(
        "relay",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 4}})),
    )
    .await
    .unwrap();
    eventually(
        cp,
        &ns,
        "4 replicas on the StatefulSet",
        TIMEOUT,
        || async { Ok(sts_api.get("relay").await?.spec.and_then(|s| s.replicas) == Some(4)) },
    )
    .await;

    // Deleting the MailCluster removes its children (garbage collection by owner reference).
    api.delete("relay", &DeleteParams::foreground())
        .await
        .unwrap();
    eventually(
        cp,
        &ns,
        "children removed",
        Duration::from_secs(180),
        || async {
            Ok(sts_api.get_opt("relay").await?.is_none()
                && cm.get_opt("relay-config").await?.is_none()
                && secrets.get_opt("relay-cluster").await?.is_none()
                && svc_api.list(&ListParams::default()).await?.items.is_empty()
                && dns.get_opt("relay").await?.is_none())
        },
    )
    .await;
    op.stop().await;
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over() {
    let (cp, client) = setup().await;
    let ns = cp.new_namespace("leader").await.unwrap();
    let lease = |identity: &str| {
        Elector::new(
            client.clone(),
            LeaseSettings {
                namespace: ns.clone(),
                name: "mailcluster-operator".into(),
                identity: identity.into(),
                lease_duration: Duration::from_secs(4),
                renew_interval: Duration::from_secs(1),
            },
        )
    };
    let a = Operator::start(client.clone(), &ns, Some(lease("a")), "a");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = Operator::start(client.clone(), &ns, Some(lease("b")), "b");
    let api: Api<MailCluster> = Api::namespaced(client.clone(), &ns);
    create(&api, &manifest("first", &ns)).await.unwrap();
    eventually(cp, &ns, "the leader reconciles", TIMEOUT, || async {
        Ok(a.reconciles() > 0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(b.reconciles(), 0, "the standby does not reconcile");
    assert_eq!(a.ctx.metrics.leader.get(), 1);
    assert_eq!(b.ctx.metrics.leader.get(), 0);

    // The leader dies without giving up its lease: the standby takes over once it expires.
    a.task.abort();
    let _ = a.task.await;
    let started = tokio::time::Instant::now();
    create(&api, &manifest("second", &ns)).await.unwrap();
    eventually(
        cp,
        &ns,
        "the standby takes over",
        Duration::from_secs(30),
        || async { Ok(b.reconciles() > 0) },
    )
    .await;
    eprintln!("takeover after {:?}", started.elapsed());
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    eventually(
        cp,
        &ns,
        "the new leader creates the second cluster",
        TIMEOUT,
        || async { Ok(sts.get_opt("second").await?.is_some()) },
    )
    .await;
    assert_eq!(b.ctx.metrics.leader.get(), 1);
    // Graceful shutdown gives the lease up, so a next instance need not wait for it to expire.
    b.stop().await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &ns);
    let l = leases.get("mailcluster-operator").await.unwrap();
    assert_eq!(
        l.spec.unwrap().holder_identity,
        None,
        "the lease is released on shutdown"
    );
}

#[tokio::test]
async fn a_missing_cert_manager_is_reported_and_the_rest_goes_on() {
    let (cp, client) = setup().await;
    let ns = cp.new_namespace("certs").await.unwrap();
    let op = Operator::start(client.clone(), &ns, None, "certs");
    let api: Api<MailCluster> = Api::namespaced(client.clone(), &ns);
    let v = set(
        manifest("issued", &ns),
        "/spec/tls",
        json!({"issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}}),
    );
    create(&api, &v).await.unwrap();
    eventually(
        cp,
        &ns,
        "Degraded CertificateCRDMissing",
        TIMEOUT,
        || async {
            let mc = api.get("issued").await?;
            Ok(condition(&mc, DEGRADED).is_some_and(|c| {
                c.0 == "True"
                    && c.1 == "CertificateCRDMissing"
                    && c.2.contains("install cert-manager")
            }))
        },
    )
    .await;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let pod = sts
        .get("issued")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    let tls = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "tls")
        .unwrap();
    assert_eq!(
        tls.secret.unwrap().secret_name.as_deref(),
        Some("issued-tls")
    );
    assert_eq!(errors(&op), 0, "a missing CRD is not a reconcile error");
    op.stop().await;
}

/// A fake member admin port on loopback answering `GET /status` with `body`.
async fn fake_status_server(
    body: std::sync::Arc<std::sync::Mutex<String>>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let body = body.lock().unwrap().clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut req = Vec::new();
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

fn status_body(pod: &str, hash: &str, depth: i64) -> String {
    json!({
        "name": pod, "version": "0.9.0", "configHash": format!("{hash}00112233445566778899aabbccddeeff"),
        "configLoadedAt": "2026-01-01T00:00:00Z", "queueDepth": depth,
        "oldestMessageAgeSeconds": 42, "draining": false, "drained": false, "ready": true,
        "peers": [], "peersReachable": 1
    })
    .to_string()
}

async fn poke(api: &Api<MailCluster>, name: &str, value: &str) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"poke": value}}})),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn members_status_is_read_from_their_admin_port() {
    let (cp, client) = setup().await;
    let ns = cp.new_namespace("memberstatus").await.unwrap();
    let op = Operator::start(client.clone(), &ns, None, "status-operator");
    let api: Api<MailCluster> = Api::namespaced(client.clone(), &ns);
    create(&api, &set(manifest("ms", &ns), "/spec/replicas", json!(2)))
        .await
        .unwrap();
    eventually(cp, &ns, "Ready", TIMEOUT, || async {
        let mc = api.get("ms").await?;
        Ok(condition(&mc, READY).is_some_and(|c| c.0 == "True"))
    })
    .await;
    let hash = api
        .get("ms")
        .await
        .unwrap()
        .status
        .unwrap()
        .config_hash
        .unwrap();

    // ms-1 runs another configuration.
    let bodies: Vec<_> = [
        status_body("ms-0", &hash, 2),
        status_body("ms-1", "0badc0ffee0badc0", 0),
    ]
    .into_iter()
    .map(|b| std::sync::Arc::new(std::sync::Mutex::new(b)))
    .collect();
    for (i, b) in bodies.iter().enumerate() {
        let addr = fake_status_server(b.clone()).await;
        op.member_ports
            .lock()
            .unwrap()
            .insert(format!("ms-{i}"), addr);
    }
    poke(&api, "ms", "1").await;
    eventually(cp, &ns, "Ready False: ConfigMismatch", TIMEOUT, || async {
        let mc = api.get("ms").await?;
        Ok(condition(&mc, READY).is_some_and(|(s, reason, msg)| {
            s == "False" && reason == "ConfigMismatch" && msg.contains("ms-1 runs 0badc0ffee0badc0")
        }))
    })
    .await;
    let st = api.get("ms").await.unwrap().status.unwrap();
    assert_eq!(st.members[0].queue_depth, Some(2));
    assert_eq!(st.members[0].oldest_message_age_seconds, Some(42));
    assert_eq!(st.members[0].version.as_deref(), Some("0.9.0"));
    assert_eq!(st.members[0].peers_reachable, Some(1));
    assert!(st.members[0].config_in_sync);
    assert!(!st.members[1].config_in_sync);

    // Restarted with the current configuration: Ready again.
    *bodies[1].lock().unwrap() = status_body("ms-1", &hash, 0);
    poke(&api, "ms", "2").await;
    eventually(cp, &ns, "Ready again", TIMEOUT, || async {
        let mc = api.get("ms").await?;
        Ok(condition(&mc, READY).is_some_and(|c| c.0 == "True"))
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn a_removed_members_volume_is_drained_then_deleted() {
    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    let (cp, client) = setup().await;
    let ns = cp.new_namespace("drain").await.unwrap();
    let op = Operator::start(client.clone(), &ns, None, "drain-operator");
    let api: Api<MailCluster> = Api::namespaced(client.clone(), &ns);
    create(&api, &manifest("dr", &ns)).await.unwrap();
    eventually(cp, &ns, "Ready with 3 members", TIMEOUT, || async {
        let mc = api.get("dr").await?;
        Ok(condition(&mc, READY).is_some_and(|c| c.0 == "True"))
    })
    .await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    assert!(pvcs.get_opt("queue-dr-2").await.unwrap().is_some());

    api.patch(
        "dr",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 2}})),
    )
    .await
    .unwrap();
    eventually(cp, &ns, "the drain Job of queue-dr-2", TIMEOUT, || async {
        Ok(jobs.get_opt("dr-drain-2").await?.is_some())
    })
    .await;
    let job = jobs.get("dr-drain-2").await.unwrap();
    assert_eq!(job.owner_references()[0].kind, "MailCluster");
    let pod = job.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.volumes
            .unwrap()
            .iter()
            .find_map(|v| v.persistent_volume_claim.clone())
            .unwrap()
            .claim_name,
        "queue-dr-2"
    );
    assert_eq!(pod.containers[0].args.as_ref().unwrap()[0], "drain");
    eventually(cp, &ns, "status says Draining", TIMEOUT, || async {
        let st = api.get("dr").await?.status.unwrap_or_default();
        Ok(st
            .orphaned_volumes
            .iter()
            .any(|v| v.claim == "queue-dr-2" && v.phase == VolumePhase::Draining))
    })
    .await;
    assert!(
        pvcs.get_opt("queue-dr-2").await.unwrap().is_some(),
        "kept until drained"
    );

    // kwok runs no containers: the Job succeeds by a status patch (its pod counts as active;
    // the start time is the Job controller's).
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    jobs.patch_status(
        "dr-drain-2",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "active": 0, "ready": 0, "completionTime": now, "succeeded": 1,
            "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now, "lastProbeTime": now},
                {"type": "Complete", "status": "True", "lastTransitionTime": now, "lastProbeTime": now}
            ]
        }})),
    )
    .await
    .unwrap();
    eventually(cp, &ns, "queue-dr-2 deleted", TIMEOUT, || async {
        Ok(pvcs
            .get_opt("queue-dr-2")
            .await?
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some()))
    })
    .await;
    assert!(pvcs.get_opt("queue-dr-1").await.unwrap().is_some());

    // Retain: scaling down keeps the volume and starts no Job.
    api.patch(
        "dr",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"spec": {"replicas": 1, "storage": {"orphanedVolumePolicy": "Retain"}}}),
        ),
    )
    .await
    .unwrap();
    eventually(cp, &ns, "queue-dr-1 Retained", TIMEOUT, || async {
        let st = api.get("dr").await?.status.unwrap_or_default();
        Ok(st
            .orphaned_volumes
            .iter()
            .any(|v| v.claim == "queue-dr-1" && v.phase == VolumePhase::Retained))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(jobs.get_opt("dr-drain-1").await.unwrap().is_none());
    let kept = pvcs.get_opt("queue-dr-1").await.unwrap().unwrap();
    assert!(kept.metadata.deletion_timestamp.is_none());
    op.stop().await;
}

#[tokio::test]
async fn a_key_rotation_adds_a_key_and_drops_the_old_one_after_the_roll() {
    let (cp, client) = setup().await;
    let ns = cp.new_namespace("rotate").await.unwrap();
    let op = Operator::start(client.clone(), &ns, None, "rotate-operator");
    let api: Api<MailCluster> = Api::namespaced(client.clone(), &ns);
    create(&api, &set(manifest("rot", &ns), "/spec/replicas", json!(2)))
        .await
        .unwrap();
    eventually(cp, &ns, "Ready", TIMEOUT, || async {
        let mc = api.get("rot").await?;
        Ok(condition(&mc, READY).is_some_and(|c| c.0 == "True"))
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let keys = |s: Secret| -> Vec<String> {
        String::from_utf8(s.data.unwrap()["cluster-key"].0.clone())
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    };
    let old = keys(secrets.get("rot-cluster").await.unwrap());
    assert_eq!(old.len(), 1);
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let key_hash = |s: StatefulSet| {
        s.spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()["mailcluster.dev/key-hash"]
            .clone()
    };
    let hash_before = key_hash(sts_api.get("rot").await.unwrap());

    api.patch(
        "rot",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {"mailcluster.dev/rotate-key": "2026-11"}}}),
        ),
    )
    .await
    .unwrap();
    let both = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    eventually(cp, &ns, "new and old key", TIMEOUT, || async {
        let k = keys(secrets.get("rot-cluster").await?);
        let ok = k.len() == 2 && k[1] == old[0] && k[0] != old[0];
        if ok {
            *both.lock().unwrap() = k;
        }
        Ok(ok)
    })
    .await;
    let new = both.lock().unwrap()[0].clone();
    eventually(
        cp,
        &ns,
        "the roll, then only the new key",
        TIMEOUT,
        || async { Ok(keys(secrets.get("rot-cluster").await?) == [new.clone()]) },
    )
    .await;
    assert_ne!(
        key_hash(sts_api.get("rot").await.unwrap()),
        hash_before,
        "the members rolled"
    );
    eventually(cp, &ns, "Ready after the rotation", TIMEOUT, || async {
        let mc = api.get("rot").await?;
        Ok(condition(&mc, READY).is_some_and(|c| c.0 == "True"))
    })
    .await;
    // Served: later reconciles keep the key.
    poke(&api, "rot", "1").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(keys(secrets.get("rot-cluster").await.unwrap()), [new]);
    op.stop().await;
}
