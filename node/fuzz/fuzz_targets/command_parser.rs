//! Fuzz the SMTP command parser and the address parser behind it, and the DATA decoder with
//! and without a header edit (sender rewriting, Received removal).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mailnode::smtp::command::Command::Rcpt { to }) = mailnode::smtp::command::parse(data) {
        let _ = to.to_string();
    }
    let mut d = mailnode::smtp::data::DataDecoder::new(1 << 20);
    let _ = d.feed(data);
    let _ = d.finish();
    let rules = [mailnode::config::SenderRewrite {
        from: "*".into(),
        to: "@example.com".into(),
    }];
    let edit = std::sync::Arc::new(mailnode::rewrite::HeaderEdit {
        senders: mailnode::rewrite::SenderRewriter::new(&rules),
        remove_received: true,
    });
    let mut d = mailnode::smtp::data::DataDecoder::new(1 << 20).with_header_edit(Some(edit));
    let _ = d.feed(data);
    let _ = d.finish();
});
