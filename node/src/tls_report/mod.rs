//! TLS reporting (RFC 8460): what this member saw of each recipient domain's MTA-STS or
//! DANE policy, counted per reporting period, and the reports made of it.
//!
//! Each member reports for itself: a domain gets one report per member and period (report
//! ids name the member), as RFC 8460 allows several reporters per organization. The counts
//! of the running period are kept on the queue volume (written every minute, at each period's
//! end and at shutdown), so a restart loses at most a minute of them.
//!
//! [`Aggregate`] is pure: sessions recorded, reports made. [`send`] is the task that ends
//! periods and sends their reports.

pub mod send;

use std::collections::HashMap;
use std::net::IpAddr;

use mail_auth::report::tlsrpt::{
    DateRange, FailureDetails, Policy, PolicyDetails, PolicyType, ResultType, Summary, TlsReport,
};
use serde::{Deserialize, Serialize};

/// Most recipient domains counted in one period; sessions of more domains are not counted.
pub const MAX_DOMAINS: usize = 10_000;
/// Most policies counted per domain in one period.
const MAX_POLICIES: usize = 16;
/// Most distinct failure details per policy; more failures only add to the totals.
const MAX_FAILURE_DETAILS: usize = 100;
/// Longest `additional-information` kept.
const MAX_INFO: usize = 300;

/// The outcome of one session (one connection to one next hop, or a hop not tried).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// TLS as the policy asks.
    Success,
    /// The policy was not met.
    Failure {
        /// The RFC 8460 result type.
        result: ResultType,
        /// The MX host.
        mx_host: Option<String>,
        /// Its address.
        ip: Option<IpAddr>,
        /// What failed, for a person.
        info: Option<String>,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PolicyCounts {
    policy: PolicyDetails,
    success: u32,
    failure: u32,
    details: Vec<FailureDetails>,
}

/// The counts of one period.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Aggregate {
    /// Start of the period, Unix seconds.
    pub start: i64,
    /// End of the period (exclusive), Unix seconds.
    pub end: i64,
    domains: HashMap<String, Vec<PolicyCounts>>,
}

/// The period of `interval` seconds (aligned to the Unix epoch, so a day is a UTC day) that
/// holds `now`.
pub fn period(now: i64, interval: u64) -> (i64, i64) {
    let i = i64::try_from(interval.max(1)).unwrap_or(86_400);
    let start = now - now.rem_euclid(i);
    (start, start + i)
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl Aggregate {
    /// An empty aggregate for `[start, end)`.
    pub fn new(start: i64, end: i64) -> Self {
        Self {
            start,
            end,
            domains: HashMap::new(),
        }
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// The domains counted.
    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.domains.keys().map(String::as_str)
    }

    /// Count one session of `policy` (its `policy-domain` is the recipient domain).
    pub fn record(&mut self, policy: &PolicyDetails, outcome: Outcome) {
        let domain = policy.policy_domain.to_ascii_lowercase();
        if !self.domains.contains_key(&domain) && self.domains.len() >= MAX_DOMAINS {
            return;
        }
        let list = self.domains.entry(domain).or_default();
        let i = match list.iter().position(|p| p.policy == *policy) {
            Some(i) => i,
            None if list.len() < MAX_POLICIES => {
                list.push(PolicyCounts {
                    policy: policy.clone(),
                    ..Default::default()
                });
                list.len() - 1
            }
            None => return,
        };
        let c = &mut list[i];
        match outcome {
            Outcome::Success => c.success = c.success.saturating_add(1),
            Outcome::Failure {
                result,
                mx_host,
                ip,
                info,
            } => {
                c.failure = c.failure.saturating_add(1);
                let info = info.map(|s| truncate(&s, MAX_INFO));
                if let Some(d) = c.details.iter_mut().find(|d| {
                    d.result_type == result
                        && d.receiving_mx_hostname == mx_host
                        && d.receiving_ip == ip
                }) {
                    d.failed_session_count = d.failed_session_count.saturating_add(1);
                    d.additional_information = info;
                } else if c.details.len() < MAX_FAILURE_DETAILS {
                    c.details.push(FailureDetails {
                        result_type: result,
                        receiving_mx_hostname: mx_host,
                        receiving_ip: ip,
                        failed_session_count: 1,
                        additional_information: info,
                        ..Default::default()
                    });
                }
            }
        }
    }

    /// The report for `domain`, if anything was counted for it.
    pub fn report(
        &self,
        domain: &str,
        organization: &str,
        contact: Option<&str>,
        reporter: &str,
    ) -> Option<TlsReport> {
        let list = self.domains.get(domain)?;
        Some(TlsReport {
            organization_name: Some(organization.to_owned()),
            date_range: DateRange::from_timestamps(self.start, self.end),
            contact_info: contact.map(str::to_owned),
            report_id: format!("{}-{}@{reporter}", self.start, domain),
            policies: list
                .iter()
                .map(|c| Policy {
                    policy: c.policy.clone(),
                    summary: Summary {
                        total_success: c.success,
                        total_failure: c.failure,
                    },
                    failure_details: c.details.clone(),
                })
                .collect(),
        })
    }
}

/// A report as RFC 8460 JSON, without the `null`s of fields that are absent.
pub fn to_json(report: &TlsReport) -> Vec<u8> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.retain(|_, x| !x.is_null());
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(report).unwrap_or_default();
    strip(&mut v);
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The result type of a failed TLS handshake.
pub fn result_of(f: crate::delivery::client::TlsFailure) -> ResultType {
    use crate::delivery::client::TlsFailure as F;
    match f {
        F::HostMismatch => ResultType::CertificateHostMismatch,
        F::Expired => ResultType::CertificateExpired,
        F::NotTrusted => ResultType::CertificateNotTrusted,
        F::Validation | F::Other => ResultType::ValidationFailure,
    }
}

/// The policy details of an MTA-STS policy of `domain`.
pub fn sts_policy(domain: &str, p: &crate::delivery::mta_sts::Policy) -> PolicyDetails {
    PolicyDetails {
        policy_type: PolicyType::Sts,
        policy_string: p.text.clone(),
        policy_domain: domain.to_owned(),
        mx_host: p.mx.clone(),
    }
}

/// The policy details of the TLSA records of `mx_host`, for `domain`.
pub fn tlsa_policy(domain: &str, mx_host: &str, records: &[String]) -> PolicyDetails {
    PolicyDetails {
        policy_type: PolicyType::Tlsa,
        policy_string: records.to_vec(),
        policy_domain: domain.to_owned(),
        mx_host: vec![mx_host.to_owned()],
    }
}

/// The policy details of a domain without a policy.
pub fn no_policy(domain: &str) -> PolicyDetails {
    PolicyDetails::new(PolicyType::NoPolicyFound, domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_aligned() {
        assert_eq!(period(86_400 * 3 + 5, 86_400), (86_400 * 3, 86_400 * 4));
        assert_eq!(period(119, 60), (60, 120));
    }

    #[test]
    fn counts_sessions_per_policy_and_failure() {
        let mut a = Aggregate::new(0, 86_400);
        let sts = PolicyDetails {
            policy_type: PolicyType::Sts,
            policy_string: vec!["version: STSv1".into(), "mode: enforce".into()],
            policy_domain: "Example.COM".into(),
            mx_host: vec!["*.example.com".into()],
        };
        a.record(&sts, Outcome::Success);
        a.record(&sts, Outcome::Success);
        let fail = |info: &str| Outcome::Failure {
            result: ResultType::CertificateExpired,
            mx_host: Some("mx1.example.com".into()),
            ip: Some("192.0.2.1".parse().unwrap()),
            info: Some(info.into()),
        };
        a.record(&sts, fail("first"));
        a.record(&sts, fail("second"));
        a.record(&no_policy("example.com"), Outcome::Success);
        let r = a
            .report("example.com", "Example Org", Some("tls@example.org"), "m0")
            .unwrap();
        assert_eq!(r.report_id, "0-example.com@m0");
        assert_eq!(r.policies.len(), 2);
        let p = &r.policies[0];
        assert_eq!((p.summary.total_success, p.summary.total_failure), (2, 2));
        assert_eq!(p.failure_details.len(), 1);
        assert_eq!(p.failure_details[0].failed_session_count, 2);
        assert_eq!(
            p.failure_details[0].additional_information.as_deref(),
            Some("second")
        );
        assert!(a.report("other.example", "x", None, "m0").is_none());
        let json: serde_json::Value = serde_json::from_slice(&to_json(&r)).unwrap();
        assert_eq!(json["policies"][0]["policy"]["policy-type"], "sts");
        assert_eq!(
            json["policies"][0]["failure-details"][0]["result-type"],
            "certificate-expired"
        );
        assert_eq!(json["date-range"]["start-datetime"], "1970-01-01T00:00:00Z");
        // Absent fields are left out, not null.
        assert!(
            json["policies"][0]["failure-details"][0]
                .get("sending-mta-ip")
                .is_none()
        );
    }

    #[test]
    fn memory_is_bounded() {
        let mut a = Aggregate::new(0, 1);
        for i in 0..MAX_DOMAINS + 10 {
            a.record(&no_policy(&format!("d{i}.example")), Outcome::Success);
        }
        assert_eq!(a.domains().count(), MAX_DOMAINS);
        let p = no_policy("d0.example");
        for i in 0..MAX_FAILURE_DETAILS + 10 {
            a.record(
                &p,
                Outcome::Failure {
                    result: ResultType::ValidationFailure,
                    mx_host: Some(format!("mx{i}.example")),
                    ip: None,
                    info: Some("é".repeat(400)),
                },
            );
        }
        let r = a.report("d0.example", "o", None, "m").unwrap();
        assert_eq!(r.policies[0].summary.total_failure, 110);
        assert_eq!(r.policies[0].failure_details.len(), MAX_FAILURE_DETAILS);
        assert!(
            r.policies[0].failure_details[0]
                .additional_information
                .as_ref()
                .unwrap()
                .len()
                <= MAX_INFO
        );
    }
}
