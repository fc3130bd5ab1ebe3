//! The Helm chart `charts/mailcluster-operator`: its CRD is the generated one, `helm lint` is
//! clean and the values schema refuses bad values, the rendered objects are what the operator
//! needs (secure Deployment, leader election with several replicas, exactly the RBAC verbs the
//! operator uses), the apiserver accepts them (server-side dry run), and `helm install`,
//! `helm upgrade` and `helm uninstall` work against the test control plane, where kwok makes
//! the operator pods Ready.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{
    KUBE_VERSION, chart, chart_dir, ensure_crd, ensure_optional_crds, eventually, helm,
    helm_offline, kubectl, of_kind, ok, one, repo_root, template, unique, wait_crd_established,
    write_temp, yaml_docs,
};
use mailcluster_testenv::ControlPlane;
use serde_json::Value;

/// What the operator does with each resource (operator/src/controller.rs, reconcile.rs,
/// apply.rs, status.rs, drain Jobs of removed members' volumes): the cluster-wide (or watched-namespace) rules, exactly. Server-side
/// apply of a missing object is authorized as create as well as patch.
const OPERATOR_RULES: &[(&str, &str, &[&str])] = &[
    ("mailcluster.dev", "mailclusters", &["list", "watch"]),
    ("mailcluster.dev", "mailclusters/status", &["patch"]),
    ("mailcluster.dev", "mailclusters/finalizers", &["update"]),
    ("apps", "statefulsets", WATCH_AND_APPLY),
    ("", "configmaps", WATCH_AND_APPLY),
    ("", "secrets", WATCH_AND_APPLY),
    (
        "",
        "services",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    ("", "pods", &["list", "watch"]),
    ("", "persistentvolumeclaims", &["get", "list", "delete"]),
    (
        "batch",
        "jobs",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    ("policy", "poddisruptionbudgets", WATCH_AND_APPLY),
    ("networking.k8s.io", "networkpolicies", WATCH_AND_APPLY),
    ("cert-manager.io", "certificates", APPLY_AND_DELETE),
    ("externaldns.k8s.io", "dnsendpoints", APPLY_AND_DELETE),
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// Owned children the controller watches and applies.
const WATCH_AND_APPLY: &[&str] = &["get", "list", "watch", "create", "patch"];
/// Optional children (CRDs of other projects): applied, or deleted when no longer wanted.
const APPLY_AND_DELETE: &[&str] = &["get", "create", "patch", "delete"];

type Grants = BTreeMap<(String, String), BTreeSet<String>>;

/// (group, resource[/resourceName]) -> verbs, from a Role or ClusterRole.
fn grants(role: &Value) -> Grants {
    let mut out = Grants::new();
    for rule in role["rules"].as_array().expect("rules") {
        let names: Vec<String> = rule["resourceNames"]
            .as_array()
            .map(|a| a.iter().map(|n| n.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                let keys: Vec<String> = if names.is_empty() {
                    vec![r.as_str().unwrap().to_string()]
                } else {
                    names
                        .iter()
                        .map(|n| format!("{}/{n}", r.as_str().unwrap()))
                        .collect()
                };
                for key in keys {
                    let verbs = out
                        .entry((g.as_str().unwrap().to_string(), key))
                        .or_default();
                    for v in rule["verbs"].as_array().unwrap() {
                        verbs.insert(v.as_str().unwrap().to_string());
                    }
                }
            }
        }
    }
    out
}

fn expected_operator_grants() -> Grants {
    OPERATOR_RULES
        .iter()
        .map(|(g, r, verbs)| {
            (
                (g.to_string(), r.to_string()),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect()
}

fn container(docs: &[Value]) -> &Value {
    &one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn args(docs: &[Value]) -> Vec<String> {
    container(docs)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn chart_crd_is_byte_identical_to_the_generated_crd() {
    let generated = repo_root().join("crds");
    let copied = chart_dir().join("crds");
    let names = |dir: &std::path::Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
            .collect()
    };
    let resync = "run `cp crds/*.yaml charts/mailcluster-operator/crds/` from the repository root";
    let files = names(&generated);
    assert!(!files.is_empty(), "crds/ holds no CRD");
    assert_eq!(
        files,
        names(&copied),
        "the chart's crds/ and crds/ hold different files: {resync}"
    );
    for f in &files {
        let a = std::fs::read(generated.join(f)).unwrap();
        let b = std::fs::read(copied.join(f)).unwrap();
        assert!(
            a == b,
            "charts/mailcluster-operator/crds/{f} is stale: {resync}"
        );
    }
}

#[test]
fn helm_lint_is_clean_and_the_schema_refuses_bad_values() {
    let chart = chart();
    let variants: &[&[&str]] = &[
        &[],
        &["replicaCount=3"],
        &[
            "watchNamespace=mail",
            "nodeImage=registry.example/mailnode:1.2.3",
        ],
        &[
            "metrics.serviceMonitor.enabled=true",
            "leaderElection.enabled=true",
        ],
        &["serviceAccount.create=false", "rbac.create=false"],
    ];
    for sets in variants {
        let mut args = vec![
            "lint",
            "--strict",
            chart.as_str(),
            "--kube-version",
            KUBE_VERSION,
        ];
        for s in *sets {
            args.extend(["--set", s]);
        }
        let out = ok(&format!("helm {}", args.join(" ")), helm_offline(&args));
        assert!(out.contains("0 chart(s) failed"), "{out}");
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "{out}"
        );
    }
    let bad: &[(&str, &str)] = &[
        ("replicaCount=-1", "replicaCount"),
        ("unknownValue=1", "unknownValue"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("metrics.port=70000", "port"),
        ("watchNamespace=Not_A_Namespace", "watchNamespace"),
        ("leaderElection.leaseSeconds=1", "leaseSeconds"),
    ];
    for (set, needle) in bad {
        let out = helm_offline(&[
            "lint",
            chart.as_str(),
            "--kube-version",
            KUBE_VERSION,
            "--set",
            set,
        ]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "helm lint accepted --set {set}:\n{text}"
        );
        assert!(text.contains(needle), "--set {set}: {text}");
    }
    // A ServiceMonitor without the Service it selects is refused.
    let out = helm_offline(&[
        "template",
        "r",
        chart.as_str(),
        "--kube-version",
        KUBE_VERSION,
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.service.enabled=false",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics.service.enabled"));
}

#[test]
fn rendered_deployment_is_locked_down_and_wired_to_the_run_flags() {
    let docs = yaml_docs(&template("r", "ops", &[]));
    assert_eq!(
        kinds(&docs),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "ServiceAccount"
        ]
        .map(String::from)
        .into(),
    );
    let dep = one(&docs, "Deployment");
    assert_eq!(dep["metadata"]["namespace"], "ops");
    assert_eq!(dep["spec"]["replicas"], 1);
    assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "r-mailcluster-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = container(&docs);
    assert_eq!(c["image"], "ghcr.io/mailcluster/mailcluster-operator:0.1.0");
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    let a = args(&docs);
    assert_eq!(a[0], "run");
    assert!(
        a.contains(&"--metrics-addr=0.0.0.0:8080".to_string()),
        "{a:?}"
    );
    assert!(a.contains(&"--leader-elect=false".to_string()), "{a:?}");
    assert!(!a.iter().any(|x| x.starts_with("--namespace")), "{a:?}");
    assert!(!a.iter().any(|x| x.starts_with("--default-image")), "{a:?}");
    let env: BTreeMap<String, String> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let v = e["value"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| e["valueFrom"]["fieldRef"]["fieldPath"].to_string());
            (e["name"].as_str().unwrap().to_string(), v)
        })
        .collect();
    assert_eq!(env["POD_NAME"], "\"metadata.name\"");
    assert_eq!(env["POD_NAMESPACE"], "\"metadata.namespace\"");
    // The metrics Service selects the pods and targets the named port.
    let svc = one(&docs, "Service");
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "Service selector {k}");
    }
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");

    // Values reach the flags.
    let docs = yaml_docs(&template(
        "r",
        "ops",
        &[
            "nodeImage=registry.example/mailnode:1.2.3",
            "metrics.port=9090",
            "resyncSeconds=60",
            "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ],
    ));
    let a = args(&docs);
    assert!(a.contains(&"--default-image=registry.example/mailnode:1.2.3".to_string()));
    assert!(a.contains(&"--metrics-addr=0.0.0.0:9090".to_string()));
    assert!(a.contains(&"--resync-seconds=60".to_string()));
    assert_eq!(container(&docs)["ports"][0]["containerPort"], 9090);
    assert!(
        container(&docs)["image"]
            .as_str()
            .unwrap()
            .ends_with("@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    );
}

#[test]
fn several_replicas_elect_a_leader() {
    let docs = yaml_docs(&template("r", "ops", &["replicaCount=3"]));
    let a = args(&docs);
    assert!(a.contains(&"--leader-elect=true".to_string()), "{a:?}");
    assert!(
        a.contains(&"--lease-name=r-mailcluster-operator".to_string()),
        "{a:?}"
    );
    assert!(a.contains(&"--lease-seconds=15".to_string()), "{a:?}");
    let dep = one(&docs, "Deployment");
    assert_eq!(dep["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(one(&docs, "PodDisruptionBudget")["spec"]["minAvailable"], 1);
    // The Lease Role: create, and get/update of this release's Lease only, in its namespace.
    let role = one(&docs, "Role");
    assert_eq!(role["metadata"]["namespace"], "ops");
    let expected: Grants = [
        (("coordination.k8s.io", "leases"), vec!["create"]),
        (
            ("coordination.k8s.io", "leases/r-mailcluster-operator"),
            vec!["get", "update"],
        ),
    ]
    .into_iter()
    .map(|((g, r), v)| {
        (
            (g.to_string(), r.to_string()),
            v.into_iter().map(String::from).collect(),
        )
    })
    .collect();
    assert_eq!(grants(role), expected);
    let rb = one(&docs, "RoleBinding");
    assert_eq!(rb["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(rb["subjects"][0]["name"], "r-mailcluster-operator");

    // One replica with leaderElection.enabled also elects (and rolls).
    let docs = yaml_docs(&template("r", "ops", &["leaderElection.enabled=true"]));
    assert!(args(&docs).contains(&"--leader-elect=true".to_string()));
    assert_eq!(
        one(&docs, "Deployment")["spec"]["strategy"]["type"],
        "RollingUpdate"
    );
    assert!(of_kind(&docs, "PodDisruptionBudget").is_empty());
}

#[test]
fn rbac_is_exactly_what_the_operator_uses() {
    // All namespaces: one ClusterRole bound to the ServiceAccount.
    let docs = yaml_docs(&template("r", "ops", &[]));
    let role = one(&docs, "ClusterRole");
    assert_eq!(grants(role), expected_operator_grants());
    let binding = one(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], "r-mailcluster-operator");
    assert_eq!(binding["subjects"][0]["namespace"], "ops");
    assert!(
        of_kind(&docs, "Role").is_empty(),
        "no Lease role without election"
    );

    // One namespace: the same rules in a Role there, and nothing cluster-wide.
    let docs = yaml_docs(&template("r", "ops", &["watchNamespace=mail"]));
    assert!(of_kind(&docs, "ClusterRole").is_empty());
    assert!(of_kind(&docs, "ClusterRoleBinding").is_empty());
    let role = one(&docs, "Role");
    assert_eq!(role["metadata"]["namespace"], "mail");
    assert_eq!(grants(role), expected_operator_grants());
    let binding = one(&docs, "RoleBinding");
    assert_eq!(binding["metadata"]["namespace"], "mail");
    assert_eq!(binding["subjects"][0]["namespace"], "ops");
    assert!(args(&docs).contains(&"--namespace=mail".to_string()));

    // No RBAC and an existing ServiceAccount.
    let docs = yaml_docs(&template(
        "r",
        "ops",
        &[
            "rbac.create=false",
            "serviceAccount.create=false",
            "serviceAccount.name=ops-sa",
        ],
    ));
    assert_eq!(
        kinds(&docs),
        ["Deployment", "Service"].map(String::from).into()
    );
    assert_eq!(
        one(&docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"],
        "ops-sa"
    );
}

#[test]
fn service_monitor_scrapes_the_metrics_service() {
    let docs = yaml_docs(&template("r", "ops", &[]));
    assert!(of_kind(&docs, "ServiceMonitor").is_empty());
    let docs = yaml_docs(&template(
        "r",
        "ops",
        &[
            "metrics.serviceMonitor.enabled=true",
            "metrics.serviceMonitor.labels.release=prom",
        ],
    ));
    let sm = one(&docs, "ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    let svc = one(&docs, "Service");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &svc["metadata"]["labels"][k], v,
            "ServiceMonitor selector {k}"
        );
    }
    assert_eq!(
        sm["spec"]["endpoints"][0]["port"],
        svc["spec"]["ports"][0]["name"]
    );
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(sm["spec"]["namespaceSelector"]["matchNames"][0], "ops");
}

/// `helm template` output, applied with a server-side dry run: the apiserver validates every
/// object (strict field validation) without keeping any.
#[test]
fn rendered_objects_pass_a_server_side_dry_run() {
    let cp = ControlPlane::shared();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ns = rt.block_on(cp.new_namespace("chart-dryrun")).unwrap();
    let watched = rt.block_on(cp.new_namespace("chart-watched")).unwrap();
    let release = unique("dry");
    let watch_set = format!("watchNamespace={watched}");
    let variants: Vec<Vec<&str>> = vec![
        vec![],
        vec!["replicaCount=3"],
        vec![
            watch_set.as_str(),
            "nodeImage=registry.example/mailnode:1.2.3",
        ],
    ];
    for sets in variants {
        let rendered = template(&release, &ns, &sets);
        let file = write_temp("rendered.yaml", &rendered);
        let file = file.display().to_string();
        let out = kubectl(
            cp,
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--validate=strict",
                "--field-manager=helm-template-dry-run",
                "-f",
                &file,
            ],
        );
        let docs = yaml_docs(&rendered);
        for d in &docs {
            let name = d["metadata"]["name"].as_str().unwrap();
            assert!(
                out.contains(name) && out.contains("(server dry run)"),
                "dry run did not report {} {name}:\n{out}",
                d["kind"]
            );
        }
        // Nothing was created.
        let dep = format!("deployment/{release}-mailcluster-operator");
        let got = cp.kubectl(&["get", &dep, "-n", &ns]).unwrap();
        assert!(!got.status.success(), "a dry run created {dep}");
    }
}

/// The first path where `want` has a field that `live` lacks or holds another value (the
/// apiserver adds defaults, so extra fields in `live` do not count).
fn first_difference(path: &str, want: &Value, live: &Value) -> Option<String> {
    match (want, live) {
        (Value::Object(w), Value::Object(l)) => w.iter().find_map(|(k, v)| {
            let p = format!("{path}.{k}");
            match l.get(k) {
                Some(lv) => first_difference(&p, v, lv),
                None => Some(format!("{p} missing")),
            }
        }),
        (Value::Array(w), Value::Array(l)) if w.len() == l.len() => w
            .iter()
            .zip(l)
            .enumerate()
            .find_map(|(i, (a, b))| first_difference(&format!("{path}[{i}]"), a, b)),
        (Value::Number(w), Value::Number(l)) if w.as_f64() == l.as_f64() => None,
        _ if want == live => None,
        _ => Some(format!("{path}: want {want}, got {live}")),
    }
}

fn json(cp: &ControlPlane, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&kubectl(cp, &a)).unwrap()
}

fn exists(cp: &ControlPlane, args: &[&str]) -> bool {
    cp.kubectl(args).unwrap().status.success()
}

fn ready_pods(cp: &ControlPlane, ns: &str, instance: &str) -> usize {
    let sel = format!("app.kubernetes.io/instance={instance}");
    let pods = json(cp, &["get", "pods", "-n", ns, "-l", &sel]);
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| {
            p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
        .count()
}

fn deployment_args(cp: &ControlPlane, ns: &str, name: &str) -> Vec<String> {
    let dep = json(cp, &["get", "deployment", name, "-n", ns]);
    dep["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The test that owns the CRD: `helm install` with the chart's crds/ (Helm creates the CRD,
/// or leaves it alone when another test created it first), then upgrade and uninstall.
#[test]
fn install_upgrade_and_uninstall() {
    let cp = ControlPlane::shared();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ns = rt.block_on(cp.new_namespace("chart-install")).unwrap();
    let release = unique("mco");
    let name = format!("{release}-mailcluster-operator");
    let chart = chart();

    let out = helm(
        cp,
        &[
            "install",
            &release,
            &chart,
            "-n",
            &ns,
            "--wait",
            "--timeout",
            "180s",
        ],
    );
    assert!(out.contains("STATUS: deployed"), "{out}");
    // NOTES.txt is rendered.
    assert!(out.contains(&format!("deployment/{name}")), "{out}");

    // The CRD is there, Established, and the one in the chart.
    wait_crd_established(cp, "mailclusters.mailcluster.dev");
    let live = json(cp, &["get", "crd", "mailclusters.mailcluster.dev"]);
    let file = std::fs::read_to_string(chart_dir().join("crds/mailcluster.dev_mailclusters.yaml"))
        .unwrap();
    let want: Value = serde_yaml::from_str(&file).unwrap();
    let diff = first_difference("spec", &want["spec"], &live["spec"]);
    assert!(
        diff.is_none(),
        "the installed CRD differs from the chart's: {diff:?}"
    );

    // The operator Deployment is up: its pod is Ready (kwok), single replica, no election.
    let dep = json(cp, &["get", "deployment", &name, "-n", &ns]);
    assert_eq!(dep["status"]["readyReplicas"], 1, "{dep}");
    assert_eq!(ready_pods(cp, &ns, &release), 1);
    let a = deployment_args(cp, &ns, &name);
    assert!(a.contains(&"--leader-elect=false".to_string()), "{a:?}");
    assert!(exists(cp, &["get", "serviceaccount", &name, "-n", &ns]));
    assert!(exists(cp, &["get", "clusterrole", &name]));
    assert!(exists(cp, &["get", "clusterrolebinding", &name]));
    assert!(exists(
        cp,
        &["get", "service", &format!("{name}-metrics"), "-n", &ns]
    ));
    let lease_role = format!("{name}-leader-election");
    assert!(!exists(cp, &["get", "role", &lease_role, "-n", &ns]));

    // Upgrade to two replicas: leader election, the Lease role, a disruption budget.
    let out = helm(
        cp,
        &[
            "upgrade",
            &release,
            &chart,
            "-n",
            &ns,
            "--reuse-values",
            "--set",
            "replicaCount=2",
            "--wait",
            "--timeout",
            "180s",
        ],
    );
    assert!(out.contains("REVISION: 2"), "{out}");
    let a = deployment_args(cp, &ns, &name);
    assert!(a.contains(&"--leader-elect=true".to_string()), "{a:?}");
    assert!(a.contains(&format!("--lease-name={name}")), "{a:?}");
    assert!(exists(cp, &["get", "role", &lease_role, "-n", &ns]));
    assert!(exists(cp, &["get", "rolebinding", &lease_role, "-n", &ns]));
    assert!(exists(
        cp,
        &["get", "poddisruptionbudget", &name, "-n", &ns]
    ));
    eventually(cp, &ns, "two ready operator pods", || {
        ready_pods(cp, &ns, &release) == 2
    });
    let dep = json(cp, &["get", "deployment", &name, "-n", &ns]);
    assert_eq!(dep["spec"]["strategy"]["type"], "RollingUpdate");
    let history = helm(cp, &["history", &release, "-n", &ns]);
    assert!(history.lines().count() >= 3, "{history}");

    // Uninstall removes everything but the CRD (Helm never deletes CRDs: MailClusters stay).
    let out = helm(
        cp,
        &[
            "uninstall",
            &release,
            "-n",
            &ns,
            "--wait",
            "--timeout",
            "180s",
        ],
    );
    assert!(out.contains("uninstalled"), "{out}");
    assert!(!exists(cp, &["get", "deployment", &name, "-n", &ns]));
    assert!(!exists(cp, &["get", "serviceaccount", &name, "-n", &ns]));
    assert!(!exists(cp, &["get", "clusterrole", &name]));
    assert!(!exists(cp, &["get", "clusterrolebinding", &name]));
    assert!(!exists(cp, &["get", "role", &lease_role, "-n", &ns]));
    assert!(!exists(
        cp,
        &["get", "poddisruptionbudget", &name, "-n", &ns]
    ));
    assert!(exists(cp, &["get", "crd", "mailclusters.mailcluster.dev"]));
    eventually(cp, &ns, "operator pods gone", || {
        let sel = format!("app.kubernetes.io/instance={release}");
        let pods = json(cp, &["get", "pods", "-n", &ns, "-l", &sel]);
        pods["items"].as_array().unwrap().is_empty()
    });
    let list = helm(cp, &["list", "-n", &ns, "-q"]);
    assert!(!list.contains(&release), "{list}");
}

/// `kubectl auth can-i` as `sa`; `resource` is `TYPE[.GROUP][/NAME]` or
/// `TYPE[.GROUP]:SUBRESOURCE`.
fn can_i(cp: &ControlPlane, sa: &str, verb: &str, resource: &str, ns: &str) -> bool {
    let mut args = vec!["auth", "can-i", verb, "-n", ns, "--as", sa];
    let sub;
    match resource.split_once(':') {
        Some((res, subresource)) => {
            sub = format!("--subresource={subresource}");
            args.extend([res, sub.as_str()]);
        }
        None => args.push(resource),
    }
    let out = cp.kubectl(&args).unwrap();
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match said.as_str() {
        "yes" => true,
        "no" => false,
        other => panic!(
            "kubectl auth can-i {verb} {resource}: {other} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The installed RBAC, asked the apiserver: the ServiceAccount may do what the operator does
/// and nothing more; with `watchNamespace` only in that namespace.
#[test]
fn installed_rbac_allows_the_operator_and_nothing_more() {
    let cp = ControlPlane::shared();
    ensure_crd(cp);
    ensure_optional_crds(cp);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ns = rt.block_on(cp.new_namespace("chart-rbac")).unwrap();
    let tenant = rt.block_on(cp.new_namespace("chart-tenant")).unwrap();
    let other = rt.block_on(cp.new_namespace("chart-other")).unwrap();
    let release = unique("rbac");
    let name = format!("{release}-mailcluster-operator");
    let sa = format!("system:serviceaccount:{ns}:{name}");
    let chart = chart();

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
            "replicaCount=2",
        ],
    );
    let allowed: Vec<(&str, String)> = OPERATOR_RULES
        .iter()
        .flat_map(|(g, r, verbs)| {
            let resource = match r.split_once('/') {
                Some((res, sub)) if g.is_empty() => format!("{res}:{sub}"),
                Some((res, sub)) => format!("{res}.{g}:{sub}"),
                None if g.is_empty() => r.to_string(),
                None => format!("{r}.{g}"),
            };
            verbs.iter().map(move |v| (*v, resource.clone()))
        })
        .collect();
    for (verb, resource) in &allowed {
        assert!(
            can_i(cp, &sa, verb, resource, &tenant),
            "the operator needs {verb} {resource}"
        );
    }
    let refused = [
        ("create", "mailclusters.mailcluster.dev"),
        ("update", "mailclusters.mailcluster.dev"),
        ("patch", "mailclusters.mailcluster.dev"),
        ("delete", "mailclusters.mailcluster.dev"),
        ("get", "mailclusters.mailcluster.dev"),
        ("delete", "statefulsets.apps"),
        ("update", "statefulsets.apps"),
        ("delete", "secrets"),
        ("delete", "configmaps"),
        ("create", "pods"),
        ("delete", "pods"),
        ("get", "pods"),
        ("delete", "poddisruptionbudgets.policy"),
        ("list", "certificates.cert-manager.io"),
        ("list", "dnsendpoints.externaldns.k8s.io"),
        ("create", "events"),
        ("get", "nodes"),
        ("create", "deployments.apps"),
        ("escalate", "clusterroles.rbac.authorization.k8s.io"),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
    ];
    for (verb, resource) in refused {
        assert!(
            !can_i(cp, &sa, verb, resource, &tenant),
            "the operator does not need {verb} {resource}"
        );
    }
    // The Lease: create in its own namespace, get/update of its own Lease only.
    let lease = format!("leases.coordination.k8s.io/{name}");
    assert!(can_i(cp, &sa, "create", "leases.coordination.k8s.io", &ns));
    assert!(can_i(cp, &sa, "get", &lease, &ns));
    assert!(can_i(cp, &sa, "update", &lease, &ns));
    assert!(!can_i(
        cp,
        &sa,
        "get",
        "leases.coordination.k8s.io/someone-else",
        &ns
    ));
    assert!(!can_i(cp, &sa, "delete", &lease, &ns));
    assert!(!can_i(
        cp,
        &sa,
        "create",
        "leases.coordination.k8s.io",
        &other
    ));

    // The operator's first apply creates each child: prove the ServiceAccount can.
    let cm = write_temp(
        "cm.yaml",
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: created-by-apply\n  namespace: {tenant}\ndata:\n  a: b\n"
        ),
    );
    let cm = cm.display().to_string();
    kubectl(
        cp,
        &[
            "apply",
            "--server-side",
            "--field-manager=mailcluster-operator",
            "--as",
            &sa,
            "-f",
            &cm,
        ],
    );
    assert!(exists(
        cp,
        &["get", "configmap", "created-by-apply", "-n", &tenant]
    ));

    // watchNamespace: the same rules in that namespace only.
    helm(
        cp,
        &[
            "upgrade",
            &release,
            &chart,
            "-n",
            &ns,
            "--skip-crds",
            "--reuse-values",
            "--set",
            &format!("watchNamespace={tenant}"),
        ],
    );
    assert!(!exists(cp, &["get", "clusterrole", &name]));
    for (verb, resource) in &allowed {
        assert!(
            can_i(cp, &sa, verb, resource, &tenant),
            "{verb} {resource} in {tenant}"
        );
        assert!(
            !can_i(cp, &sa, verb, resource, &other),
            "{verb} {resource} in {other}"
        );
    }
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
    assert!(!can_i(
        cp,
        &sa,
        "list",
        "mailclusters.mailcluster.dev",
        &tenant
    ));
}
