//! Editing a message's header section: originator addresses rewritten, Received headers
//! removed.

use super::SenderRewriter;

/// Largest header section edited. A longer one (Postfix's `header_size_limit` is the same
/// 100 KiB) is left as it is: an edit is never half applied.
pub const MAX_HEADER_SECTION: usize = 100 * 1024;

/// Headers whose addresses are the sender's and are rewritten (RFC 5322 section 3.6.2 and
/// 3.6.6 originator fields).
const SENDER_HEADERS: [&str; 4] = ["from", "sender", "resent-from", "resent-sender"];

/// The marker of a Received header written by a mailnode.
const OWN_MARK: &str = "(mailnode)";

/// What a listener changes in the header section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderEdit {
    /// Rewrite originator addresses with these rules.
    pub senders: Option<SenderRewriter>,
    /// Drop Received headers not written by a mailnode.
    pub remove_received: bool,
}

/// What an edit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edited {
    /// The new header section.
    pub section: Vec<u8>,
    /// Addresses rewritten.
    pub rewritten: usize,
    /// Received headers removed.
    pub removed: usize,
}

/// Where the header section of `buf` ends (the length of the header lines, each with its
/// CRLF, without the empty line), looking for the empty line from byte `from` on; `None`
/// when it is not in `buf` yet.
pub fn section_end(buf: &[u8], from: usize) -> Option<usize> {
    if buf.starts_with(b"\r\n") {
        return Some(0);
    }
    let from = from.min(buf.len());
    memchr::memmem::find(&buf[from..], b"\r\n\r\n").map(|i| from + i + 2)
}

fn name_of(field: &[u8]) -> Option<&[u8]> {
    let colon = memchr::memchr(b':', field)?;
    let name = &field[..colon];
    (!name.is_empty() && name.iter().all(|b| (33..=126).contains(b))).then_some(name)
}

impl HeaderEdit {
    /// Whether the edit changes anything at all.
    pub fn is_active(&self) -> bool {
        self.senders.is_some() || self.remove_received
    }

    /// `section` (the header lines of a message, see [`section_end`]) edited, or `None`
    /// when nothing changed. A line that is not a header field ends the editing: it and what
    /// follows are kept as they are.
    pub fn apply(&self, section: &[u8]) -> Option<Edited> {
        let mut out = Vec::with_capacity(section.len() + 64);
        let (mut rewritten, mut removed) = (0, 0);
        let mut fields = Fields::new(section);
        for (name, field) in fields.by_ref() {
            if self.remove_received
                && name.eq_ignore_ascii_case(b"received")
                && memchr::memmem::find(field, OWN_MARK.as_bytes()).is_none()
            {
                removed += 1;
                continue;
            }
            if let Some(rules) = &self.senders
                && SENDER_HEADERS
                    .iter()
                    .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
                && let Ok(text) = std::str::from_utf8(field)
            {
                let value_at = name.len() + 1;
                let (n, value) = rewrite_addresses(&text[value_at..], |a| rules.rewrite(a));
                if n > 0 {
                    rewritten += n;
                    out.extend_from_slice(&field[..value_at]);
                    out.extend_from_slice(value.as_bytes());
                    continue;
                }
            }
            out.extend_from_slice(field);
        }
        out.extend_from_slice(fields.rest());
        (rewritten + removed > 0).then_some(Edited {
            section: out,
            rewritten,
            removed,
        })
    }
}

/// The header fields at the start of a message: `(name, field)`, the field with its
/// continuation lines and CRLFs. It stops at the first line that is not a field (the empty
/// line before the body, or anything else); [`Fields::rest`] is what it did not read.
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    /// The fields of `msg` (a message or its header section).
    pub fn new(msg: &'a [u8]) -> Self {
        Self { rest: msg }
    }

    /// What follows the last field read.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest;
        if rest.is_empty() {
            return None;
        }
        // The first line and the continuation lines that start with SP or HTAB.
        let mut len = 0;
        loop {
            len += memchr::memchr(b'\n', &rest[len..]).map_or(rest.len() - len, |i| i + 1);
            if !matches!(rest.get(len), Some(b' ' | b'\t')) {
                break;
            }
        }
        let (field, tail) = rest.split_at(len);
        let name = name_of(field)?;
        self.rest = tail;
        Some((name, field))
    }
}

/// The value of a header field as [`Fields`] gives it: after the colon, unfolded, trimmed.
pub fn value_of(field: &[u8]) -> String {
    let v = memchr::memchr(b':', field).map_or(field, |i| &field[i + 1..]);
    String::from_utf8_lossy(v)
        .split(['\r', '\n'])
        .collect::<String>()
        .trim()
        .to_owned()
}

/// The addresses of an address-list header value (RFC 5322 section 3.4) that `f` rewrites,
/// replaced: in `Name <addr>` only the angle address, otherwise the bare `addr`. Quoted
/// strings and comments are skipped, folding is kept. Returns how many were replaced.
pub fn rewrite_addresses(
    value: &str,
    mut f: impl FnMut(&str) -> Option<String>,
) -> (usize, String) {
    let mut spans = Vec::new();
    // Per mailbox: its angle address, or its bare tokens that hold an '@'.
    let mut angle: Option<(usize, usize)> = None;
    let mut bare: Vec<(usize, usize)> = Vec::new();
    let mut token: Option<usize> = None;
    let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
    let mut angle_start: Option<usize> = None;
    let end_token = |token: &mut Option<usize>, at: usize, bare: &mut Vec<(usize, usize)>| {
        if let Some(s) = token.take()
            && value[s..at].contains('@')
        {
            bare.push((s, at));
        }
    };
    for (i, c) in value.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        if (quoted || depth > 0) && c == '\\' {
            escaped = true;
            continue;
        }
        if quoted {
            quoted = c != '"';
            continue;
        }
        if depth > 0 {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            continue;
        }
        if let Some(s) = angle_start {
            if c == '>' {
                // A source route (`<@a,@b:user@d>`) is obsolete; the address is after ':'.
                let s = value[s..i].rfind(':').map_or(s, |k| s + k + 1);
                angle = Some((s, i));
                angle_start = None;
            }
            continue;
        }
        match c {
            '"' => {
                end_token(&mut token, i, &mut bare);
                quoted = true;
            }
            '(' => {
                end_token(&mut token, i, &mut bare);
                depth = 1;
            }
            '<' => {
                end_token(&mut token, i, &mut bare);
                angle_start = Some(i + c.len_utf8());
            }
            ',' | ';' | ':' => {
                end_token(&mut token, i, &mut bare);
                if c == ':' {
                    // A group's display name, not a mailbox.
                    bare.clear();
                } else {
                    spans.extend(angle.take().map_or(std::mem::take(&mut bare), |a| vec![a]));
                    bare.clear();
                }
            }
            c if c.is_whitespace() => end_token(&mut token, i, &mut bare),
            _ => {
                token.get_or_insert(i);
            }
        }
    }
    end_token(&mut token, value.len(), &mut bare);
    spans.extend(angle.take().map_or(bare, |a| vec![a]));
    let mut out = value.to_owned();
    let mut n = 0;
    spans.sort_unstable();
    for (s, e) in spans.into_iter().rev() {
        if let Some(new) = f(&value[s..e]) {
            out.replace_range(s..e, &new);
            n += 1;
        }
    }
    (n, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(rules: &[(&str, &str)], remove_received: bool) -> HeaderEdit {
        HeaderEdit {
            senders: crate::rewrite::address::rules_of(rules),
            remove_received,
        }
    }

    fn up(a: &str) -> Option<String> {
        a.ends_with("@lan")
            .then(|| a.replace("@lan", "@example.com"))
    }

    #[test]
    fn addresses_are_found_in_the_forms_devices_write() {
        for (value, want) in [
            (" root@lan\r\n", " root@example.com\r\n"),
            (" <root@lan>\r\n", " <root@example.com>\r\n"),
            (
                " \"Scanner, 2nd floor <x@lan>\" <scan@lan> (root@lan)\r\n",
                " \"Scanner, 2nd floor <x@lan>\" <scan@example.com> (root@lan)\r\n",
            ),
            (
                " a@lan, B <b@lan>,\r\n\tc@other\r\n",
                " a@example.com, B <b@example.com>,\r\n\tc@other\r\n",
            ),
            (
                " Team: a@lan, b@lan;\r\n",
                " Team: a@example.com, b@example.com;\r\n",
            ),
            (
                " <@relay.lan:root@lan>\r\n",
                " <@relay.lan:root@example.com>\r\n",
            ),
            (
                " root@lan (Printer \\) x@lan)\r\n",
                " root@example.com (Printer \\) x@lan)\r\n",
            ),
            (" Grüße <grüße@lan>\r\n", " Grüße <grüße@example.com>\r\n"),
        ] {
            assert_eq!(rewrite_addresses(value, up).1, want, "{value:?}");
        }
        assert_eq!(rewrite_addresses(" undisclosed-recipients:;\r\n", up).0, 0);
        assert_eq!(rewrite_addresses(" \"unterminated <a@lan>\r\n", up).0, 0);
    }

    #[test]
    fn originator_headers_are_rewritten_and_other_headers_kept() {
        let e = edit(&[("@scanner01.lan", "@example.com")], false);
        let section = b"From: Scanner <root@scanner01.lan>\r\n\
Reply-To: root@scanner01.lan\r\n\
To: it@example.com\r\n\
SENDER:\r\n root@Scanner01.lan\r\n\
Subject: root@scanner01.lan\r\n";
        let out = e.apply(section).unwrap();
        assert_eq!(out.rewritten, 2);
        assert_eq!(
            String::from_utf8(out.section).unwrap(),
            "From: Scanner <root@example.com>\r\n\
Reply-To: root@scanner01.lan\r\n\
To: it@example.com\r\n\
SENDER:\r\n root@example.com\r\n\
Subject: root@scanner01.lan\r\n"
        );
        assert_eq!(e.apply(b"From: app@example.com\r\n"), None);
    }

    #[test]
    fn foreign_received_headers_go_and_mailnode_ones_stay() {
        let e = edit(&[], true);
        assert!(e.is_active());
        let section = b"Received: from scanner01 (10.1.2.3)\r\n\tby gw.lan; Mon, 1 Jan 2026\r\n\
Received: from a ([192.0.2.1]:25)\r\n\tby relay (mailnode) with ESMTP id X;\r\n\tdate\r\n\
received: from b\r\n\
Subject: hi\r\n";
        let out = e.apply(section).unwrap();
        assert_eq!(out.removed, 2);
        assert_eq!(
            String::from_utf8(out.section).unwrap(),
            "Received: from a ([192.0.2.1]:25)\r\n\tby relay (mailnode) with ESMTP id X;\r\n\tdate\r\n\
Subject: hi\r\n"
        );
        assert!(!edit(&[], false).is_active());
    }

    #[test]
    fn editing_stops_at_a_line_that_is_not_a_field() {
        let e = edit(&[], true);
        let section = b"Subject: x\r\nnot a header\r\nReceived: from y\r\n";
        assert_eq!(e.apply(section), None);
        let section =
            b"Received: from y\r\nSubject: x\r\n no colon continues\r\nbody line\r\nReceived: z";
        let out = e.apply(section).unwrap();
        assert_eq!(
            out.section,
            b"Subject: x\r\n no colon continues\r\nbody line\r\nReceived: z"
        );
    }

    #[test]
    fn the_section_ends_at_the_first_empty_line() {
        assert_eq!(section_end(b"\r\nbody", 0), Some(0));
        assert_eq!(section_end(b"A: b\r\n\r\nbody\r\n\r\n", 0), Some(6));
        assert_eq!(section_end(b"A: b\r\nC: d\r\n", 0), None);
        assert_eq!(section_end(b"A: b\r\n\r\n", 4), Some(6));
        assert_eq!(section_end(b"A: b\r\n", 99), None);
    }
}
