//! Fuzz the SMTP command parser and the address parser behind it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mailnode::smtp::command::Command::Rcpt { to }) = mailnode::smtp::command::parse(data) {
        let _ = to.to_string();
    }
    let mut d = mailnode::smtp::data::DataDecoder::new(1 << 20);
    let _ = d.feed(data);
    let _ = d.finish();
});
