//! The driver shared by the session fuzz target (node/fuzz) and its stable proptest twin: feeds
//! arbitrary command lines to a [`Session`] and answers every action it asks for, so that every
//! state is reachable. Not part of the node's behaviour.

use std::sync::Arc;

use super::data::DataDecoder;
use super::session::{ClientInfo, Next, Session, SessionConfig};

/// Runs `lines` through a session with TLS, AUTH and small limits; must never panic.
pub fn drive_session<'a>(lines: impl IntoIterator<Item = &'a [u8]>) {
    let cfg = SessionConfig {
        hostname: "fuzz.example".into(),
        listener: "fuzz".into(),
        max_message_size: 1000,
        max_recipients: 5,
        max_errors: 1000,
        starttls: true,
        tls_required: false,
        auth: true,
        policy: Arc::new(crate::smtp::policy::Policy::default()),
        memory: Some(crate::admission::ContentMemory {
            budget: crate::admission::MemoryBudget::new(4000),
            spill_at: 500,
        }),
        forbid_unauth_pipelining: true,
        rate_limits: Arc::new(crate::rate_limit::RateLimiter::new(Vec::new())),
        rewrite: None,
    };
    let client = ClientInfo {
        addr: std::net::SocketAddr::from(([127, 0, 0, 2], 1)),
        proxy: None,
    };
    let mut s = Session::new(cfg, client);
    for line in lines {
        let step = s.line(line);
        match step.next {
            Next::StartTls => s.tls_started(),
            Next::Authenticate(_) => {
                let _ = s.auth_done(line.len() % 2 == 0);
            }
            Next::Data => {
                let _ = s.data_done(b"x\r\n".to_vec(), Default::default());
            }
            Next::Chunk { accept: true, .. } => {
                s.chunk_data(b"x");
                let _ = s.chunk_done();
            }
            Next::Close => break,
            _ => {}
        }
    }
}

/// Runs a client's byte stream through a session the way the server reads a socket: command
/// lines, DATA content through the decoder, BDAT chunks passed on in pieces as they would
/// arrive, content due for the queue file taken after each piece, and the check for input
/// pipelined after a refused DATA. Another session holds part of the shared memory budget (its
/// size from the first input byte). Panics when the budget is ever over its limit or not all
/// given back once the session is gone, when a session holds more than the spill threshold
/// plus one piece, or when a queued message's file and tail differ from the content sent.
pub fn drive_stream(input: &[u8]) {
    const LIMIT: u64 = 3000;
    const SPILL_AT: usize = 700;
    const MAX_PIECE: usize = 61;
    let budget = crate::admission::MemoryBudget::new(LIMIT);
    let held = u64::from(input.first().copied().unwrap_or(0)) * 8;
    assert!(budget.try_reserve(held));
    let memory = crate::admission::ContentMemory {
        budget: Arc::clone(&budget),
        spill_at: SPILL_AT as u64,
    };
    let cfg = SessionConfig {
        hostname: "fuzz.example".into(),
        listener: "fuzz".into(),
        max_message_size: 2000,
        max_recipients: 5,
        max_errors: 1000,
        starttls: false,
        tls_required: false,
        auth: false,
        policy: Arc::new(crate::smtp::policy::Policy::default()),
        memory: Some(memory.clone()),
        forbid_unauth_pipelining: input.get(1).is_some_and(|b| b % 2 == 0),
        rate_limits: Arc::new(crate::rate_limit::RateLimiter::new(Vec::new())),
        rewrite: None,
    };
    let client = ClientInfo {
        addr: std::net::SocketAddr::from(([127, 0, 0, 2], 1)),
        proxy: None,
    };
    let mut s = Session::new(cfg, client);
    let mut rest = input.get(2..).unwrap_or_default();
    // Pieces of content arrive in sizes taken from the input itself.
    let piece = |rest: &[u8]| 1 + usize::from(rest.first().copied().unwrap_or(0) % MAX_PIECE as u8);
    // The queue file of the message being received, as the server writes it, and the
    // content the client sent for it (BDAT).
    let mut file: Vec<u8> = Vec::new();
    let mut sent: Vec<u8> = Vec::new();
    let spill = |file: &mut Vec<u8>, bytes: Option<Vec<u8>>| {
        if let Some(b) = bytes {
            assert!(
                b.len() < SPILL_AT + MAX_PIECE,
                "session held {} bytes",
                b.len()
            );
            file.extend(b);
        }
        assert!(budget.used() <= LIMIT, "budget over its limit");
    };
    'session: while let Some(lf) = rest.iter().position(|b| *b == b'\n') {
        let line = &rest[..lf];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        rest = &rest[lf + 1..];
        let mut step = s.line(line);
        if !rest.is_empty()
            && let Some(close) = s.input_before_reply()
        {
            step = close;
        }
        loop {
            step = match step.next {
                Next::Close => break 'session,
                Next::Data => {
                    let mut dec = DataDecoder::with_memory(2000, Some(memory.clone()));
                    let mut whole = DataDecoder::new(2000);
                    loop {
                        if rest.is_empty() {
                            break 'session;
                        }
                        let n = piece(rest).min(rest.len());
                        let done = dec.feed(&rest[..n]);
                        assert_eq!(done, whole.feed(&rest[..n]));
                        match done {
                            Some(used) => {
                                rest = &rest[used..];
                                break;
                            }
                            None => rest = &rest[n..],
                        }
                        spill(&mut file, dec.take_spill());
                    }
                    let (body, flaws, hold) = dec.finish_held();
                    let (all, all_flaws) = whole.finish();
                    assert_eq!(flaws, all_flaws);
                    sent = all;
                    s.data_done_held(body, flaws, hold)
                }
                Next::Chunk { size, accept } => {
                    let mut left = usize::try_from(size).unwrap_or(usize::MAX);
                    while left > 0 {
                        if rest.is_empty() {
                            break 'session;
                        }
                        let n = piece(rest).min(rest.len()).min(left);
                        if accept {
                            s.chunk_data(&rest[..n]);
                            sent.extend_from_slice(&rest[..n]);
                            spill(&mut file, s.take_spill());
                        }
                        rest = &rest[n..];
                        left -= n;
                    }
                    if !accept {
                        break;
                    }
                    s.chunk_done()
                }
                Next::Queue(draft) => {
                    file.extend_from_slice(&draft.body);
                    assert!(file == sent, "queued content differs from what was sent");
                    let _ = s.queued(Ok("FUZZ"));
                    break;
                }
                _ => break,
            };
        }
        if !s.receiving_chunks() {
            file.clear();
            sent.clear();
        }
    }
    drop(s);
    budget.release(held);
    assert_eq!(budget.used(), 0, "content budget not given back");
}
