//! What `local` tells a person once the members are ready: where each member listens, the DNS
//! records the cluster would publish, where mail goes, the local credentials, and a command that
//! sends a test mail through each listener.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use mailnode_api::config as node;

use crate::builders::dnsendpoint;
use crate::crd::MailCluster;

use super::{Adjustments, LOCAL_USER, MemberLayout, READY_PREFIX};

/// The facts the summary is made of.
#[derive(Debug)]
pub(super) struct Summary<'a> {
    pub(super) mc: &'a MailCluster,
    /// The state directory.
    pub(super) state: &'a Path,
    /// Each member's layout, process id and log file.
    pub(super) members: Vec<(&'a MemberLayout, u32, &'a Path)>,
    /// The members' node configurations, in member order.
    pub(super) configs: &'a [node::Config],
    /// The sink's address and directory, when mail goes there.
    pub(super) sink: Option<(SocketAddr, &'a Path)>,
    pub(super) adjustments: &'a Adjustments,
    /// Whether TLS uses the self-signed certificate made for local mode.
    pub(super) tls: bool,
    /// The local SMTP AUTH user's password, when AUTH is on.
    pub(super) password: Option<&'a str>,
}

impl Summary<'_> {
    /// The text, ending with the [`READY_PREFIX`] line.
    pub(super) fn render(&self) -> String {
        let mc = self.mc;
        let state = self.state;
        let mut out = String::new();
        let _ = writeln!(out, "members:");
        for (m, pid, log) in &self.members {
            let _ = writeln!(
                out,
                "  {}  pid {pid}  admin http://{}/readyz  peers {}  log {}",
                m.name,
                m.admin(),
                m.peer(),
                log.display()
            );
            for (l, want, got) in &m.listeners {
                let mapped = if want == got {
                    String::new()
                } else {
                    format!("  (manifest port {want})")
                };
                let _ = writeln!(out, "    smtp {l}: {}{mapped}", SocketAddr::new(m.ip, *got));
            }
        }
        let addrs: Vec<String> = {
            let mut v: Vec<String> = self
                .members
                .iter()
                .map(|(m, _, _)| m.ip.to_string())
                .collect();
            v.dedup();
            v
        };
        let records = dnsendpoint::records(mc, &addrs);
        let ttl = mc.spec.dns_or_default().ttl;
        let _ = writeln!(out, "DNS records it would publish (not published locally):");
        if records.is_empty() {
            let _ = writeln!(out, "  none (spec.dns is disabled)");
        }
        for r in &records {
            let _ = writeln!(
                out,
                "  {}.  {ttl}  IN  {}  {}",
                r.name,
                r.record_type,
                r.targets.join("  ")
            );
        }
        match self.sink {
            Some((addr, dir)) => {
                let why = if mc.spec.delivery.smarthosts.is_empty() {
                    "the manifest names no smarthosts"
                } else {
                    "--sink"
                };
                let _ = writeln!(
                    out,
                    "delivery: to the local sink smtp://{} ({why}); messages land in {}",
                    addr,
                    dir.display()
                );
            }
            None => {
                let hosts: Vec<String> = mc
                    .spec
                    .delivery
                    .smarthosts
                    .iter()
                    .map(|h| format!("{}:{} (priority {})", h.host.0, h.port, h.priority))
                    .collect();
                let _ = writeln!(
                    out,
                    "delivery: to the manifest's smarthosts {}; mail stays queued while they are unreachable (--sink delivers to {} instead)",
                    hosts.join(", "),
                    state.join("sink").display()
                );
            }
        }
        for l in &self.adjustments.loopback_added {
            let _ = writeln!(
                out,
                "note: listener {l} does not allow loopback to relay; local mode adds 127.0.0.0/8 to its allowedSources"
            );
        }
        if self.tls {
            let _ = writeln!(
                out,
                "note: TLS uses a self-signed certificate for {} in {}",
                mc.spec.hostname,
                state.join("tls").display()
            );
        }
        if let Some(pw) = self.password {
            let _ = writeln!(
                out,
                "note: SMTP AUTH user {LOCAL_USER}, password {pw} (in {})",
                state.join("auth").display()
            );
        }
        if let Some(c) = self.configs.first() {
            let cmds: Vec<(String, String)> = c
                .listeners
                .iter()
                .filter_map(|l| swaks_command(c, l, self.password).map(|s| (l.name.clone(), s)))
                .collect();
            if cmds.is_empty() {
                let _ = writeln!(
                    out,
                    "no listener accepts mail from loopback (no relay policy, no accepted domains)"
                );
            } else {
                let _ = writeln!(out, "send a test mail:");
                for (l, cmd) in cmds {
                    let _ = writeln!(out, "  # listener {l}\n  {cmd}");
                }
            }
        }
        let _ = writeln!(
            out,
            "{READY_PREFIX} {} member(s) ready; Ctrl-C stops them",
            self.members.len()
        );
        out
    }
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "@._-:/+=,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The swaks command that sends a test mail through `listener` of `member`, or `None` when
/// the listener accepts nothing from loopback.
pub fn swaks_command(
    config: &node::Config,
    listener: &node::Listener,
    password: Option<&str>,
) -> Option<String> {
    let relays = !listener.relay.allowed_sources.is_empty();
    let to = if relays {
        match listener.relay.recipient_domains.first() {
            Some(d) => format!("test@{d}"),
            None => "test@example.net".to_string(),
        }
    } else {
        format!("postmaster@{}", listener.accept_domains.first()?)
    };
    let mut cmd = format!(
        "swaks --server {} --from local-test@{} --to {} --header {}",
        listener.address,
        config.hostname,
        to,
        shell_quote("Subject: mailcluster local test")
    );
    if listener.tls.required || (relays && listener.relay.require_auth) {
        cmd.push_str(" --tls");
    }
    if relays && listener.relay.require_auth {
        let _ = write!(
            cmd,
            " --auth PLAIN --auth-user {LOCAL_USER} --auth-password {}",
            shell_quote(password.unwrap_or("PASSWORD"))
        );
    }
    Some(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;
    use crate::local::files::testing::files;
    use crate::local::layout::testing::members;
    use crate::local::localize;

    #[test]
    fn swaks_commands_follow_the_policy() {
        let mc = sample();
        let (c, _) = localize(&mc, &members(1, true), 0, &files(), None).unwrap();
        let devices = swaks_command(&c, &c.listeners[0], None).unwrap();
        assert!(devices.contains("--server 127.0.0.10:10025"), "{devices}");
        assert!(devices.contains("--to test@example.com"), "{devices}");
        assert!(!devices.contains("--auth"), "{devices}");
        let apps = swaks_command(&c, &c.listeners[1], Some("pw")).unwrap();
        assert!(
            apps.contains("--tls") && apps.contains("--auth-password pw"),
            "{apps}"
        );
        let mx = swaks_command(&c, &c.listeners[2], None).unwrap();
        assert!(mx.contains("--to postmaster@example.com"), "{mx}");
    }

    #[test]
    fn the_summary_says_where_members_listen_where_mail_goes_and_how_to_send() {
        let mc = sample();
        let layouts = members(2, true);
        let configs: Vec<_> = (0..2)
            .map(|i| localize(&mc, &layouts, i, &files(), None).unwrap().0)
            .collect();
        let log = Path::new("/state/members/relay-0/mailnode.log");
        let adjustments = Adjustments {
            loopback_added: vec!["devices".into()],
        };
        let sink_dir = Path::new("/state/sink");
        let text = Summary {
            mc: &mc,
            state: Path::new("/state"),
            members: layouts.iter().map(|m| (m, 4242, log)).collect(),
            configs: &configs,
            sink: Some(("127.0.0.1:40000".parse().unwrap(), sink_dir)),
            adjustments: &adjustments,
            tls: true,
            password: Some("secret-pw"),
        }
        .render();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.contains(&"  relay-1  pid 4242  admin http://127.0.0.11:8025/readyz  peers 127.0.0.11:7025  log /state/members/relay-0/mailnode.log"),
            "{text}"
        );
        assert!(
            lines.contains(&"    smtp devices: 127.0.0.10:10025  (manifest port 25)"),
            "{text}"
        );
        assert!(
            lines.contains(&"  smtp.example.com.  300  IN  A  127.0.0.10  127.0.0.11"),
            "{text}"
        );
        assert!(text.contains("IN  MX  20 smtp.example.com"), "{text}");
        assert!(
            text.contains("delivery: to the local sink smtp://127.0.0.1:40000 (--sink); messages land in /state/sink"),
            "{text}"
        );
        assert!(
            text.contains("note: listener devices does not allow loopback"),
            "{text}"
        );
        assert!(
            text.contains("password secret-pw (in /state/auth)"),
            "{text}"
        );
        assert!(text.contains("swaks --server 127.0.0.10:10025"), "{text}");
        assert_eq!(
            lines.last(),
            Some(&"ready: 2 member(s) ready; Ctrl-C stops them")
        );
    }
}
