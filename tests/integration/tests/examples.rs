//! Every manifest in `examples/` is accepted by a real apiserver that has the generated CRD
//! from `crds/` (server-side dry run, strict field validation, CEL rules), so an example that
//! drifts from the CRD fails here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::{ok, repo_root, wait_crd_established, write_temp, yaml_docs};
use mailcluster_testenv::{ControlPlane, Options};

/// The Kubernetes manifests in `examples/`: YAML files whose documents name a `kind`. Other
/// YAML there (a `mailnode` configuration file, which has no `kind`) is not for the apiserver.
fn examples() -> Vec<PathBuf> {
    let dir = repo_root().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .filter(|p| {
            yaml_docs(&std::fs::read_to_string(p).unwrap())
                .iter()
                .any(|d| d.get("kind").is_some() || d.get("apiVersion").is_some())
        })
        .collect();
    files.sort();
    files
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> std::process::Output {
    cp.kubectl(args).expect("running kubectl")
}

fn dry_run(cp: &ControlPlane, file: &str) -> std::process::Output {
    kubectl(
        cp,
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--validate=strict",
            "--field-manager=examples-test",
            "-f",
            file,
        ],
    )
}

/// A control plane of its own (apiserver only) with the generated CRD and the examples'
/// namespaces.
fn setup() -> ControlPlane {
    let cp = ControlPlane::start(Options::bare()).expect("control plane");
    let crds = repo_root().join("crds").display().to_string();
    ok(
        "kubectl apply crds/",
        kubectl(&cp, &["apply", "--server-side", "-f", &crds]),
    );
    wait_crd_established(&cp, "mailclusters.mailcluster.dev");
    let mut namespaces: Vec<String> = examples()
        .iter()
        .flat_map(|f| yaml_docs(&std::fs::read_to_string(f).unwrap()))
        .filter_map(|d| d["metadata"]["namespace"].as_str().map(String::from))
        .collect();
    namespaces.sort();
    namespaces.dedup();
    for ns in namespaces {
        ok(
            "kubectl create namespace",
            kubectl(&cp, &["create", "namespace", &ns]),
        );
    }
    cp
}

#[test]
fn every_example_is_accepted_by_the_crd_and_drift_is_refused() {
    let files = examples();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for wanted in [
        "mailcluster.yaml",
        "devices-internal.yaml",
        "apps-authenticated.yaml",
        "fallback-mx.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "examples/{wanted} is missing"
        );
    }

    let cp = setup();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let docs = yaml_docs(&text);
        assert!(!docs.is_empty(), "{} holds no object", f.display());
        for d in &docs {
            assert_eq!(
                d["apiVersion"],
                "mailcluster.dev/v1alpha1",
                "{}",
                f.display()
            );
            assert_eq!(d["kind"], "MailCluster", "{}", f.display());
        }
        let path = f.display().to_string();
        let out = ok(&format!("dry run of {path}"), dry_run(&cp, &path));
        for d in &docs {
            let name = d["metadata"]["name"].as_str().unwrap();
            assert!(
                out.contains(&format!(
                    "mailcluster.mailcluster.dev/{name} serverside-applied (server dry run)"
                )),
                "{path}: {out}"
            );
        }
        // A dry run keeps nothing.
        let ns = docs[0]["metadata"]["namespace"].as_str().unwrap();
        let name = docs[0]["metadata"]["name"].as_str().unwrap();
        let got = kubectl(&cp, &["get", "mailcluster", name, "-n", ns]);
        assert!(!got.status.success(), "{path}: the dry run created {name}");
    }

    // The same check refuses a manifest that drifted from the CRD: a renamed field (strict
    // field validation), a wrong enum value, and a broken cross-field rule (CEL).
    let base = std::fs::read_to_string(repo_root().join("examples/mailcluster.yaml")).unwrap();
    let drifted = [
        (
            "allowedSources:",
            "allowedSource:",
            "field not declared in schema",
        ),
        ("mode: StartTLS", "mode: starttls", "Unsupported value"),
        (
            "  tls:\n    secretName: smtp-example-com\n",
            "",
            "set spec.tls",
        ),
    ];
    for (from, to, needle) in drifted {
        assert!(
            base.contains(from),
            "examples/mailcluster.yaml no longer has {from:?}"
        );
        let bad = base.replacen(from, to, 1);
        let file = write_temp("drifted.yaml", &bad).display().to_string();
        let out = dry_run(&cp, &file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{from:?} -> {to:?} was accepted:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(stderr.contains(needle), "{from:?} -> {to:?}: {stderr}");
    }
}
