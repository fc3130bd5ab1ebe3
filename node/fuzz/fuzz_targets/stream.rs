//! Fuzz a client's byte stream through the session as the server reads it: command lines,
//! DATA content and BDAT chunks in pieces, against a shared memory budget.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mailnode::smtp::fuzzing::drive_stream(data);
});
