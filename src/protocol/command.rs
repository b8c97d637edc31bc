//! Requests, as both dialects give them once split into words.

use super::ProtocolError;
use super::commands::{COMMANDS, CommandQuery};

/// Most words any command takes; a request with more is an unknown command. Words are kept on
/// the stack up to this count.
pub(super) const MAX_WORDS: usize = 8;

/// What a debug command does to a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugAction {
    /// Make the bucket's task panic.
    Crash,
    /// Make the bucket's task stop.
    Stop,
}

/// What `CLUSTER` is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterQuery {
    /// `CLUSTER INFO`: `cluster_state` and the counts Redis gives.
    Info,
    /// `CLUSTER MYID`: this node's id.
    MyId,
    /// `CLUSTER SLOTS`: each shard's slots and the nodes holding them, its leader first.
    Slots,
    /// `CLUSTER NODES`: every node, with the slots of the shards it leads.
    Nodes,
    /// `CLUSTER SHARDS`: each shard's slots and its nodes, the leader as master.
    Shards,
    /// `CLUSTER ADDNODE id host:port`: a node expected to join at that cluster address
    /// (`None`: not a node id and an address).
    AddNode(Option<(u64, std::net::SocketAddr)>),
    /// `CLUSTER REMOVENODE id`: drain a member, then remove it (`None`: not a node id).
    RemoveNode(Option<u64>),
    /// `CLUSTER FORGET id`: remove a dead member at once, its replicas rebuilt elsewhere.
    Forget(Option<u64>),
}

/// A node id as `CLUSTER` commands take one: decimal, or the forty hexadecimal digits
/// `CLUSTER NODES` shows.
fn node_id(word: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(word).ok()?;
    match text.len() {
        40 => u64::from_str_radix(text.get(24..)?, 16)
            .ok()
            .filter(|_| text[..24].bytes().all(|digit| digit == b'0')),
        _ => text.parse().ok(),
    }
    .filter(|&id| id > 0)
}

/// What `CLIENT` is asked: about this connection, as Redis clients ask on connecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRequest<'a> {
    /// `CLIENT SETNAME name`: names this connection.
    SetName(&'a [u8]),
    /// `CLIENT GETNAME`: this connection's name, if it has one.
    GetName,
    /// `CLIENT SETINFO LIB-NAME|LIB-VER value`: which client library this is.
    SetInfo {
        /// `LIB-NAME` or `LIB-VER`, as sent.
        attribute: &'a [u8],
        /// Its value.
        value: &'a [u8],
    },
    /// `CLIENT ID`: this connection's id.
    Id,
    /// `CLIENT INFO`: this connection, as a line of `CLIENT LIST`.
    Info,
    /// `CLIENT LIST`: every connection, a line each.
    List,
    /// `CLIENT KILL …`: closes the connections named.
    Kill(ClientKill<'a>),
}

/// Which connections `CLIENT KILL` closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKill<'a> {
    /// `CLIENT KILL ip:port` (the old form: replies `OK`, or an error if there is none).
    Address(&'a [u8]),
    /// `CLIENT KILL ADDR ip:port` (replies with how many were closed).
    AddressFilter(&'a [u8]),
    /// `CLIENT KILL ID id` (replies with how many were closed).
    Id(u64),
}

/// A request on one key of one bucket: what a connection runs in batches, its buckets found
/// together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRequest<'a> {
    /// The bucket.
    pub bucket: &'a [u8],
    /// The key.
    pub key: &'a [u8],
    /// What to do with it.
    pub action: KeyAction<'a>,
}

/// What a [`KeyRequest`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAction<'a> {
    /// `GET bucket key`
    Get,
    /// `PUT bucket key value`
    Put {
        /// The value.
        value: &'a [u8],
    },
    /// `DELETE bucket key`
    Delete,
}

/// A request, its words borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// `CREATE bucket`
    Create {
        /// The bucket.
        bucket: &'a [u8],
    },
    /// `GET`, `PUT` or `DELETE`: a request on one key of one bucket.
    Key(KeyRequest<'a>),
    /// `DROP bucket`
    Drop {
        /// The bucket.
        bucket: &'a [u8],
    },
    /// `PING [message]`
    Ping {
        /// Echoed back if given.
        message: Option<&'a [u8]>,
    },
    /// `ECHO message`: the message back, as Redis answers it (`redis-cli --pipe` ends its
    /// stream with one to know when every reply is in).
    Echo {
        /// What is sent back.
        message: &'a [u8],
    },
    /// `QUIT`
    Quit,
    /// `INFO [section…]`: the sections asked for (up to seven), or every one.
    Info {
        /// The sections named, as sent.
        sections: [Option<&'a [u8]>; MAX_WORDS - 1],
    },
    /// `DBSIZE`: how many keys there are (on this node).
    DbSize,
    /// `CLUSTER KEYSLOT name`: the slot a bucket of that name belongs to, as Redis Cluster
    /// computes it.
    ClusterKeySlot {
        /// The bucket's name.
        name: &'a [u8],
    },
    /// `CLUSTER INFO|MYID|SLOTS|NODES|SHARDS`: the cluster as Redis Cluster clients read it.
    Cluster(ClusterQuery),
    /// `COMMAND [COUNT|INFO name…|DOCS]`: kv's commands as Redis describes its own.
    Command(CommandQuery<'a>),
    /// `CLIENT SETNAME|GETNAME|SETINFO …`: about this connection.
    Client(ClientRequest<'a>),
    /// `SELECT index`: kv has one database, 0.
    Select {
        /// The database asked for, as sent.
        index: &'a [u8],
    },
    /// `BUCKETS [after]`: one page of bucket names greater than `after`.
    Buckets {
        /// The last name of the previous page.
        after: Option<&'a [u8]>,
    },
    /// `KEYS bucket [cursor]`: one page of the bucket's keys, from `cursor` (0: the first
    /// page), with the cursor of the next.
    Keys {
        /// The bucket.
        bucket: &'a [u8],
        /// Where the previous page ended.
        cursor: u64,
    },
    /// `HELLO [protover [AUTH username password] [SETNAME name]]`: chooses RESP2 or RESP3,
    /// authenticates and names the connection, and answers with what the server is.
    Hello {
        /// The RESP version asked for, as sent.
        version: Option<&'a [u8]>,
        /// `AUTH username password`.
        auth: Option<(&'a [u8], &'a [u8])>,
        /// `SETNAME name`.
        name: Option<&'a [u8]>,
    },
    /// `AUTH [username] password`
    Auth {
        /// Only `default` is known.
        username: Option<&'a [u8]>,
        /// The password.
        password: &'a [u8],
    },
    /// `MULTI`: queue the next requests until `EXEC`.
    Multi,
    /// `EXEC`: run the queued requests in order.
    Exec,
    /// `DISCARD`: forget the queued requests.
    Discard,
    /// `MONITOR`: stream every request the server gets.
    Monitor,
    /// `CONFIG GET pattern`: the server's settings whose names match.
    ConfigGet {
        /// A glob (`*`, `?`, `[…]`).
        pattern: &'a [u8],
    },
    /// `CONFIG SET|RESETSTAT|REWRITE …`: kv's settings are fixed at start-up.
    ConfigChange,
    /// `SCAN cursor [MATCH pattern] [COUNT count]`: a page of bucket names (the keys of the
    /// keyspace as Redis clients see it) and the cursor of the next page.
    Scan {
        /// 0, or what the previous page gave.
        cursor: u64,
        /// Only names matching this glob.
        pattern: Option<&'a [u8]>,
        /// How many names to look at (at most the page size).
        count: Option<usize>,
    },
    /// `DEBUG PANIC`: the connection's own task panics, when the server allows it.
    DebugPanic,
    /// `DEBUG CRASH bucket` or `DEBUG STOP bucket`, when the server allows it.
    Debug {
        /// What to do.
        action: DebugAction,
        /// The bucket.
        bucket: &'a [u8],
    },
}

impl<'a> Request<'a> {
    /// The request's command, as its place in [`COMMANDS`](super::COMMANDS): what its counts
    /// and latencies are kept under.
    #[must_use]
    pub fn command_slot(&self) -> usize {
        use super::commands::slot;
        match self {
            Self::Create { .. } => slot::CREATE,
            Self::Key(KeyRequest { action, .. }) => match action {
                KeyAction::Get => slot::GET,
                KeyAction::Put { .. } => slot::PUT,
                KeyAction::Delete => slot::DELETE,
            },
            Self::Drop { .. } => slot::DROP,
            Self::Ping { .. } => slot::PING,
            Self::Echo { .. } => slot::ECHO,
            Self::Quit => slot::QUIT,
            Self::Info { .. } => slot::INFO,
            Self::DbSize => slot::DBSIZE,
            Self::ClusterKeySlot { .. } | Self::Cluster(_) => slot::CLUSTER,
            Self::Command(_) => slot::COMMAND,
            Self::Client(_) => slot::CLIENT,
            Self::Select { .. } => slot::SELECT,
            Self::Buckets { .. } => slot::BUCKETS,
            Self::Keys { .. } => slot::KEYS,
            Self::Hello { .. } => slot::HELLO,
            Self::Auth { .. } => slot::AUTH,
            Self::Multi => slot::MULTI,
            Self::Exec => slot::EXEC,
            Self::Discard => slot::DISCARD,
            Self::Monitor => slot::MONITOR,
            Self::ConfigGet { .. } | Self::ConfigChange => slot::CONFIG,
            Self::Scan { .. } => slot::SCAN,
            Self::DebugPanic | Self::Debug { .. } => slot::DEBUG,
        }
    }

    /// `GET bucket key`
    #[must_use]
    pub fn get(bucket: &'a [u8], key: &'a [u8]) -> Self {
        Self::Key(KeyRequest {
            bucket,
            key,
            action: KeyAction::Get,
        })
    }

    /// `PUT bucket key value`
    #[must_use]
    pub fn put(bucket: &'a [u8], key: &'a [u8], value: &'a [u8]) -> Self {
        Self::Key(KeyRequest {
            bucket,
            key,
            action: KeyAction::Put { value },
        })
    }

    /// `DELETE bucket key`
    #[must_use]
    pub fn delete(bucket: &'a [u8], key: &'a [u8]) -> Self {
        Self::Key(KeyRequest {
            bucket,
            key,
            action: KeyAction::Delete,
        })
    }

    /// Makes a request of its words. `words` holds at most [`MAX_WORDS`] words; `extra` says
    /// whether the request had more (which no command accepts).
    pub(super) fn from_words(words: &[&'a [u8]], extra: bool) -> Result<Self, ProtocolError> {
        Self::parse_words(words, extra)?.ok_or_else(|| refusal(words, extra))
    }

    /// The request `words` make; `Ok(None)` if they make none (no such command, or not with
    /// these words).
    fn parse_words(words: &[&'a [u8]], extra: bool) -> Result<Option<Self>, ProtocolError> {
        let Some((command, arguments)) = words.split_first() else {
            return Ok(None);
        };
        if extra {
            return Ok(None);
        }
        let is = |name: &str| command.eq_ignore_ascii_case(name.as_bytes());
        let request = match arguments {
            [bucket] if is("CREATE") => Self::Create { bucket },
            [bucket, key, value] if is("PUT") => Self::put(bucket, key, value),
            [bucket, key] if is("GET") => Self::get(bucket, key),
            [bucket, key] if is("DELETE") => Self::delete(bucket, key),
            [bucket] if is("DROP") => Self::Drop { bucket },
            [] if is("PING") => Self::Ping { message: None },
            [message] if is("PING") => Self::Ping {
                message: Some(message),
            },
            [message] if is("ECHO") => Self::Echo { message },
            [] if is("QUIT") => Self::Quit,
            names if is("INFO") => {
                let mut sections = [None; MAX_WORDS - 1];
                for (slot, name) in sections.iter_mut().zip(names) {
                    *slot = Some(*name);
                }
                Self::Info { sections }
            }
            [] if is("DBSIZE") => Self::DbSize,
            [subcommand, name] if is("CLUSTER") && subcommand.eq_ignore_ascii_case(b"KEYSLOT") => {
                Self::ClusterKeySlot { name }
            }
            [subcommand, id, address]
                if is("CLUSTER") && subcommand.eq_ignore_ascii_case(b"ADDNODE") =>
            {
                let address = std::str::from_utf8(address)
                    .ok()
                    .and_then(|address| address.parse().ok());
                Self::Cluster(ClusterQuery::AddNode(node_id(id).zip(address)))
            }
            [subcommand, id] if is("CLUSTER") && subcommand.eq_ignore_ascii_case(b"REMOVENODE") => {
                Self::Cluster(ClusterQuery::RemoveNode(node_id(id)))
            }
            [subcommand, id] if is("CLUSTER") && subcommand.eq_ignore_ascii_case(b"FORGET") => {
                Self::Cluster(ClusterQuery::Forget(node_id(id)))
            }
            [subcommand] if is("CLUSTER") => {
                let query = [
                    ("INFO", ClusterQuery::Info),
                    ("MYID", ClusterQuery::MyId),
                    ("SLOTS", ClusterQuery::Slots),
                    ("NODES", ClusterQuery::Nodes),
                    ("SHARDS", ClusterQuery::Shards),
                ]
                .into_iter()
                .find(|(name, _)| subcommand.eq_ignore_ascii_case(name.as_bytes()));
                let Some((_, query)) = query else {
                    return Ok(None);
                };
                Self::Cluster(query)
            }
            [] if is("COMMAND") => Self::Command(CommandQuery::All),
            [subcommand, names @ ..] if is("COMMAND") => {
                let is_sub = |name: &str| subcommand.eq_ignore_ascii_case(name.as_bytes());
                Self::Command(match names {
                    [] if is_sub("COUNT") => CommandQuery::Count,
                    _ if is_sub("DOCS") => CommandQuery::Docs,
                    _ if is_sub("INFO") => {
                        let mut asked = [None; 3];
                        for (slot, name) in asked.iter_mut().zip(names) {
                            *slot = Some(*name);
                        }
                        CommandQuery::Info(asked)
                    }
                    _ => return Ok(None),
                })
            }
            [subcommand, rest @ ..] if is("CLIENT") => {
                let is_sub = |name: &str| subcommand.eq_ignore_ascii_case(name.as_bytes());
                let is_word = |word: &[u8], name: &str| word.eq_ignore_ascii_case(name.as_bytes());
                Self::Client(match rest {
                    [name] if is_sub("SETNAME") => ClientRequest::SetName(name),
                    [] if is_sub("GETNAME") => ClientRequest::GetName,
                    [attribute, value] if is_sub("SETINFO") => {
                        ClientRequest::SetInfo { attribute, value }
                    }
                    [] if is_sub("ID") => ClientRequest::Id,
                    [] if is_sub("INFO") => ClientRequest::Info,
                    [] if is_sub("LIST") => ClientRequest::List,
                    [address] if is_sub("KILL") => {
                        ClientRequest::Kill(ClientKill::Address(address))
                    }
                    [filter, address] if is_sub("KILL") && is_word(filter, "ADDR") => {
                        ClientRequest::Kill(ClientKill::AddressFilter(address))
                    }
                    [filter, id] if is_sub("KILL") && is_word(filter, "ID") => {
                        ClientRequest::Kill(ClientKill::Id(
                            number(id).ok_or(ProtocolError::NotANumber { what: "client id" })?,
                        ))
                    }
                    _ => return Ok(None),
                })
            }
            [] | [_] if is("HELLO") => Self::Hello {
                version: arguments.first().copied(),
                auth: None,
                name: None,
            },
            [version, options @ ..] if is("HELLO") => {
                let (mut auth, mut name) = (None, None);
                each_option("hello", options, |rest| match rest {
                    [option, username, password, after @ ..]
                        if option.eq_ignore_ascii_case(b"AUTH") =>
                    {
                        auth = Some((*username, *password));
                        Ok(Some(after))
                    }
                    [option, new_name, after @ ..] if option.eq_ignore_ascii_case(b"SETNAME") => {
                        name = Some(*new_name);
                        Ok(Some(after))
                    }
                    _ => Ok(None),
                })?;
                Self::Hello {
                    version: Some(version),
                    auth,
                    name,
                }
            }
            [password] if is("AUTH") => Self::Auth {
                username: None,
                password,
            },
            [username, password] if is("AUTH") => Self::Auth {
                username: Some(username),
                password,
            },
            [] if is("MULTI") => Self::Multi,
            [] if is("EXEC") => Self::Exec,
            [] if is("DISCARD") => Self::Discard,
            [] if is("MONITOR") => Self::Monitor,
            [subcommand, pattern] if is("CONFIG") && subcommand.eq_ignore_ascii_case(b"GET") => {
                Self::ConfigGet {
                    pattern: bounded_pattern(pattern)?,
                }
            }
            [subcommand, ..]
                if is("CONFIG")
                    && [&b"SET"[..], b"RESETSTAT", b"REWRITE"]
                        .iter()
                        .any(|name| subcommand.eq_ignore_ascii_case(name)) =>
            {
                Self::ConfigChange
            }
            [cursor, options @ ..] if is("SCAN") => {
                let cursor = number(cursor).ok_or(ProtocolError::InvalidCursor)?;
                let (mut pattern, mut count) = (None, None);
                each_option("scan", options, |rest| match rest {
                    [option, value, after @ ..] if option.eq_ignore_ascii_case(b"MATCH") => {
                        pattern = Some(bounded_pattern(value)?);
                        Ok(Some(after))
                    }
                    [option, value, after @ ..] if option.eq_ignore_ascii_case(b"COUNT") => {
                        count = Some(
                            number(value)
                                .and_then(|count| usize::try_from(count).ok())
                                .filter(|&count| count > 0)
                                .ok_or(ProtocolError::NotANumber { what: "COUNT" })?,
                        );
                        Ok(Some(after))
                    }
                    _ => Ok(None),
                })?;
                Self::Scan {
                    cursor,
                    pattern,
                    count,
                }
            }
            [index] if is("SELECT") => Self::Select { index },
            [] if is("BUCKETS") => Self::Buckets { after: None },
            [after] if is("BUCKETS") => Self::Buckets { after: Some(after) },
            [bucket] if is("KEYS") => Self::Keys { bucket, cursor: 0 },
            [bucket, cursor] if is("KEYS") => Self::Keys {
                bucket,
                cursor: number(cursor).ok_or(ProtocolError::InvalidCursor)?,
            },
            [action] if is("DEBUG") && action.eq_ignore_ascii_case(b"PANIC") => Self::DebugPanic,
            [action, bucket] if is("DEBUG") => {
                let action = if action.eq_ignore_ascii_case(b"CRASH") {
                    DebugAction::Crash
                } else if action.eq_ignore_ascii_case(b"STOP") {
                    DebugAction::Stop
                } else {
                    return Ok(None);
                };
                Self::Debug { action, bucket }
            }
            _ => return Ok(None),
        };
        Ok(Some(request))
    }
}

/// Reads a command's optional `NAME value…` words: `take` takes the option at the front of
/// what is left and returns the rest after it, or `None` for a word that is no option of the
/// command (a syntax error naming it).
fn each_option<'w, 'a>(
    command: &'static str,
    mut rest: &'w [&'a [u8]],
    mut take: impl FnMut(&'w [&'a [u8]]) -> Result<Option<&'w [&'a [u8]]>, ProtocolError>,
) -> Result<(), ProtocolError> {
    while let Some(option) = rest.first() {
        rest = take(rest)?.ok_or_else(|| ProtocolError::Syntax {
            command,
            near: String::from_utf8_lossy(option).into_owned(),
        })?;
    }
    Ok(())
}

/// The longest `MATCH` or `CONFIG GET` pattern taken (Redis's key patterns are short).
const MAX_PATTERN_LEN: usize = 512;

/// `pattern`, if it is within [`MAX_PATTERN_LEN`].
fn bounded_pattern(pattern: &[u8]) -> Result<&[u8], ProtocolError> {
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(ProtocolError::PatternTooLong {
            limit: MAX_PATTERN_LEN,
        });
    }
    Ok(pattern)
}

/// `word` as a decimal number, if it is one.
fn number(word: &[u8]) -> Option<u64> {
    std::str::from_utf8(word).ok()?.parse().ok()
}

/// Why `words` make no request, named as Redis names it: a command kv does not have, a
/// subcommand its command does not have, or a known command with the wrong number of words.
fn refusal(words: &[&[u8]], extra: bool) -> ProtocolError {
    /// Redis shows at most this much of a name or an argument.
    const SHOWN: usize = 128;
    let shown = |word: &[u8]| String::from_utf8_lossy(&word[..word.len().min(SHOWN)]).into_owned();
    let Some((name, arguments)) = words.split_first() else {
        return ProtocolError::UnknownCommand {
            name: String::new(),
            args: String::new(),
        };
    };
    // Redis's commands on a bare key, as redis-benchmark sends them: say what kv takes.
    let bucket_less = [
        ("set", 3, "PUT bucket key value"),
        ("get", 2, "GET bucket key"),
        ("del", 2, "DELETE bucket key"),
    ];
    if let Some(&(command, _, usage)) = bucket_less.iter().find(|(command, words_taken, _)| {
        name.eq_ignore_ascii_case(command.as_bytes())
            && (*command != "get" || words.len() == *words_taken)
    }) {
        return ProtocolError::NoBucket { command, usage };
    }
    let Some(spec) = COMMANDS
        .iter()
        .find(|spec| name.eq_ignore_ascii_case(spec.name.as_bytes()))
    else {
        let args = arguments
            .iter()
            .map(|argument| format!("'{}' ", shown(argument)))
            .collect();
        return ProtocolError::UnknownCommand {
            name: shown(name),
            args,
        };
    };
    let count = i64::try_from(words.len()).unwrap_or(i64::MAX);
    let arity_fits = !extra
        && if spec.arity < 0 {
            count >= -spec.arity
        } else {
            count == spec.arity
        };
    let subcommands = SUBCOMMANDS
        .iter()
        .find(|(command, _)| *command == spec.name)
        .map(|(_, subcommands)| *subcommands);
    match (arguments.first(), subcommands) {
        (Some(subcommand), Some(known))
            if arity_fits
                && !known
                    .iter()
                    .any(|known| subcommand.eq_ignore_ascii_case(known.as_bytes())) =>
        {
            ProtocolError::UnknownSubcommand {
                command: spec.name,
                subcommand: shown(subcommand),
            }
        }
        _ => ProtocolError::WrongArity { command: spec.name },
    }
}

/// The commands whose first argument is a subcommand, and their subcommands.
const SUBCOMMANDS: [(&str, &[&str]); 5] = [
    (
        "client",
        &[
            "setname", "getname", "setinfo", "id", "info", "list", "kill",
        ],
    ),
    (
        "cluster",
        &["info", "myid", "slots", "nodes", "shards", "keyslot"],
    ),
    ("command", &["count", "info", "docs"]),
    ("config", &["get", "set", "resetstat", "rewrite"]),
    ("debug", &["crash", "stop", "panic"]),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_case_insensitive_and_arity_is_checked() {
        assert_eq!(
            Request::from_words(&[b"get", b"shopping", b"milk"], false),
            Ok(Request::get(b"shopping", b"milk"))
        );
        assert_eq!(
            Request::from_words(&[b"DELETE", b"shopping"], false),
            Err(ProtocolError::WrongArity { command: "delete" })
        );
        assert_eq!(
            Request::from_words(&[b"PUT", b"a", b"b", b"c"], true),
            Err(ProtocolError::WrongArity { command: "put" })
        );
        assert_eq!(
            Request::from_words(&[b"FLUSH"], false),
            Err(ProtocolError::UnknownCommand {
                name: "FLUSH".into(),
                args: String::new()
            })
        );
        assert!(
            Request::from_words(&[], false)
                .unwrap_err()
                .is_unknown_command()
        );
    }

    #[test]
    fn membership_commands_take_node_ids_as_numbers_or_as_cluster_nodes_shows_them() {
        let cluster = |words: &[&[u8]]| match Request::from_words(words, false).unwrap() {
            Request::Cluster(query) => query,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            cluster(&[b"CLUSTER", b"removenode", b"4"]),
            ClusterQuery::RemoveNode(Some(4))
        );
        let named = format!("{:040x}", 12);
        assert_eq!(
            cluster(&[b"CLUSTER", b"FORGET", named.as_bytes()]),
            ClusterQuery::Forget(Some(12))
        );
        for invalid in [
            &b"0"[..],
            b"x",
            b"f0000000000000000000000000000000000000001",
        ] {
            assert_eq!(
                cluster(&[b"CLUSTER", b"FORGET", invalid]),
                ClusterQuery::Forget(None)
            );
        }
        assert_eq!(
            cluster(&[b"CLUSTER", b"ADDNODE", b"5", b"127.0.0.1:7405"]),
            ClusterQuery::AddNode(Some((5, "127.0.0.1:7405".parse().unwrap())))
        );
        assert_eq!(
            cluster(&[b"CLUSTER", b"ADDNODE", b"5", b"nowhere"]),
            ClusterQuery::AddNode(None)
        );
    }

    #[test]
    fn refusals_name_the_command_as_redis_does() {
        let refused = |words: &[&[u8]]| Request::from_words(words, false).unwrap_err().to_string();
        assert_eq!(
            refused(&[b"FLY", b"away", b"now"]),
            "unknown command 'FLY', with args beginning with: 'away' 'now' "
        );
        assert_eq!(
            refused(&[b"delete", b"b"]),
            "wrong number of arguments for 'delete' command"
        );
        assert_eq!(
            refused(&[b"CLUSTER", b"MEET"]),
            "unknown subcommand 'MEET' of 'cluster'"
        );
        assert_eq!(
            refused(&[b"CLUSTER", b"KEYSLOT"]),
            "wrong number of arguments for 'cluster' command"
        );
        assert_eq!(
            refused(&[b"SET", b"k", b"v"]),
            "kv keeps keys in buckets: 'set' needs one, as in PUT bucket key value"
        );
        assert_eq!(
            refused(&[b"get", b"k"]),
            "kv keeps keys in buckets: 'get' needs one, as in GET bucket key"
        );
    }
}
