//! The client's side of the line protocol: reading a reply. Line replies do not say their own
//! shape (a `GET` answers with two lines, a `PUT` with one), so the reader is told what the
//! request was. Each reply becomes the [`ReplyValue`] its RESP twin would be, so a client
//! handles both dialects alike.

use super::ProtocolError;
use super::reply::UNAVAILABLE;
use super::resp_reply::ReplyValue;

/// What a line-protocol request is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineReplyShape {
    /// One line: `OK`, `PONG`, `NOT FOUND`, `ERROR …`, `UNKNOWN COMMAND`.
    Status,
    /// `GET`: the value on a line then `OK` (an empty line for a missing key), or one error
    /// line.
    Value,
    /// Lines then `OK` (`INFO`, `BUCKETS`, `KEYS`, `PING message`), or one error line.
    Lines,
}

impl LineReplyShape {
    /// The shape of the reply to a request whose words are `words`.
    #[must_use]
    pub fn of(words: &[&[u8]]) -> Self {
        let is = |name: &str| {
            words
                .first()
                .is_some_and(|command| command.eq_ignore_ascii_case(name.as_bytes()))
        };
        if is("GET") {
            Self::Value
        } else if is("INFO") || is("BUCKETS") || is("KEYS") || (is("PING") && words.len() > 1) {
            Self::Lines
        } else {
            Self::Status
        }
    }
}

/// Parses the first reply in `input`, of `shape`: `Ok(None)` if it is not all there yet,
/// otherwise the reply and how many bytes it took. No line may be longer than `max_line_len`.
///
/// # Errors
/// [`ProtocolError::Malformed`] for a line past the bound.
pub fn parse_line_reply(
    input: &[u8],
    shape: LineReplyShape,
    max_line_len: usize,
) -> Result<Option<(ReplyValue, usize)>, ProtocolError> {
    let mut lines = Lines {
        input,
        at: 0,
        max_line_len,
    };
    let Some(first) = lines.next()? else {
        return Ok(None);
    };
    if let Some(status) = status(first) {
        return Ok(Some((status, lines.at)));
    }
    let reply = match shape {
        LineReplyShape::Status => ReplyValue::Simple(String::from_utf8_lossy(first).into_owned()),
        LineReplyShape::Value => {
            match lines.next()? {
                None => return Ok(None),
                Some(b"OK") => {}
                Some(_) => return Err(ProtocolError::Malformed("a value not followed by OK")),
            }
            ReplyValue::Bulk((!first.is_empty()).then(|| bytes::Bytes::copy_from_slice(first)))
        }
        LineReplyShape::Lines => {
            let mut items = vec![ReplyValue::Bulk(Some(bytes::Bytes::copy_from_slice(first)))];
            loop {
                match lines.next()? {
                    None => return Ok(None),
                    Some(b"OK") => break,
                    Some(line) => {
                        items.push(ReplyValue::Bulk(Some(bytes::Bytes::copy_from_slice(line))));
                    }
                }
            }
            ReplyValue::Array(Some(items))
        }
    };
    Ok(Some((reply, lines.at)))
}

/// A one-line reply that ends any shape: success without a value, or an error (in the words
/// RESP would give it).
fn status(line: &[u8]) -> Option<ReplyValue> {
    let text = || String::from_utf8_lossy(line).into_owned();
    match line {
        b"OK" | b"PONG" => Some(ReplyValue::Simple(text())),
        b"NOT FOUND" => Some(ReplyValue::Error("NOTFOUND bucket does not exist".into())),
        b"UNKNOWN COMMAND" => Some(ReplyValue::Error("ERR unknown command".into())),
        _ => line.strip_prefix(b"ERROR ").map(|message| {
            let code = if message == UNAVAILABLE.as_bytes() {
                "TRYAGAIN"
            } else {
                "ERR"
            };
            ReplyValue::Error(format!("{code} {}", String::from_utf8_lossy(message)))
        }),
    }
}

/// The CRLF-ended lines of a reply, without their ends.
struct Lines<'a> {
    input: &'a [u8],
    at: usize,
    max_line_len: usize,
}

impl<'a> Lines<'a> {
    fn next(&mut self) -> Result<Option<&'a [u8]>, ProtocolError> {
        let rest = &self.input[self.at..];
        let window = &rest[..rest.len().min(self.max_line_len.saturating_add(2))];
        match memchr::memchr(b'\n', window) {
            Some(end) => {
                self.at += end + 1;
                Ok(Some(
                    rest[..end].strip_suffix(b"\r").unwrap_or(&rest[..end]),
                ))
            }
            None if rest.len() > self.max_line_len => {
                Err(ProtocolError::Malformed("reply line too long"))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn all(input: &[u8], shapes: &[LineReplyShape]) -> Vec<ReplyValue> {
        let mut at = 0;
        let mut replies = Vec::new();
        for &shape in shapes {
            let (reply, taken) = parse_line_reply(&input[at..], shape, 1024)
                .unwrap()
                .unwrap();
            replies.push(reply);
            at += taken;
        }
        assert_eq!(at, input.len());
        replies
    }

    #[test]
    fn line_replies_read_as_their_resp_twins() {
        use LineReplyShape::{Lines, Status, Value};
        let input = b"OK\r\n1\r\nOK\r\n\r\nOK\r\nNOT FOUND\r\nERROR bucket limit of 2 reached\r\n0\r\nk1\r\nOK\r\nUNKNOWN COMMAND\r\nERROR cluster unavailable, try again\r\n";
        assert_eq!(
            all(
                input,
                &[Status, Value, Value, Value, Status, Lines, Status, Value]
            ),
            [
                ReplyValue::Simple("OK".into()),
                ReplyValue::Bulk(Some(Bytes::from("1"))),
                ReplyValue::Bulk(None),
                ReplyValue::Error("NOTFOUND bucket does not exist".into()),
                ReplyValue::Error("ERR bucket limit of 2 reached".into()),
                ReplyValue::Array(Some(vec![
                    ReplyValue::Bulk(Some(Bytes::from("0"))),
                    ReplyValue::Bulk(Some(Bytes::from("k1"))),
                ])),
                ReplyValue::Error("ERR unknown command".into()),
                ReplyValue::Error("TRYAGAIN cluster unavailable, try again".into()),
            ]
        );
    }

    #[test]
    fn a_reply_not_all_there_is_incomplete_and_an_endless_line_is_refused() {
        let input = b"1\r\nOK\r\n";
        for cut in 0..=input.len() {
            let parsed = parse_line_reply(&input[..cut], LineReplyShape::Value, 1024);
            assert_eq!(parsed.unwrap().is_none(), cut < input.len(), "cut at {cut}");
        }
        assert!(parse_line_reply(&[b'x'; 2000], LineReplyShape::Status, 1024).is_err());
        assert_eq!(
            LineReplyShape::of(&[b"get", b"b", b"k"]),
            LineReplyShape::Value
        );
        assert_eq!(LineReplyShape::of(&[b"PING"]), LineReplyShape::Status);
        assert_eq!(LineReplyShape::of(&[b"PING", b"hi"]), LineReplyShape::Lines);
    }
}
