//! MTA-STS (RFC 8461) for delivery by MX: a recipient domain that publishes a policy
//! (`_mta-sts.DOMAIN` TXT and `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`) says which MX
//! hosts are its own and, in `enforce` mode, that mail goes to them only over TLS with a
//! certificate valid for the MX host's name.
//!
//! The policy text parser and the MX pattern match are pure. [`Policies`] fetches and
//! caches: a policy is used until `max_age` after it was fetched; it is fetched again when
//! the TXT record's `id` changes, or once half its `max_age` has passed (renewed before it
//! expires); a failed fetch keeps the cached policy and is not repeated for [`FETCH_RETRY`]
//! unless the `id` changes again. Policies are kept in a directory of the queue volume too, so a restart
//! does not forget them (a downgrade that strips the TXT record then changes nothing).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mail_auth::common::parse::TxtRecordParser as _;
use serde::{Deserialize, Serialize};

use super::dns::{Dns, DnsError};

/// Largest policy read (RFC 8461 section 3.3 suggests servers keep it under 64 KiB).
const MAX_POLICY: usize = 64 * 1024;
/// Most time for one policy fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(20);
/// After a failed fetch, the domain's policy is not fetched again for this long.
pub const FETCH_RETRY: Duration = Duration::from_secs(300);
/// Most recipient domains remembered in memory (their policies stay on disk).
const MAX_DOMAINS: usize = 50_000;
/// The longest `max_age` allowed (RFC 8461 section 3.2).
const MAX_AGE_LIMIT: u64 = 31_557_600;

/// A policy's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Only the listed MX hosts, only over TLS with a valid certificate.
    Enforce,
    /// Deliver as without a policy; failures are reported (TLS-RPT).
    Testing,
    /// The domain withdrew its policy.
    None,
}

/// A policy as fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The TXT record's `id` the policy was fetched for.
    pub id: String,
    /// Its mode.
    pub mode: Mode,
    /// MX host patterns: a name, or `*.` and a name for any one label before it.
    pub mx: Vec<String>,
    /// Seconds the policy may be used after it was fetched.
    pub max_age: u64,
    /// When it was fetched, Unix seconds.
    pub fetched_at: i64,
    /// The policy text, for reports (RFC 8460 `policy-string`).
    pub text: Vec<String>,
}

impl Policy {
    /// Whether the policy is still to be used at `now` (Unix seconds).
    pub fn fresh(&self, now: i64) -> bool {
        now < self
            .fetched_at
            .saturating_add(i64::try_from(self.max_age).unwrap_or(i64::MAX))
    }

    /// Whether the policy is to be fetched again at `now` (Unix seconds) although its TXT
    /// `id` did not change: once half its `max_age` has passed, so that a policy in use is
    /// renewed long before it expires (RFC 8461 section 10.2), while a failed fetch keeps it.
    pub fn refresh_due(&self, now: i64) -> bool {
        now >= self
            .fetched_at
            .saturating_add(i64::try_from(self.max_age / 2).unwrap_or(i64::MAX))
    }

    /// Whether `host` (an MX host name) is one of the policy's.
    pub fn allows(&self, host: &str) -> bool {
        self.mx.iter().any(|p| mx_matches(p, host))
    }
}

/// Parse a policy file (RFC 8461 section 3.2): `key: value` lines ending in LF or CRLF;
/// `version` must be `STSv1`; `mode` and `max_age` are required, `mx` is required unless the
/// mode is `none`; unknown keys are ignored. The error names the field.
pub fn parse_policy(text: &str, id: &str, fetched_at: i64) -> Result<Policy, String> {
    let (mut version, mut mode, mut max_age) = (None, None, None);
    let mut mx = Vec::new();
    let mut lines = Vec::new();
    for (n, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        lines.push(line.to_owned());
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: not `key: value`", n + 1))?;
        let v = v.trim();
        match k.trim() {
            "version" if version.is_none() => version = Some(v.to_owned()),
            "mode" if mode.is_none() => {
                mode = Some(match v {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return Err(format!("mode {other:?} is not enforce, testing or none")),
                });
            }
            "max_age" if max_age.is_none() => {
                max_age = Some(
                    v.parse::<u64>()
                        .ok()
                        .filter(|a| *a <= MAX_AGE_LIMIT && v.len() <= 10)
                        .ok_or_else(|| {
                            format!(
                                "max_age {v:?} is not a number of seconds up to {MAX_AGE_LIMIT}"
                            )
                        })?,
                );
            }
            "mx" => {
                let p = v.to_ascii_lowercase();
                if p.is_empty() || p.len() > 253 || p.contains(char::is_whitespace) {
                    return Err(format!("mx {v:?} is not a host name pattern"));
                }
                mx.push(p);
            }
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err(match version {
            None => "no version".into(),
            Some(v) => format!("version {v:?} is not STSv1"),
        });
    }
    let mode = mode.ok_or("no mode")?;
    let max_age = max_age.ok_or("no max_age")?;
    if mx.is_empty() && mode != Mode::None {
        return Err("no mx".into());
    }
    Ok(Policy {
        id: id.to_owned(),
        mode,
        mx,
        max_age,
        fetched_at,
        text: lines,
    })
}

/// Whether MX host `host` matches policy pattern `pattern` (RFC 8461 section 4.1): equal
/// names, or `*.rest` and a host that is one label followed by `rest`. Case and a final dot
/// are ignored.
pub fn mx_matches(pattern: &str, host: &str) -> bool {
    let p = pattern.trim_end_matches('.').to_ascii_lowercase();
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    match p.strip_prefix("*.") {
        Some(rest) => h
            .split_once('.')
            .is_some_and(|(label, after)| !label.is_empty() && after == rest),
        None => p == h,
    }
}

/// The `id` of the domain's MTA-STS TXT record: `None` unless exactly one record starts with
/// `v=STSv1` and it is valid (RFC 8461 section 3.1).
pub fn record_id(txts: &[Vec<u8>]) -> Option<String> {
    let sts: Vec<&Vec<u8>> = txts.iter().filter(|t| t.starts_with(b"v=STSv1")).collect();
    match sts.as_slice() {
        [one] => mail_auth::mta_sts::MtaSts::parse(one).ok().map(|r| r.id),
        _ => None,
    }
}

/// Why a domain's policy could not be had (RFC 8460 result types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The policy could not be fetched (`sts-policy-fetch-error`).
    Fetch(String),
    /// The policy host's certificate is not valid (`sts-webpki-invalid`).
    Webpki(String),
    /// The policy is not valid (`sts-policy-invalid`).
    Invalid(String),
}

impl Failure {
    /// The RFC 8460 result type.
    pub fn result(&self) -> mail_auth::report::tlsrpt::ResultType {
        use mail_auth::report::tlsrpt::ResultType as R;
        match self {
            Failure::Fetch(_) => R::StsPolicyFetchError,
            Failure::Webpki(_) => R::StsWebpkiInvalid,
            Failure::Invalid(_) => R::StsPolicyInvalid,
        }
    }

    /// The RFC 8460 result type's name.
    pub fn result_type(&self) -> &'static str {
        match self {
            Failure::Fetch(_) => "sts-policy-fetch-error",
            Failure::Webpki(_) => "sts-webpki-invalid",
            Failure::Invalid(_) => "sts-policy-invalid",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Fetch(w) | Failure::Webpki(w) | Failure::Invalid(w) => {
                write!(f, "{}: {w}", self.result_type())
            }
        }
    }
}

/// The policy that applies to a domain now.
#[derive(Debug, Clone, Default)]
pub struct Lookup {
    /// The policy in force (`enforce` or `testing`), if any.
    pub policy: Option<Arc<Policy>>,
    /// Why a published policy could not be fetched this time, if so (for logs and reports).
    pub failure: Option<Failure>,
}

#[derive(Debug, Default)]
struct Entry {
    loaded: bool,
    policy: Option<Arc<Policy>>,
    /// After a failed fetch: the TXT `id` it was for, and when to try that id again.
    retry_after: Option<(String, tokio::time::Instant)>,
    failure: Option<Failure>,
}

/// The policies of the recipient domains, fetched when needed.
#[derive(Debug)]
pub struct Policies {
    dir: Option<PathBuf>,
    domains: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Entry>>>>,
}

fn now_s() -> i64 {
    super::now_ms() / 1000
}

/// A domain name safe to use as a file name, or `None`.
fn file_name(domain: &str) -> Option<String> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    (!d.is_empty()
        && d.len() <= 253
        && !d.starts_with('.')
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !d.contains(".."))
    .then(|| format!("{d}.json"))
}

impl Policies {
    /// Policies cached in memory and in `dir` (created when first needed), if given.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            domains: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn entry(&self, domain: &str) -> Arc<tokio::sync::Mutex<Entry>> {
        let mut m = self
            .domains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= MAX_DOMAINS && !m.contains_key(domain) {
            // Forget the domains without a policy that no lookup holds now; those with one
            // are read back from disk when needed.
            m.retain(|_, e| {
                Arc::strong_count(e) > 1 || e.try_lock().map_or(true, |e| e.policy.is_some())
            });
            if m.len() >= MAX_DOMAINS {
                m.retain(|_, e| Arc::strong_count(e) > 1);
            }
        }
        Arc::clone(m.entry(domain.to_owned()).or_default())
    }

    fn load(&self, domain: &str) -> Option<Policy> {
        let path = self.dir.as_ref()?.join(file_name(domain)?);
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn store(&self, domain: &str, p: &Policy) {
        let (Some(dir), Some(name)) = (self.dir.as_ref(), file_name(domain)) else {
            return;
        };
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!(".{name}"));
            std::fs::write(&tmp, serde_json::to_vec(p).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, dir.join(&name))
        };
        if let Err(e) = write() {
            tracing::warn!(domain, error = %e, "cannot keep the MTA-STS policy on disk");
        }
    }

    /// The policy of `domain` now: the cached one while fresh and its TXT `id` unchanged,
    /// else fetched (over HTTPS checked against the web PKI roots and `ca`). Concurrent
    /// lookups of one domain wait for one fetch.
    pub async fn lookup(&self, domain: &str, dns: &Dns, ca: Option<&Path>) -> Lookup {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let entry = self.entry(&domain);
        let mut e = entry.lock().await;
        let now = now_s();
        if !e.loaded {
            e.loaded = true;
            e.policy = self.load(&domain).map(Arc::new);
        }
        if e.policy.as_ref().is_some_and(|p| !p.fresh(now)) {
            e.policy = None;
        }
        let id = match dns.txt(&format!("_mta-sts.{domain}")).await {
            Ok(txts) => record_id(&txts),
            Err(DnsError::NotFound { .. }) => None,
            Err(err) => {
                tracing::debug!(domain, error = %err, "MTA-STS TXT lookup failed; using the cached policy if any");
                None
            }
        };
        let current = |e: &Entry| Lookup {
            policy: e.policy.clone().filter(|p| p.mode != Mode::None),
            failure: e.failure.clone(),
        };
        let Some(id) = id else {
            // No (valid) record: a cached policy still holds until it expires.
            return current(&e);
        };
        if e.policy
            .as_ref()
            .is_some_and(|p| p.id == id && !p.refresh_due(now))
        {
            e.failure = None;
            return current(&e);
        }
        if e.retry_after
            .as_ref()
            .is_some_and(|(failed, t)| *failed == id && tokio::time::Instant::now() < *t)
        {
            return current(&e);
        }
        match fetch(&domain, &id, dns, ca).await {
            Ok(p) => {
                tracing::info!(domain, id = %p.id, mode = ?p.mode, mx = ?p.mx, max_age = p.max_age, "MTA-STS policy fetched");
                self.store(&domain, &p);
                e.policy = Some(Arc::new(p));
                e.failure = None;
                e.retry_after = None;
            }
            Err(f) => {
                tracing::warn!(domain, error = %f, cached = e.policy.is_some(), "MTA-STS policy not fetched; using the cached policy if any");
                e.failure = Some(f);
                e.retry_after = Some((id, tokio::time::Instant::now() + FETCH_RETRY));
            }
        }
        current(&e)
    }
}

/// Fetch and parse `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`: status 200 only (no
/// redirects), `text/plain`, at most [`MAX_POLICY`] bytes.
async fn fetch(domain: &str, id: &str, dns: &Dns, ca: Option<&Path>) -> Result<Policy, Failure> {
    let host = format!("mta-sts.{domain}");
    let tls = super::https::tls(ca).map_err(Failure::Fetch)?;
    let req = http::Request::get("/.well-known/mta-sts.txt")
        .body(bytes::Bytes::new())
        .map_err(|e| Failure::Fetch(e.to_string()))?;
    let resp = super::https::request(dns, tls, &host, 443, req, MAX_POLICY, FETCH_TIMEOUT)
        .await
        .map_err(|e| {
            if e.starts_with("TLS with") && e.contains("certificate") {
                Failure::Webpki(e)
            } else {
                Failure::Fetch(e)
            }
        })?;
    if resp.status != 200 {
        return Err(Failure::Fetch(format!(
            "https://{host}/.well-known/mta-sts.txt answered HTTP {}",
            resp.status
        )));
    }
    let ct = resp.content_type.unwrap_or_default().to_ascii_lowercase();
    if !ct.starts_with("text/plain") {
        return Err(Failure::Invalid(format!(
            "https://{host}/.well-known/mta-sts.txt is {ct:?}, not text/plain"
        )));
    }
    let text = std::str::from_utf8(&resp.body)
        .map_err(|_| Failure::Invalid(format!("the policy of {domain} is not UTF-8")))?;
    parse_policy(text, id, now_s())
        .map_err(|why| Failure::Invalid(format!("the policy of {domain}: {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.mx.example.net\r\nmax_age: 604800\r\n";

    #[test]
    fn parses_policies() {
        let p = parse_policy(GOOD, "20260101", 1000).unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx, ["mail.example.com", "*.mx.example.net"]);
        assert_eq!(p.max_age, 604_800);
        assert!(p.fresh(1000 + 604_799) && !p.fresh(1000 + 604_800));
        assert!(!p.refresh_due(1000 + 302_399) && p.refresh_due(1000 + 302_400));
        assert_eq!(p.text.len(), 5);
        // LF only, unknown keys, extra spaces.
        let p = parse_policy(
            "version: STSv1\nmode:testing\nfoo: bar\nmx:  a.example \nmax_age: 86400\n",
            "x",
            0,
        )
        .unwrap();
        assert_eq!(
            (p.mode, p.mx.as_slice()),
            (Mode::Testing, &["a.example".to_owned()][..])
        );
        // mode none needs no mx.
        assert_eq!(
            parse_policy("version: STSv1\nmode: none\nmax_age: 1\n", "x", 0)
                .unwrap()
                .mode,
            Mode::None
        );
        for (text, why) in [
            ("mode: enforce\nmx: a\nmax_age: 1\n", "no version"),
            (
                "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
                "STSv2",
            ),
            ("version: STSv1\nmx: a\nmax_age: 1\n", "no mode"),
            (
                "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
                "strict",
            ),
            ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
            ("version: STSv1\nmode: enforce\nmx: a\n", "no max_age"),
            (
                "version: STSv1\nmode: enforce\nmx: a\nmax_age: 31557601\n",
                "max_age",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n",
                "max_age",
            ),
            ("<html>\nversion: STSv1\n", "line 1"),
        ] {
            let e = parse_policy(text, "x", 0).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn matches_mx_patterns() {
        assert!(mx_matches("mail.example.com", "MAIL.example.com."));
        assert!(mx_matches("*.example.com", "mx1.example.com"));
        assert!(!mx_matches("*.example.com", "a.b.example.com"));
        assert!(!mx_matches("*.example.com", "example.com"));
        assert!(!mx_matches("*.example.com", ".example.com"));
        assert!(!mx_matches("mail.example.com", "mail.example.com.evil"));
        assert!(!mx_matches("mail.example.com", "xmail.example.com"));
    }

    #[test]
    fn reads_the_txt_record() {
        let r = |s: &[&str]| s.iter().map(|x| x.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(record_id(&r(&["v=STSv1; id=2026A"])), Some("2026A".into()));
        assert_eq!(
            record_id(&r(&["v=spf1 -all", "v=STSv1; id=7;"])),
            Some("7".into())
        );
        assert_eq!(record_id(&r(&["v=STSv1; id=1", "v=STSv1; id=2"])), None);
        assert_eq!(record_id(&r(&["v=STSv1;"])), None);
        assert_eq!(record_id(&r(&[])), None);
    }

    #[test]
    fn remembered_domains_are_bounded() {
        let p = Policies::new(None);
        let held = p.entry("held.example");
        for i in 0..MAX_DOMAINS + 5 {
            let _ = p.entry(&format!("d{i}.example"));
        }
        let m = p.domains.lock().unwrap();
        assert!(m.len() <= MAX_DOMAINS, "{}", m.len());
        // An entry a lookup holds is never dropped under it.
        assert!(m.contains_key("held.example"));
        drop(held);
    }

    #[test]
    fn file_names_are_safe() {
        assert_eq!(file_name("Example.COM."), Some("example.com.json".into()));
        assert_eq!(file_name("../etc"), None);
        assert_eq!(file_name("a/b"), None);
        assert_eq!(file_name(""), None);
    }
}
