//! Ending reporting periods and sending their reports (RFC 8460 section 5): for each domain
//! counted, its `_smtp._tls` TXT record names where reports go (`rua`): `mailto:` addresses
//! get a `multipart/report` message queued in this member's own queue (delivered, retried and
//! DKIM-signed like any mail, with the null sender so that nothing bounces back), `https:`
//! URLs a POST of `application/tlsrpt+gzip`. Domains without the record get nothing.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mail_auth::common::parse::TxtRecordParser as _;
use mail_auth::mta_sts::{ReportUri, TlsRpt};
use mail_auth::report::tlsrpt::PolicyDetails;

use super::{Aggregate, Outcome, period};
use crate::config::TlsReports;
use crate::delivery::attempt::Engine;

/// How often the running period's counts are written to disk.
const SAVE_EVERY: Duration = Duration::from_secs(60);
/// Most time for one HTTPS report.
const POST_TIMEOUT: Duration = Duration::from_secs(30);
/// File of the running period's counts.
const CURRENT: &str = "current.json";

/// The counts of the running period, and where ended periods wait to be reported.
#[derive(Debug)]
pub struct Reports {
    dir: PathBuf,
    current: Mutex<Aggregate>,
}

fn now_s() -> i64 {
    crate::delivery::now_ms() / 1000
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

impl Reports {
    /// Counts kept in `dir` (the running period's are read back, if any).
    pub fn new(dir: PathBuf) -> Self {
        let current = std::fs::read(dir.join(CURRENT))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            dir,
            current: Mutex::new(current),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Aggregate> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Count one session in the running period (of `interval` seconds).
    pub fn record(&self, interval: u64, policy: &PolicyDetails, outcome: Outcome) {
        let mut a = self.lock();
        if a.end == 0 {
            let (start, end) = period(now_s(), interval);
            *a = Aggregate::new(start, end);
        }
        a.record(policy, outcome);
    }

    /// Write the running period's counts to disk.
    pub fn save(&self) {
        let bytes = serde_json::to_vec(&*self.lock()).unwrap_or_default();
        if let Err(e) = write_atomic(&self.dir.join(CURRENT), &bytes) {
            tracing::warn!(error = %e, "cannot keep the TLS report counts on disk");
        }
    }

    /// If the running period is over at `now`, start the next one and keep the ended one
    /// (if it counted anything) as a file to report.
    fn roll(&self, now: i64, interval: u64) {
        let ended = {
            let mut a = self.lock();
            if a.end != 0 && now < a.end {
                return;
            }
            let (start, end) = period(now, interval);
            std::mem::replace(&mut *a, Aggregate::new(start, end))
        };
        if !ended.is_empty() {
            let path = self.dir.join(format!("ended-{}.json", ended.start));
            let bytes = serde_json::to_vec(&ended).unwrap_or_default();
            if let Err(e) = write_atomic(&path, &bytes) {
                tracing::warn!(error = %e, "cannot keep an ended TLS report period; its reports are lost");
            }
        }
        self.save();
    }

    /// Files of ended periods, oldest first.
    fn ended(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("ended-") && n.ends_with(".json"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Where a domain wants its reports: the `rua` of its one `v=TLSRPTv1` record.
pub fn report_uris(txts: &[Vec<u8>]) -> Vec<ReportUri> {
    let recs: Vec<&Vec<u8>> = txts
        .iter()
        .filter(|t| t.starts_with(b"v=TLSRPTv1"))
        .collect();
    match recs.as_slice() {
        [one] => TlsRpt::parse(one).map(|r| r.rua).unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes)?;
    e.finish()
}

/// Send the report of `domain` out of `agg` to where the domain asks.
async fn send_domain(engine: &Engine, rc: &TlsReports, agg: &Aggregate, domain: &str) {
    let cfg = engine.cfg();
    let txts = match engine.dns().txt(&format!("_smtp._tls.{domain}")).await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(domain, error = %e, "no TLS report record");
            return;
        }
    };
    let targets = report_uris(&txts);
    if targets.is_empty() {
        return;
    }
    let Some(report) = agg.report(
        domain,
        &rc.organization_name,
        rc.contact.as_deref(),
        &cfg.hostname,
    ) else {
        return;
    };
    let gz = match gzip(&super::to_json(&report)) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(domain, error = %e, "cannot compress a TLS report");
            return;
        }
    };
    let metric = |via: &str, result: &str| {
        engine
            .metrics
            .tls_reports
            .get_or_create(&vec![
                ("via".to_owned(), via.to_owned()),
                ("result".to_owned(), result.to_owned()),
            ])
            .inc();
    };
    let mailto: Vec<String> = targets
        .iter()
        .filter_map(|t| match t {
            ReportUri::Mail(a) => Some(a.clone()),
            ReportUri::Http(_) => None,
        })
        .collect();
    if !mailto.is_empty() {
        let mut msg = Vec::new();
        let built = report.write_rfc5322_from_bytes(
            domain,
            &cfg.hostname,
            rc.from.as_str(),
            mailto.iter().map(String::as_str),
            &gz,
            &mut msg,
        );
        match built {
            Ok(()) => match engine.queue_local("", &mailto, msg, "tls-report").await {
                Ok(id) => {
                    tracing::info!(domain, id = %id, to = ?mailto, report_id = %report.report_id, "TLS report queued");
                    metric("mail", "sent");
                }
                Err(e) => {
                    tracing::warn!(domain, error = %e, "cannot queue a TLS report");
                    metric("mail", "failed");
                }
            },
            Err(e) => {
                tracing::warn!(domain, error = %e, "cannot build a TLS report message");
                metric("mail", "failed");
            }
        }
    }
    for t in &targets {
        let ReportUri::Http(url) = t else { continue };
        match post(engine, url, &gz).await {
            Ok(status) => {
                tracing::info!(domain, url = %url, status, report_id = %report.report_id, "TLS report posted");
                metric("https", "sent");
            }
            Err(e) => {
                tracing::warn!(domain, url = %url, error = %e, "TLS report not posted");
                metric("https", "failed");
            }
        }
    }
}

/// POST a compressed report; `Ok(status)` for a 2xx answer.
async fn post(engine: &Engine, url: &str, gz: &[u8]) -> Result<u16, String> {
    let (host, port, path) = crate::delivery::https::split_url(url)
        .ok_or_else(|| format!("{url} is not an https:// URL"))?;
    let cfg = engine.cfg();
    let tls = crate::delivery::https::tls(cfg.delivery.tls.ca_file.as_deref())?;
    let req = http::Request::post(path.as_str())
        .header(http::header::CONTENT_TYPE, "application/tlsrpt+gzip")
        .body(bytes::Bytes::copy_from_slice(gz))
        .map_err(|e| e.to_string())?;
    let resp = crate::delivery::https::request(
        engine.dns(),
        tls,
        &host,
        port,
        req,
        64 * 1024,
        POST_TIMEOUT,
    )
    .await?;
    if (200..300).contains(&resp.status) {
        Ok(resp.status)
    } else {
        Err(format!("answered HTTP {}", resp.status))
    }
}

/// End periods and send their reports until `shutdown` turns true; the running period's
/// counts are saved every minute and at the end.
pub async fn run(engine: Arc<Engine>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let reports = &engine.tls_reports;
    let mut last_save = tokio::time::Instant::now();
    loop {
        let cfg = engine.cfg();
        let mut wait = SAVE_EVERY;
        if let Some(rc) = &cfg.delivery.tls_reports {
            let now = now_s();
            reports.roll(now, rc.interval_seconds);
            for path in reports.ended() {
                let agg: Option<Aggregate> = std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                if let Some(agg) = agg {
                    let mut domains: Vec<String> = agg.domains().map(str::to_owned).collect();
                    domains.sort();
                    for d in &domains {
                        send_domain(&engine, rc, &agg, d).await;
                    }
                }
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a reported TLS report period");
                }
            }
            if last_save.elapsed() >= SAVE_EVERY {
                reports.save();
                last_save = tokio::time::Instant::now();
            }
            let end = reports.lock().end;
            let until_end = u64::try_from(end - now_s()).unwrap_or(0);
            // Reports of many members should not arrive at once: a little after the end.
            let spread = (rc.interval_seconds / 100).min(300);
            let jitter = if spread == 0 {
                0
            } else {
                u64::from(std::process::id()) % spread
            };
            wait =
                wait.min(Duration::from_secs(until_end + jitter).max(Duration::from_millis(200)));
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {
                if cfg.delivery.tls_reports.is_some() {
                    reports.save();
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_report_record() {
        let r = |s: &[&str]| s.iter().map(|x| x.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(
            report_uris(&r(&[
                "v=spf1 -all",
                "v=TLSRPTv1; rua=mailto:tls@example.com,https://r.example/tlsrpt"
            ])),
            vec![
                ReportUri::Mail("tls@example.com".into()),
                ReportUri::Http("https://r.example/tlsrpt".into())
            ]
        );
        assert!(
            report_uris(&r(&[
                "v=TLSRPTv1; rua=mailto:a@b",
                "v=TLSRPTv1; rua=mailto:c@d"
            ]))
            .is_empty()
        );
        assert!(report_uris(&r(&[])).is_empty());
    }

    #[test]
    fn ended_periods_are_kept_until_reported() {
        let dir = tempfile::tempdir().unwrap();
        let r = Reports::new(dir.path().to_path_buf());
        r.record(60, &super::super::no_policy("a.example"), Outcome::Success);
        let end = r.lock().end;
        r.roll(end - 1, 60);
        assert!(r.ended().is_empty());
        r.roll(end, 60);
        let ended = r.ended();
        assert_eq!(ended.len(), 1);
        let agg: Aggregate = serde_json::from_slice(&std::fs::read(&ended[0]).unwrap()).unwrap();
        assert_eq!(agg.domains().collect::<Vec<_>>(), ["a.example"]);
        // The new period starts empty, and an empty period leaves no file.
        assert!(r.lock().is_empty());
        r.roll(end + 60, 60);
        assert_eq!(r.ended().len(), 1);
        // Counts survive a restart.
        r.record(60, &super::super::no_policy("b.example"), Outcome::Success);
        r.save();
        let again = Reports::new(dir.path().to_path_buf());
        assert_eq!(again.lock().domains().collect::<Vec<_>>(), ["b.example"]);
    }
}
