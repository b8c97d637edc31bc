//! The client's side of RESP: encoding a request, parsing a reply. What `kv cli`, `kv bench`
//! and the client library use; the server's side is in `resp.rs`.

use bytes::Bytes;

use super::ProtocolError;
use super::resp::header;

/// Appends a request, an array of bulk strings, as a RESP client sends it.
pub fn encode_request(arguments: &[&[u8]], out: &mut bytes::BytesMut) {
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(b"*");
    out.extend_from_slice(digits.format(arguments.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for argument in arguments {
        out.extend_from_slice(b"$");
        out.extend_from_slice(digits.format(argument.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(argument);
        out.extend_from_slice(b"\r\n");
    }
}

/// A reply as a RESP client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyValue {
    /// `+text`
    Simple(String),
    /// `-text`
    Error(String),
    /// `:number`
    Integer(i64),
    /// `$length` and its bytes, or `$-1` (`None`).
    Bulk(Option<Bytes>),
    /// `*count` and its elements, or `*-1` (`None`).
    Array(Option<Vec<ReplyValue>>),
    /// A RESP3 map (`%count`, then each key and its value); in RESP2, an array of the keys and
    /// values one after another, as Redis sends it there.
    Map(Vec<(ReplyValue, ReplyValue)>),
}

impl ReplyValue {
    /// A bulk string of `text`.
    #[must_use]
    pub fn bulk(text: impl Into<Bytes>) -> Self {
        Self::Bulk(Some(text.into()))
    }
}

/// Deepest nesting of arrays a client accepts in a reply.
const MAX_DEPTH: usize = 8;

/// Parses the first reply in `input`: `Ok(None)` if it is not all there yet, otherwise the
/// reply and how many bytes it took. `max_bulk_len` bounds any one bulk string or array.
///
/// # Errors
/// [`ProtocolError`] if the bytes are not RESP2 or pass the bound.
pub fn parse_reply(
    input: &[u8],
    max_bulk_len: usize,
) -> Result<Option<(ReplyValue, usize)>, ProtocolError> {
    reply_at(input, 0, max_bulk_len, 0)
}

fn reply_at(
    input: &[u8],
    at: usize,
    max_bulk_len: usize,
    depth: usize,
) -> Result<Option<(ReplyValue, usize)>, ProtocolError> {
    let Some(&kind) = input.get(at) else {
        return Ok(None);
    };
    let line_end = |from: usize| -> Result<Option<usize>, ProtocolError> {
        let rest = &input[from..];
        let window = &rest[..rest.len().min(max_bulk_len.saturating_add(2))];
        match memchr::memchr(b'\n', window) {
            Some(end) if end > 0 && rest[end - 1] == b'\r' => Ok(Some(from + end - 1)),
            Some(_) => Err(ProtocolError::Malformed("line not ended by CRLF")),
            None if rest.len() > max_bulk_len => {
                Err(ProtocolError::Malformed("reply line too long"))
            }
            None => Ok(None),
        }
    };
    let text = |from: usize, to: usize| String::from_utf8_lossy(&input[from..to]).into_owned();
    match kind {
        // RESP3's simple kinds, read as their nearest RESP2 kind: null, boolean, double, big
        // number.
        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => {
            let Some(end) = line_end(at + 1)? else {
                return Ok(None);
            };
            let value = match kind {
                b'+' | b',' | b'(' => ReplyValue::Simple(text(at + 1, end)),
                b'-' => ReplyValue::Error(text(at + 1, end)),
                b'_' => ReplyValue::Bulk(None),
                b'#' => ReplyValue::Integer(i64::from(&input[at + 1..end] == b"t")),
                _ => ReplyValue::Integer(
                    text(at + 1, end)
                        .parse()
                        .map_err(|_| ProtocolError::Malformed("invalid integer"))?,
                ),
            };
            Ok(Some((value, end + 2)))
        }
        // `=` is RESP3's verbatim string (a bulk whose first four bytes name its format), `~`
        // a set, `%` a map, `>` a push.
        b'$' | b'*' | b'=' | b'~' | b'%' | b'>' => {
            let Some((length, data)) = header(input, at, kind)? else {
                return Ok(None);
            };
            if length < 0 {
                let none = if kind == b'$' {
                    ReplyValue::Bulk(None)
                } else {
                    ReplyValue::Array(None)
                };
                return Ok(Some((none, data)));
            }
            if length as u64 > max_bulk_len as u64 {
                return Err(ProtocolError::BulkTooLong {
                    length: length as u64,
                    limit: max_bulk_len,
                });
            }
            let length = length as usize;
            if kind == b'$' || kind == b'=' {
                if input.len() < data + length + 2 {
                    return Ok(None);
                }
                if &input[data + length..data + length + 2] != b"\r\n" {
                    return Err(ProtocolError::Malformed("bulk not ended by CRLF"));
                }
                let skip = if kind == b'=' { length.min(4) } else { 0 };
                let bulk = Bytes::copy_from_slice(&input[data + skip..data + length]);
                return Ok(Some((ReplyValue::Bulk(Some(bulk)), data + length + 2)));
            }
            let length = if kind == b'%' {
                length.saturating_mul(2)
            } else {
                length
            };
            if depth == MAX_DEPTH {
                return Err(ProtocolError::Malformed("arrays nested too deep"));
            }
            let mut elements = Vec::with_capacity(length.min(1024));
            let mut next = data;
            for _ in 0..length {
                let Some((element, after)) = reply_at(input, next, max_bulk_len, depth + 1)? else {
                    return Ok(None);
                };
                elements.push(element);
                next = after;
            }
            let value = if kind == b'%' {
                let mut pairs = Vec::with_capacity(elements.len() / 2);
                let mut elements = elements.into_iter();
                while let (Some(key), Some(value)) = (elements.next(), elements.next()) {
                    pairs.push((key, value));
                }
                ReplyValue::Map(pairs)
            } else {
                ReplyValue::Array(Some(elements))
            };
            Ok(Some((value, next)))
        }
        _ => Err(ProtocolError::Malformed("unknown reply type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        let input = b"+OK\r\n-ERR no\r\n:42\r\n$-1\r\n$2\r\nhi\r\n*2\r\n$1\r\na\r\n*-1\r\n";
        let mut at = 0;
        let mut values = Vec::new();
        while let Some((value, next)) = reply_at(input, at, 1024, 0).unwrap() {
            values.push(value);
            at = next;
        }
        assert_eq!(
            values,
            [
                ReplyValue::Simple("OK".into()),
                ReplyValue::Error("ERR no".into()),
                ReplyValue::Integer(42),
                ReplyValue::Bulk(None),
                ReplyValue::Bulk(Some(Bytes::from("hi"))),
                ReplyValue::Array(Some(vec![
                    ReplyValue::Bulk(Some(Bytes::from("a"))),
                    ReplyValue::Array(None)
                ])),
            ]
        );
    }
}
