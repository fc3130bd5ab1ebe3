//! Message content: the DATA decoder (dot-unstuffing, end-of-data detection), its sending
//! side ([`dot_stuff`]) and the checks shared with BDAT (size, line length, line endings).
//!
//! # Bare CR and bare LF
//! Only `CRLF . CRLF` ends DATA. A bare LF or a bare CR (one not part of a CRLF pair) anywhere
//! in the content makes the message invalid: the decoder keeps reading until the real end of
//! data and the session then refuses the whole message with `554 5.6.0`, queueing nothing.
//! This closes SMTP smuggling (a second message hidden behind `LF . LF` or `CR . CR`, which
//! another MTA might treat as end of data) instead of guessing what the client meant; it is the
//! behaviour Postfix adopted (`smtpd_forbid_bare_newline`). Lines longer than 998 octets plus
//! CRLF (RFC 5321 section 4.5.3.1.6) are refused the same way.

use std::sync::Arc;

use crate::admission::{ContentMemory, Hold};
use crate::rewrite::header::{HeaderEdit, MAX_HEADER_SECTION, section_end};

/// Longest allowed line without its CRLF.
pub const MAX_LINE: usize = 998;

/// What was wrong with a body, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BodyFlaws {
    /// Larger than the limit.
    pub too_big: bool,
    /// A bare CR or LF was seen.
    pub bare_newline: bool,
    /// A line was longer than [`MAX_LINE`].
    pub long_line: bool,
}

impl BodyFlaws {
    /// No flaw.
    pub fn is_clean(&self) -> bool {
        !self.too_big && !self.bare_newline && !self.long_line
    }
}

/// Collects body bytes, enforcing size and checking line endings and lengths.
///
/// With a [`ContentMemory`], kept bytes are reserved from its budget, and once they reach its
/// `spill_at` (or the budget has no room for them) they are due to go to the message's queue
/// file: the reader takes them with [`BodyCheck::take_spill`] after each piece of input, so a
/// session never holds more than `spill_at` plus one piece. A flawed body is no longer kept:
/// it will be refused.
#[derive(Debug)]
pub struct BodyCheck {
    body: Vec<u8>,
    size: u64,
    max: u64,
    prev_cr: bool,
    line_len: usize,
    flaws: BodyFlaws,
    memory: Option<ContentMemory>,
    /// Bytes of the budget held for `body`.
    held: u64,
    spill_due: bool,
    /// The listener's header edit, until the header section has been seen.
    header: Option<PendingHeader>,
}

/// A header edit waiting for the end of the header section, which stays in memory (and off
/// the queue file) until then, up to [`MAX_HEADER_SECTION`].
#[derive(Debug)]
struct PendingHeader {
    edit: Arc<HeaderEdit>,
    /// Bytes of the body already searched for the empty line.
    scanned: usize,
}

impl BodyCheck {
    /// A collector for at most `max` bytes, kept in memory.
    pub fn new(max: u64) -> Self {
        Self::with_memory(max, None)
    }

    /// A collector for at most `max` bytes whose kept bytes are reserved from `memory`'s
    /// budget and handed out for the queue file beyond its threshold.
    pub fn with_memory(max: u64, memory: Option<ContentMemory>) -> Self {
        Self {
            body: Vec::with_capacity(16 * 1024),
            size: 0,
            max,
            prev_cr: false,
            line_len: 0,
            flaws: BodyFlaws::default(),
            memory,
            held: 0,
            spill_due: false,
            header: None,
        }
    }

    /// Apply `edit` to the header section (sender rewriting, Received removal).
    pub fn with_header_edit(mut self, edit: Option<Arc<HeaderEdit>>) -> Self {
        self.header = edit.map(|edit| PendingHeader { edit, scanned: 0 });
        self
    }

    /// Edits the header section once its end is in the body, or gives up when it is longer
    /// than [`MAX_HEADER_SECTION`]. At the end of the content (`done`), all of it is header.
    fn edit_header(&mut self, done: bool) {
        let Some(p) = &mut self.header else {
            return;
        };
        let end = match section_end(&self.body, p.scanned.saturating_sub(3)) {
            Some(end) => end,
            None if done => self.body.len(),
            None if self.body.len() > MAX_HEADER_SECTION => {
                tracing::warn!(
                    bytes = self.body.len(),
                    "header section over {MAX_HEADER_SECTION} bytes: not rewritten"
                );
                self.header = None;
                return;
            }
            None => {
                p.scanned = self.body.len();
                return;
            }
        };
        if end <= MAX_HEADER_SECTION
            && let Some(edited) = p.edit.apply(&self.body[..end])
        {
            self.body.splice(..end, edited.section);
        }
        self.header = None;
    }

    fn give_back(&mut self) {
        if let Some(m) = &self.memory {
            m.budget.release(std::mem::take(&mut self.held));
        }
    }

    fn keep(&mut self, data: &[u8]) {
        if let Some(m) = &self.memory {
            let n = data.len() as u64;
            if m.budget.try_reserve(n) {
                self.held += n;
            } else {
                // Kept only until the reader takes it, right after this piece.
                self.spill_due = true;
            }
            if self.body.len() as u64 + n >= m.spill_at {
                self.spill_due = true;
            }
        }
        self.body.extend_from_slice(data);
    }

    /// Add content bytes. Runs of ordinary bytes are found with a vectorized search for the
    /// next CR or LF; only those two are looked at one by one.
    pub fn push(&mut self, data: &[u8]) {
        let mut i = 0;
        while i < data.len() {
            let run = memchr::memchr2(b'\r', b'\n', &data[i..]).unwrap_or(data.len() - i);
            if run > 0 {
                if self.prev_cr {
                    self.flaws.bare_newline = true;
                    self.prev_cr = false;
                }
                self.line_len += run;
                if self.line_len > MAX_LINE {
                    self.flaws.long_line = true;
                }
                i += run;
                continue;
            }
            if data[i] == b'\n' {
                if !self.prev_cr {
                    self.flaws.bare_newline = true;
                }
                self.line_len = 0;
                self.prev_cr = false;
            } else {
                if self.prev_cr {
                    self.flaws.bare_newline = true;
                }
                self.prev_cr = true;
            }
            i += 1;
        }
        self.size = self.size.saturating_add(data.len() as u64);
        if self.size > self.max {
            self.flaws.too_big = true;
        }
        if self.flaws.is_clean() {
            self.keep(data);
            self.edit_header(false);
        } else if !self.body.is_empty() || self.held > 0 {
            self.body = Vec::new();
            self.spill_due = false;
            self.give_back();
        }
    }

    /// Bytes seen so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The kept bytes, when they are due to go to the queue file (see [`BodyCheck`]); their
    /// budget is given back.
    pub fn take_spill(&mut self) -> Option<Vec<u8>> {
        if self.header.is_some() || !std::mem::take(&mut self.spill_due) {
            return None;
        }
        self.give_back();
        Some(std::mem::take(&mut self.body))
    }

    /// Finish: the body and its flaws, the budget given back. A trailing lone CR counts as
    /// bare.
    pub fn finish(self) -> (Vec<u8>, BodyFlaws) {
        let (body, flaws, _) = self.finish_held();
        (body, flaws)
    }

    /// Finish, and keep the body's bytes counted against the budget in the returned
    /// [`Hold`] until it is dropped (after the message is queued): every byte of content in
    /// memory counts, not only what is still being received.
    pub fn finish_held(mut self) -> (Vec<u8>, BodyFlaws, Option<Hold>) {
        if self.prev_cr {
            self.flaws.bare_newline = true;
        }
        if self.flaws.is_clean() {
            self.edit_header(true);
        } else {
            self.body = Vec::new();
            self.give_back();
        }
        let hold = self
            .memory
            .as_ref()
            .map(|m| Hold::new(Arc::clone(&m.budget), std::mem::take(&mut self.held)));
        (std::mem::take(&mut self.body), self.flaws, hold)
    }
}

impl Drop for BodyCheck {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Bol,
    Text,
    Cr,
    Dot,
    DotCr,
}

/// Streaming DATA decoder: feed raw bytes after the 354 reply; it removes dot-stuffing and finds
/// `CRLF . CRLF`.
#[derive(Debug)]
pub struct DataDecoder {
    st: St,
    out: Vec<u8>,
    check: BodyCheck,
}

impl DataDecoder {
    /// A decoder for a message of at most `max` bytes.
    pub fn new(max: u64) -> Self {
        Self::with_memory(max, None)
    }

    /// A decoder whose kept content is reserved from `memory`'s budget and handed out for the
    /// queue file beyond its threshold (see [`BodyCheck`]).
    pub fn with_memory(max: u64, memory: Option<ContentMemory>) -> Self {
        Self {
            st: St::Bol,
            out: Vec::with_capacity(8192),
            check: BodyCheck::with_memory(max, memory),
        }
    }

    /// Apply `edit` to the header section (see [`BodyCheck::with_header_edit`]).
    pub fn with_header_edit(mut self, edit: Option<Arc<HeaderEdit>>) -> Self {
        self.check = self.check.with_header_edit(edit);
        self
    }

    /// Feed bytes. Returns `Some(n)` when the end of data was found after `n` bytes of `input`
    /// (the rest belongs to the next command); `None` when all of `input` was consumed.
    pub fn feed(&mut self, input: &[u8]) -> Option<usize> {
        let mut end = None;
        let mut i = 0;
        while i < input.len() {
            if self.st == St::Text {
                // Ordinary bytes up to the next CR pass through as they are.
                let run = memchr::memchr(b'\r', &input[i..]).unwrap_or(input.len() - i);
                self.out.extend_from_slice(&input[i..i + run]);
                i += run;
                if i == input.len() {
                    break;
                }
            }
            let b = input[i];
            i += 1;
            let mut st = self.st;
            if st == St::Bol {
                if b == b'.' {
                    self.st = St::Dot;
                    continue;
                }
                st = St::Text;
            }
            if st == St::Dot {
                if b == b'\r' {
                    self.st = St::DotCr;
                    continue;
                }
                st = St::Text; // stuffed dot dropped
            }
            if st == St::DotCr {
                if b == b'\n' {
                    end = Some(i);
                    break;
                }
                st = St::Cr;
            }
            if st == St::Cr {
                if b == b'\n' {
                    self.out.extend_from_slice(b"\r\n");
                    self.st = St::Bol;
                    continue;
                }
                self.out.push(b'\r');
                if b == b'\r' {
                    self.st = St::Cr;
                    continue;
                }
                st = St::Text;
            }
            // Text
            debug_assert_eq!(st, St::Text);
            if b == b'\r' {
                self.st = St::Cr;
            } else {
                self.out.push(b);
                self.st = St::Text;
            }
        }
        if !self.out.is_empty() {
            self.check.push(&self.out);
            self.out.clear();
        }
        end
    }

    /// Bytes of content so far.
    pub fn size(&self) -> u64 {
        self.check.size()
    }

    /// Content due to go to the queue file (see [`BodyCheck::take_spill`]).
    pub fn take_spill(&mut self) -> Option<Vec<u8>> {
        self.check.take_spill()
    }

    /// The decoded body and its flaws (call after `feed` returned `Some`).
    pub fn finish(self) -> (Vec<u8>, BodyFlaws) {
        self.check.finish()
    }

    /// [`DataDecoder::finish`], with the body's bytes still counted against the budget in the
    /// returned [`Hold`] (see [`BodyCheck::finish_held`]).
    pub fn finish_held(self) -> (Vec<u8>, BodyFlaws, Option<Hold>) {
        self.check.finish_held()
    }
}

/// The sending side of [`DataDecoder`]: the DATA payload of `msg`, dot-stuffed, with CRLF
/// line ends kept (a lone LF at the very end made CRLF) and `CRLF.CRLF` at the end.
pub fn dot_stuff(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 64 + 5);
    let mut at_line_start = true;
    for &b in msg {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        if out.ends_with(b"\n") {
            out.pop();
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::MemoryBudget;

    fn decode(input: &[u8], max: u64) -> (Vec<u8>, BodyFlaws, Option<usize>) {
        let mut d = DataDecoder::new(max);
        let end = d.feed(input);
        let (b, f) = d.finish();
        (b, f, end)
    }

    #[test]
    fn end_and_unstuffing() {
        let (b, f, end) = decode(b"Subject: x\r\n\r\n..hi\r\n.\r\nQUIT\r\n", 1000);
        assert_eq!(b, b"Subject: x\r\n\r\n.hi\r\n");
        assert!(f.is_clean());
        assert_eq!(end, Some(23));
        let (b, _, end) = decode(b".\r\n", 1000);
        assert!(b.is_empty());
        assert_eq!(end, Some(3));
    }

    #[test]
    fn byte_by_byte_same_result() {
        let input = b"a\r\n..b\r\n.c\r\n\r\n.\r\nrest";
        let mut d = DataDecoder::new(1000);
        let mut end = None;
        for (i, b) in input.iter().enumerate() {
            if let Some(n) = d.feed(std::slice::from_ref(b)) {
                end = Some(i + n);
                break;
            }
        }
        let (b, f) = d.finish();
        assert_eq!(b, b"a\r\n.b\r\nc\r\n\r\n");
        assert!(f.is_clean());
        assert_eq!(end, Some(input.len() - 4));
    }

    #[test]
    fn smuggling_is_not_end() {
        // LF.LF and CR.CR never end the data; they make it flawed.
        let (_, f, end) = decode(b"a\n.\nMAIL FROM:<x@y>\r\n", 1000);
        assert_eq!(end, None);
        assert!(f.bare_newline);
        let (_, f, end) = decode(b"a\r\n.\nb\r\n.\r\n", 1000);
        assert!(end.is_some());
        assert!(f.bare_newline);
        let (_, f, end) = decode(b"a\r.\rb\r\n.\r\n", 1000);
        assert!(end.is_some());
        assert!(f.bare_newline);
    }

    #[test]
    fn limits() {
        let (b, f, _) = decode(b"0123456789\r\n.\r\n", 5);
        assert!(f.too_big);
        assert!(b.is_empty());
        let long = [b"x".repeat(999), b"\r\n.\r\n".to_vec()].concat();
        assert!(decode(&long, 10_000).1.long_line);
        let ok = [b"x".repeat(998), b"\r\n.\r\n".to_vec()].concat();
        assert!(decode(&ok, 10_000).1.is_clean());
    }

    #[test]
    fn budget_is_reserved_while_receiving_and_given_back() {
        let budget = MemoryBudget::new(100);
        let memory = |spill_at| {
            Some(ContentMemory {
                budget: Arc::clone(&budget),
                spill_at,
            })
        };
        let mut fits = DataDecoder::with_memory(1000, memory(1000));
        assert_eq!(fits.feed(b"0123456789\r\n"), None);
        assert_eq!(fits.take_spill(), None);
        assert_eq!(budget.used(), 12);
        // Content the budget has no room for is due for the queue file at once.
        let mut over = DataDecoder::with_memory(1000, memory(1000));
        assert_eq!(over.feed("y".repeat(95).as_bytes()), None);
        assert_eq!(over.take_spill(), Some(b"y".repeat(95)));
        assert_eq!(budget.used(), 12, "taken content holds nothing");
        assert!(over.feed(b"\r\n.\r\n").is_some());
        let (tail, flaws) = over.finish();
        assert!(flaws.is_clean());
        assert_eq!(tail, b"\r\n");
        assert!(fits.feed(b".\r\n").is_some());
        let (body, flaws) = fits.finish();
        assert!(flaws.is_clean());
        assert_eq!(body, b"0123456789\r\n");
        assert_eq!(budget.used(), 0);
        let mut dropped = DataDecoder::with_memory(1000, memory(1000));
        dropped.feed(b"abc\r\n");
        drop(dropped);
        assert_eq!(
            budget.used(),
            0,
            "a session that ends mid-DATA gives its bytes back"
        );
    }

    #[test]
    fn content_past_the_threshold_is_handed_out_in_pieces_and_adds_up() {
        let budget = MemoryBudget::new(1 << 20);
        let mut dec = DataDecoder::with_memory(
            1 << 20,
            Some(ContentMemory {
                budget: Arc::clone(&budget),
                spill_at: 100,
            }),
        );
        let line = format!("{}\r\n", "z".repeat(38));
        let mut spilled = Vec::new();
        for _ in 0..10 {
            assert_eq!(dec.feed(line.as_bytes()), None);
            if let Some(bytes) = dec.take_spill() {
                assert!(bytes.len() >= 100 && bytes.len() < 140, "{}", bytes.len());
                spilled.extend(bytes);
            }
            assert!(budget.used() < 100);
        }
        assert!(dec.feed(b".\r\n").is_some());
        let (tail, flaws) = dec.finish();
        assert!(flaws.is_clean());
        spilled.extend(tail);
        assert_eq!(spilled, line.repeat(10).into_bytes());
        // A flawed body stops being kept: nothing more is handed out.
        let mut bad = DataDecoder::with_memory(
            1 << 20,
            Some(ContentMemory {
                budget: Arc::clone(&budget),
                spill_at: 100,
            }),
        );
        bad.feed(b"bare\nnewline\r\n");
        bad.feed(line.repeat(5).as_bytes());
        assert_eq!(bad.take_spill(), None);
        assert_eq!(budget.used(), 0);
    }

    fn scanner_edit() -> Option<Arc<HeaderEdit>> {
        Some(Arc::new(HeaderEdit {
            senders: crate::rewrite::address::rules_of(&[("@scanner.lan", "@example.com")]),
            remove_received: true,
        }))
    }

    #[test]
    fn the_header_section_is_edited_before_anything_goes_to_the_queue_file() {
        let budget = MemoryBudget::new(1 << 20);
        let memory = Some(ContentMemory {
            budget: Arc::clone(&budget),
            spill_at: 100,
        });
        let mut dec = DataDecoder::with_memory(1 << 20, memory).with_header_edit(scanner_edit());
        let long = format!("X-Pad: {}\r\n", "p".repeat(200));
        let head =
            format!("Received: from scanner (10.0.0.9)\r\n{long}From: Scan <root@scanner.lan>\r\n");
        let line = format!("{}\r\n", "z".repeat(38));
        let mut stored = Vec::new();
        // Byte by byte: the empty line is found across pieces, and nothing is handed out
        // before it although the threshold is long passed.
        for b in head.as_bytes() {
            assert_eq!(dec.feed(&[*b]), None);
            assert_eq!(dec.take_spill(), None);
        }
        for piece in [b"\r\n".as_slice(), line.as_bytes(), line.as_bytes()] {
            assert_eq!(dec.feed(piece), None);
            stored.extend(dec.take_spill().unwrap_or_default());
        }
        assert!(!stored.is_empty());
        assert!(dec.feed(b"Received: in the body\r\n.\r\n").is_some());
        let (tail, flaws) = dec.finish();
        assert!(flaws.is_clean());
        stored.extend(tail);
        let want = format!(
            "{long}From: Scan <root@example.com>\r\n\r\n{line}{line}Received: in the body\r\n"
        );
        assert_eq!(String::from_utf8(stored).unwrap(), want);
    }

    #[test]
    fn a_message_without_a_body_is_all_header_and_an_endless_header_is_left_alone() {
        let mut dec = DataDecoder::new(1 << 20).with_header_edit(scanner_edit());
        assert!(dec.feed(b"From: root@scanner.lan\r\n.\r\n").is_some());
        assert_eq!(dec.finish().0, b"From: root@example.com\r\n");
        let mut dec = DataDecoder::new(1 << 20).with_header_edit(scanner_edit());
        let field = format!("X-Long: {}\r\n", "l".repeat(900));
        let mut input = "From: root@scanner.lan\r\n".to_owned();
        while input.len() <= MAX_HEADER_SECTION {
            input.push_str(&field);
        }
        assert_eq!(dec.feed(input.as_bytes()), None);
        assert!(dec.feed(b"\r\nbody\r\n.\r\n").is_some());
        let body = dec.finish().0;
        assert!(body.starts_with(b"From: root@scanner.lan\r\n"));
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b"a\r\n.b\r\n..\r\n"), b"a\r\n..b\r\n...\r\n.\r\n");
        assert_eq!(dot_stuff(b".x"), b"..x\r\n.\r\n");
        assert_eq!(dot_stuff(b"x\n"), b"x\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
    }
}
