//! The peer protocol's lines, free of I/O: the greeting, the commands and the transfer
//! header, built and parsed here for both the client and the server.

use super::PeerError;

/// Protocol name and version, in the greeting.
pub const PROTOCOL: &str = "MNPEER1";

/// Most MACs an `AUTH` line may carry (one per key during a rotation).
const MAX_MACS: usize = 8;

/// The server's greeting.
pub fn greeting(hostname: &str, nonce: &str, node: &str) -> String {
    format!("220 {hostname} {PROTOCOL} nonce={nonce} node={node}")
}

/// The server nonce and node id of a greeting.
pub fn parse_greeting(line: &str) -> Result<(String, String), PeerError> {
    if !line.starts_with("220 ") {
        return Err(PeerError::Refused(line.to_owned()));
    }
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_owned)
    };
    match (field("nonce="), field("node=")) {
        (Some(nonce), Some(node)) => Ok((nonce, node)),
        _ => Err(PeerError::Protocol(format!("not a peer greeting: {line}"))),
    }
}

/// The header of one moved message: the three parts follow it, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Xfer {
    /// The message was on hold and stays so.
    pub hold: bool,
    /// Bytes of envelope JSON.
    pub envelope: u64,
    /// Bytes of delivery state JSON.
    pub state: u64,
    /// Bytes of message.
    pub message: u64,
}

impl Xfer {
    /// Bytes that follow the header.
    pub fn total(&self) -> u64 {
        self.envelope
            .saturating_add(self.state)
            .saturating_add(self.message)
    }

    /// The command line.
    pub fn line(&self) -> String {
        format!(
            "XFER {} {} {} {}",
            u8::from(self.hold),
            self.envelope,
            self.state,
            self.message
        )
    }

    /// Envelope, state and message out of the [`Xfer::total`] bytes that followed.
    pub fn split<'a>(&self, data: &'a [u8]) -> Option<(&'a [u8], &'a [u8], &'a [u8])> {
        let e = usize::try_from(self.envelope).ok()?;
        let s = usize::try_from(self.state).ok()?;
        if u64::try_from(data.len()).ok()? != self.total() {
            return None;
        }
        let (env, rest) = data.split_at(e);
        let (state, msg) = rest.split_at(s);
        Some((env, state, msg))
    }
}

/// A client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `AUTH <client nonce> <mac hex>...`: the MACs that are valid hex, at most eight.
    Auth {
        /// The client's nonce (64 hex digits).
        cnonce: String,
        /// One MAC per key the client knows.
        macs: Vec<Vec<u8>>,
    },
    /// `XFER`: a message follows.
    Xfer(Xfer),
    /// `XFLUSH <domain | *>`: run the queue for a domain (lower-cased), or all of it.
    Xflush(Option<String>),
    /// `XRATE <length>`: a rate limit report (JSON) of that many bytes follows.
    Xrate(u64),
    /// `NOOP`.
    Noop,
    /// `QUIT`.
    Quit,
    /// A known command with bad arguments.
    Syntax,
    /// Anything else.
    Unknown,
}

/// Parse a command line (without its CRLF). Command names are case-insensitive.
pub fn parse_command(line: &str) -> Command {
    let mut w = line.split_whitespace();
    let cmd = w.next().unwrap_or("").to_ascii_uppercase();
    match cmd.as_str() {
        "AUTH" => match w.next() {
            Some(cnonce) if cnonce.len() == 64 => Command::Auth {
                cnonce: cnonce.to_owned(),
                macs: w.take(MAX_MACS).filter_map(super::auth::unhex).collect(),
            },
            _ => Command::Syntax,
        },
        "XFER" => {
            let nums: Option<Vec<u64>> = w.map(|x| x.parse().ok()).collect();
            match nums.as_deref() {
                Some(&[hold @ (0 | 1), envelope, state, message]) => Command::Xfer(Xfer {
                    hold: hold == 1,
                    envelope,
                    state,
                    message,
                }),
                _ => Command::Syntax,
            }
        }
        "XRATE" => match (w.next().map(str::parse::<u64>), w.next()) {
            (Some(Ok(n)), None) => Command::Xrate(n),
            _ => Command::Syntax,
        },
        "XFLUSH" => {
            let d = w.next().unwrap_or("*");
            Command::Xflush((d != "*").then(|| d.to_ascii_lowercase()))
        }
        "NOOP" => Command::Noop,
        "QUIT" => Command::Quit,
        _ => Command::Unknown,
    }
}

/// The client's `AUTH` line.
pub fn auth_line(cnonce: &str, macs: &[String]) -> String {
    format!("AUTH {cnonce} {}", macs.join(" "))
}

/// The client's `XRATE` line, for a report of `len` bytes.
pub fn xrate_line(len: usize) -> String {
    format!("XRATE {len}")
}

/// The client's `XFLUSH` line.
pub fn xflush_line(domain: Option<&str>) -> String {
    format!("XFLUSH {}", domain.unwrap_or("*"))
}

/// The peer's queue id in a `250 2.0.0 <id> queued` answer to `XFER`.
pub fn queued_id(reply: &str) -> Option<&str> {
    reply
        .strip_prefix("250 ")
        .and_then(|r| r.split_whitespace().nth(1))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn greeting_round_trip() {
        let g = greeting("mx.example", "ab12", "n1");
        assert_eq!(g, "220 mx.example MNPEER1 nonce=ab12 node=n1");
        assert_eq!(parse_greeting(&g).unwrap(), ("ab12".into(), "n1".into()));
        assert!(matches!(
            parse_greeting("554 5.7.1 not a cluster member"),
            Err(PeerError::Refused(_))
        ));
        assert!(matches!(
            parse_greeting("220 mx.example ESMTP"),
            Err(PeerError::Protocol(_))
        ));
    }

    #[test]
    fn commands() {
        let cnonce = "a".repeat(64);
        assert_eq!(
            parse_command(&auth_line(&cnonce, &["00ff".into(), "zz".into()])),
            Command::Auth {
                cnonce: cnonce.clone(),
                macs: vec![vec![0, 255]]
            }
        );
        assert_eq!(parse_command("AUTH short 00"), Command::Syntax);
        assert_eq!(
            parse_command(&format!("auth {cnonce} {}", "00 ".repeat(20))),
            Command::Auth {
                cnonce,
                macs: vec![vec![0]; MAX_MACS]
            }
        );
        let x = Xfer {
            hold: true,
            envelope: 3,
            state: 2,
            message: 4,
        };
        assert_eq!(x.line(), "XFER 1 3 2 4");
        assert_eq!(parse_command(&x.line()), Command::Xfer(x));
        assert_eq!(x.total(), 9);
        assert_eq!(
            x.split(b"envstmsg!"),
            Some((b"env".as_slice(), b"st".as_slice(), b"msg!".as_slice()))
        );
        assert_eq!(x.split(b"short"), None);
        for bad in [
            "XFER 1 2 3",
            "XFER 2 1 1 1",
            "XFER 0 a 1 2 3",
            "XFER 0 1 2 3 4",
        ] {
            assert_eq!(parse_command(bad), Command::Syntax, "{bad}");
        }
        assert_eq!(
            parse_command(&xflush_line(Some("Example.COM"))),
            Command::Xflush(Some("example.com".into()))
        );
        assert_eq!(parse_command(&xflush_line(None)), Command::Xflush(None));
        assert_eq!(parse_command("XFLUSH"), Command::Xflush(None));
        assert_eq!(parse_command(&xrate_line(120)), Command::Xrate(120));
        for bad in ["XRATE", "XRATE -1", "XRATE 1 2", "XRATE x"] {
            assert_eq!(parse_command(bad), Command::Syntax, "{bad}");
        }
        assert_eq!(parse_command("noop"), Command::Noop);
        assert_eq!(parse_command("QUIT"), Command::Quit);
        assert_eq!(parse_command("EHLO x"), Command::Unknown);
        assert_eq!(parse_command(""), Command::Unknown);
        assert_eq!(queued_id("250 2.0.0 ABC123 queued"), Some("ABC123"));
        assert_eq!(queued_id("451 4.3.0 cannot queue"), None);
    }
}
