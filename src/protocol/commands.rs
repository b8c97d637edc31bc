//! What `COMMAND` tells a client about kv's commands, in Redis's shape: name, arity, flags and
//! where the key is. Cluster clients (redis-py's `RedisCluster`) read it to learn which
//! argument decides where a request goes: for kv, the bucket, argument 1.

use bytes::Bytes;

use super::ReplyValue;

/// One command as `COMMAND` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandSpec {
    /// Lower-case, as Redis names commands.
    pub name: &'static str,
    /// Words including the command's name; negative: at least that many.
    pub arity: i64,
    /// Redis's command flags that apply.
    pub flags: &'static [&'static str],
    /// The first key's position (0: no key), the last key's, and the step between keys.
    pub keys: (i64, i64, i64),
}

/// Every command kv answers. The bucket is the key: it alone decides a request's slot.
pub const COMMANDS: &[CommandSpec] = &[
    spec("create", 2, &["write", "denyoom"], (1, 1, 1)),
    spec("drop", 2, &["write"], (1, 1, 1)),
    spec("put", 4, &["write", "denyoom"], (1, 1, 1)),
    spec("get", 3, &["readonly", "fast"], (1, 1, 1)),
    spec("delete", 3, &["write", "fast"], (1, 1, 1)),
    spec("keys", -2, &["readonly"], (1, 1, 1)),
    spec("buckets", -1, &["readonly"], (0, 0, 0)),
    spec("ping", -1, &["fast", "stale"], (0, 0, 0)),
    spec("quit", 1, &["fast", "stale"], (0, 0, 0)),
    spec("info", -1, &["stale"], (0, 0, 0)),
    spec("dbsize", 1, &["readonly", "fast"], (0, 0, 0)),
    spec("cluster", -2, &["stale"], (0, 0, 0)),
    spec("command", -1, &["stale"], (0, 0, 0)),
    spec("client", -2, &["stale"], (0, 0, 0)),
    spec("select", 2, &["fast", "stale"], (0, 0, 0)),
    spec("debug", -2, &["admin", "noscript"], (0, 0, 0)),
];

const fn spec(
    name: &'static str,
    arity: i64,
    flags: &'static [&'static str],
    keys: (i64, i64, i64),
) -> CommandSpec {
    CommandSpec {
        name,
        arity,
        flags,
        keys,
    }
}

/// What `COMMAND` is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandQuery<'a> {
    /// `COMMAND`: every command.
    All,
    /// `COMMAND COUNT`
    Count,
    /// `COMMAND INFO name…` (up to three names here): each, or nil if there is no such
    /// command.
    Info([Option<&'a [u8]>; 3]),
    /// `COMMAND DOCS`: kv has no docs to give; an empty answer, which clients accept.
    Docs,
}

/// The answer to `query`.
#[must_use]
pub fn describe_commands(query: &CommandQuery<'_>) -> ReplyValue {
    match query {
        CommandQuery::All => ReplyValue::Array(Some(COMMANDS.iter().map(describe).collect())),
        CommandQuery::Count => ReplyValue::Integer(COMMANDS.len() as i64),
        CommandQuery::Info(names) => ReplyValue::Array(Some(
            names
                .iter()
                .flatten()
                .map(|name| {
                    COMMANDS
                        .iter()
                        .find(|spec| name.eq_ignore_ascii_case(spec.name.as_bytes()))
                        .map_or(ReplyValue::Array(None), describe)
                })
                .collect(),
        )),
        CommandQuery::Docs => ReplyValue::Array(Some(Vec::new())),
    }
}

/// One command as Redis 2.8–6 describe it: name, arity, flags, first key, last key, step.
fn describe(spec: &CommandSpec) -> ReplyValue {
    let (first, last, step) = spec.keys;
    ReplyValue::Array(Some(vec![
        ReplyValue::Bulk(Some(Bytes::from_static(spec.name.as_bytes()))),
        ReplyValue::Integer(spec.arity),
        ReplyValue::Array(Some(
            spec.flags
                .iter()
                .map(|flag| ReplyValue::Simple((*flag).to_owned()))
                .collect(),
        )),
        ReplyValue::Integer(first),
        ReplyValue::Integer(last),
        ReplyValue::Integer(step),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_is_each_bucket_commands_key() {
        for name in ["create", "drop", "put", "get", "delete", "keys"] {
            let spec = COMMANDS.iter().find(|spec| spec.name == name);
            assert_eq!(spec.map(|spec| spec.keys), Some((1, 1, 1)), "{name}");
        }
    }

    #[test]
    fn info_answers_nil_for_an_unknown_command() {
        let answer = describe_commands(&CommandQuery::Info([Some(b"PUT"), Some(b"fly"), None]));
        let ReplyValue::Array(Some(entries)) = answer else {
            panic!("an array");
        };
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0], describe(&COMMANDS[2]));
        assert_eq!(entries[1], ReplyValue::Array(None));
    }
}
