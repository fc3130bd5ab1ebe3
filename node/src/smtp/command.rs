//! Bytes to SMTP command: a pure parser for one command line (without the line ending).

use super::address::{AddressError, Path, parse_path};

/// BODY parameter of MAIL (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyType {
    /// 7-bit content.
    #[default]
    SevenBit,
    /// 8BITMIME.
    EightBitMime,
}

/// Parameters of MAIL FROM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailParams {
    /// SIZE=n (RFC 1870).
    pub size: Option<u64>,
    /// BODY=.
    pub body: BodyType,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// AUTH=<> (RFC 4954), kept as given.
    pub auth: Option<String>,
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// HELO domain.
    Helo(String),
    /// EHLO domain.
    Ehlo(String),
    /// MAIL FROM.
    Mail {
        /// Reverse-path.
        from: Path,
        /// Parameters.
        params: MailParams,
    },
    /// RCPT TO.
    Rcpt {
        /// Forward-path.
        to: Path,
    },
    /// DATA.
    Data,
    /// BDAT size \[LAST\] (RFC 3030).
    Bdat {
        /// Chunk size in octets.
        size: u64,
        /// Last chunk.
        last: bool,
    },
    /// RSET.
    Rset,
    /// NOOP.
    Noop,
    /// QUIT.
    Quit,
    /// HELP.
    Help,
    /// VRFY (answered without disclosure).
    Vrfy,
    /// EXPN (answered without disclosure).
    Expn,
    /// STARTTLS.
    StartTls,
    /// AUTH mechanism \[initial-response\].
    Auth {
        /// Mechanism name, upper case.
        mechanism: String,
        /// Initial response (base64 or `=`).
        initial: Option<String>,
    },
    /// A PROXY protocol v1 line where a command was expected.
    Proxy,
    /// ETRN (RFC 1985): run the queue for a domain (`@domain`, `#queue` forms accepted).
    Etrn(String),
}

/// Why a line is not a valid command. Each maps to a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Unknown verb: 500 5.5.1.
    #[error("command not recognized")]
    Unknown,
    /// Bad arguments: 501 5.5.4.
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    /// Bad address: 553 5.1.x / 501.
    #[error("bad address: {0}")]
    Address(#[from] AddressError),
    /// Unknown or bad ESMTP parameter: 555 5.5.4.
    #[error("parameter not supported: {0}")]
    Param(String),
    /// Not UTF-8: 500 5.5.2.
    #[error("invalid characters in command")]
    Encoding,
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

fn no_args(rest: &str, cmd: Command) -> Result<Command, CommandError> {
    if rest.trim().is_empty() {
        Ok(cmd)
    } else {
        Err(CommandError::Syntax("no arguments allowed"))
    }
}

/// Parse one command line (the line ending already removed).
pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    let line = std::str::from_utf8(line).map_err(|_| CommandError::Encoding)?;
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(CommandError::Encoding);
    }
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    if verb.len() > 10 {
        return Err(CommandError::Unknown);
    }
    let verb = verb.to_ascii_uppercase();
    match verb.as_str() {
        "HELO" | "EHLO" => {
            let name = rest.trim();
            if name.is_empty() || name.contains(' ') {
                return Err(CommandError::Syntax("expected a domain or address literal"));
            }
            Ok(if verb == "HELO" {
                Command::Helo(name.to_owned())
            } else {
                Command::Ehlo(name.to_owned())
            })
        }
        "MAIL" => {
            let arg = strip_prefix_ci(rest, "FROM:")
                .ok_or(CommandError::Syntax("expected MAIL FROM:<address>"))?;
            let (from, params) = parse_path(arg)?;
            let params = parse_mail_params(params)?;
            Ok(Command::Mail { from, params })
        }
        "RCPT" => {
            let arg = strip_prefix_ci(rest, "TO:")
                .ok_or(CommandError::Syntax("expected RCPT TO:<address>"))?;
            let (to, params) = parse_path(arg)?;
            if let Some(p) = params.split(' ').find(|p| !p.is_empty()) {
                return Err(CommandError::Param(p.to_owned()));
            }
            if matches!(to, Path::Null) {
                return Err(CommandError::Address(AddressError::NullNotAllowed));
            }
            Ok(Command::Rcpt { to })
        }
        "DATA" => no_args(rest, Command::Data),
        "BDAT" => {
            let mut parts = rest.split(' ').filter(|p| !p.is_empty());
            let size = parts
                .next()
                .and_then(|n| {
                    if n.bytes().all(|b| b.is_ascii_digit()) {
                        n.parse::<u64>().ok()
                    } else {
                        None
                    }
                })
                .ok_or(CommandError::Syntax("expected BDAT size [LAST]"))?;
            let last = match parts.next() {
                None => false,
                Some(w) if w.eq_ignore_ascii_case("LAST") => true,
                Some(_) => return Err(CommandError::Syntax("expected BDAT size [LAST]")),
            };
            if parts.next().is_some() {
                return Err(CommandError::Syntax("expected BDAT size [LAST]"));
            }
            Ok(Command::Bdat { size, last })
        }
        "RSET" => no_args(rest, Command::Rset),
        "ETRN" => {
            let arg = rest.trim();
            let dom = arg.trim_start_matches(['@', '#']);
            if dom.is_empty()
                || dom.contains(char::is_whitespace)
                || !dom
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
            {
                Err(CommandError::Syntax("ETRN needs a domain"))
            } else {
                Ok(Command::Etrn(dom.to_ascii_lowercase()))
            }
        }
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(rest, Command::Quit),
        "HELP" => Ok(Command::Help),
        "VRFY" => {
            if rest.trim().is_empty() {
                Err(CommandError::Syntax("VRFY needs an argument"))
            } else {
                Ok(Command::Vrfy)
            }
        }
        "EXPN" => {
            if rest.trim().is_empty() {
                Err(CommandError::Syntax("EXPN needs an argument"))
            } else {
                Ok(Command::Expn)
            }
        }
        "STARTTLS" => no_args(rest, Command::StartTls),
        "AUTH" => {
            let mut parts = rest.split(' ').filter(|p| !p.is_empty());
            let mechanism = parts
                .next()
                .ok_or(CommandError::Syntax("expected AUTH mechanism"))?
                .to_ascii_uppercase();
            let initial = parts.next().map(str::to_owned);
            if parts.next().is_some() {
                return Err(CommandError::Syntax("too many arguments"));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        "PROXY" => Ok(Command::Proxy),
        _ => Err(CommandError::Unknown),
    }
}

fn parse_mail_params(s: &str) -> Result<MailParams, CommandError> {
    let mut params = MailParams::default();
    for p in s.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = match p.find('=') {
            Some(i) => (&p[..i], Some(&p[i + 1..])),
            None => (p, None),
        };
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(v))
                if !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()) =>
            {
                params.size = Some(v.parse().unwrap_or(u64::MAX));
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => params.body = BodyType::SevenBit,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => {
                params.body = BodyType::EightBitMime
            }
            ("SMTPUTF8", None) => params.smtputf8 = true,
            ("AUTH", Some(v)) if !v.is_empty() => params.auth = Some(v.to_owned()),
            _ => return Err(CommandError::Param(p.to_owned())),
        }
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs() {
        assert_eq!(
            parse(b"ehlo client.example").unwrap(),
            Command::Ehlo("client.example".into())
        );
        assert_eq!(parse(b"QUIT").unwrap(), Command::Quit);
        assert_eq!(parse(b"noop hello").unwrap(), Command::Noop);
        assert_eq!(
            parse(b"DATA x").unwrap_err(),
            CommandError::Syntax("no arguments allowed")
        );
        assert_eq!(parse(b"FOO").unwrap_err(), CommandError::Unknown);
        assert_eq!(
            parse(b"BDAT 10 LAST").unwrap(),
            Command::Bdat {
                size: 10,
                last: true
            }
        );
        assert!(parse(b"BDAT -1").is_err());
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2").unwrap(),
            Command::Proxy
        );
        assert_eq!(parse(b"HELO \xff").unwrap_err(), CommandError::Encoding);
    }

    #[test]
    fn mail_and_rcpt() {
        let Command::Mail { from, params } =
            parse(b"MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME SMTPUTF8").unwrap()
        else {
            panic!()
        };
        assert!(matches!(from, Path::Mailbox(_)));
        assert_eq!(params.size, Some(100));
        assert_eq!(params.body, BodyType::EightBitMime);
        assert!(params.smtputf8);
        assert_eq!(
            parse(b"MAIL FROM:<> RET=FULL").unwrap_err(),
            CommandError::Param("RET=FULL".into())
        );
        assert!(matches!(
            parse(b"mail from: <>").unwrap(),
            Command::Mail {
                from: Path::Null,
                ..
            }
        ));
        assert!(matches!(
            parse(b"RCPT TO:<>").unwrap_err(),
            CommandError::Address(_)
        ));
        assert!(matches!(
            parse(b"RCPT TO:<x@y> NOTIFY=NEVER").unwrap_err(),
            CommandError::Param(_)
        ));
        assert!(matches!(
            parse(b"RCPT FROM:<x@y>").unwrap_err(),
            CommandError::Syntax(_)
        ));
    }
}
