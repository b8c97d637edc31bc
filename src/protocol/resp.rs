//! RESP2 as the server reads it: requests as arrays of bulk strings (replies are encoded in
//! `reply.rs`; the client's side is `resp_reply.rs`).

use super::command::{MAX_WORDS, Request};
use super::{Dialect, ParseLimits, Parsed, ProtocolError};

/// Longest header line (`*<count>` or `$<length>`): a sign and twenty digits fit easily.
const MAX_HEADER_LEN: usize = 32;

/// Reads `<prefix><decimal>\r\n` at `input[at..]`; returns the number and the offset after it.
pub(super) fn header(
    input: &[u8],
    at: usize,
    prefix: u8,
) -> Result<Option<(i64, usize)>, ProtocolError> {
    let rest = &input[at..];
    match rest.first() {
        None => return Ok(None),
        Some(&byte) if byte != prefix => {
            return Err(ProtocolError::Malformed(if prefix == b'$' {
                "expected '$'"
            } else {
                "expected '*'"
            }));
        }
        Some(_) => {}
    }
    if let Some((number, length)) = plain_header_digits(rest) {
        return Ok(Some((number, at + length)));
    }
    Ok(header_digits(rest)?.map(|(number, length)| (number, at + length)))
}

/// Reads the number of a header line `rest` (prefix already checked) and the line's length.
fn header_digits(rest: &[u8]) -> Result<Option<(i64, usize)>, ProtocolError> {
    let window = &rest[..rest.len().min(MAX_HEADER_LEN)];
    let Some(end) = memchr::memchr(b'\n', window) else {
        if rest.len() >= MAX_HEADER_LEN {
            return Err(ProtocolError::Malformed("header line too long"));
        }
        return Ok(None);
    };
    let digits = window[1..end]
        .strip_suffix(b"\r")
        .ok_or(ProtocolError::Malformed("header not ended by CRLF"))?;
    let number = std::str::from_utf8(digits)
        .ok()
        .and_then(|text| text.parse::<i64>().ok())
        .ok_or(ProtocolError::Malformed("invalid length"))?;
    Ok(Some((number, end + 1)))
}

/// The common header, a prefix byte, 1 to 18 decimal digits and CRLF, read in one pass: its
/// number and its length. `None` for anything else, which [`header_digits`] then reads (signs,
/// errors, incomplete lines). Written by hand because a search for the line's end, a UTF-8
/// check and `str::parse` for each of a request's four headers cost more than the rest of its
/// parse; 18 digits cannot overflow an `i64`.
fn plain_header_digits(rest: &[u8]) -> Option<(i64, usize)> {
    const MAX_DIGITS: usize = 18;
    let mut number: i64 = 0;
    let mut end = 1;
    while let Some(&byte) = rest.get(end)
        && byte.is_ascii_digit()
        && end <= MAX_DIGITS
    {
        number = number * 10 + i64::from(byte - b'0');
        end += 1;
    }
    (end > 1 && rest.get(end..end + 2) == Some(b"\r\n")).then_some((number, end + 2))
}

pub(super) fn parse<'a>(input: &'a [u8], limits: &ParseLimits) -> Parsed<'a> {
    match parse_array(input, limits) {
        Ok(Some((words, count, extra, consumed))) => {
            match Request::from_words(&words[..count], extra) {
                Ok(request) => Parsed::Request {
                    request,
                    dialect: Dialect::Resp,
                    consumed,
                },
                Err(error) => Parsed::Invalid {
                    error,
                    dialect: Dialect::Resp,
                    consumed,
                },
            }
        }
        Ok(None) => Parsed::Incomplete,
        Err(error) => Parsed::Fatal {
            error,
            dialect: Dialect::Resp,
        },
    }
}

pub(super) type Words<'a> = ([&'a [u8]; MAX_WORDS], usize, bool, usize);

/// Invariant kept while a request arrives: nothing is reserved for an announced length; the
/// caller's buffer grows only with the bytes that really came, and the announced lengths of
/// one request together may not pass `max_bulk_len`.
pub(super) fn parse_array<'a>(
    input: &'a [u8],
    limits: &ParseLimits,
) -> Result<Option<Words<'a>>, ProtocolError> {
    let Some((count, mut at)) = header(input, 0, b'*')? else {
        return Ok(None);
    };
    let count = u64::try_from(count).map_err(|_| ProtocolError::Malformed("negative count"))?;
    if count > limits.max_args as u64 {
        return Err(ProtocolError::TooManyArguments {
            count,
            limit: limits.max_args,
        });
    }
    let mut words: [&[u8]; MAX_WORDS] = [&[]; MAX_WORDS];
    let mut announced: u64 = 0;
    // Every element is read (the stream must stay in step), but only the first MAX_WORDS are
    // kept: no command has more.
    for index in 0..usize::try_from(count).unwrap_or(usize::MAX) {
        let Some((length, data)) = header(input, at, b'$')? else {
            return Ok(None);
        };
        let length =
            u64::try_from(length).map_err(|_| ProtocolError::Malformed("negative bulk length"))?;
        announced += length;
        if announced > limits.max_bulk_len as u64 {
            return Err(ProtocolError::BulkTooLong {
                length: announced,
                limit: limits.max_bulk_len,
            });
        }
        // Fits in usize: bounded by `max_bulk_len` just above.
        let end = data + length as usize;
        if input.len() < end + 2 {
            return Ok(None);
        }
        if &input[end..end + 2] != b"\r\n" {
            return Err(ProtocolError::Malformed("bulk not ended by CRLF"));
        }
        if let Some(word) = words.get_mut(index) {
            *word = &input[data..end];
        }
        at = end + 2;
    }
    let count = count as usize;
    Ok(Some((words, count.min(MAX_WORDS), count > MAX_WORDS, at)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ParseLimits {
        ParseLimits::default()
    }

    proptest::proptest! {
        #[test]
        fn the_quick_header_path_reads_what_the_general_one_reads(
            digits in "[0-9]{0,22}",
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4),
        ) {
            // Digits and a tail, often CRLF: every header the quick path takes must read as
            // the general path reads it, and a header it declines is left to that path.
            let mut line = b"$".to_vec();
            line.extend_from_slice(digits.as_bytes());
            line.extend_from_slice(&tail);
            let general = header_digits(&line);
            if let Some(quick) = plain_header_digits(&line) {
                proptest::prop_assert_eq!(general, Ok(Some(quick)));
            }
            let mut crlf = b"*".to_vec();
            crlf.extend_from_slice(digits.as_bytes());
            crlf.extend_from_slice(b"\r\n");
            let quick = plain_header_digits(&crlf);
            proptest::prop_assert_eq!(quick.is_some(), (1..=18).contains(&digits.len()));
            if let Some(quick) = quick {
                proptest::prop_assert_eq!(header_digits(&crlf), Ok(Some(quick)));
            }
        }
    }

    #[test]
    fn an_array_of_bulks_is_a_request() {
        let input = b"*4\r\n$3\r\nPUT\r\n$8\r\nshopping\r\n$4\r\nmilk\r\n$3\r\n\x00\r\n\r\n";
        assert_eq!(
            parse(input, &limits()),
            Parsed::Request {
                request: Request::put(b"shopping", b"milk", b"\x00\r\n"),
                dialect: Dialect::Resp,
                consumed: input.len()
            }
        );
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete() {
        let input = b"*3\r\n$3\r\nGET\r\n$8\r\nshopping\r\n$4\r\nmilk\r\n";
        for end in 0..input.len() {
            assert_eq!(parse(&input[..end], &limits()), Parsed::Incomplete, "{end}");
        }
    }

    #[test]
    fn announced_lengths_past_the_limit_are_fatal_before_any_byte_arrives() {
        let limits = ParseLimits {
            max_bulk_len: 10,
            ..limits()
        };
        assert!(matches!(
            parse(b"*2\r\n$3\r\nGET\r\n$536870912\r\n", &limits),
            Parsed::Fatal {
                error: ProtocolError::BulkTooLong { .. },
                ..
            }
        ));
        // Several bulks together count too.
        assert!(matches!(
            parse(b"*3\r\n$6\r\nCREATE\r\n$6\r\n", &limits),
            Parsed::Fatal {
                error: ProtocolError::BulkTooLong { .. },
                ..
            }
        ));
    }

    #[test]
    fn malformed_input_is_fatal() {
        for input in [
            &b"*2\r\n+GET\r\n"[..],
            b"*x\r\n",
            b"*-5\r\n",
            b"*1\r\n$3\r\nGETxx",
            b"*1\r\n$3\n",
            b"*99999999999999999999999999999999999\r\n",
        ] {
            assert!(
                matches!(parse(input, &limits()), Parsed::Fatal { .. }),
                "{input:?}"
            );
        }
    }

    #[test]
    fn extra_words_are_skipped_and_make_an_unknown_command() {
        let input = b"*5\r\n$3\r\nGET\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$1\r\nd\r\nPING\r\n";
        assert_eq!(
            parse(input, &limits()),
            Parsed::Invalid {
                error: ProtocolError::WrongArity { command: "get" },
                dialect: Dialect::Resp,
                consumed: input.len() - 6
            }
        );
    }
}
