//! Fuzz the session state machine with arbitrary command lines.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mailnode::smtp::session::{ClientInfo, Next, Session, SessionConfig};

fuzz_target!(|data: &[u8]| {
    let cfg = SessionConfig {
        hostname: "fuzz.example".into(),
        listener: "fuzz".into(),
        max_message_size: 1000,
        max_recipients: 5,
        max_errors: 1000,
        starttls: true,
        tls_required: false,
        auth: true,
        policy: Arc::new(mailnode::policy::Policy::default()),
    };
    let mut s = Session::new(cfg, ClientInfo { addr: "127.0.0.2:1".parse().unwrap(), proxy: None });
    for line in data.split(|b| *b == b'\n') {
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
});
