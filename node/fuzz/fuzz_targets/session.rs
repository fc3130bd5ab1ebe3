//! Fuzz the session state machine with arbitrary command lines.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mailnode::smtp::fuzzing::drive_session(data.split(|b| *b == b'\n'));
});
