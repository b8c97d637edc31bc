//! The guide's line protocol: words separated by runs of spaces or tabs, ended by `\n`, with a
//! `\r` before it dropped.

use super::command::{MAX_WORDS, Request};
use super::{Dialect, ParseLimits, Parsed, ProtocolError};

pub(super) fn parse<'a>(input: &'a [u8], limits: &ParseLimits) -> Parsed<'a> {
    // Search no further than the limit allows: a line that long is refused either way, and
    // searching all of a huge buffer for every request would be quadratic.
    let window = &input[..input.len().min(limits.max_line_len + 1)];
    let Some(end) = memchr::memchr(b'\n', window) else {
        if input.len() > limits.max_line_len {
            return Parsed::Overlong {
                error: ProtocolError::LineTooLong {
                    limit: limits.max_line_len,
                },
            };
        }
        return Parsed::Incomplete;
    };
    let consumed = end + 1;
    let line = &input[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if std::str::from_utf8(line).is_err() {
        return Parsed::Invalid {
            error: ProtocolError::InvalidUtf8,
            dialect: Dialect::Line,
            consumed,
        };
    }
    let (words, count, extra) = split(line);
    match Request::from_words(&words[..count], extra) {
        Ok(request) => Parsed::Request {
            request,
            dialect: Dialect::Line,
            consumed,
        },
        Err(error) => Parsed::Invalid {
            error,
            dialect: Dialect::Line,
            consumed,
        },
    }
}

/// The first [`MAX_WORDS`] words of `line`, how many there are of them, and whether there
/// were more.
pub(super) fn split(line: &[u8]) -> ([&[u8]; MAX_WORDS], usize, bool) {
    let mut words: [&[u8]; MAX_WORDS] = [&[]; MAX_WORDS];
    let mut count = 0;
    for word in line
        .split(|&byte| byte == b' ' || byte == b'\t')
        .filter(|word| !word.is_empty())
    {
        if count == MAX_WORDS {
            return (words, count, true);
        }
        words[count] = word;
        count += 1;
    }
    (words, count, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{KeyAction, KeyRequest};

    fn limits() -> ParseLimits {
        ParseLimits::default()
    }

    #[test]
    fn the_guide_session_parses() {
        let parsed = parse(b"PUT shopping milk 1\r\nGET", &limits());
        assert_eq!(
            parsed,
            Parsed::Request {
                request: Request::put(b"shopping", b"milk", b"1"),
                dialect: Dialect::Line,
                consumed: 21
            }
        );
    }

    #[test]
    fn runs_of_blanks_and_surrounding_blanks_are_ignored() {
        let parsed = parse(b" \tGET\t\tshopping   milk \r\n", &limits());
        assert!(matches!(
            parsed,
            Parsed::Request {
                request: Request::Key(KeyRequest {
                    bucket: b"shopping",
                    key: b"milk",
                    action: KeyAction::Get,
                }),
                ..
            }
        ));
    }

    #[test]
    fn a_line_without_its_end_is_incomplete_until_it_passes_the_limit() {
        let limits = ParseLimits {
            max_line_len: 8,
            ..limits()
        };
        assert_eq!(parse(b"GET a b", &limits), Parsed::Incomplete);
        assert_eq!(
            parse(b"GET abcdefg", &limits),
            Parsed::Overlong {
                error: ProtocolError::LineTooLong { limit: 8 }
            }
        );
        // A line of exactly the limit, then its newline, is fine.
        assert!(matches!(
            parse(b"CREATE a\n", &limits),
            Parsed::Request { .. }
        ));
    }

    #[test]
    fn non_utf8_is_refused_and_the_line_consumed() {
        assert_eq!(
            parse(b"GET \xff\xfe k\nPING\n", &limits()),
            Parsed::Invalid {
                error: ProtocolError::InvalidUtf8,
                dialect: Dialect::Line,
                consumed: 9
            }
        );
    }
}
