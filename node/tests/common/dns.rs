//! A tiny authoritative DNS server for tests (UDP on loopback), answering MX, A, AAAA and TXT
//! from a table that can change while it runs; other names get NXDOMAIN, known names without
//! the type get NOERROR/empty.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinEncodable};

#[derive(Debug, Clone)]
pub enum Rec {
    Mx(u16, String),
    Ip(IpAddr),
    Txt(String),
}

pub struct TestDns {
    pub addr: SocketAddr,
    table: Arc<Mutex<Vec<(String, Rec)>>>,
    stop: Arc<AtomicBool>,
    ttl: Arc<AtomicU32>,
}

fn norm(n: &str) -> String {
    n.trim_end_matches('.').to_ascii_lowercase()
}

impl TestDns {
    pub fn start(ip: &str) -> TestDns {
        let sock = UdpSocket::bind((ip, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let table: Arc<Mutex<Vec<(String, Rec)>>> = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let ttl = Arc::new(AtomicU32::new(5));
        let (t, s, l) = (Arc::clone(&table), Arc::clone(&stop), Arc::clone(&ttl));
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_bytes(&buf[..n]) else {
                    continue;
                };
                let mut resp = Message::response(q.metadata.id, q.metadata.op_code);
                resp.metadata.authoritative = true;
                resp.metadata.recursion_desired = q.metadata.recursion_desired;
                resp.metadata.recursion_available = true;
                let Some(query) = q.queries.first().cloned() else {
                    continue;
                };
                let qname = norm(&query.name().to_utf8());
                let table = t.lock().unwrap().clone();
                let known = table.iter().any(|(n, _)| *n == qname);
                for (n, r) in &table {
                    if *n != qname {
                        continue;
                    }
                    let name = query.name().clone();
                    let rdata = match (r, query.query_type()) {
                        (Rec::Mx(p, x), RecordType::MX) => RData::MX(MX::new(
                            *p,
                            Name::from_str(&format!("{}.", x.trim_end_matches('.')))
                                .unwrap_or_else(|_| Name::root()),
                        )),
                        (Rec::Ip(IpAddr::V4(ip)), RecordType::A) => RData::A(A(*ip)),
                        (Rec::Ip(IpAddr::V6(ip)), RecordType::AAAA) => RData::AAAA(AAAA(*ip)),
                        (Rec::Txt(t), RecordType::TXT) => RData::TXT(TXT::new(vec![t.clone()])),
                        _ => continue,
                    };
                    resp.answers
                        .push(Record::from_rdata(name, l.load(Ordering::Relaxed), rdata));
                }
                resp.queries.push(query);
                if !known {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                }
                if let Ok(bytes) = resp.to_bytes() {
                    let _ = sock.send_to(&bytes, from);
                }
            }
        });
        TestDns {
            addr,
            table,
            stop,
            ttl,
        }
    }

    /// The TTL of the answers from now on (0: resolvers keep nothing, for records a test
    /// changes).
    pub fn set_ttl(&self, secs: u32) {
        self.ttl.store(secs, Ordering::Relaxed);
    }

    pub fn add(&self, name: &str, rec: Rec) {
        self.table.lock().unwrap().push((norm(name), rec));
    }

    /// Remove every record of `name` that `which` selects.
    pub fn remove(&self, name: &str, which: impl Fn(&Rec) -> bool) {
        let n = norm(name);
        self.table
            .lock()
            .unwrap()
            .retain(|(k, r)| *k != n || !which(r));
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
