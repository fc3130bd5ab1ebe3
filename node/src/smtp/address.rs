//! Mail addresses in SMTP paths (RFC 5321 section 4.1.2, RFC 6531 for UTF-8) and detection of
//! classic relay tricks: the percent hack (`user%other@us`), source routes (`@a:user@b`),
//! bang paths (`other!user@us`) and quoted local parts that hide `@`, `%` or `!`.
//!
//! Parsing is strict about structure (angle brackets, one `@`, domain syntax) and records
//! the tricks instead of failing, so the caller decides: a sender may carry them, a
//! recipient is refused.

/// A parsed mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Local part, unquoted (escapes removed).
    pub local: String,
    /// Domain as written (a name or an address literal such as `[192.0.2.1]`).
    pub domain: String,
    /// The local part was a quoted string.
    pub quoted: bool,
    /// The path carried an (ignored) source route `@a,@b:`.
    pub source_route: bool,
}

/// A relay trick found in an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayTrick {
    /// `user%other.example@us`.
    PercentHack,
    /// `@relay:user@other` or `@a,@b:user@c`.
    SourceRoute,
    /// `other!user@us`.
    BangPath,
    /// `"user@other"@us`.
    QuotedAt,
}

impl RelayTrick {
    /// Short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayTrick::PercentHack => "percent_hack",
            RelayTrick::SourceRoute => "source_route",
            RelayTrick::BangPath => "bang_path",
            RelayTrick::QuotedAt => "quoted_at",
        }
    }
}

impl Address {
    /// Domain in lower case, for comparisons.
    pub fn domain_lower(&self) -> String {
        self.domain.to_lowercase()
    }

    /// Whether the domain is an address literal (`[..]`).
    pub fn is_literal(&self) -> bool {
        self.domain.starts_with('[')
    }

    /// Whether any part is non-ASCII (needs SMTPUTF8).
    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }

    /// The first relay trick this address uses, if any.
    pub fn relay_trick(&self) -> Option<RelayTrick> {
        if self.source_route {
            return Some(RelayTrick::SourceRoute);
        }
        if self.quoted && self.local.contains('@') {
            return Some(RelayTrick::QuotedAt);
        }
        if self.local.contains('%') {
            return Some(RelayTrick::PercentHack);
        }
        if self.local.contains('!') {
            return Some(RelayTrick::BangPath);
        }
        None
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.quoted || self.local.is_empty() || !is_dot_string(&self.local) {
            f.write_str("\"")?;
            for c in self.local.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\"")?;
        } else {
            f.write_str(&self.local)?;
        }
        write!(f, "@{}", self.domain)
    }
}

/// A path in MAIL or RCPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// `<>`: the null reverse-path (bounces).
    Null,
    /// `<postmaster>` without a domain (RCPT only).
    Postmaster,
    /// A mailbox.
    Mailbox(Address),
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Null => Ok(()),
            Path::Postmaster => f.write_str("postmaster"),
            Path::Mailbox(a) => write!(f, "{a}"),
        }
    }
}

/// Why a path could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Missing `<` or `>`.
    #[error("path must be enclosed in <>")]
    NoBrackets,
    /// Local part syntax.
    #[error("bad local part")]
    BadLocal,
    /// Domain syntax.
    #[error("bad domain")]
    BadDomain,
    /// No `@domain`.
    #[error("address needs a domain")]
    NoDomain,
    /// Too long.
    #[error("address too long")]
    TooLong,
    /// `<>` where a mailbox is needed.
    #[error("null path not allowed here")]
    NullNotAllowed,
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

fn valid_domain(d: &str) -> bool {
    if d.is_empty() || d.len() > 255 {
        return false;
    }
    if let Some(lit) = d.strip_prefix('[') {
        let Some(inner) = lit.strip_suffix(']') else {
            return false;
        };
        if let Some(v6) = inner.strip_prefix("IPv6:") {
            return v6.parse::<std::net::Ipv6Addr>().is_ok();
        }
        return inner.parse::<std::net::Ipv4Addr>().is_ok();
    }
    d.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| {
                c.is_ascii_alphanumeric()
                    || c == '-'
                    || (!c.is_ascii() && !c.is_control() && !c.is_whitespace())
            })
    })
}

/// Parse a path at the start of `s` (leading spaces allowed). Returns the path and the rest
/// of the line (the ESMTP parameters).
pub fn parse_path(s: &str) -> Result<(Path, &str), AddressError> {
    let s = s.trim_start_matches(' ');
    let Some(inner_start) = s.strip_prefix('<') else {
        return Err(AddressError::NoBrackets);
    };
    // Find the closing '>' outside a quoted string.
    let mut in_quote = false;
    let mut escaped = false;
    let mut end = None;
    for (i, c) in inner_start.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '>' if !in_quote => {
                end = Some(i);
                break;
            }
            _ => {}
        }
    }
    let end = end.ok_or(AddressError::NoBrackets)?;
    let inner = &inner_start[..end];
    let rest = &inner_start[end + 1..];
    if inner.len() > 254 {
        return Err(AddressError::TooLong);
    }
    if inner.is_empty() {
        return Ok((Path::Null, rest));
    }
    let mut source_route = false;
    let mut mailbox = inner;
    if inner.starts_with('@') {
        // A-d-l ":" Mailbox; the route is ignored but remembered.
        let colon = inner.find(':').ok_or(AddressError::BadDomain)?;
        for hop in inner[..colon].split(',') {
            let hop = hop.strip_prefix('@').ok_or(AddressError::BadDomain)?;
            if !valid_domain(hop) {
                return Err(AddressError::BadDomain);
            }
        }
        source_route = true;
        mailbox = &inner[colon + 1..];
    }
    if mailbox.eq_ignore_ascii_case("postmaster") && !source_route {
        return Ok((Path::Postmaster, rest));
    }
    let (local, quoted, domain) = if let Some(q) = mailbox.strip_prefix('"') {
        let mut local = String::new();
        let mut escaped = false;
        let mut close = None;
        for (i, c) in q.char_indices() {
            if escaped {
                local.push(c);
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                close = Some(i);
                break;
            } else if c.is_control() {
                return Err(AddressError::BadLocal);
            } else {
                local.push(c);
            }
        }
        let close = close.ok_or(AddressError::BadLocal)?;
        let after = &q[close + 1..];
        let domain = after.strip_prefix('@').ok_or(AddressError::NoDomain)?;
        (local, true, domain)
    } else {
        let at = mailbox.rfind('@').ok_or(AddressError::NoDomain)?;
        let local = &mailbox[..at];
        if !is_dot_string(local) {
            return Err(AddressError::BadLocal);
        }
        (local.to_owned(), false, &mailbox[at + 1..])
    };
    if local.len() > 64 {
        return Err(AddressError::TooLong);
    }
    if !valid_domain(domain) {
        return Err(AddressError::BadDomain);
    }
    Ok((
        Path::Mailbox(Address {
            local,
            domain: domain.to_owned(),
            quoted,
            source_route,
        }),
        rest,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbox(s: &str) -> Address {
        match parse_path(s) {
            Ok((Path::Mailbox(a), _)) => a,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn plain_and_params() {
        let (p, rest) = parse_path("<a.b@Example.COM> SIZE=10").unwrap();
        let Path::Mailbox(a) = p else { panic!() };
        assert_eq!(a.local, "a.b");
        assert_eq!(a.domain_lower(), "example.com");
        assert_eq!(rest, " SIZE=10");
        assert_eq!(parse_path("<>").unwrap().0, Path::Null);
        assert_eq!(parse_path("<Postmaster>").unwrap().0, Path::Postmaster);
        assert_eq!(parse_path(" <x@y>").unwrap().1, "");
    }

    #[test]
    fn tricks_detected() {
        assert_eq!(
            mbox("<u%other.net@us.example>").relay_trick(),
            Some(RelayTrick::PercentHack)
        );
        assert_eq!(
            mbox("<@a.example,@b.example:u@c.example>").relay_trick(),
            Some(RelayTrick::SourceRoute)
        );
        assert_eq!(
            mbox("<other.net!u@us.example>").relay_trick(),
            Some(RelayTrick::BangPath)
        );
        assert_eq!(
            mbox("<\"u@other.net\"@us.example>").relay_trick(),
            Some(RelayTrick::QuotedAt)
        );
        assert_eq!(
            mbox("<\"u%x\"@us.example>").relay_trick(),
            Some(RelayTrick::PercentHack)
        );
        assert_eq!(mbox("<\"a b\"@us.example>").relay_trick(), None);
        assert_eq!(mbox("<u@[192.0.2.1]>").relay_trick(), None);
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(parse_path("u@x").unwrap_err(), AddressError::NoBrackets);
        assert_eq!(parse_path("<u@x").unwrap_err(), AddressError::NoBrackets);
        assert_eq!(parse_path("<u>").unwrap_err(), AddressError::NoDomain);
        assert_eq!(parse_path("<u@x..y>").unwrap_err(), AddressError::BadDomain);
        assert_eq!(parse_path("<u@x.>").unwrap_err(), AddressError::BadDomain);
        assert_eq!(parse_path("<a..b@x>").unwrap_err(), AddressError::BadLocal);
        assert_eq!(parse_path("<a@b@x>").unwrap_err(), AddressError::BadLocal);
        assert_eq!(
            parse_path("<u@[300.1.1.1]>").unwrap_err(),
            AddressError::BadDomain
        );
    }

    #[test]
    fn utf8() {
        let a = mbox("<jörg@bücher.example>");
        assert!(!a.is_ascii());
        assert_eq!(a.to_string(), "jörg@bücher.example");
    }
}
