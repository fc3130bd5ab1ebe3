//! Fuzz the PROXY protocol v1/v2 parser: never panics, and a parsed header never claims more
//! bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, n))) = mailnode::proxy_protocol::parse(data) {
        assert!(n <= data.len());
    }
});
