//! The `mailcluster-operator` binary: `crd` prints what `crds/` holds, `render` prints every
//! object offline and names the file when it cannot.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn operator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mailcluster-operator"))
}

#[test]
fn crd_prints_the_committed_crd() {
    let out = operator().arg("crd").output().unwrap();
    assert!(out.status.success());
    let committed = include_str!("../../crds/mailcluster.dev_mailclusters.yaml");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), committed);
}

#[test]
fn render_prints_every_object() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.yaml");
    std::fs::write(
        &file,
        r#"apiVersion: mailcluster.dev/v1alpha1
kind: MailCluster
metadata: {name: relay, namespace: mail}
spec:
  hostname: smtp.example.com
  listeners:
    - {name: smtp, port: 25, relay: {allowedSources: [10.0.0.0/8]}}
  tls: {issuerRef: {name: letsencrypt, kind: ClusterIssuer}}
  dns: {mx: [{domain: example.com, priority: 10}]}
"#,
    )
    .unwrap();
    let out = operator()
        .arg("render")
        .arg(&file)
        .args(["--address", "192.0.2.1", "--default-image", "mailnode:x"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for kind in [
        "kind: Secret",
        "kind: ConfigMap",
        "kind: Service",
        "kind: StatefulSet",
        "kind: PodDisruptionBudget",
        "kind: NetworkPolicy",
        "kind: Certificate",
        "kind: DNSEndpoint",
    ] {
        assert!(text.contains(kind), "{kind} missing:\n{text}");
    }
    assert!(text.contains("image: mailnode:x"));
    assert!(text.contains("10 smtp.example.com"));
}

#[test]
fn render_names_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, "kind: MailCluster\nspec: {hostname: 5}\n").unwrap();
    let out = operator().arg("render").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("broken.yaml"), "{err}");
}
