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
            if bytes.contains(&b'\n') && std::str::from_utf8(bytes).is_ok() {
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
}
