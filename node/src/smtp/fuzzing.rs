//! The driver shared by the session fuzz target (node/fuzz) and its stable proptest twin: feeds
//! arbitrary command lines to a [`Session`] and answers every action it asks for, so that every
//! state is reachable. Not part of the node's behaviour.

use std::sync::Arc;

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
        policy: Arc::new(crate::policy::Policy::default()),
        budget: Some(crate::admission::MemoryBudget::new(4000)),
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
                let _ = s.chunk_done(b"x");
            }
            Next::Close => break,
            _ => {}
        }
    }
}
