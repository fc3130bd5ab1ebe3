//! OAuth2 access tokens for SMTP AUTH to smarthosts (`oauth2`): the client credentials grant
//! (RFC 6749 section 4.4) against the token endpoint over HTTPS, a token cached until shortly
//! before it expires, and the SASL messages that carry it (XOAUTH2, OAUTHBEARER RFC 7628).
//! A token the next hop refuses is dropped, so that the next attempt fetches a new one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::time::Instant;

use crate::config::OAuth2;

/// A token is fetched again when less than this is left of its life.
const REFRESH_BEFORE: Duration = Duration::from_secs(300);
/// Most time for one token request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest token response read.
const MAX_RESPONSE: usize = 64 * 1024;

/// A token that could not be had.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// The client secret file cannot be read.
    #[error("cannot read the OAuth2 client secret {path}: {source}")]
    Secret {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The token URL is not usable.
    #[error("OAuth2 token URL {0} is not an https:// URL with a host")]
    Url(String),
    /// Connecting or talking to the token endpoint failed.
    #[error("OAuth2 token endpoint {url}: {why}")]
    Endpoint {
        /// The token URL.
        url: String,
        /// What failed.
        why: String,
    },
    /// The endpoint refused (e.g. a wrong client secret).
    #[error("OAuth2 token endpoint {url} answered {status}: {error}")]
    Refused {
        /// The token URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Its `error` and `error_description`, or the start of the body.
        error: String,
    },
}

#[derive(Debug, Clone)]
struct Cached {
    token: String,
    refresh_at: Instant,
}

/// The tokens of every `oauth2` setting in use.
#[derive(Debug)]
pub struct Tokens {
    cache: tokio::sync::Mutex<HashMap<OAuth2, Cached>>,
    tls: HashMap<Option<std::path::PathBuf>, Arc<rustls::ClientConfig>>,
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_value(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".to_owned(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The access token and its lifetime out of a token response body.
fn parse_token(body: &[u8]) -> Option<(String, Duration)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let token = v.get("access_token")?.as_str()?.to_owned();
    let secs = v
        .get("expires_in")
        .and_then(|e| e.as_u64().or_else(|| e.as_str()?.parse().ok()))
        .unwrap_or(3600);
    (!token.is_empty()).then_some((token, Duration::from_secs(secs)))
}

/// A refusal's `error: error_description`, or the start of the body.
fn describe_error(body: &[u8]) -> String {
    let v: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |k: &str| {
        v.as_ref()
            .and_then(|v| v.get(k))
            .and_then(|e| e.as_str())
            .map(str::to_owned)
    };
    match (field("error"), field("error_description")) {
        (Some(e), Some(d)) => format!("{e}: {d}"),
        (Some(e), None) => e,
        _ => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

/// The XOAUTH2 initial response (base64).
pub fn xoauth2(user: &str, token: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// The OAUTHBEARER initial response (RFC 7628, base64).
pub fn oauthbearer(user: &str, host: &str, port: u16, token: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!(
        "n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    ))
}

impl Tokens {
    /// The TLS settings for every token endpoint CA of `cfg` (the web PKI roots, and each
    /// `caFile`).
    pub fn new(cfg: &crate::config::DeliveryConfig) -> Result<Self, String> {
        let cas = std::iter::once(cfg.oauth2.as_ref())
            .chain(cfg.routes.iter().map(|r| r.oauth2.as_ref()))
            .chain(cfg.sender_routes.iter().map(|r| r.oauth2.as_ref()))
            .flatten()
            .map(|o| o.ca_file.clone())
            .chain(std::iter::once(None));
        let mut tls = HashMap::new();
        for ca in cas {
            if let std::collections::hash_map::Entry::Vacant(v) = tls.entry(ca) {
                let c = super::https::tls(v.key().as_deref())?;
                v.insert(c);
            }
        }
        Ok(Self {
            cache: tokio::sync::Mutex::new(HashMap::new()),
            tls,
        })
    }

    /// A valid token for `o`: the cached one, or a new one from the endpoint. Concurrent
    /// callers wait for one request.
    pub async fn token(&self, o: &OAuth2, dns: &super::dns::Dns) -> Result<String, OAuthError> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.get(o)
            && Instant::now() < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        let (token, life) = self.fetch(o, dns).await?;
        let refresh_at = Instant::now() + life.saturating_sub(REFRESH_BEFORE.min(life / 2));
        tracing::info!(token_url = %o.token_url, client_id = %o.client_id, expires_in = life.as_secs(), "OAuth2 token fetched");
        cache.insert(
            o.clone(),
            Cached {
                token: token.clone(),
                refresh_at,
            },
        );
        Ok(token)
    }

    /// Forget the token of `o` (the next hop refused it).
    pub async fn forget(&self, o: &OAuth2) {
        self.cache.lock().await.remove(o);
    }

    async fn fetch(
        &self,
        o: &OAuth2,
        dns: &super::dns::Dns,
    ) -> Result<(String, Duration), OAuthError> {
        let url = o.token_url.clone();
        let endpoint = |why: String| OAuthError::Endpoint {
            url: url.clone(),
            why,
        };
        let (host, port, path) =
            super::https::split_url(&url).ok_or_else(|| OAuthError::Url(url.clone()))?;
        let secret = std::fs::read_to_string(&o.client_secret_file).map_err(|source| {
            OAuthError::Secret {
                path: o.client_secret_file.clone(),
                source,
            }
        })?;
        let mut form = format!(
            "grant_type=client_credentials&client_id={}&client_secret={}",
            form_value(&o.client_id),
            form_value(secret.trim_end_matches(['\r', '\n']))
        );
        if !o.scope.is_empty() {
            form.push_str(&format!("&scope={}", form_value(&o.scope)));
        }
        let tls = match self.tls.get(&o.ca_file) {
            Some(t) => Arc::clone(t),
            // A caFile that a reload added: its settings are made for this request.
            None => super::https::tls(o.ca_file.as_deref()).map_err(endpoint)?,
        };
        let req = http::Request::post(path.as_str())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(bytes::Bytes::from(form))
            .map_err(|e| endpoint(e.to_string()))?;
        let super::https::Response { status, body, .. } =
            super::https::request(dns, tls, &host, port, req, MAX_RESPONSE, REQUEST_TIMEOUT)
                .await
                .map_err(endpoint)?;
        if status != 200 {
            return Err(OAuthError::Refused {
                url,
                status,
                error: describe_error(&body),
            });
        }
        parse_token(&body).ok_or_else(|| endpoint("the answer holds no access_token".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_forms_and_answers() {
        assert_eq!(form_value("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
        assert_eq!(
            parse_token(br#"{"token_type":"Bearer","expires_in":3599,"access_token":"eyJ"}"#),
            Some(("eyJ".into(), Duration::from_secs(3599)))
        );
        assert_eq!(
            parse_token(br#"{"access_token":"t","expires_in":"60"}"#),
            Some(("t".into(), Duration::from_secs(60)))
        );
        assert_eq!(parse_token(br#"{"error":"invalid_client"}"#), None);
        assert_eq!(
            describe_error(br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret"}"#),
            "invalid_client: AADSTS7000215: Invalid client secret"
        );
        let decoded = |b: String| {
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap()).unwrap()
        };
        assert_eq!(
            decoded(xoauth2("relay@example.com", "tok")),
            "user=relay@example.com\x01auth=Bearer tok\x01\x01"
        );
        assert_eq!(
            decoded(oauthbearer("u@x", "smtp.x", 587, "tok")),
            "n,a=u@x,\x01host=smtp.x\x01port=587\x01auth=Bearer tok\x01\x01"
        );
    }
}
