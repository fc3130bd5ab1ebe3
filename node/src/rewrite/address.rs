//! Sender address rewriting rules, matched in order.

use mailnode_api::config::SenderRewrite;

#[derive(Debug, Clone, PartialEq, Eq)]
enum From {
    Any,
    Domain(String),
    Address(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum To {
    Domain(String),
    Address(String),
}

/// A listener's sender rewriting rules, ready to match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderRewriter {
    rules: Vec<(From, To)>,
}

impl SenderRewriter {
    /// The rules of `rules` (validated with the config: `from` is `*`, `@domain` or
    /// `user@domain`; `to` is `@domain` or `user@domain`). `None` when there are none.
    pub fn new(rules: &[SenderRewrite]) -> Option<Self> {
        let rules: Vec<_> = rules
            .iter()
            .map(|r| {
                let from = if r.from == "*" {
                    From::Any
                } else if let Some(d) = r.from.strip_prefix('@') {
                    From::Domain(d.to_ascii_lowercase())
                } else {
                    From::Address(r.from.to_ascii_lowercase())
                };
                let to = match r.to.strip_prefix('@') {
                    Some(d) => To::Domain(d.to_owned()),
                    None => To::Address(r.to.clone()),
                };
                (from, to)
            })
            .collect();
        (!rules.is_empty()).then_some(Self { rules })
    }

    /// The address `addr` is rewritten to, or `None` when no rule matches it (or it is the
    /// null sender, or has no `@`). Matching ignores case; the local part kept by a `to:
    /// "@domain"` rule keeps its case.
    pub fn rewrite(&self, addr: &str) -> Option<String> {
        let (local, domain) = addr.rsplit_once('@')?;
        if local.is_empty() || domain.is_empty() {
            return None;
        }
        let to = self.rules.iter().find_map(|(from, to)| {
            let hit = match from {
                From::Any => true,
                From::Domain(d) => domain.eq_ignore_ascii_case(d),
                From::Address(a) => addr.eq_ignore_ascii_case(a),
            };
            hit.then_some(to)
        })?;
        let new = match to {
            To::Domain(d) => format!("{local}@{d}"),
            To::Address(a) => a.clone(),
        };
        (new != addr).then_some(new)
    }
}

/// Rules from `(from, to)` pairs, for tests.
#[cfg(test)]
pub(crate) fn rules_of(pairs: &[(&str, &str)]) -> Option<SenderRewriter> {
    let rules: Vec<_> = pairs
        .iter()
        .map(|(f, t)| SenderRewrite {
            from: (*f).into(),
            to: (*t).into(),
        })
        .collect();
    SenderRewriter::new(&rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(pairs: &[(&str, &str)]) -> SenderRewriter {
        rules_of(pairs).unwrap()
    }

    #[test]
    fn the_first_matching_rule_wins_and_case_is_ignored() {
        let r = rules(&[
            ("root@scanner01.lan", "scanner01@example.com"),
            ("@scanner01.lan", "@example.com"),
            ("*", "devices@example.com"),
        ]);
        assert_eq!(
            r.rewrite("ROOT@Scanner01.LAN").as_deref(),
            Some("scanner01@example.com")
        );
        assert_eq!(
            r.rewrite("Alerts@scanner01.lan").as_deref(),
            Some("Alerts@example.com")
        );
        assert_eq!(
            r.rewrite("x@other.lan").as_deref(),
            Some("devices@example.com")
        );
        assert_eq!(r.rewrite("devices@example.com"), None, "already the target");
        assert_eq!(r.rewrite(""), None, "null sender");
        assert_eq!(r.rewrite("postmaster"), None);
    }

    #[test]
    fn without_a_catch_all_other_senders_stay() {
        let r = rules(&[("@mfp.lan", "@example.com")]);
        assert_eq!(r.rewrite("app@example.com"), None);
        assert_eq!(
            r.rewrite("scan@sub.mfp.lan"),
            None,
            "subdomains are not matched"
        );
        assert!(SenderRewriter::new(&[]).is_none());
    }
}
