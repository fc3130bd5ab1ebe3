//! Settings that are valid but deserve a second look, shown in `status.warnings` (and so in
//! `kubectl describe mc`): a pure function of the spec.

use ipnet::IpNet;

use crate::crd::MailClusterSpec;

/// Networks that are not on the public internet: private (RFC 1918, RFC 4193), shared address
/// space (RFC 6598), loopback and link-local.
const NON_PUBLIC: [&str; 9] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "fc00::/7",
    "fe80::/10",
    "::1/128",
];

/// Whether every address of `net` is outside the public internet.
fn is_non_public(net: &IpNet) -> bool {
    NON_PUBLIC
        .iter()
        .filter_map(|n| n.parse::<IpNet>().ok())
        .any(|p| p.contains(net))
}

/// One line per listener whose relay sources include public addresses, naming the field and
/// what it means.
pub fn spec_warnings(spec: &MailClusterSpec) -> Vec<String> {
    let mut out = Vec::new();
    for (i, l) in spec.listeners.iter().enumerate() {
        let Some(relay) = &l.relay else { continue };
        let public: Vec<&str> = relay
            .allowed_sources
            .iter()
            .filter(|c| {
                c.as_str()
                    .parse::<IpNet>()
                    .is_ok_and(|n| !is_non_public(&n))
            })
            .map(|c| c.as_str())
            .collect();
        if public.is_empty() {
            continue;
        }
        let guard = if relay.require_auth {
            "clients there must still authenticate"
        } else if !relay.recipient_domains.is_empty() {
            "they may relay only to relay.recipientDomains"
        } else {
            "they may relay anywhere without authenticating"
        };
        out.push(format!(
            "spec.listeners[{i}].relay.allowedSources includes public addresses ({}): {guard}; check that only your own hosts are there",
            public.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(relay: &str) -> MailClusterSpec {
        serde_yaml::from_str(&format!(
            "hostname: smtp.example.com\nlisteners:\n  - name: a\n    port: 25\n    relay: {relay}\n"
        ))
        .unwrap()
    }

    #[test]
    fn public_relay_sources_are_named_with_what_guards_them() {
        assert!(
            spec_warnings(&spec(
                "{allowedSources: [10.20.0.0/16, fd00::/8, 100.64.1.0/24]}"
            ))
            .is_empty()
        );
        let w = spec_warnings(&spec("{allowedSources: [10.0.0.0/8, 198.51.100.0/24]}"));
        assert_eq!(w.len(), 1);
        assert!(
            w[0].starts_with(
                "spec.listeners[0].relay.allowedSources includes public addresses (198.51.100.0/24)"
            ),
            "{w:?}"
        );
        assert!(w[0].contains("without authenticating"), "{w:?}");
        let w = spec_warnings(&spec("{allowedSources: [0.0.0.0/0], requireAuth: true}"));
        assert!(w[0].contains("must still authenticate"), "{w:?}");
        // A private prefix that is wider than the private range is public in part.
        let w = spec_warnings(&spec("{allowedSources: [10.0.0.0/7]}"));
        assert_eq!(w.len(), 1, "{w:?}");
    }
}
