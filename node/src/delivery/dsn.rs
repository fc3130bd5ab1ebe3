//! Delivery status notifications (RFC 3464 `multipart/report`), built purely from the
//! envelope, the failed recipients and the original message.

use std::fmt::Write as _;

/// What the report says happened to the recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Delivery failed for good.
    Failed,
    /// Still trying (a delay warning).
    Delayed,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
        }
    }
}

/// One recipient in a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnRecipient {
    /// The recipient address.
    pub address: String,
    /// Enhanced status code, e.g. `5.1.1`.
    pub status: String,
    /// Diagnostic (the next hop's reply, or our reason).
    pub diagnostic: String,
    /// The next hop that answered, if any.
    pub remote_mta: Option<String>,
}

/// Everything a report needs.
#[derive(Debug, Clone)]
pub struct DsnInput<'a> {
    /// Our host name (Reporting-MTA, From).
    pub reporting_mta: &'a str,
    /// Queue id of the original message.
    pub queue_id: &'a str,
    /// Envelope sender of the original (the report's recipient).
    pub sender: &'a str,
    /// Arrival time, RFC 5322 date.
    pub arrival_date: &'a str,
    /// Now, RFC 5322 date.
    pub date: &'a str,
    /// Failed or delayed.
    pub action: Action,
    /// Recipients reported.
    pub recipients: &'a [DsnRecipient],
    /// The original message (its header section is returned).
    pub original: &'a [u8],
    /// A unique token for the boundary and Message-ID.
    pub unique: &'a str,
}

/// The header section of a message (up to the first empty line), without it.
pub fn header_section(msg: &[u8]) -> &[u8] {
    let mut i = 0;
    while i < msg.len() {
        let end = msg[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(msg.len(), |p| i + p + 1);
        let line = &msg[i..end];
        if line == b"\r\n" || line == b"\n" {
            return &msg[..i];
        }
        i = end;
    }
    msg
}

fn header_lines(msg: &[u8]) -> impl Iterator<Item = &[u8]> {
    header_section(msg)
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty() && !l.starts_with(b" ") && !l.starts_with(b"\t"))
}

fn has_prefix_ci(line: &[u8], name: &str) -> bool {
    line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
}

/// Number of `Received:` headers (the hop count).
pub fn received_count(msg: &[u8]) -> usize {
    header_lines(msg)
        .filter(|l| has_prefix_ci(l, "received:"))
        .count()
}

/// Whether the message is itself a delivery report (never answered with another one).
pub fn is_report(msg: &[u8]) -> bool {
    header_lines(msg).any(|l| {
        has_prefix_ci(l, "content-type:")
            && String::from_utf8_lossy(l)
                .to_ascii_lowercase()
                .contains("report-type=delivery-status")
    })
}

/// The enhanced status code of a reply text (`5.1.1 User unknown`), or one derived from
/// the reply code.
pub fn status_of(code: u16, text: &str) -> String {
    if let Some(enhanced) = crate::smtp::reply::leading_enhanced(text) {
        return enhanced.to_owned();
    }
    match code / 100 {
        5 => "5.0.0".into(),
        4 => "4.0.0".into(),
        _ => "2.0.0".into(),
    }
}

/// A recorded deferral (`"host (address): 451 4.3.0 text"` for a next hop's reply, or a reply
/// of our own such as `"451 4.4.1 no next hop ..."`) as what a delay report needs: the remote
/// host if any, the reply itself, and its enhanced status (`4.0.0` when it has none).
pub fn deferral_parts(last: &str) -> (Option<String>, String, String) {
    let remote_host = last
        .split_once("): ")
        .and_then(|(head, reply)| Some((head.split_once(" (")?.0, reply)))
        .filter(|(host, _)| !host.is_empty() && !host.contains(char::is_whitespace));
    let (remote, reply) = match remote_host {
        Some((host, reply)) => (Some(host.to_owned()), reply),
        None => (None, last),
    };
    let mut words = reply.split_whitespace();
    let status = match (words.next(), words.next()) {
        (Some(code), rest) if code.len() == 3 && code.starts_with('4') => {
            let code = code.parse::<u16>().unwrap_or(400);
            status_of(code, rest.unwrap_or(""))
        }
        _ => "4.0.0".to_owned(),
    };
    (remote, reply.to_owned(), status)
}

fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Build the complete report message (headers and body, CRLF line ends).
pub fn build(d: &DsnInput<'_>) -> Vec<u8> {
    let boundary = format!("{}/{}", d.unique, d.reporting_mta);
    let (subject, human) = match d.action {
        Action::Failed => (
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to one or more recipients.\r\n\
             It has been removed from the queue. The reasons are below.",
        ),
        Action::Delayed => (
            "Delayed Mail (still being retried)",
            "Your message has not yet been delivered to one or more recipients.\r\n\
             Delivery is still being attempted; you do not need to resend it.",
        ),
    };
    let mut s = String::new();
    let _ = write!(
        s,
        "From: Mail Delivery System <MAILER-DAEMON@{mta}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <{unique}.dsn@{mta}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         This is the mail system at host {mta}.\r\n\r\n{human}\r\n\r\n",
        mta = d.reporting_mta,
        to = d.sender,
        date = d.date,
        unique = d.unique,
    );
    for r in d.recipients {
        let _ = write!(s, "<{}>: {}\r\n", r.address, clean(&r.diagnostic));
    }
    let _ = write!(
        s,
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {mta}\r\n\
         X-Mailnode-Queue-ID: {id}\r\n\
         Arrival-Date: {arrival}\r\n",
        mta = d.reporting_mta,
        id = d.queue_id,
        arrival = d.arrival_date,
    );
    for r in d.recipients {
        let _ = write!(
            s,
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: {}\r\nStatus: {}\r\n",
            r.address,
            d.action.as_str(),
            r.status
        );
        if let Some(m) = &r.remote_mta {
            let _ = write!(s, "Remote-MTA: dns; {m}\r\n");
        }
        let _ = write!(s, "Diagnostic-Code: smtp; {}\r\n", clean(&r.diagnostic));
    }
    let _ = write!(
        s,
        "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    );
    let mut out = s.into_bytes();
    let headers = header_section(d.original);
    out.extend_from_slice(headers);
    if !headers.ends_with(b"\n") && !headers.is_empty() {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferral_parts_of_remote_and_own_replies() {
        assert_eq!(
            deferral_parts("mx.example (192.0.2.1:25): 451 4.3.0 try later"),
            (
                Some("mx.example".to_owned()),
                "451 4.3.0 try later".to_owned(),
                "4.3.0".to_owned()
            )
        );
        assert_eq!(
            deferral_parts("451 4.4.1 no next hop accepted the message; last: x (y): z"),
            (
                None,
                "451 4.4.1 no next hop accepted the message; last: x (y): z".to_owned(),
                "4.4.1".to_owned()
            )
        );
        assert_eq!(deferral_parts("mx (a): 421 closing").2, "4.0.0");
        assert_eq!(deferral_parts("not yet delivered").2, "4.0.0");
    }

    #[test]
    fn report_has_parts_and_only_the_failed_recipient() {
        let orig = b"Received: from a\r\nReceived: from b\r\nMessage-ID: <m1@x>\r\nSubject: hi\r\n\r\nsecret body\r\n";
        assert_eq!(received_count(orig), 2);
        assert!(!is_report(orig));
        let rcpts = [DsnRecipient {
            address: "bad@d.example".into(),
            status: status_of(550, "5.1.1 no such user"),
            diagnostic: "550 5.1.1 no such user".into(),
            remote_mta: Some("mx.d.example".into()),
        }];
        let msg = build(&DsnInput {
            reporting_mta: "relay.example",
            queue_id: "Q1",
            sender: "s@a.example",
            arrival_date: "Mon, 1 Jan 2024 00:00:00 +0000",
            date: "Mon, 1 Jan 2024 01:00:00 +0000",
            action: Action::Failed,
            recipients: &rcpts,
            original: orig,
            unique: "U1",
        });
        let text = String::from_utf8(msg.clone()).unwrap();
        assert!(text.contains("report-type=delivery-status"));
        assert!(
            text.contains(
                "Final-Recipient: rfc822; bad@d.example\r\nAction: failed\r\nStatus: 5.1.1"
            )
        );
        assert!(text.contains("Message-ID: <m1@x>"));
        assert!(!text.contains("secret body"));
        assert!(text.ends_with("--U1/relay.example--\r\n"));
        assert!(is_report(&msg));
        assert_eq!(status_of(451, "try later"), "4.0.0");
        assert_eq!(status_of(550, "5.7.1 denied"), "5.7.1");
        assert_eq!(status_of(550, "5.x.1 denied"), "5.0.0");
    }
}
