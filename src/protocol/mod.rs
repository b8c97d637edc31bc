//! Parsing requests and encoding replies, for the guide's line protocol and for RESP (2, or 3
//! once a connection asks for it with `HELLO 3`).
//!
//! Pure functions over byte slices: no I/O, nothing of ours below it, so it can be fuzzed and
//! property-tested on its own. Requests borrow their words from the caller's buffer; nothing is
//! copied until a value is stored.
//!
//! The dialect is chosen per request by its first byte, as Redis does: `*` starts a RESP array
//! of bulk strings; anything else is a line.

mod command;
mod commands;
mod line;
mod line_reply;
mod reply;
mod resp;
mod resp_reply;

pub use command::{
    ClientKill, ClientRequest, ClusterQuery, DebugAction, KeyAction, KeyRequest, Request,
};
pub use commands::{COMMANDS, CommandQuery, CommandSpec, NOT_A_COMMAND, describe_commands};
pub use line_reply::{LineReplyShape, parse_line_reply};
pub use reply::{ErrorReply, Reply, SlotRange, encode, encode_page, encode_value};
pub use resp_reply::{ReplyValue, encode_request, parse_reply};

/// Which protocol a request came in, and so which one its reply goes out in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Dialect {
    /// The guide's line protocol: words separated by blanks, one request per line.
    Line,
    /// RESP2: an array of bulk strings, as Redis clients send.
    Resp,
    /// A RESP request on a connection that chose RESP3 (`HELLO 3`): the same requests, replies
    /// with RESP3's null (`_`) and maps (`%`) where RESP2 has a null bulk and flat arrays.
    Resp3,
}

impl Dialect {
    /// The dialect of a request that starts with `first`: `*` opens a RESP array; anything
    /// else starts a line.
    #[must_use]
    pub fn of(first: u8) -> Self {
        if first == b'*' {
            Self::Resp
        } else {
            Self::Line
        }
    }

    /// Whether this is RESP, of either version.
    #[must_use]
    pub fn is_resp(self) -> bool {
        matches!(self, Self::Resp | Self::Resp3)
    }

    /// The dialect replies go out in on a connection that chose RESP `version` (2 or 3): a
    /// RESP request is answered in that version; a line is answered as a line.
    #[must_use]
    pub fn with_version(self, resp3: bool) -> Self {
        match self {
            Self::Resp if resp3 => Self::Resp3,
            Self::Resp3 if !resp3 => Self::Resp,
            other => other,
        }
    }
}

/// The bounds a parser enforces on what a client sends.
#[derive(Debug, Clone, Copy)]
pub struct ParseLimits {
    /// Longest line: a line-protocol request, or a RESP header line.
    pub max_line_len: usize,
    /// Longest single RESP bulk string.
    pub max_bulk_len: usize,
    /// Most elements in one RESP array.
    pub max_args: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        Self {
            max_line_len: 64 * 1024,
            max_bulk_len: 8 * 1024 * 1024,
            max_args: 1024,
        }
    }
}

/// What a parser made of the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// The buffer holds no complete request yet; read more and parse again.
    Incomplete,
    /// A request, taking the first `consumed` bytes.
    Request {
        /// The request.
        request: Request<'a>,
        /// The dialect to reply in.
        dialect: Dialect,
        /// Bytes of the buffer it took.
        consumed: usize,
    },
    /// A bad request, taking the first `consumed` bytes: reply with the error and go on with
    /// the rest of the stream.
    Invalid {
        /// What was wrong.
        error: ProtocolError,
        /// The dialect to reply in.
        dialect: Dialect,
        /// Bytes of the buffer it took.
        consumed: usize,
    },
    /// A line longer than the limit with no end in sight: reply with the error, then discard
    /// everything up to and including the next newline, so no piece of it ever runs as a
    /// request of its own.
    Overlong {
        /// The error to reply with.
        error: ProtocolError,
    },
    /// The stream cannot be resynchronised: reply with the error and close the connection.
    Fatal {
        /// What was wrong.
        error: ProtocolError,
        /// The dialect to reply in.
        dialect: Dialect,
    },
}

impl ProtocolError {
    /// Whether the guide would answer this `UNKNOWN COMMAND`: no such command, or not with
    /// these words.
    #[must_use]
    pub fn is_unknown_command(&self) -> bool {
        matches!(
            self,
            Self::UnknownCommand { .. }
                | Self::WrongArity { .. }
                | Self::UnknownSubcommand { .. }
                | Self::NoBucket { .. }
        )
    }
}

/// Something wrong with what a client sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// No such command (the line protocol answers the guide's `UNKNOWN COMMAND`; RESP names
    /// it as Redis does).
    #[error("unknown command '{name}', with args beginning with: {args}")]
    UnknownCommand {
        /// The command as sent (at most 128 bytes of it, lossily as UTF-8).
        name: String,
        /// Its first arguments, each quoted and followed by a space, as Redis shows them.
        args: String,
    },
    /// A known command with the wrong number of words (`UNKNOWN COMMAND` in the line protocol,
    /// as the guide has it).
    #[error("wrong number of arguments for '{command}' command")]
    WrongArity {
        /// The command's name.
        command: &'static str,
    },
    /// A Redis command on a key alone (`SET key value`, `GET key`): kv's keys live in buckets.
    #[error("kv keeps keys in buckets: '{command}' needs one, as in {usage}")]
    NoBucket {
        /// The command as Redis names it.
        command: &'static str,
        /// kv's form of it.
        usage: &'static str,
    },
    /// A known command with a subcommand it does not have.
    #[error("unknown subcommand '{subcommand}' of '{command}'")]
    UnknownSubcommand {
        /// The command's name.
        command: &'static str,
        /// The subcommand as sent (at most 128 bytes of it, lossily as UTF-8).
        subcommand: String,
    },
    /// A line longer than the limit.
    #[error("line too long (limit {limit} bytes)")]
    LineTooLong {
        /// The limit, in bytes.
        limit: usize,
    },
    /// A line-protocol request that is not UTF-8.
    #[error("request is not valid UTF-8")]
    InvalidUtf8,
    /// A bulk string longer than the limit.
    #[error("bulk length {length} over the limit of {limit} bytes")]
    BulkTooLong {
        /// The announced length.
        length: u64,
        /// The limit, in bytes.
        limit: usize,
    },
    /// A RESP array with more elements than the limit.
    #[error("{count} arguments over the limit of {limit}")]
    TooManyArguments {
        /// The announced count.
        count: u64,
        /// The limit.
        limit: usize,
    },
    /// A word that should be a number and is not.
    #[error("{what} is not a valid number")]
    NotANumber {
        /// What the number is.
        what: &'static str,
    },
    /// Words a command does not take where they are.
    #[error("syntax error in '{command}' near '{near}'")]
    Syntax {
        /// The command.
        command: &'static str,
        /// The first word not understood (lossily as UTF-8).
        near: String,
    },
    /// A `MATCH` or `CONFIG GET` pattern longer than the limit (compiling one costs with its
    /// length, and a client chooses it).
    #[error("pattern longer than {limit} bytes")]
    PatternTooLong {
        /// The limit, in bytes.
        limit: usize,
    },
    /// A cursor that is not a number a listing gave.
    #[error("invalid cursor: pass 0, or the cursor the previous page gave")]
    InvalidCursor,
    /// Anything else that is not RESP.
    #[error("Protocol error: {0}")]
    Malformed(&'static str),
}

/// Parses the first request in `input`.
#[must_use]
pub fn parse<'a>(input: &'a [u8], limits: &ParseLimits) -> Parsed<'a> {
    match input.first().map(|&first| Dialect::of(first)) {
        None => Parsed::Incomplete,
        Some(Dialect::Resp | Dialect::Resp3) => resp::parse(input, limits),
        Some(Dialect::Line) => line::parse(input, limits),
    }
}

/// The words of the complete request at the start of `input` (at most the first eight, and
/// whether there were more), as `MONITOR` shows them; `None` if it is not a whole, well-formed
/// request.
#[must_use]
pub fn request_words<'a>(input: &'a [u8], limits: &ParseLimits) -> Option<(Vec<&'a [u8]>, bool)> {
    if input.first() == Some(&b'*') {
        let (words, count, extra, _) = resp::parse_array(input, limits).ok()??;
        return Some((words[..count].to_vec(), extra));
    }
    let end = memchr::memchr(b'\n', input)?;
    let line = &input[..end];
    let (words, count, extra) = line::split(line.strip_suffix(b"\r").unwrap_or(line));
    Some((words[..count].to_vec(), extra))
}
