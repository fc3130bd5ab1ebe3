//! One HTTPS request (HTTP/1.1 over rustls) to a host resolved through the delivery resolver,
//! with a size limit on the answer and a deadline: OAuth2 token requests, MTA-STS policy
//! fetches and TLS reports posted over HTTPS. No redirects are followed, no connection kept.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;

use super::dns::Dns;

/// An answer.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body, at most the limit asked for.
    pub body: Bytes,
}

/// A TLS client configuration for HTTPS: certificates checked against the web PKI roots and
/// `ca`, HTTP/1.1 by ALPN.
pub fn tls(ca: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut c = (*super::client::tls_config(true, ca)?).clone();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// Host, port and path of an `https://` URL.
pub fn split_url(url: &str) -> Option<(String, u16, String)> {
    let rest = url.strip_prefix("https://")?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        let port = after
            .strip_prefix(':')
            .map_or(Some(443), |p| p.parse().ok())?;
        (h.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().ok()?),
            None => (authority.to_owned(), 443),
        }
    };
    (!host.is_empty()).then(|| (host, port, path.to_owned()))
}

/// Send `req` (its URI is the path; `Host` is added) to `host:port` over TLS checked by `tls`
/// for `host`. The error says what failed, for a person.
pub async fn request(
    dns: &Dns,
    tls: Arc<rustls::ClientConfig>,
    host: &str,
    port: u16,
    mut req: http::Request<Bytes>,
    max_body: usize,
    deadline: Duration,
) -> Result<Response, String> {
    let exchange = async {
        let ip = dns
            .ips(host)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .next()
            .ok_or_else(|| format!("{host} has no address"))?;
        let tcp = tokio::net::TcpStream::connect((ip, port))
            .await
            .map_err(|e| format!("connect {ip}:{port}: {e}"))?;
        let name =
            rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let host_header = http::HeaderValue::from_str(host).map_err(|e| e.to_string())?;
        req.headers_mut().insert(http::header::HOST, host_header);
        let req = req.map(http_body_util::Full::new);
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = http_body_util::Limited::new(resp.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok(Response {
            status,
            content_type,
            body,
        })
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| format!("no answer from {host} within {} s", deadline.as_secs()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("https://login.example/t/oauth2/v2.0/token"),
            Some(("login.example".into(), 443, "/t/oauth2/v2.0/token".into()))
        );
        assert_eq!(
            split_url("https://127.0.0.1:8443"),
            Some(("127.0.0.1".into(), 8443, "/".into()))
        );
        assert_eq!(
            split_url("https://[::1]:9/x"),
            Some(("::1".into(), 9, "/x".into()))
        );
        assert_eq!(split_url("http://a/b"), None);
        assert_eq!(split_url("https:///b"), None);
    }
}
