//! DKIM signing of mail as it leaves (`delivery.dkim`, RFC 6376 and RFC 8463 with the
//! `mail-auth` crate): a message whose `From` header is at a configured domain (or a
//! subdomain of it), received on a listener the domain signs for, gets one `DKIM-Signature`
//! per key of the domain (relaxed/relaxed, the header fields of
//! [`DKIM_DEFAULT_HEADERS`] that are present). A message that already carries a signature
//! of that domain is not signed again.
//!
//! Signing happens at each delivery attempt, so the queue keeps the message as received: a
//! key rotated in its Secret, or a changed `dkim` config (reloaded), applies to mail already
//! queued, and a message moved to a peer is signed by the member that delivers it.
//! [`pick`] and [`signed_domains`] are pure; [`keys`] reads and caches the key files.

pub mod keys;

use mailnode_api::config::{DKIM_DEFAULT_HEADERS, DkimDomain};

use crate::rewrite::header::{Fields, rewrite_addresses, value_of};

pub use keys::{DkimError, Signer, dns_record};

/// The domain of the first address of the message's first `From` header, lowercased.
pub fn from_domain(msg: &[u8]) -> Option<String> {
    let (_, field) = Fields::new(msg).find(|(n, _)| n.eq_ignore_ascii_case(b"from"))?;
    let mut first = None;
    rewrite_addresses(&value_of(field), |a| {
        first.get_or_insert_with(|| a.to_owned());
        None
    });
    let first = first?;
    let (_, domain) = first.rsplit_once('@')?;
    (!domain.is_empty()).then(|| domain.trim_end_matches('.').to_ascii_lowercase())
}

/// The `d=` domains of the message's `DKIM-Signature` headers, lowercased.
pub fn signed_domains(msg: &[u8]) -> Vec<String> {
    Fields::new(msg)
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"dkim-signature"))
        .filter_map(|(_, field)| {
            value_of(field).split(';').find_map(|tag| {
                let (k, v) = tag.split_once('=')?;
                (k.trim() == "d").then(|| {
                    v.split_whitespace()
                        .collect::<String>()
                        .to_ascii_lowercase()
                })
            })
        })
        .collect()
}

/// The domain config that signs a message received on `listener`, with its index in `cfg`:
/// the most specific domain that the `From` domain is or is under, if its `listeners` admit
/// `listener` and the message has no signature of that domain yet.
pub fn pick<'a>(
    cfg: &'a [DkimDomain],
    listener: &str,
    msg: &[u8],
) -> Option<(usize, &'a DkimDomain)> {
    if cfg.is_empty() {
        return None;
    }
    let from = from_domain(msg)?;
    let (i, d) = cfg
        .iter()
        .enumerate()
        .filter(|(_, d)| {
            let dom = d.domain.to_ascii_lowercase();
            from == dom || from.ends_with(&format!(".{dom}"))
        })
        .max_by_key(|(_, d)| d.domain.len())?;
    if !d.listeners.is_empty() && !d.listeners.iter().any(|l| l == listener) {
        return None;
    }
    let dom = d.domain.to_ascii_lowercase();
    (!signed_domains(msg).contains(&dom)).then_some((i, d))
}

/// The header fields a domain signs.
pub fn headers_of(d: &DkimDomain) -> Vec<String> {
    if d.headers.is_empty() {
        DKIM_DEFAULT_HEADERS
            .iter()
            .map(|h| (*h).to_owned())
            .collect()
    } else {
        d.headers.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailnode_api::config::DkimKeyFile;

    fn domain(d: &str, listeners: &[&str]) -> DkimDomain {
        DkimDomain {
            domain: d.into(),
            keys: vec![DkimKeyFile {
                selector: "s1".into(),
                key_file: "/k".into(),
            }],
            listeners: listeners.iter().map(|l| (*l).to_owned()).collect(),
            headers: Vec::new(),
        }
    }

    #[test]
    fn the_from_domain_picks_the_most_specific_config() {
        let cfg = [
            domain("example.com", &[]),
            domain("eu.example.com", &["apps"]),
        ];
        let msg = |from: &str| {
            format!("Subject: x\r\nFrom: {from}\r\nTo: y@z\r\n\r\nFrom: body@other\r\n")
        };
        let pick_for = |from: &str, listener: &str| {
            pick(&cfg, listener, msg(from).as_bytes()).map(|(_, d)| d.domain.clone())
        };
        assert_eq!(
            pick_for("App <app@Example.COM>", "apps").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            pick_for("a@mail.example.com", "x").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            pick_for("a@eu.example.com", "apps").as_deref(),
            Some("eu.example.com")
        );
        assert_eq!(
            pick_for("a@eu.example.com", "devices"),
            None,
            "not that listener"
        );
        assert_eq!(pick_for("a@notexample.com", "apps"), None);
        assert_eq!(pick(&cfg, "apps", b"To: y@z\r\n\r\n"), None, "no From");
        assert_eq!(pick(&[], "apps", msg("a@example.com").as_bytes()), None);
    }

    #[test]
    fn a_message_signed_by_the_domain_is_not_signed_again() {
        let cfg = [domain("example.com", &[])];
        let signed = b"DKIM-Signature: v=1; a=rsa-sha256; d=other.example; s=x;\r\n b=abc\r\n\
DKIM-Signature: v=1; a=ed25519-sha256; s=s; d=\r\n Example.com; b=x\r\nFrom: a@example.com\r\n\r\nhi\r\n";
        assert_eq!(signed_domains(signed), ["other.example", "example.com"]);
        assert_eq!(pick(&cfg, "apps", signed), None);
        let other =
            b"DKIM-Signature: v=1; d=other.example; s=x; b=abc\r\nFrom: a@example.com\r\n\r\n";
        assert!(pick(&cfg, "apps", other).is_some());
    }
}
