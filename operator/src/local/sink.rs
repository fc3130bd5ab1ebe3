//! The directory sink: a small SMTP server on loopback that stores each message it accepts as
//! `STATE/sink/*.eml`, the next hop of local members when the manifest names no smarthosts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::files::mkdir;
use super::{LocalError, io};

/// Largest message the sink stores.
const SINK_MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Longest command line the sink reads.
const SINK_MAX_LINE: usize = 4096;
/// Sink idle timeout per read.
const SINK_READ_TIMEOUT: Duration = Duration::from_secs(300);

/// An SMTP server on loopback that writes every message it accepts into a directory.
#[derive(Debug)]
pub struct Sink {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where messages go.
    pub dir: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    /// Starts the sink on `bind` (port 0: any free port), storing into `dir`.
    pub async fn start(bind: SocketAddr, dir: PathBuf) -> Result<Self, LocalError> {
        mkdir(&dir)?;
        let listener = TcpListener::bind(bind)
            .await
            .map_err(io("cannot listen on", bind))?;
        let addr = listener
            .local_addr()
            .map_err(io("cannot listen on", bind))?;
        let counter = Arc::new(AtomicU64::new(0));
        let d = dir.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let d = d.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    if let Err(e) = sink_session(stream, &d, &counter).await {
                        tracing::debug!(error = %e, "sink session ended");
                    }
                });
            }
        });
        Ok(Self { addr, dir, task })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    buf.clear();
    let n = tokio::time::timeout(
        SINK_READ_TIMEOUT,
        r.take(u64::try_from(max).unwrap_or(u64::MAX))
            .read_until(b'\n', buf),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(n > 0)
}

fn angle(arg: &str) -> String {
    let a = arg.trim();
    match (a.find('<'), a.find('>')) {
        (Some(s), Some(e)) if e > s => a[s + 1..e].to_string(),
        _ => a.split_whitespace().next().unwrap_or("").to_string(),
    }
}

async fn sink_session(stream: TcpStream, dir: &Path, counter: &AtomicU64) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 mailcluster-local-sink ESMTP\r\n").await?;
    let mut line = Vec::new();
    let mut from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        if !read_line(&mut r, &mut line, SINK_MAX_LINE).await? {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        let upper = text.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-mailcluster-local-sink\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 SIZE 67108864\r\n"
        } else if upper.starts_with("HELO") {
            b"250 mailcluster-local-sink\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            from = Some(angle(&text[10..]));
            rcpts.clear();
            b"250 2.1.0 ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            if from.is_none() {
                b"503 5.5.1 MAIL first\r\n"
            } else {
                rcpts.push(angle(&text[8..]));
                b"250 2.1.5 ok\r\n"
            }
        } else if upper == "DATA" {
            if from.is_none() || rcpts.is_empty() {
                b"503 5.5.1 MAIL and RCPT first\r\n"
            } else {
                w.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                let mut msg = Vec::new();
                let mut too_big = false;
                loop {
                    if !read_line(&mut r, &mut line, SINK_MAX_MESSAGE).await? {
                        return Ok(());
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                    let body = if line.starts_with(b".") {
                        &line[1..]
                    } else {
                        &line[..]
                    };
                    if msg.len() + body.len() > SINK_MAX_MESSAGE {
                        too_big = true;
                    } else {
                        msg.extend_from_slice(body);
                    }
                }
                let envelope_from = from.take().unwrap_or_default();
                let envelope_to = std::mem::take(&mut rcpts);
                if too_big {
                    b"552 5.3.4 message too big\r\n"
                } else {
                    store(dir, counter, &envelope_from, &envelope_to, &msg).await?;
                    b"250 2.0.0 stored\r\n"
                }
            }
        } else if upper == "RSET" {
            from = None;
            rcpts.clear();
            b"250 2.0.0 ok\r\n"
        } else if upper == "NOOP" {
            b"250 2.0.0 ok\r\n"
        } else if upper == "QUIT" {
            w.write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else {
            b"502 5.5.2 not implemented\r\n"
        };
        w.write_all(reply).await?;
    }
}

async fn store(
    dir: &Path,
    counter: &AtomicU64,
    from: &str,
    to: &[String],
    msg: &[u8],
) -> std::io::Result<()> {
    let n = counter.fetch_add(1, Ordering::SeqCst);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let name = format!("{stamp}-{}-{n}.eml", std::process::id());
    let mut data = format!(
        "X-Mailcluster-Sink-From: <{from}>\r\nX-Mailcluster-Sink-To: {}\r\n",
        to.iter()
            .map(|t| format!("<{t}>"))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .into_bytes();
    data.extend_from_slice(msg);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = tokio::fs::File::create(&tmp).await?;
    f.write_all(&data).await?;
    f.sync_all().await?;
    drop(f);
    tokio::fs::rename(&tmp, dir.join(name)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sink_stores_messages_as_eml() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::start("127.0.0.1:0".parse().unwrap(), dir.path().join("sink"))
            .await
            .unwrap();
        let s = TcpStream::connect(sink.addr).await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("220"));
        w.write_all(b"EHLO t\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
            .await
            .unwrap();
        let mut replies = Vec::new();
        while replies.len() < 7 {
            line.clear();
            r.read_line(&mut line).await.unwrap();
            replies.push(line.clone());
        }
        assert!(replies[6].starts_with("354"), "{replies:?}");
        w.write_all(b"Message-ID: <m1@x.test>\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
            .await
            .unwrap();
        line.clear();
        r.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("250"), "{line}");
        let files: Vec<_> = std::fs::read_dir(&sink.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        assert_eq!(files.len(), 1);
        let text = std::fs::read_to_string(&files[0]).unwrap();
        assert!(text.contains("Message-ID: <m1@x.test>"), "{text}");
        assert!(text.contains("\r\n.dot\r\n"), "dot-unstuffed: {text}");
        assert!(text.contains("X-Mailcluster-Sink-To: <b@y.test>"), "{text}");
    }
}
