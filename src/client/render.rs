//! How `kv cli` shows a reply to a person, after `redis-cli`.

use std::fmt::Write as _;

use crate::protocol::ReplyValue;

/// The reply as `kv cli` prints it: simple strings bare, values quoted with escapes,
/// `(nil)` for a missing key, arrays numbered, errors as `(error) …`.
#[must_use]
pub fn render(reply: &ReplyValue) -> String {
    let mut out = String::new();
    render_into(reply, 0, &mut out);
    out
}

fn render_into(reply: &ReplyValue, indent: usize, out: &mut String) {
    match reply {
        ReplyValue::Simple(text) => out.push_str(text),
        ReplyValue::Error(text) => {
            let _ = write!(out, "(error) {text}");
        }
        ReplyValue::Integer(number) => {
            let _ = write!(out, "(integer) {number}");
        }
        ReplyValue::Bulk(None) | ReplyValue::Array(None) => out.push_str("(nil)"),
        ReplyValue::Bulk(Some(bytes)) => {
            let text = bytes
                .iter()
                .all(|&byte| byte == b'\n' || byte == b'\r' || byte == b'\t' || byte >= b' ');
            if bytes.contains(&b'\n') && text && std::str::from_utf8(bytes).is_ok() {
                // Multi-line text (INFO) reads best as it is.
                out.push_str(&String::from_utf8_lossy(bytes));
            } else {
                let _ = write!(out, "\"{}\"", bytes.escape_ascii());
            }
        }
        ReplyValue::Array(Some(elements)) if elements.is_empty() => out.push_str("(empty array)"),
        ReplyValue::Array(Some(elements)) => {
            let width = elements.len().to_string().len();
            for (index, element) in elements.iter().enumerate() {
                if index > 0 {
                    out.push('\n');
                    out.push_str(&" ".repeat(indent));
                }
                let _ = write!(out, "{:>width$}) ", index + 1);
                render_into(element, indent + width + 2, out);
            }
        }
        ReplyValue::Map(pairs) if pairs.is_empty() => out.push_str("(empty hash)"),
        ReplyValue::Map(pairs) => {
            let width = pairs.len().to_string().len();
            for (index, (key, value)) in pairs.iter().enumerate() {
                if index > 0 {
                    out.push('\n');
                    out.push_str(&" ".repeat(indent));
                }
                let _ = write!(out, "{:>width$}# ", index + 1);
                render_into(key, indent + width + 2, out);
                out.push_str(" => ");
                render_into(value, indent + width + 2, out);
            }
        }
    }
}

/// The reply as `kv cli` prints it raw (`--raw`, or when stdout is not a terminal), as
/// redis-cli does: values as they are, a nil as an empty line, each element of an array on a
/// line of its own, numbers bare.
#[must_use]
pub fn render_raw(reply: &ReplyValue) -> Vec<u8> {
    let mut out = Vec::new();
    raw_into(reply, &mut out);
    out
}

fn raw_into(reply: &ReplyValue, out: &mut Vec<u8>) {
    match reply {
        ReplyValue::Simple(text) | ReplyValue::Error(text) => {
            out.extend_from_slice(text.as_bytes());
        }
        ReplyValue::Integer(number) => out.extend_from_slice(number.to_string().as_bytes()),
        ReplyValue::Bulk(None) | ReplyValue::Array(None) => {}
        ReplyValue::Bulk(Some(bytes)) => out.extend_from_slice(bytes),
        ReplyValue::Array(Some(elements)) => {
            for (index, element) in elements.iter().enumerate() {
                if index > 0 {
                    out.push(b'\n');
                }
                raw_into(element, out);
            }
        }
        ReplyValue::Map(pairs) => {
            for (index, (key, value)) in pairs.iter().enumerate() {
                if index > 0 {
                    out.push(b'\n');
                }
                raw_into(key, out);
                out.push(b'\n');
                raw_into(value, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn replies_render_like_redis_cli() {
        assert_eq!(render(&ReplyValue::Simple("OK".into())), "OK");
        assert_eq!(render(&ReplyValue::Bulk(None)), "(nil)");
        assert_eq!(
            render(&ReplyValue::Bulk(Some(Bytes::from_static(b"a\x00b")))),
            "\"a\\x00b\""
        );
        assert_eq!(
            render(&ReplyValue::Array(Some(vec![
                ReplyValue::Bulk(Some(Bytes::from_static(b"x"))),
                ReplyValue::Bulk(Some(Bytes::from_static(b"y"))),
            ]))),
            "1) \"x\"\n2) \"y\""
        );
        assert_eq!(
            render(&ReplyValue::Error("NOTFOUND bucket does not exist".into())),
            "(error) NOTFOUND bucket does not exist"
        );
    }

    #[test]
    fn raw_replies_are_the_bytes() {
        assert_eq!(
            render_raw(&ReplyValue::Bulk(Some(Bytes::from_static(b"a\x00b")))),
            b"a\x00b"
        );
        assert_eq!(render_raw(&ReplyValue::Bulk(None)), b"");
        assert_eq!(
            render_raw(&ReplyValue::Array(Some(vec![
                ReplyValue::Integer(1),
                ReplyValue::Simple("OK".into())
            ]))),
            b"1\nOK"
        );
    }
}
