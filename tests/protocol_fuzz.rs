//! The parsers against arbitrary input: nothing panics, and well-formed requests survive any
//! way of being cut into pieces.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use kv::protocol::{Dialect, ParseLimits, Parsed, Request, parse, parse_reply};
use proptest::prelude::*;

fn limits() -> ParseLimits {
    ParseLimits {
        max_line_len: 256,
        max_bulk_len: 1024,
        max_args: 16,
    }
}

fn resp(words: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", words.len()).into_bytes();
    for word in words {
        out.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
        out.extend_from_slice(word);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses a whole stream as the server does: every request in order, feeding it `chunks` at a
/// time, discarding after an over-long line. Returns what each request became.
fn parse_stream(stream: &[u8], chunk: usize) -> Vec<String> {
    let limits = limits();
    let mut buffer = Vec::new();
    let mut results = Vec::new();
    let mut discarding = false;
    for piece in stream.chunks(chunk.max(1)) {
        buffer.extend_from_slice(piece);
        loop {
            if discarding {
                let Some(end) = buffer.iter().position(|&byte| byte == b'\n') else {
                    buffer.clear();
                    break;
                };
                buffer.drain(..=end);
                discarding = false;
            }
            match parse(&buffer, &limits) {
                Parsed::Incomplete => break,
                Parsed::Request {
                    request, consumed, ..
                } => {
                    assert!(consumed > 0 && consumed <= buffer.len());
                    results.push(format!("{request:?}"));
                    buffer.drain(..consumed);
                }
                Parsed::Invalid {
                    error, consumed, ..
                } => {
                    assert!(consumed > 0 && consumed <= buffer.len());
                    results.push(format!("{error}"));
                    buffer.drain(..consumed);
                }
                Parsed::Overlong { error } => {
                    results.push(format!("{error}"));
                    discarding = true;
                }
                Parsed::Fatal { error, .. } => {
                    results.push(format!("fatal: {error}"));
                    return results;
                }
            }
        }
        // Bounded: never more than one over-limit request plus one piece.
        assert!(
            buffer.len() <= 1024 + 16 * 32 + chunk,
            "buffer grew to {}",
            buffer.len()
        );
    }
    results
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse(&bytes, &limits());
        let _ = parse_reply(&bytes, 1024);
        let _ = parse_stream(&bytes, 7);
    }

    #[test]
    fn resp_round_trips_binary_words(
        bucket in proptest::collection::vec(any::<u8>(), 0..40),
        key in proptest::collection::vec(any::<u8>(), 0..40),
        value in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let encoded = resp(&[b"PUT", &bucket, &key, &value]);
        prop_assert_eq!(
            parse(&encoded, &limits()),
            Parsed::Request {
                request: Request::put(&bucket, &key, &value),
                dialect: Dialect::Resp,
                consumed: encoded.len(),
            }
        );
    }

    #[test]
    fn a_pipeline_parses_the_same_however_it_is_cut(
        words in proptest::collection::vec(
            proptest::collection::vec("[a-zA-Z0-9]{1,12}", 1..5), 1..20),
        use_resp in proptest::collection::vec(any::<bool>(), 20),
        chunk in 1usize..64,
    ) {
        let mut stream = Vec::new();
        for (request, resp_dialect) in words.iter().zip(&use_resp) {
            let request: Vec<&[u8]> = request.iter().map(String::as_bytes).collect();
            if *resp_dialect {
                stream.extend_from_slice(&resp(&request));
            } else {
                stream.extend_from_slice(&request.join(&b' '));
                stream.extend_from_slice(b"\r\n");
            }
        }
        let whole = parse_stream(&stream, stream.len());
        prop_assert_eq!(whole.len(), words.len());
        prop_assert_eq!(parse_stream(&stream, chunk), whole);
    }
}
