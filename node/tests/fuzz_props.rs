//! The fuzz targets of node/fuzz as bounded random tests on stable (proptest): the command
//! parser, the DATA decoder, the PROXY header parser, the session and the outbound trust
//! parsers (MTA-STS policies and records, TLS report records, DANE's DER walk) never panic, and a byte
//! stream with DATA and BDAT content keeps the memory budget. Beside them, the writing and
//! reading sides of the protocol checked as inverses (dot stuffing, replies).
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

fn smtpish() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        "(?i)(MAIL FROM:|RCPT TO:|EHLO |HELO |BDAT |AUTH |DATA|RSET|STARTTLS|PROXY )[ -~]{0,80}"
            .prop_map(String::into_bytes),
        "(MAIL FROM:|RCPT TO:)<[@a-z%!\".:\\[\\]0-9,\\\\ ]{0,40}>( [A-Z0-9=]{0,20})?"
            .prop_map(String::into_bytes),
    ]
}

/// DATA decoding written plainly, as the oracle of the decoder: the content ends at the first
/// CRLF "." CRLF (the start of the data counting as a line start), a "." that starts a line is
/// dropped, and the flaws are read off the decoded body.
fn reference_decode(
    raw: &[u8],
    max: usize,
) -> Option<(usize, Vec<u8>, mailnode::smtp::data::BodyFlaws)> {
    let framed = [b"\r\n".as_slice(), raw].concat();
    let stop = framed.windows(5).position(|w| w == b"\r\n.\r\n")?;
    let content = &framed[2..stop + 2];
    let mut body = Vec::new();
    for (i, &b) in content.iter().enumerate() {
        let line_start = i == 0 || content[..i].ends_with(b"\r\n");
        if !(b == b'.' && line_start) {
            body.push(b);
        }
    }
    let bare = body.iter().enumerate().any(|(i, &b)| {
        (b == b'\r' && body.get(i + 1) != Some(&b'\n'))
            || (b == b'\n' && (i == 0 || body[i - 1] != b'\r'))
    });
    let long = body
        .split(|b| *b == b'\n')
        .any(|l| l.iter().filter(|b| **b != b'\r').count() > mailnode::smtp::data::MAX_LINE);
    let flaws = mailnode::smtp::data::BodyFlaws {
        too_big: body.len() > max,
        bare_newline: bare,
        long_line: long,
    };
    if !flaws.is_clean() {
        body.clear();
    }
    Some((stop + 3, body, flaws))
}

fn content_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            4 => Just(b"a".to_vec()),
            2 => Just(b"\r\n".to_vec()),
            1 => Just(b".".to_vec()),
            1 => Just(b"\r".to_vec()),
            1 => Just(b"\n".to_vec()),
            1 => Just(b"\r\n.\r\n".to_vec()),
            1 => Just(vec![b'x'; 997]),
        ],
        0..40,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn dot_stuffing_and_the_decoder_are_inverses(lines in proptest::collection::vec("[.a ]{0,12}", 0..12)) {
        let msg: Vec<u8> = lines.iter().flat_map(|l| format!("{l}\r\n").into_bytes()).collect();
        let wire = mailnode::smtp::data::dot_stuff(&msg);
        let mut dec = mailnode::smtp::data::DataDecoder::new(1 << 20);
        prop_assert_eq!(dec.feed(&wire), Some(wire.len()));
        let (body, flaws) = dec.finish();
        prop_assert!(flaws.is_clean());
        prop_assert_eq!(body, msg);
    }

    #[test]
    fn a_written_reply_reads_back_as_itself(
        code in 200u16..600,
        enhanced in prop_oneof![Just(String::new()), "[245]\\.[0-9]{1,3}\\.[0-9]{1,3}"],
        lines in proptest::collection::vec("[a-zA-Z0-9 .,:-]{0,30}", 1..5),
    ) {
        use mailnode::smtp::reply::{Reply, leading_enhanced, parse_reply};
        // A first line that itself starts with an enhanced code reads as one: not a reply
        // this node writes.
        prop_assume!(!enhanced.is_empty() || leading_enhanced(&lines[0]).is_none());
        let reply = Reply { code, enhanced: enhanced.into(), lines };
        let wire = reply.to_wire();
        let (back, used) = parse_reply(wire.as_bytes()).unwrap().unwrap();
        prop_assert_eq!(used, wire.len());
        prop_assert_eq!(back, reply);
    }

    #[test]
    fn data_decoder_agrees_with_the_plain_reference(raw in content_bytes(), pieces in proptest::collection::vec(1usize..700, 1..8), max in 0usize..5000) {
        let mut dec = mailnode::smtp::data::DataDecoder::new(max as u64);
        let mut at = 0;
        let mut end = None;
        for p in pieces.iter().cycle() {
            if at >= raw.len() {
                break;
            }
            let n = (*p).min(raw.len() - at);
            if let Some(used) = dec.feed(&raw[at..at + n]) {
                end = Some(at + used);
                break;
            }
            at += n;
        }
        match reference_decode(&raw, max) {
            None => prop_assert_eq!(end, None),
            Some((stop, body, flaws)) => {
                prop_assert_eq!(end, Some(stop));
                prop_assert_eq!(dec.finish(), (body, flaws));
            }
        }
    }

    #[test]
    fn command_parser_never_panics(line in smtpish()) {
        if let Ok(mailnode::smtp::command::Command::Rcpt { to }) = mailnode::smtp::command::parse(&line) {
            let _ = to.to_string();
        }
    }

    #[test]
    fn header_editing_is_the_same_in_any_pieces_and_never_panics(
        fields in proptest::collection::vec(prop_oneof![
            "(From|Sender|Received|reply-to|X-A): [ -~]{0,40}\r\n",
            "(From|Sender): [\"()<>,:;@ a-z\\\\]{0,30}\r\n",
            "[ \t][ -~]{0,20}\r\n",
            "[a-z ]{0,10}\r\n",
        ], 0..12),
        body in "[ -~]{0,30}",
        cut in 0usize..600,
    ) {
        let rules = [mailnode::config::SenderRewrite { from: "*".into(), to: "@example.com".into() }];
        let edit = Some(std::sync::Arc::new(mailnode::rewrite::HeaderEdit {
            senders: mailnode::rewrite::SenderRewriter::new(&rules),
            remove_received: true,
        }));
        let content = format!("{}\r\n{body}\r\n", fields.concat());
        let data = mailnode::smtp::data::dot_stuff(content.as_bytes());
        let mut whole = mailnode::smtp::data::DataDecoder::new(1 << 20).with_header_edit(edit.clone());
        prop_assert!(whole.feed(&data).is_some());
        let mut split = mailnode::smtp::data::DataDecoder::new(1 << 20).with_header_edit(edit);
        let cut = cut.min(data.len());
        if split.feed(&data[..cut]).is_none() {
            prop_assert!(split.feed(&data[cut..]).is_some());
        }
        let (a, b) = (whole.finish(), split.finish());
        prop_assert_eq!(&a, &b);
        // The body is never touched.
        let tail = format!("\r\n{body}\r\n");
        prop_assert!(a.0.ends_with(tail.as_bytes()) || !a.1.is_clean());
    }

    #[test]
    fn header_edit_never_panics_on_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let rules = [mailnode::config::SenderRewrite { from: "*".into(), to: "x@example.com".into() }];
        let edit = mailnode::rewrite::HeaderEdit {
            senders: mailnode::rewrite::SenderRewriter::new(&rules),
            remove_received: true,
        };
        if let Some(e) = edit.apply(&data) {
            prop_assert!(e.rewritten + e.removed > 0);
        }
        let text = String::from_utf8_lossy(&data);
        let (n, same) = mailnode::rewrite::header::rewrite_addresses(&text, |a| Some(a.to_owned()));
        prop_assert_eq!(same, text.into_owned(), "{} identical replacements", n);
    }

    #[test]
    fn data_decoder_split_anywhere_is_the_same(data in proptest::collection::vec(prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), Just(b'a')], 0..200), cut in 0usize..200) {
        let mut whole = mailnode::smtp::data::DataDecoder::new(1 << 20);
        let end_whole = whole.feed(&data);
        let mut split = mailnode::smtp::data::DataDecoder::new(1 << 20);
        let cut = cut.min(data.len());
        let end_split = match split.feed(&data[..cut]) {
            Some(n) => Some(n),
            None => split.feed(&data[cut..]).map(|n| n + cut),
        };
        prop_assert_eq!(end_whole, end_split);
        prop_assert_eq!(whole.finish(), split.finish());
    }

    #[test]
    fn proxy_parser_never_panics(data in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|t| [mailnode::proxy_protocol::V2_SIGNATURE.to_vec(), t].concat()),
        "PROXY (TCP4|TCP6|UNKNOWN)[ 0-9a-f.:]{0,60}\r\n".prop_map(String::into_bytes),
    ]) {
        if let Ok(Some((_, n))) = mailnode::proxy_protocol::parse(&data) {
            prop_assert!(n <= data.len());
        }
    }

    #[test]
    fn session_never_panics(lines in proptest::collection::vec(smtpish(), 0..20)) {
        mailnode::smtp::fuzzing::drive_session(lines.iter().map(Vec::as_slice));
    }

    #[test]
    fn stream_keeps_the_budget(head in proptest::collection::vec(any::<u8>(), 2), lines in proptest::collection::vec(prop_oneof![
        smtpish(),
        Just(b"EHLO c".to_vec()),
        Just(b"MAIL FROM:<a@b.example>".to_vec()),
        Just(b"RCPT TO:<x@y.example>".to_vec()),
        Just(b"DATA".to_vec()),
        Just(b".".to_vec()),
        "BDAT [0-9]{1,4}( LAST)?".prop_map(String::into_bytes),
        proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'\r'), Just(b'.')], 0..400),
    ], 0..30)) {
        let mut input = head;
        for l in &lines {
            input.extend_from_slice(l);
            input.extend_from_slice(b"\r\n");
        }
        mailnode::smtp::fuzzing::drive_stream(&input);
    }

    #[test]
    fn outbound_trust_parsers_never_panic(
        policy in "(version: STSv1|mode: (enforce|testing|none|x)|mx: [*.a-z0-9]{0,20}|max_age: [0-9-]{0,12}|[ -~]{0,30})(\r?\n(version: STSv1|mode: (enforce|testing|none)|mx: [*.a-z0-9]{0,20}|max_age: [0-9]{0,12}|[ -~]{0,30})){0,8}",
        der in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        use mailnode::delivery::{dane, mta_sts};
        if let Ok(p) = mta_sts::parse_policy(&policy, "id", 0) {
            prop_assert!(p.max_age <= 31_557_600);
            prop_assert!(p.mode == mta_sts::Mode::None || !p.mx.is_empty());
        }
        let txts = vec![policy.clone().into_bytes(), format!("v=STSv1; id={policy}").into_bytes()];
        let _ = mta_sts::record_id(&txts);
        let _ = mailnode::tls_report::send::report_uris(&[format!("v=TLSRPTv1; rua={policy}").into_bytes()]);
        if let Some(spki) = dane::spki(&der) {
            prop_assert!(spki.len() <= der.len());
        }
    }
}
