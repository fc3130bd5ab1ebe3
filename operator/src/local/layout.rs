//! Where each local member listens: a loopback address per member (or distinct ports on
//! 127.0.0.1), privileged ports mapped to high ones, every port probed free.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::builders::BuildError;
use crate::crd::{ADMIN_PORT, MailCluster, PEER_PORT};

use super::LocalError;

/// Ports below this are mapped to `port + PORT_SHIFT` locally.
const PRIVILEGED: u16 = 1024;
/// Added to a privileged port to get the local one (25 -> 10025).
const PORT_SHIFT: u16 = 10000;

/// Where one member listens locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberLayout {
    /// Member name (`NAME-i`, as the StatefulSet's pods).
    pub name: String,
    /// Its loopback address.
    pub ip: IpAddr,
    /// Listener name, manifest port, local port.
    pub listeners: Vec<(String, u16, u16)>,
    pub admin_port: u16,
    /// Peer channel port.
    pub peer_port: u16,
    /// Its directory under the state directory.
    pub dir: PathBuf,
}

impl MemberLayout {
    /// The admin endpoint.
    pub fn admin(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.admin_port)
    }
    /// The peer endpoint.
    pub fn peer(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.peer_port)
    }
    /// Local address of a listener.
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, p)| SocketAddr::new(self.ip, *p))
    }
}

/// Picks free local ports, remembering what it gave out.
#[derive(Debug, Default)]
struct Ports {
    taken: HashSet<SocketAddr>,
}

impl Ports {
    fn free(addr: SocketAddr) -> bool {
        std::net::TcpListener::bind(addr).is_ok()
    }

    /// `want`, mapped up when privileged, or a free ephemeral port when that is busy.
    fn pick(&mut self, ip: IpAddr, want: u16) -> Result<u16, LocalError> {
        let want = if want < PRIVILEGED {
            want + PORT_SHIFT
        } else {
            want
        };
        let addr = SocketAddr::new(ip, want);
        if !self.taken.contains(&addr) && Self::free(addr) {
            self.taken.insert(addr);
            return Ok(want);
        }
        for _ in 0..20 {
            let l = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
                .map_err(|_| LocalError::NoPort(ip))?;
            let a = l.local_addr().map_err(|_| LocalError::NoPort(ip))?;
            if self.taken.insert(a) {
                return Ok(a.port());
            }
        }
        Err(LocalError::NoPort(ip))
    }
}

fn port_of(p: i32) -> Result<u16, LocalError> {
    u16::try_from(p).map_err(|_| LocalError::Unsupported(format!("port {p} is not in 1-65535")))
}

/// Addresses and ports of the members, probing that they are free.
pub(super) fn layout(
    mc: &MailCluster,
    first_ip: Ipv4Addr,
    state: &Path,
) -> Result<Vec<MemberLayout>, LocalError> {
    let name = mc.metadata.name.clone().ok_or(BuildError::MissingName)?;
    let n = usize::try_from(mc.spec.replicas.max(1)).unwrap_or(1);
    // 127.0.0.x other than .1 exists on Linux; elsewhere every member uses 127.0.0.1.
    let distinct = std::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(first_ip), 0)).is_ok();
    let mut ports = Ports::default();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let ip = if distinct {
            let bits = first_ip
                .to_bits()
                .checked_add(u32::try_from(i).unwrap_or(u32::MAX));
            match bits.map(Ipv4Addr::from_bits) {
                Some(ip) if ip.is_loopback() => IpAddr::V4(ip),
                _ => {
                    return Err(LocalError::Unsupported(format!(
                        "{first_ip} + {i} is not a loopback address; pass a lower --listen-ip"
                    )));
                }
            }
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        };
        let mut listeners = Vec::new();
        for l in &mc.spec.listeners {
            let p = port_of(l.port)?;
            listeners.push((l.name.clone(), p, ports.pick(ip, p)?));
        }
        let member = format!("{name}-{i}");
        out.push(MemberLayout {
            admin_port: ports.pick(ip, port_of(ADMIN_PORT)?)?,
            peer_port: ports.pick(ip, port_of(PEER_PORT)?)?,
            dir: state.join("members").join(&member),
            name: member,
            ip,
            listeners,
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(super) mod testing {
    use super::*;

    pub(in crate::local) fn members(n: usize, distinct: bool) -> Vec<MemberLayout> {
        (0..n)
            .map(|i| {
                let ip: IpAddr = if distinct {
                    format!("127.0.0.{}", 10 + i).parse().unwrap()
                } else {
                    "127.0.0.1".parse().unwrap()
                };
                let k = if distinct {
                    0
                } else {
                    u16::try_from(i).unwrap() * 10
                };
                MemberLayout {
                    name: format!("relay-{i}"),
                    ip,
                    listeners: vec![
                        ("devices".into(), 25, 10025 + k),
                        ("apps".into(), 587, 10587 + k),
                        ("inbound-mx".into(), 2525, 2525 + k),
                    ],
                    admin_port: 8025 + k,
                    peer_port: 7025 + k,
                    dir: PathBuf::from(format!("/state/members/relay-{i}")),
                }
            })
            .collect()
    }
}
