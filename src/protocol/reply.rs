//! Encoding replies in the dialect their request came in.

use bytes::{BufMut, BytesMut};

use super::{Dialect, ProtocolError, ReplyValue};

/// An error reply: `ERROR <message>` in the line protocol, `-<code> <message>` in RESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// The RESP error code: `ERR`, or a more specific word a client can match on.
    pub code: &'static str,
    /// What went wrong, for a person.
    pub message: String,
}

impl ErrorReply {
    /// A generic `ERR` error.
    #[must_use]
    pub fn new(message: impl std::fmt::Display) -> Self {
        Self {
            code: "ERR",
            message: message.to_string(),
        }
    }

    /// What a request gets when its shard has no reachable leader in time: `-TRYAGAIN` in
    /// RESP, so that Redis clients send it again.
    #[must_use]
    pub fn unavailable() -> Self {
        Self {
            code: "TRYAGAIN",
            message: UNAVAILABLE.into(),
        }
    }
}

/// The message of [`ErrorReply::unavailable`]: all a line-protocol client sees of it.
pub const UNAVAILABLE: &str = "cluster unavailable, try again";

impl From<&ProtocolError> for ErrorReply {
    fn from(error: &ProtocolError) -> Self {
        Self::new(error)
    }
}

/// A range of slots and the nodes that hold it, its leader first: `(host, port, id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    /// The first slot.
    pub first: u16,
    /// The last slot.
    pub last: u16,
    /// The nodes: client host, client port, node id.
    pub nodes: Vec<(String, u16, String)>,
}

/// A reply to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `OK` / `+OK`
    Ok,
    /// The bucket does not exist: `NOT FOUND` / `-NOTFOUND bucket 'name' does not exist`.
    NotFound(&'a [u8]),
    /// No such command, or the wrong number of words: `UNKNOWN COMMAND` / `-ERR unknown command`.
    UnknownCommand,
    /// A `GET` result: the value then `OK` (an empty line for a missing key), or a bulk string
    /// (null for a missing key).
    Value(Option<&'a [u8]>),
    /// A number: on a line then `OK`, or a RESP integer.
    Integer(i64),
    /// `PONG`, or the message `PING` was given.
    Pong(Option<&'a [u8]>),
    /// Lines of text (`INFO`): each line then `OK`, or one bulk string.
    Text(&'a str),
    /// A page of names or keys: one per line then `OK`, or an array of bulk strings.
    List(&'a [&'a [u8]]),
    /// `CLUSTER SLOTS`: for each range of slots, its nodes (the leader first) as `host`,
    /// `port` and id: nested arrays in RESP, a line a range in the line protocol.
    Slots(&'a [SlotRange]),
    /// A page of a listing and where the next page starts (`0`: this was the last): the cursor
    /// on a line, then the items one per line, then `OK`; or, as Redis's `SCAN`, an array of the
    /// cursor (a bulk string) and an array of the items.
    Page {
        /// Where the next page starts.
        cursor: u64,
        /// The page's items.
        items: &'a [&'a [u8]],
    },
    /// A nested answer (`COMMAND`, `CLUSTER SHARDS`): as it is in RESP; in the line protocol,
    /// its leaves one per line (a nil as an empty line), then `OK`.
    Tree(&'a ReplyValue),
    /// A status word (`QUEUED`): on its own line, or a RESP simple string.
    Status(&'static str),
    /// Anything that went wrong.
    Error(ErrorReply),
}

/// How much of a bucket's name an error shows.
const MAX_NAME_SHOWN: usize = 128;

/// Appends `reply` to `out` in `dialect`.
pub fn encode(reply: &Reply<'_>, dialect: Dialect, out: &mut BytesMut) {
    match dialect {
        Dialect::Line => encode_line(reply, out),
        Dialect::Resp => encode_resp(reply, false, out),
        Dialect::Resp3 => encode_resp(reply, true, out),
    }
}

fn encode_line(reply: &Reply<'_>, out: &mut BytesMut) {
    match reply {
        Reply::Ok => out.put_slice(b"OK\r\n"),
        Reply::NotFound(_) => out.put_slice(b"NOT FOUND\r\n"),
        Reply::UnknownCommand => out.put_slice(b"UNKNOWN COMMAND\r\n"),
        Reply::Value(value) => encode_value(*value, Dialect::Line, out),
        Reply::Integer(number) => {
            encode_lines(&[itoa::Buffer::new().format(*number).as_bytes()], out);
        }
        // As Redis answers an inline `PING`, so that tools which send one (redis-benchmark's
        // `PING_INLINE`) read a reply they know; the guide has no `PING`.
        Reply::Pong(None) => out.put_slice(b"+PONG\r\n"),
        Reply::Pong(Some(message)) => encode_lines(&[message], out),
        Reply::Text(text) => {
            let lines: Vec<&[u8]> = text.lines().map(str::as_bytes).collect();
            encode_lines(&lines, out);
        }
        Reply::List(items) => encode_lines(items, out),
        Reply::Slots(ranges) => {
            let lines: Vec<String> = ranges
                .iter()
                .map(|range| {
                    let nodes: Vec<String> = range
                        .nodes
                        .iter()
                        .map(|(host, port, id)| format!("{host}:{port}@{id}"))
                        .collect();
                    format!("{}-{} {}", range.first, range.last, nodes.join(" "))
                })
                .collect();
            let lines: Vec<&[u8]> = lines.iter().map(String::as_bytes).collect();
            encode_lines(&lines, out);
        }
        Reply::Page { cursor, items } => {
            let mut number = itoa::Buffer::new();
            let lines: Vec<&[u8]> = std::iter::once(number.format(*cursor).as_bytes())
                .chain(items.iter().copied())
                .collect();
            encode_lines(&lines, out);
        }
        Reply::Tree(tree) => {
            let mut leaves = Vec::new();
            flatten(tree, &mut leaves);
            let lines: Vec<&[u8]> = leaves.iter().map(Vec::as_slice).collect();
            encode_lines(&lines, out);
        }
        Reply::Status(word) => {
            out.put_slice(word.as_bytes());
            out.put_slice(b"\r\n");
        }
        Reply::Error(error) => {
            out.put_slice(b"ERROR ");
            put_single_line(error.message.as_bytes(), out);
        }
    }
}

/// `reply` in RESP2, or RESP3 when `resp3`: they differ in nulls and maps.
fn encode_resp(reply: &Reply<'_>, resp3: bool, out: &mut BytesMut) {
    match reply {
        Reply::Ok => out.put_slice(b"+OK\r\n"),
        Reply::NotFound(bucket) => {
            out.put_slice(b"-NOTFOUND bucket '");
            // At most this much of the name, on one line: a name may be long or hold anything.
            let shown = &bucket[..bucket.len().min(MAX_NAME_SHOWN)];
            put_single_line(shown, out);
            out.truncate(out.len() - 2);
            out.put_slice(b"' does not exist\r\n");
        }
        Reply::UnknownCommand => {
            out.put_slice(b"-ERR unknown command or wrong number of arguments\r\n");
        }
        Reply::Value(value) => {
            let dialect = if resp3 { Dialect::Resp3 } else { Dialect::Resp };
            encode_value(*value, dialect, out);
        }
        Reply::Integer(number) => put_integer(*number, out),
        Reply::Pong(None) => out.put_slice(b"+PONG\r\n"),
        Reply::Pong(Some(message)) => put_bulk(message, out),
        Reply::Text(text) => put_bulk(text.as_bytes(), out),
        Reply::List(items) => {
            put_header(b'*', items.len(), out);
            for item in *items {
                put_bulk(item, out);
            }
        }
        Reply::Slots(ranges) => {
            put_header(b'*', ranges.len(), out);
            for range in *ranges {
                put_header(b'*', 2 + range.nodes.len(), out);
                put_integer(i64::from(range.first), out);
                put_integer(i64::from(range.last), out);
                for (host, port, id) in &range.nodes {
                    put_header(b'*', 3, out);
                    put_bulk(host.as_bytes(), out);
                    put_integer(i64::from(*port), out);
                    put_bulk(id.as_bytes(), out);
                }
            }
        }
        Reply::Page { cursor, items } => {
            put_header(b'*', 2, out);
            put_bulk(itoa::Buffer::new().format(*cursor).as_bytes(), out);
            put_header(b'*', items.len(), out);
            for item in *items {
                put_bulk(item, out);
            }
        }
        Reply::Tree(tree) => put_tree(tree, resp3, out),
        Reply::Status(word) => {
            out.put_u8(b'+');
            out.put_slice(word.as_bytes());
            out.put_slice(b"\r\n");
        }
        Reply::Error(error) => {
            out.put_u8(b'-');
            out.put_slice(error.code.as_bytes());
            out.put_u8(b' ');
            put_single_line(error.message.as_bytes(), out);
        }
    }
}

/// Appends a page of a listing (see [`Reply::Page`]) whose items are owned byte strings.
pub fn encode_page(cursor: u64, items: &[bytes::Bytes], dialect: Dialect, out: &mut BytesMut) {
    let items: Vec<&[u8]> = items.iter().map(|item| &item[..]).collect();
    encode(
        &Reply::Page {
            cursor,
            items: &items,
        },
        dialect,
        out,
    );
}

/// Appends the reply to a `GET`: the hot path, so it takes the value as a borrowed slice and
/// can run while the bucket's table is locked.
pub fn encode_value(value: Option<&[u8]>, dialect: Dialect, out: &mut BytesMut) {
    match (value, dialect) {
        (Some(value), Dialect::Line) => encode_lines(&[value], out),
        (None, Dialect::Line) => out.put_slice(b"\r\nOK\r\n"),
        (Some(value), Dialect::Resp | Dialect::Resp3) => put_bulk(value, out),
        (None, Dialect::Resp) => out.put_slice(b"$-1\r\n"),
        (None, Dialect::Resp3) => out.put_slice(b"_\r\n"),
    }
}

/// Lines then `OK`, in the line protocol. A line containing CR or LF cannot be sent there
/// without breaking the framing, so the whole reply becomes an error naming RESP instead.
fn encode_lines(lines: &[&[u8]], out: &mut BytesMut) {
    if lines
        .iter()
        .any(|line| line.contains(&b'\n') || line.contains(&b'\r'))
    {
        out.put_slice(b"ERROR reply contains a line break; read it over RESP\r\n");
        return;
    }
    for line in lines {
        out.reserve(line.len() + 2);
        out.put_slice(line);
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"OK\r\n");
}

/// Writes `text` with any CR or LF replaced, then CRLF: error text must stay on one line.
fn put_single_line(text: &[u8], out: &mut BytesMut) {
    out.extend(text.iter().map(|&byte| {
        if byte == b'\r' || byte == b'\n' {
            b' '
        } else {
            byte
        }
    }));
    out.put_slice(b"\r\n");
}

/// `tree` in RESP2, or RESP3 when `resp3`.
fn put_tree(tree: &ReplyValue, resp3: bool, out: &mut BytesMut) {
    match tree {
        ReplyValue::Simple(text) => {
            out.put_u8(b'+');
            put_single_line(text.as_bytes(), out);
        }
        ReplyValue::Error(text) => {
            out.put_u8(b'-');
            put_single_line(text.as_bytes(), out);
        }
        ReplyValue::Integer(number) => put_integer(*number, out),
        ReplyValue::Bulk(Some(bytes)) => put_bulk(bytes, out),
        ReplyValue::Bulk(None) | ReplyValue::Array(None) if resp3 => out.put_slice(b"_\r\n"),
        ReplyValue::Bulk(None) => out.put_slice(b"$-1\r\n"),
        ReplyValue::Array(Some(elements)) => {
            put_header(b'*', elements.len(), out);
            for element in elements {
                put_tree(element, resp3, out);
            }
        }
        ReplyValue::Array(None) => out.put_slice(b"*-1\r\n"),
        ReplyValue::Map(pairs) => {
            if resp3 {
                put_header(b'%', pairs.len(), out);
            } else {
                put_header(b'*', 2 * pairs.len(), out);
            }
            for (key, value) in pairs {
                put_tree(key, resp3, out);
                put_tree(value, resp3, out);
            }
        }
    }
}

/// The leaves of `tree`, depth first, as lines.
fn flatten(tree: &ReplyValue, leaves: &mut Vec<Vec<u8>>) {
    match tree {
        ReplyValue::Simple(text) | ReplyValue::Error(text) => leaves.push(text.as_bytes().to_vec()),
        ReplyValue::Integer(number) => {
            leaves.push(itoa::Buffer::new().format(*number).as_bytes().to_vec());
        }
        ReplyValue::Bulk(bytes) => {
            leaves.push(bytes.as_ref().map_or_else(Vec::new, |b| b.to_vec()));
        }
        ReplyValue::Array(Some(elements)) => {
            for element in elements {
                flatten(element, leaves);
            }
        }
        ReplyValue::Array(None) => leaves.push(Vec::new()),
        ReplyValue::Map(pairs) => {
            for (key, value) in pairs {
                flatten(key, leaves);
                flatten(value, leaves);
            }
        }
    }
}

fn put_integer(number: i64, out: &mut BytesMut) {
    out.put_u8(b':');
    out.put_slice(itoa::Buffer::new().format(number).as_bytes());
    out.put_slice(b"\r\n");
}

fn put_header(kind: u8, length: usize, out: &mut BytesMut) {
    let mut digits = itoa::Buffer::new();
    out.put_u8(kind);
    out.put_slice(digits.format(length).as_bytes());
    out.put_slice(b"\r\n");
}

fn put_bulk(bytes: &[u8], out: &mut BytesMut) {
    out.reserve(bytes.len() + 16);
    put_header(b'$', bytes.len(), out);
    out.put_slice(bytes);
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(reply: &Reply<'_>) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(reply, Dialect::Line, &mut out);
        out.to_vec()
    }

    fn resp(reply: &Reply<'_>) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(reply, Dialect::Resp, &mut out);
        out.to_vec()
    }

    #[test]
    fn the_guide_replies_byte_for_byte() {
        assert_eq!(line(&Reply::Ok), b"OK\r\n");
        assert_eq!(line(&Reply::NotFound(b"shop")), b"NOT FOUND\r\n");
        assert_eq!(line(&Reply::UnknownCommand), b"UNKNOWN COMMAND\r\n");
        assert_eq!(line(&Reply::Value(Some(b"1"))), b"1\r\nOK\r\n");
        assert_eq!(line(&Reply::Value(None)), b"\r\nOK\r\n");
    }

    #[test]
    fn resp3_differs_in_nulls_and_maps() {
        let resp3 = |reply: &Reply<'_>| {
            let mut out = BytesMut::new();
            encode(reply, Dialect::Resp3, &mut out);
            out.to_vec()
        };
        assert_eq!(resp3(&Reply::Value(None)), b"_\r\n");
        assert_eq!(resp3(&Reply::Value(Some(b"1"))), b"$1\r\n1\r\n");
        let map = ReplyValue::Map(vec![(ReplyValue::bulk("proto"), ReplyValue::Integer(3))]);
        assert_eq!(resp3(&Reply::Tree(&map)), b"%1\r\n$5\r\nproto\r\n:3\r\n");
        assert_eq!(resp(&Reply::Tree(&map)), b"*2\r\n$5\r\nproto\r\n:3\r\n");
        assert_eq!(resp3(&Reply::Tree(&ReplyValue::Bulk(None))), b"_\r\n");
    }

    #[test]
    fn resp_replies() {
        assert_eq!(resp(&Reply::Ok), b"+OK\r\n");
        assert_eq!(
            resp(&Reply::NotFound(b"sh\r\nop")),
            b"-NOTFOUND bucket 'sh  op' does not exist\r\n"
        );
        assert_eq!(resp(&Reply::Value(Some(b"1"))), b"$1\r\n1\r\n");
        assert_eq!(resp(&Reply::Value(None)), b"$-1\r\n");
        assert_eq!(
            resp(&Reply::List(&[b"a", b""])),
            b"*2\r\n$1\r\na\r\n$0\r\n\r\n"
        );
        assert_eq!(
            resp(&Reply::Error(ErrorReply::new("bad\r\nthing"))),
            b"-ERR bad  thing\r\n"
        );
    }

    #[test]
    fn values_that_would_break_a_line_are_refused_in_the_line_protocol() {
        assert_eq!(
            line(&Reply::Value(Some(b"a\r\nOK"))),
            b"ERROR reply contains a line break; read it over RESP\r\n"
        );
    }
}
