//! What `COMMAND` tells a client about kv's commands, in Redis's shape: name, arity, flags and
//! where the key is. Cluster clients (redis-py's `RedisCluster`) read it to learn which
//! argument decides where a request goes: for kv, the bucket, argument 1.

use bytes::Bytes;

use super::ReplyValue;

/// One command as `COMMAND` describes it, with what `kv cli`'s `help` shows of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandSpec {
    /// Lower-case, as Redis names commands.
    pub name: &'static str,
    /// The commands it is listed with (`COMMAND DOCS`; redis-cli's `help @group`).
    pub group: &'static str,
    /// Words including the command's name; negative: at least that many.
    pub arity: i64,
    /// Redis's command flags that apply.
    pub flags: &'static [&'static str],
    /// The first key's position (0: no key), the last key's, and the step between keys.
    pub keys: (i64, i64, i64),
    /// Its arguments, as `help` shows them.
    pub arguments: &'static str,
    /// What it does, in a line.
    pub summary: &'static str,
}

/// Every command kv answers. The bucket is the key: it alone decides a request's slot.
pub const COMMANDS: &[CommandSpec] = &[
    spec("create", "bucket", 2, &["write", "denyoom"], (1, 1, 1))
        .about("bucket", "Creates a bucket (OK if it exists)."),
    spec("drop", "bucket", 2, &["write"], (1, 1, 1))
        .about("bucket", "Drops a bucket and all its keys."),
    spec("put", "bucket", 4, &["write", "denyoom"], (1, 1, 1))
        .about("bucket key value", "Sets a key of a bucket."),
    spec("get", "bucket", 3, &["readonly", "fast"], (1, 1, 1))
        .about("bucket key", "A key's value (nil if the key is missing)."),
    spec("delete", "bucket", 3, &["write", "fast"], (1, 1, 1))
        .about("bucket key", "Deletes a key of a bucket."),
    spec("keys", "bucket", -2, &["readonly"], (1, 1, 1)).about(
        "bucket [cursor]",
        "A page of a bucket's keys and the cursor of the next page (0: the last).",
    ),
    spec("buckets", "bucket", -1, &["readonly"], (0, 0, 0)).about(
        "[after]",
        "A page of bucket names after `after`, in byte order.",
    ),
    spec("scan", "bucket", -2, &["readonly"], (0, 0, 0)).about(
        "cursor [MATCH pattern] [COUNT count]",
        "A page of bucket names and the cursor of the next page (0: the last).",
    ),
    spec("ping", "connection", -1, &["fast", "stale"], (0, 0, 0))
        .about("[message]", "PONG, or the message."),
    spec("echo", "connection", 2, &["fast", "stale"], (0, 0, 0)).about("message", "The message."),
    spec("quit", "connection", 1, &["fast", "stale"], (0, 0, 0))
        .about("", "Closes the connection."),
    spec("info", "server", -1, &["stale"], (0, 0, 0))
        .about("[section]", "The server's counters and settings."),
    spec("dbsize", "server", 1, &["readonly", "fast"], (0, 0, 0))
        .about("", "How many keys this node holds."),
    spec(
        "hello",
        "connection",
        -1,
        &["fast", "stale", "noauth"],
        (0, 0, 0),
    )
    .about(
        "[2|3 [AUTH username password] [SETNAME name]]",
        "Chooses RESP2 or RESP3 and says what the server is.",
    ),
    spec(
        "auth",
        "connection",
        -2,
        &["fast", "stale", "noauth"],
        (0, 0, 0),
    )
    .about(
        "[username] password",
        "Authenticates the connection (--requirepass).",
    ),
    spec("multi", "transactions", 1, &["fast"], (0, 0, 0))
        .about("", "Queues the next commands until EXEC."),
    spec("exec", "transactions", 1, &[], (0, 0, 0)).about(
        "",
        "Runs the queued commands in order; their replies as an array.",
    ),
    spec("discard", "transactions", 1, &["fast"], (0, 0, 0))
        .about("", "Forgets the queued commands."),
    spec("monitor", "server", 1, &["admin"], (0, 0, 0))
        .about("", "Streams every command the server receives."),
    spec("config", "server", -2, &["admin", "stale"], (0, 0, 0))
        .about("GET pattern", "The settings whose names match the pattern."),
    spec("cluster", "cluster", -2, &["stale"], (0, 0, 0)).about(
        "INFO|MYID|SLOTS|NODES|SHARDS|KEYSLOT name",
        "The cluster as Redis Cluster clients read it.",
    ),
    spec("command", "server", -1, &["stale"], (0, 0, 0)).about(
        "[COUNT|INFO name...|DOCS]",
        "kv's commands, as Redis describes its own.",
    ),
    spec("client", "connection", -2, &["stale"], (0, 0, 0)).about(
        "SETNAME name|GETNAME|SETINFO attr value|ID|INFO|LIST|KILL ...",
        "About connections: this one, or all.",
    ),
    spec("select", "connection", 2, &["fast", "stale"], (0, 0, 0))
        .about("index", "Chooses the database: kv has one, 0."),
    spec("debug", "server", -2, &["admin", "noscript"], (0, 0, 0)).about(
        "CRASH bucket|STOP bucket|PANIC",
        "Fault injection, with --enable-debug-commands.",
    ),
];

const fn spec(
    name: &'static str,
    group: &'static str,
    arity: i64,
    flags: &'static [&'static str],
    keys: (i64, i64, i64),
) -> CommandSpec {
    CommandSpec {
        name,
        group,
        arity,
        flags,
        keys,
        arguments: "",
        summary: "",
    }
}

/// The place of `name` in [`COMMANDS`] (at compile time).
const fn place(name: &str) -> usize {
    let name = name.as_bytes();
    let mut index = 0;
    while index < COMMANDS.len() {
        let known = COMMANDS[index].name.as_bytes();
        if known.len() == name.len() {
            let mut at = 0;
            while at < name.len() && known[at] == name[at] {
                at += 1;
            }
            if at == name.len() {
                return index;
            }
        }
        index += 1;
    }
    panic!("no such command in COMMANDS")
}

/// The slot that counts what was not a command (refused before it ran as one).
pub const NOT_A_COMMAND: usize = COMMANDS.len();

/// Places in [`COMMANDS`], for counting requests by command without looking names up.
pub mod slot {
    use super::place;
    #[allow(missing_docs)]
    pub const CREATE: usize = place("create");
    #[allow(missing_docs)]
    pub const DROP: usize = place("drop");
    #[allow(missing_docs)]
    pub const PUT: usize = place("put");
    #[allow(missing_docs)]
    pub const GET: usize = place("get");
    #[allow(missing_docs)]
    pub const DELETE: usize = place("delete");
    #[allow(missing_docs)]
    pub const KEYS: usize = place("keys");
    #[allow(missing_docs)]
    pub const BUCKETS: usize = place("buckets");
    #[allow(missing_docs)]
    pub const SCAN: usize = place("scan");
    #[allow(missing_docs)]
    pub const PING: usize = place("ping");
    #[allow(missing_docs)]
    pub const ECHO: usize = place("echo");
    #[allow(missing_docs)]
    pub const QUIT: usize = place("quit");
    #[allow(missing_docs)]
    pub const INFO: usize = place("info");
    #[allow(missing_docs)]
    pub const DBSIZE: usize = place("dbsize");
    #[allow(missing_docs)]
    pub const HELLO: usize = place("hello");
    #[allow(missing_docs)]
    pub const AUTH: usize = place("auth");
    #[allow(missing_docs)]
    pub const MULTI: usize = place("multi");
    #[allow(missing_docs)]
    pub const EXEC: usize = place("exec");
    #[allow(missing_docs)]
    pub const DISCARD: usize = place("discard");
    #[allow(missing_docs)]
    pub const MONITOR: usize = place("monitor");
    #[allow(missing_docs)]
    pub const CONFIG: usize = place("config");
    #[allow(missing_docs)]
    pub const CLUSTER: usize = place("cluster");
    #[allow(missing_docs)]
    pub const COMMAND: usize = place("command");
    #[allow(missing_docs)]
    pub const CLIENT: usize = place("client");
    #[allow(missing_docs)]
    pub const SELECT: usize = place("select");
    #[allow(missing_docs)]
    pub const DEBUG: usize = place("debug");
}

impl CommandSpec {
    const fn about(mut self, arguments: &'static str, summary: &'static str) -> Self {
        self.arguments = arguments;
        self.summary = summary;
        self
    }

    /// The command as a person would find it.
    #[must_use]
    pub fn find(name: &str) -> Option<&'static Self> {
        COMMANDS
            .iter()
            .find(|spec| spec.name.eq_ignore_ascii_case(name))
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
    /// `COMMAND DOCS`: each command's summary and arguments.
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
        CommandQuery::Docs => ReplyValue::Map(
            COMMANDS
                .iter()
                .map(|spec| {
                    let docs = ReplyValue::Map(vec![
                        (ReplyValue::bulk("summary"), ReplyValue::bulk(spec.summary)),
                        (ReplyValue::bulk("group"), ReplyValue::bulk(spec.group)),
                        (ReplyValue::bulk("arguments"), document_arguments(spec)),
                    ]);
                    (ReplyValue::bulk(spec.name), docs)
                })
                .collect(),
        ),
    }
}

/// A command's arguments as `COMMAND DOCS` gives Redis's: an array of maps, here one per word
/// of its usage line at the outer level (`bucket`, `[cursor]`, `[MATCH pattern]`), with a
/// `name`, a `type` (`key` for the bucket, else `string`) and, bracketed, the flag `optional`.
/// redis-cli builds its help and hints from these, joined by spaces, and stops on an assertion
/// if `arguments` is anything but an array (as it once was here, a line of text).
fn document_arguments(spec: &CommandSpec) -> ReplyValue {
    let mut depth = 0usize;
    let outer_blank = move |c: char| {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        c == ' ' && depth == 0
    };
    let arguments = spec
        .arguments
        .split(outer_blank)
        .filter(|word| !word.is_empty())
        .enumerate()
        .map(|(index, word)| {
            let bracketed = word.strip_prefix('[').and_then(|w| w.strip_suffix(']'));
            let kind = if index == 0 && spec.keys.0 == 1 {
                "key"
            } else {
                "string"
            };
            let mut fields = vec![
                (
                    ReplyValue::bulk("name"),
                    ReplyValue::bulk(bracketed.unwrap_or(word)),
                ),
                (ReplyValue::bulk("type"), ReplyValue::bulk(kind)),
            ];
            if bracketed.is_some() {
                let optional = ReplyValue::Simple("optional".to_owned());
                fields.push((
                    ReplyValue::bulk("flags"),
                    ReplyValue::Array(Some(vec![optional])),
                ));
            }
            ReplyValue::Map(fields)
        })
        .collect();
    ReplyValue::Array(Some(arguments))
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

    /// redis-cli asserts that `arguments` is an array and reads each argument's `name` and
    /// `type` and its `optional` flag; `help @group` compares `group` as a string.
    #[test]
    fn docs_give_each_argument_as_redis_cli_reads_it() {
        let keys = COMMANDS.iter().find(|spec| spec.name == "keys").unwrap();
        let optional = ReplyValue::Array(Some(vec![ReplyValue::Simple("optional".into())]));
        assert_eq!(
            document_arguments(keys),
            ReplyValue::Array(Some(vec![
                ReplyValue::Map(vec![
                    (ReplyValue::bulk("name"), ReplyValue::bulk("bucket")),
                    (ReplyValue::bulk("type"), ReplyValue::bulk("key")),
                ]),
                ReplyValue::Map(vec![
                    (ReplyValue::bulk("name"), ReplyValue::bulk("cursor")),
                    (ReplyValue::bulk("type"), ReplyValue::bulk("string")),
                    (ReplyValue::bulk("flags"), optional.clone()),
                ]),
            ]))
        );
        let hello = COMMANDS.iter().find(|spec| spec.name == "hello").unwrap();
        let ReplyValue::Array(Some(arguments)) = document_arguments(hello) else {
            panic!("an array");
        };
        assert_eq!(
            arguments,
            vec![ReplyValue::Map(vec![
                (
                    ReplyValue::bulk("name"),
                    ReplyValue::bulk("2|3 [AUTH username password] [SETNAME name]")
                ),
                (ReplyValue::bulk("type"), ReplyValue::bulk("string")),
                (ReplyValue::bulk("flags"), optional),
            ])],
            "a bracket's inner brackets stay in its one argument"
        );
        for spec in COMMANDS {
            let ReplyValue::Array(Some(arguments)) = document_arguments(spec) else {
                panic!("{}: an array", spec.name);
            };
            assert_eq!(
                arguments.is_empty(),
                spec.arguments.is_empty(),
                "{}",
                spec.name
            );
            assert!(!spec.group.is_empty(), "{}", spec.name);
        }
    }
}
