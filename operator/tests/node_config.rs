//! What the operator renders is what the relay node accepts: `mailnode check-config` on the
//! ConfigMap content the builders produce, for the design's example and for variations.

#![allow(clippy::unwrap_used)]

mod common;

use common::mailnode_bin;

use std::process::Command;

use mailcluster_operator::builders::configmap;
use mailcluster_operator::crd::{MailCluster, MailClusterSpec};

fn cluster(spec_yaml: &str) -> MailCluster {
    let spec: MailClusterSpec = serde_yaml::from_str(spec_yaml).expect("spec parses");
    let mut mc = MailCluster::new("relay", spec);
    mc.metadata.namespace = Some("mail".into());
    mc
}

const DESIGN_EXAMPLE: &str = r#"
hostname: smtp.example.com
replicas: 3
listeners:
  - name: devices-internal
    port: 25
    relay: {allowedSources: [10.20.0.0/16], recipientDomains: [example.com]}
  - name: apps-external
    port: 587
    tls: {mode: StartTLS, required: true}
    relay: {allowedSources: [10.30.0.0/16], requireAuth: true}
  - name: inbound-mx
    port: 2525
    acceptDomains: [example.com]
    proxyProtocol: true
    trustedProxies: [192.0.2.0/24, "2001:db8::/32"]
    maxMessageSize: 52428800
delivery:
  smarthosts:
    - {host: exchange.example.internal, port: 25, priority: 10}
    - {host: exchange-dr.example.internal, port: 25, priority: 20}
  retry: {first: 1m, max: 1h, lifetime: 5d}
storage: {size: 10Gi}
dns: {ttl: 300, mx: [{domain: example.com, priority: 20}]}
tls: {secretName: smtp-example-com}
auth: {secretName: smtp-users}
"#;

const MINIMAL: &str = r#"
hostname: relay.example.org
listeners: [{name: smtp, port: 25}]
"#;

#[test]
fn mailnode_check_config_accepts_what_the_operator_renders() {
    let bin = mailnode_bin();
    let dir = tempfile::tempdir().unwrap();
    for (name, spec) in [("design", DESIGN_EXAMPLE), ("minimal", MINIMAL)] {
        let mc = cluster(spec);
        let addrs = [
            "192.0.2.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        ];
        let rendered = configmap::render(&configmap::node_config(&mc, &addrs).unwrap()).unwrap();
        let cm = configmap::config_map(&mc, &rendered).unwrap();
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, &cm.data.unwrap()[configmap::CONFIG_KEY]).unwrap();
        let out = Command::new(&bin)
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mailnode check-config refused the {name} config:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            rendered.yaml
        );
    }
}

#[test]
fn mailnode_check_config_refuses_a_broken_file() {
    // The check above can fail: a config with a misspelt key is refused, naming the key.
    let bin = mailnode_bin();
    let dir = tempfile::tempdir().unwrap();
    let mc = cluster(MINIMAL);
    let rendered = configmap::render(&configmap::node_config(&mc, &[]).unwrap()).unwrap();
    let broken = rendered.yaml.replace("hostname:", "hostnam:");
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, broken).unwrap();
    let out = Command::new(&bin)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hostnam"));
}
