//! SMTP replies (RFC 5321 section 4.2) with enhanced status codes (RFC 3463): one [`Reply`]
//! type for the replies this node writes and for those it reads from a next hop
//! ([`parse_reply`]), so that both sides agree on codes, enhanced codes and text.

use std::borrow::Cow;
use std::fmt::Write as _;

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code.
    pub code: u16,
    /// Enhanced status code such as `5.7.1`, or empty. Written at the start of every line.
    pub enhanced: Cow<'static, str>,
    /// Text lines, after the code and the enhanced code.
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply.
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced: Cow::Borrowed(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A multi-line reply without enhanced code (EHLO).
    pub fn multi(code: u16, lines: Vec<String>) -> Self {
        Self {
            code,
            enhanced: Cow::Borrowed(""),
            lines,
        }
    }

    /// A reply made up locally for what was not one (a timeout or an error, shown as a reply).
    pub fn synthetic(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced: Cow::Borrowed(""),
            lines: vec![text.into()],
        }
    }

    /// Whether the code is 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Whether the code is 5xx.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The enhanced status code, if the reply has one.
    pub fn enhanced(&self) -> Option<&str> {
        (!self.enhanced.is_empty()).then_some(&*self.enhanced)
    }

    /// One line for logs and DSNs: the code, the enhanced code and the text lines.
    pub fn text(&self) -> String {
        let mut s = self.code.to_string();
        if !self.enhanced.is_empty() {
            s.push(' ');
            s.push_str(&self.enhanced);
        }
        for line in &self.lines {
            s.push(' ');
            s.push_str(line);
        }
        s
    }

    /// Append the wire form (with CRLF) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut s = String::new();
        let n = self.lines.len();
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            if self.enhanced.is_empty() {
                let _ = write!(s, "{}{}{}\r\n", self.code, sep, line);
            } else {
                let _ = write!(s, "{}{}{} {}\r\n", self.code, sep, self.enhanced, line);
            }
        }
        if n == 0 {
            let _ = write!(s, "{}\r\n", self.code);
        }
        out.extend_from_slice(s.as_bytes());
    }

    /// Wire form as a string.
    pub fn to_wire(&self) -> String {
        let mut v = Vec::new();
        self.write_to(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.code,
            self.enhanced,
            self.lines.join(" / ")
        )
    }
}

/// The enhanced status code (RFC 3463: class `2`, `4` or `5`, then subject and detail of one to
/// three digits) that starts `text`, if any.
pub fn leading_enhanced(text: &str) -> Option<&str> {
    let first = text.split(' ').next()?;
    let mut parts = first.split('.');
    let class = parts.next()?;
    let ok = matches!(class, "2" | "4" | "5")
        && parts.clone().count() == 2
        && parts.all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    ok.then_some(first)
}

/// A reply that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// A line of more than 4096 bytes.
    #[error("reply line too long")]
    LineTooLong,
    /// A line that does not start with three digits.
    #[error("bad reply line {0:?}")]
    BadLine(String),
    /// The code changed within a multi-line reply.
    #[error("reply code changed within a reply")]
    CodeChanged,
    /// More than 200 lines.
    #[error("reply has too many lines")]
    TooManyLines,
}

/// Parse one complete reply at the start of `buf`: the reply and the bytes it used, or
/// `None` when more input is needed.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut pos = 0;
    let mut lines = Vec::new();
    let mut code = None;
    loop {
        let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') else {
            if buf.len() - pos > 4096 {
                return Err(ReplyError::LineTooLong);
            }
            return Ok(None);
        };
        let line = &buf[pos..pos + nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos += nl + 1;
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(ReplyError::BadLine(
                String::from_utf8_lossy(line).into_owned(),
            ));
        }
        let c = u16::from(line[0] - b'0') * 100
            + u16::from(line[1] - b'0') * 10
            + u16::from(line[2] - b'0');
        if *code.get_or_insert(c) != c {
            return Err(ReplyError::CodeChanged);
        }
        let sep = line.get(3).copied().unwrap_or(b' ');
        lines.push(String::from_utf8_lossy(line.get(4..).unwrap_or_default()).into_owned());
        if sep != b'-' {
            return Ok(Some((split_enhanced(c, lines), pos)));
        }
        if lines.len() > 200 {
            return Err(ReplyError::TooManyLines);
        }
    }
}

/// The reply with the enhanced code that starts its first line taken out of every line that
/// starts with it (RFC 3463 puts it on each line of a multi-line reply).
fn split_enhanced(code: u16, mut lines: Vec<String>) -> Reply {
    let enhanced = lines
        .first()
        .and_then(|l| leading_enhanced(l))
        .map(str::to_owned);
    let Some(enhanced) = enhanced else {
        return Reply {
            code,
            enhanced: Cow::Borrowed(""),
            lines,
        };
    };
    for line in &mut lines {
        if let Some(rest) = line.strip_prefix(enhanced.as_str())
            && (rest.is_empty() || rest.starts_with(' '))
        {
            *line = rest.strip_prefix(' ').unwrap_or(rest).to_owned();
        }
    }
    Reply {
        code,
        enhanced: Cow::Owned(enhanced),
        lines,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_multi_line() {
        assert_eq!(Reply::new(250, "2.0.0", "OK").to_wire(), "250 2.0.0 OK\r\n");
        assert_eq!(
            Reply::multi(250, vec!["a".into(), "b".into()]).to_wire(),
            "250-a\r\n250 b\r\n"
        );
    }

    #[test]
    fn parses_single_multi_and_partial_replies() {
        assert!(parse_reply(b"250-a\r\n250 b").unwrap().is_none());
        let (r, n) = parse_reply(b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-AUTH PLAIN login\r\n250 STARTTLS\r\nXX").unwrap().unwrap();
        assert_eq!(n, 83);
        assert_eq!(r.code, 250);
        assert_eq!(r.lines[3], "AUTH PLAIN login");
        assert_eq!(r.enhanced(), None);
        let (r, _) = parse_reply(b"550 5.1.1 no\n").unwrap().unwrap();
        assert!(r.is_permanent());
        assert_eq!(r.text(), "550 5.1.1 no");
        assert_eq!(r.enhanced(), Some("5.1.1"));
        assert_eq!(r, Reply::new(550, "5.1.1", "no"));
        let (r, _) = parse_reply(b"451-4.3.0 try\r\n451 4.3.0 later\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.lines, ["try", "later"]);
        assert_eq!(r.text(), "451 4.3.0 try later");
        let (r, _) = parse_reply(b"250 2.0.0.1 ok\r\n").unwrap().unwrap();
        assert_eq!(r.enhanced(), None);
        let (r, _) = parse_reply(b"421\r\n").unwrap().unwrap();
        assert_eq!(r.code, 421);
        assert!(matches!(
            parse_reply(b"25x ok\r\n"),
            Err(ReplyError::BadLine(_))
        ));
        assert_eq!(
            parse_reply(b"250-a\r\n251 b\r\n"),
            Err(ReplyError::CodeChanged)
        );
    }
}
