//! Fuzz what the delivery side reads from the network to decide on TLS: MTA-STS policy files
//! (fetched over HTTPS from the recipient's domain) and TXT records, TLS report records, and
//! the DER walk that finds a certificate's public key for DANE. None may panic, and what they
//! accept must hold to their rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailnode::delivery::{dane, mta_sts};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(p) = mta_sts::parse_policy(text, "id", 0)
    {
        assert!(p.max_age <= 31_557_600);
        assert!(p.mode == mta_sts::Mode::None || !p.mx.is_empty());
        for m in &p.mx {
            let _ = p.allows(m);
        }
    }
    let txts: Vec<Vec<u8>> = data.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    let _ = mta_sts::record_id(&txts);
    let _ = mailnode::tls_report::send::report_uris(&txts);
    if let Some(spki) = dane::spki(data) {
        let start = spki.as_ptr() as usize - data.as_ptr() as usize;
        assert!(start + spki.len() <= data.len());
    }
    for selector in 0..2 {
        let t = dane::Tlsa {
            usage: 3,
            selector,
            matching: 1,
            data: vec![0; 32],
        };
        let _ = t.matches(data);
    }
});
