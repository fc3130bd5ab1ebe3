//! PROXY protocol v1 (text) and v2 (binary) header parser, pure.
//! See <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included.
pub const V1_MAX: usize = 107;
/// Longest v2 header this parser accepts (TLVs included).
pub const V2_MAX: usize = 16 + 2048;

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The proxied client and the address it connected to.
    Proxied {
        /// Original client.
        source: SocketAddr,
        /// Original destination.
        destination: SocketAddr,
    },
    /// v1 `UNKNOWN` or v2 `LOCAL`: use the connection's own address.
    Local,
}

/// Parse errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Neither v1 nor v2 signature.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// Malformed v1 line.
    #[error("malformed PROXY v1 header")]
    BadV1,
    /// Malformed v2 header.
    #[error("malformed PROXY v2 header")]
    BadV2,
    /// Too long.
    #[error("PROXY header too long")]
    TooLong,
}

/// Parse a header at the start of `buf`. `Ok(None)`: need more bytes. `Ok(Some((h, n)))`:
/// header `h` took the first `n` bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let n = buf.len().min(12);
    if buf[..n] == V2_SIGNATURE[..n] {
        if buf.len() < 16 {
            return Ok(None);
        }
        return parse_v2(buf);
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return parse_v1(buf);
    }
    Err(ProxyError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let Some(lf) = buf.iter().take(V1_MAX).position(|b| *b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::TooLong)
        } else {
            Ok(None)
        };
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(ProxyError::BadV1);
    }
    let line = std::str::from_utf8(&buf[..lf - 1]).map_err(|_| ProxyError::BadV1)?;
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Some((ProxyHeader::Local, lf + 1))),
        ["PROXY", fam, src, dst, sport, dport] => {
            let (src, dst): (IpAddr, IpAddr) = match *fam {
                "TCP4" => (
                    IpAddr::V4(src.parse::<Ipv4Addr>().map_err(|_| ProxyError::BadV1)?),
                    IpAddr::V4(dst.parse::<Ipv4Addr>().map_err(|_| ProxyError::BadV1)?),
                ),
                "TCP6" => (
                    IpAddr::V6(src.parse::<Ipv6Addr>().map_err(|_| ProxyError::BadV1)?),
                    IpAddr::V6(dst.parse::<Ipv6Addr>().map_err(|_| ProxyError::BadV1)?),
                ),
                _ => return Err(ProxyError::BadV1),
            };
            let port = |p: &str| -> Result<u16, ProxyError> {
                if p.is_empty()
                    || p.len() > 5
                    || !p.bytes().all(|b| b.is_ascii_digit())
                    || (p.len() > 1 && p.starts_with('0'))
                {
                    return Err(ProxyError::BadV1);
                }
                p.parse().map_err(|_| ProxyError::BadV1)
            };
            Ok(Some((
                ProxyHeader::Proxied {
                    source: SocketAddr::new(src, port(sport)?),
                    destination: SocketAddr::new(dst, port(dport)?),
                },
                lf + 1,
            )))
        }
        _ => Err(ProxyError::BadV1),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let ver_cmd = buf[12];
    let fam = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::BadV2);
    }
    if 16 + len > V2_MAX {
        return Err(ProxyError::TooLong);
    }
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let total = 16 + len;
    match ver_cmd & 0x0f {
        0 => return Ok(Some((ProxyHeader::Local, total))),
        1 => {}
        _ => return Err(ProxyError::BadV2),
    }
    match fam {
        // TCP over IPv4
        0x11 => {
            if body.len() < 12 {
                return Err(ProxyError::BadV2);
            }
            let src = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let dst = Ipv4Addr::new(body[4], body[5], body[6], body[7]);
            let sp = u16::from_be_bytes([body[8], body[9]]);
            let dp = u16::from_be_bytes([body[10], body[11]]);
            Ok(Some((
                ProxyHeader::Proxied {
                    source: SocketAddr::new(IpAddr::V4(src), sp),
                    destination: SocketAddr::new(IpAddr::V4(dst), dp),
                },
                total,
            )))
        }
        // TCP over IPv6
        0x21 => {
            if body.len() < 36 {
                return Err(ProxyError::BadV2);
            }
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&body[0..16]);
            d.copy_from_slice(&body[16..32]);
            let sp = u16::from_be_bytes([body[32], body[33]]);
            let dp = u16::from_be_bytes([body[34], body[35]]);
            Ok(Some((
                ProxyHeader::Proxied {
                    source: SocketAddr::new(IpAddr::V6(Ipv6Addr::from(s)), sp),
                    destination: SocketAddr::new(IpAddr::V6(Ipv6Addr::from(d)), dp),
                },
                total,
            )))
        }
        // UNSPEC: like LOCAL.
        0x00 => Ok(Some((ProxyHeader::Local, total))),
        _ => Err(ProxyError::BadV2),
    }
}

/// Encode a v2 header (for tests and tools).
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut v = V2_SIGNATURE.to_vec();
    v.push(0x21);
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            v.push(0x11);
            v.extend_from_slice(&12u16.to_be_bytes());
            v.extend_from_slice(&s.ip().octets());
            v.extend_from_slice(&d.ip().octets());
            v.extend_from_slice(&s.port().to_be_bytes());
            v.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let to6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(x) => x.to_ipv6_mapped(),
                IpAddr::V6(x) => x,
            };
            v.push(0x21);
            v.extend_from_slice(&36u16.to_be_bytes());
            v.extend_from_slice(&to6(s).octets());
            v.extend_from_slice(&to6(d).octets());
            v.extend_from_slice(&s.port().to_be_bytes());
            v.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1() {
        let (h, n) = parse(b"PROXY TCP4 192.0.2.1 198.51.100.1 5678 25\r\nEHLO x\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(n, 43);
        assert_eq!(
            h,
            ProxyHeader::Proxied {
                source: "192.0.2.1:5678".parse().unwrap(),
                destination: "198.51.100.1:25".parse().unwrap()
            }
        );
        assert_eq!(parse(b"PROXY TCP4 192.0.2.1").unwrap(), None);
        assert_eq!(parse(b"PROX").unwrap(), None);
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Some((ProxyHeader::Local, 15))
        );
        assert!(parse(b"PROXY TCP4 ::1 ::1 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n").is_err());
        assert!(parse(b"EHLO x\r\n").is_err());
        assert_eq!(parse(&[b'P'; 200]), Err(ProxyError::NotProxy));
        let mut long = b"PROXY ".to_vec();
        long.extend_from_slice(&[b'1'; 200]);
        assert_eq!(parse(&long), Err(ProxyError::TooLong));
        let (h, _) = parse(b"PROXY TCP6 2001:db8::1 ::1 1 25\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h, ProxyHeader::Proxied { source, .. } if source.port() == 1));
    }

    #[test]
    fn v2_roundtrip_and_partial() {
        let s: SocketAddr = "203.0.113.7:4000".parse().unwrap();
        let d: SocketAddr = "127.0.0.1:25".parse().unwrap();
        let enc = encode_v2(s, d);
        for i in 0..enc.len() {
            assert_eq!(parse(&enc[..i]).unwrap(), None, "prefix {i}");
        }
        assert_eq!(
            parse(&enc).unwrap(),
            Some((
                ProxyHeader::Proxied {
                    source: s,
                    destination: d
                },
                enc.len()
            ))
        );
        let s6: SocketAddr = "[2001:db8::5]:4000".parse().unwrap();
        let d6: SocketAddr = "[::1]:25".parse().unwrap();
        let enc6 = encode_v2(s6, d6);
        assert_eq!(
            parse(&enc6).unwrap().unwrap().0,
            ProxyHeader::Proxied {
                source: s6,
                destination: d6
            }
        );
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local).unwrap(), Some((ProxyHeader::Local, 16)));
        let mut bad = enc.clone();
        bad[12] = 0x31;
        assert!(parse(&bad).is_err());
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(parse(&short).is_err());
    }
}
