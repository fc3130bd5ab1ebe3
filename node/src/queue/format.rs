//! On-disk format of a queued message: one file holding the message, the envelope and a
//! footer with lengths and a SHA-256 over both, so recovery can tell a complete file from a
//! partial one without trusting the file system's ordering.
//!
//! ```text
//! [message bytes: Received header + content]
//! [envelope JSON]
//! "\nMNQ1 " <message length, 16 hex> " " <envelope length, 8 hex> " " <sha256 hex> "\n"
//! ```

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Footer length in bytes.
pub const FOOTER_LEN: usize = 97;

/// The envelope version this mailnode writes and reads. A file of another version is kept
/// (never removed as invalid) but not delivered by this version.
pub const ENVELOPE_VERSION: u32 = 1;

/// Immutable facts about a queued message. Mutable delivery progress (attempts, next retry,
/// per-recipient status) lives in a separate [`DeliveryState`] file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Format version.
    pub version: u32,
    /// Queue id.
    pub id: String,
    /// Sender; empty for the null reverse-path.
    pub sender: String,
    /// Recipients as accepted.
    pub recipients: Vec<String>,
    /// Client address (after PROXY resolution).
    pub client: SocketAddr,
    /// Proxy the client came through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<SocketAddr>,
    /// HELO/EHLO name.
    pub helo: String,
    /// Authenticated user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// Listener name.
    pub listener: String,
    /// TLS was used.
    pub tls: bool,
    /// SMTPUTF8 requested.
    pub smtputf8: bool,
    /// BODY=8BITMIME.
    pub eight_bit: bool,
    /// Receive time, Unix seconds.
    pub received_at: i64,
    /// Message size in bytes (Received header included).
    pub size: u64,
    /// Delivery attempts when the message was queued (0; see [`DeliveryState`]).
    pub attempts: u32,
}

/// Status of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RecipientStatus {
    /// Not yet delivered.
    Pending,
    /// Temporarily failed; will be retried.
    Deferred,
    /// Delivered.
    Delivered,
    /// Permanently failed (bounced).
    Failed,
}

impl RecipientStatus {
    /// Still to be delivered: pending or deferred.
    pub fn is_open(self) -> bool {
        matches!(self, RecipientStatus::Pending | RecipientStatus::Deferred)
    }
}

/// Per-recipient delivery progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecipientState {
    /// Recipient.
    pub address: String,
    pub status: RecipientStatus,
    /// Last reply from the next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
}

/// Mutable delivery progress of a message (written by the delivery engine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryState {
    /// Attempts so far.
    pub attempts: u32,
    /// Next attempt, Unix seconds.
    pub next_attempt_at: i64,
    pub recipients: Vec<RecipientState>,
    /// A delay warning was sent to the sender.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delay_warned: bool,
}

impl DeliveryState {
    /// Recipients still to be delivered.
    pub fn open_recipients(&self) -> impl Iterator<Item = &RecipientState> {
        self.recipients.iter().filter(|r| r.status.is_open())
    }

    /// Positions of the recipients still to be delivered.
    pub fn open_indices(&self) -> Vec<usize> {
        (0..self.recipients.len())
            .filter(|&i| self.recipients[i].status.is_open())
            .collect()
    }

    /// The state of a freshly queued message.
    pub fn initial(env: &Envelope) -> Self {
        Self {
            attempts: env.attempts,
            next_attempt_at: env.received_at,
            recipients: env
                .recipients
                .iter()
                .map(|r| RecipientState {
                    address: r.clone(),
                    status: RecipientStatus::Pending,
                    last_reply: None,
                })
                .collect(),
            delay_warned: false,
        }
    }
}

/// Why a file is not a valid queued message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Shorter than the footer, or lengths do not add up (partial write).
    #[error("truncated or partial file")]
    Truncated,
    /// Footer not recognized.
    #[error("bad footer")]
    BadFooter,
    /// Hash mismatch (partial or corrupted content).
    #[error("checksum mismatch")]
    Checksum,
    /// Envelope JSON invalid.
    #[error("bad envelope: {0}")]
    Envelope(String),
    /// A complete file whose envelope this version does not read (written by another
    /// mailnode version).
    #[error(
        "envelope version {found}, but this mailnode reads version {ENVELOPE_VERSION}: run the mailnode version that wrote it to deliver it"
    )]
    Version {
        /// The version in the file.
        found: u32,
    },
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The SHA-256 and length of a message's bytes, fed as they are written, so a file can be
/// written in pieces (content streamed as it arrives) and still end with the same footer.
#[derive(Debug, Clone, Default)]
pub struct MessageDigest {
    hash: Sha256,
    len: usize,
}

impl MessageDigest {
    /// Add message bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hash.update(bytes);
        self.len += bytes.len();
    }

    /// Message bytes so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No message bytes yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What follows the message bytes in the file: the envelope JSON and the footer.
    pub fn trailer(mut self, env: &Envelope) -> Result<Vec<u8>, serde_json::Error> {
        let env_json = serde_json::to_vec(env)?;
        self.hash.update(&env_json);
        let footer = format!(
            "\nMNQ1 {:016x} {:08x} {}\n",
            self.len,
            env_json.len(),
            hex(&self.hash.finalize())
        );
        let mut out = env_json;
        out.extend_from_slice(footer.as_bytes());
        Ok(out)
    }
}

/// What follows the message parts in the file (envelope JSON and footer), so a writer can
/// write the parts as they are instead of copying them into one buffer first.
pub fn trailer(env: &Envelope, parts: &[&[u8]]) -> Result<Vec<u8>, serde_json::Error> {
    let mut d = MessageDigest::default();
    for p in parts {
        d.update(p);
    }
    d.trailer(env)
}

/// Decode and verify a message file. Returns the envelope and the message byte range.
pub fn decode(file: &[u8]) -> Result<(Envelope, std::ops::Range<usize>), FormatError> {
    if file.len() < FOOTER_LEN {
        return Err(FormatError::Truncated);
    }
    let footer = &file[file.len() - FOOTER_LEN..];
    let text = std::str::from_utf8(footer).map_err(|_| FormatError::BadFooter)?;
    let text = text.strip_prefix("\nMNQ1 ").ok_or(FormatError::BadFooter)?;
    let text = text.strip_suffix('\n').ok_or(FormatError::BadFooter)?;
    let mut it = text.split(' ');
    let (Some(m), Some(e), Some(sum), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(FormatError::BadFooter);
    };
    let msg_len = usize::from_str_radix(m, 16).map_err(|_| FormatError::BadFooter)?;
    let env_len = usize::from_str_radix(e, 16).map_err(|_| FormatError::BadFooter)?;
    if msg_len
        .checked_add(env_len)
        .and_then(|x| x.checked_add(FOOTER_LEN))
        != Some(file.len())
    {
        return Err(FormatError::Truncated);
    }
    let content = &file[..msg_len + env_len];
    if hex(&Sha256::digest(content)) != sum {
        return Err(FormatError::Checksum);
    }
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let json = &content[msg_len..];
    let found = serde_json::from_slice::<Versioned>(json)
        .map_err(|e| FormatError::Envelope(e.to_string()))?
        .version;
    if found != ENVELOPE_VERSION {
        return Err(FormatError::Version { found });
    }
    let env: Envelope =
        serde_json::from_slice(json).map_err(|e| FormatError::Envelope(e.to_string()))?;
    Ok((env, 0..msg_len))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Encode a message file from the message parts (written in order) and the envelope.
    pub fn encode(env: &Envelope, parts: &[&[u8]]) -> Result<Vec<u8>, serde_json::Error> {
        let trailer = trailer(env, parts)?;
        let mut out = parts.concat();
        out.extend_from_slice(&trailer);
        Ok(out)
    }

    pub(crate) fn sample() -> Envelope {
        Envelope {
            version: ENVELOPE_VERSION,
            id: "ABC".into(),
            sender: "a@b.example".into(),
            recipients: vec!["c@d.example".into()],
            client: "127.0.0.2:1234".parse().unwrap(),
            proxy: None,
            helo: "client".into(),
            auth_user: None,
            listener: "l".into(),
            tls: false,
            smtputf8: false,
            eight_bit: false,
            received_at: 1,
            size: 5,
            attempts: 0,
        }
    }

    #[test]
    fn roundtrip_and_every_truncation_fails() {
        let env = sample();
        let file = encode(&env, &[b"Rec\r\n", b"hello\r\n"]).unwrap();
        let (e, r) = decode(&file).unwrap();
        assert_eq!(e, env);
        assert_eq!(&file[r], b"Rec\r\nhello\r\n");
        for n in 0..file.len() {
            assert!(decode(&file[..n]).is_err(), "prefix {n} accepted");
        }
        let mut bad = file.clone();
        bad[2] ^= 1;
        assert_eq!(decode(&bad).unwrap_err(), FormatError::Checksum);
    }

    /// A complete file with `json` as its envelope.
    pub(crate) fn raw_file(msg: &[u8], json: &str) -> Vec<u8> {
        let mut h = Sha256::new();
        h.update(msg);
        h.update(json.as_bytes());
        let footer = format!(
            "\nMNQ1 {:016x} {:08x} {}\n",
            msg.len(),
            json.len(),
            hex(&h.finalize())
        );
        [msg, json.as_bytes(), footer.as_bytes()].concat()
    }

    #[test]
    fn another_envelope_version_is_named_not_taken_for_damage() {
        let mut env = sample();
        env.version = 2;
        let file = encode(&env, &[b"hello\r\n"]).unwrap();
        assert_eq!(
            decode(&file).unwrap_err(),
            FormatError::Version { found: 2 }
        );
        // A newer version may change the envelope's shape: the version is read first.
        let file = raw_file(
            b"hello\r\n",
            r#"{"version":3,"recipients":{"new":"shape"}}"#,
        );
        let err = decode(&file).unwrap_err();
        assert_eq!(err, FormatError::Version { found: 3 });
        let text = err.to_string();
        assert!(
            text.contains("version 3") && text.contains("reads version 1"),
            "{text}"
        );
    }
}
