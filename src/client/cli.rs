//! `kv cli`, after redis-cli: one command from the arguments, commands piped on stdin, or an
//! interactive prompt with history, local `help`, completion and hints, which reconnects when
//! the server comes back.

use std::borrow::Cow;
use std::io::{BufRead, IsTerminal, Write};

use rustyline::completion::{Completer, Pair};
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::Validator;
use rustyline::{Context, Helper};

use super::{Client, ClientError, render, render_raw};
use crate::protocol::{COMMANDS, CommandSpec, ReplyValue};

/// What `kv cli` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct CliOptions {
    /// The servers, `host:port`, tried in turn.
    pub nodes: Vec<String>,
    /// The password to give on connecting.
    pub password: Option<String>,
    /// Print replies raw (`Some(true)`), formatted (`Some(false)`), or raw when stdout is not
    /// a terminal (`None`), as redis-cli does.
    pub raw: Option<bool>,
    /// One command to send; without one, stdin is read (a prompt on a terminal).
    pub command: Vec<String>,
}

/// Runs `kv cli`; the exit code: 0, or 1 if any command failed (an error reply, or no server
/// to send it to).
pub async fn run(options: CliOptions) -> i32 {
    let raw = options
        .raw
        .unwrap_or_else(|| !std::io::stdout().is_terminal());
    let mut session = Session {
        nodes: options.nodes.clone(),
        at: 0,
        password: options.password.clone(),
        client: None,
        raw,
    };
    if !options.command.is_empty() {
        let words: Vec<Vec<u8>> = options
            .command
            .iter()
            .map(|word| word.clone().into_bytes())
            .collect();
        return i32::from(!session.run(&words).await);
    }
    if std::io::stdin().is_terminal() {
        interactive(session).await
    } else {
        piped(session).await
    }
}

/// Commands piped on stdin, a line each, as redis-cli reads them.
async fn piped(mut session: Session) -> i32 {
    let mut failed = false;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else {
            eprintln!("kv: stdin: not text");
            return 1;
        };
        match split_arguments(&line) {
            Ok(words) if words.is_empty() => {}
            Ok(words) => failed |= !session.run(&words).await,
            Err(error) => {
                eprintln!("(error) {error}");
                failed = true;
            }
        }
    }
    i32::from(failed)
}

async fn interactive(mut session: Session) -> i32 {
    let Ok(mut editor) = rustyline::Editor::<CliHelper, rustyline::history::DefaultHistory>::new()
    else {
        eprintln!("kv: cannot open the terminal");
        return 1;
    };
    editor.set_helper(Some(CliHelper));
    let history =
        std::env::var_os("HOME").map(|home| std::path::PathBuf::from(home).join(".kv_cli_history"));
    if let Some(history) = &history {
        let _ = editor.load_history(history);
    }
    // As redis-cli: try at once, and say so if there is no server yet.
    session.connect().await;
    println!(
        "kv cli {}: `help` lists the commands, `help <command>` shows one.",
        env!("CARGO_PKG_VERSION")
    );
    loop {
        let prompt = match &session.client {
            Some(_) => format!("{}> ", session.nodes[session.at]),
            None => "not connected> ".to_owned(),
        };
        let line = match editor.readline(&prompt) {
            Ok(line) => line,
            Err(
                rustyline::error::ReadlineError::Interrupted | rustyline::error::ReadlineError::Eof,
            ) => break,
            Err(error) => {
                eprintln!("kv: {error}");
                return 1;
            }
        };
        let words = match split_arguments(&line) {
            Ok(words) if words.is_empty() => continue,
            Ok(words) => words,
            Err(error) => {
                eprintln!("(error) {error}");
                continue;
            }
        };
        let _ = editor.add_history_entry(line.as_str());
        let first = String::from_utf8_lossy(&words[0]).to_ascii_lowercase();
        match first.as_str() {
            "exit" => break,
            "help" | "?" => {
                let topic = words
                    .get(1)
                    .map(|word| String::from_utf8_lossy(word).into_owned());
                println!("{}", help(topic.as_deref()));
                continue;
            }
            "clear" => {
                let _ = editor.clear_screen();
                continue;
            }
            _ => {}
        }
        session.run(&words).await;
        if first == "quit" {
            break;
        }
    }
    if let Some(history) = &history {
        let _ = editor.save_history(history);
    }
    0
}

/// A connection that comes and goes: made on first use, remade after it breaks.
struct Session {
    nodes: Vec<String>,
    /// Which of `nodes` is (or was last) connected.
    at: usize,
    password: Option<String>,
    client: Option<Client>,
    raw: bool,
}

impl Session {
    /// Connects to the first of the nodes that answers, from the last one used; says why not.
    async fn connect(&mut self) -> bool {
        let mut reasons = Vec::new();
        for offset in 0..self.nodes.len() {
            let at = (self.at + offset) % self.nodes.len();
            match Client::connect(self.nodes[at].as_str()).await {
                Ok(mut client) => {
                    if let Some(password) = &self.password {
                        match client.call(&[b"AUTH", password.as_bytes()]).await {
                            Ok(ReplyValue::Error(error)) => {
                                eprintln!("AUTH failed: {error}");
                            }
                            Ok(_) => {}
                            Err(error) => {
                                reasons.push(format!("{}: {error}", self.nodes[at]));
                                continue;
                            }
                        }
                    }
                    self.at = at;
                    self.client = Some(client);
                    return true;
                }
                Err(error) => reasons.push(format!("{}: {}", self.nodes[at], reason(&error))),
            }
        }
        eprintln!("Could not connect to kv at {}", reasons.join("; "));
        false
    }

    /// Sends `words` and prints the reply; whether it succeeded. A request is sent once: if
    /// the connection breaks meanwhile, it may or may not have run, and it is not resent.
    async fn run(&mut self, words: &[Vec<u8>]) -> bool {
        if self.client.is_none() && !self.connect().await {
            return false;
        }
        let Some(client) = &mut self.client else {
            return false;
        };
        let words: Vec<&[u8]> = words.iter().map(Vec::as_slice).collect();
        match client.call(&words).await {
            Ok(reply) => {
                let failed = matches!(reply, ReplyValue::Error(_));
                let mut shown = if self.raw {
                    render_raw(&reply)
                } else {
                    render(&reply).into_bytes()
                };
                shown.push(b'\n');
                // Errors go to stderr, so that a script's output holds only what it asked for.
                let written = if failed {
                    std::io::stderr().write_all(&shown)
                } else {
                    let mut stdout = std::io::stdout().lock();
                    stdout.write_all(&shown).and_then(|()| stdout.flush())
                };
                written.is_ok() && !failed
            }
            Err(error) => {
                self.client = None;
                eprintln!(
                    "Error: {}; the command may or may not have run. Reconnecting on the next command.",
                    reason(&error)
                );
                false
            }
        }
    }
}

/// What went wrong, once: an I/O error's own words, without the wrappers that repeat them.
fn reason(error: &ClientError) -> String {
    match error {
        ClientError::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// Splits a line into arguments as redis-cli does: blanks separate them; in double quotes,
/// `\n`, `\r`, `\t`, `\b`, `\a`, `\\`, `\"` and `\xHH` are escapes; in single quotes only
/// `\'`. Written here because shell-style splitters (shlex) have no `\xHH`, and binary keys
/// and values need it.
///
/// # Errors
/// Unbalanced quotes, or a closing quote not followed by a blank.
pub fn split_arguments(line: &str) -> Result<Vec<Vec<u8>>, &'static str> {
    let bytes = line.as_bytes();
    let mut words = Vec::new();
    let mut at = 0;
    loop {
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if at == bytes.len() {
            return Ok(words);
        }
        let mut word = Vec::new();
        let mut quote = None;
        loop {
            let Some(&byte) = bytes.get(at) else {
                if quote.is_some() {
                    return Err("unbalanced quotes");
                }
                break;
            };
            match quote {
                None if byte.is_ascii_whitespace() => break,
                None if byte == b'"' || byte == b'\'' => quote = Some(byte),
                None => word.push(byte),
                Some(b'"') if byte == b'\\' && at + 1 < bytes.len() => {
                    at += 1;
                    let escaped = bytes[at];
                    let hex = |digit: u8| char::from(digit).to_digit(16);
                    match escaped {
                        b'x' if at + 2 < bytes.len() => {
                            if let (Some(high), Some(low)) =
                                (hex(bytes[at + 1]), hex(bytes[at + 2]))
                            {
                                word.push(u8::try_from(high * 16 + low).unwrap_or(0));
                                at += 2;
                            } else {
                                word.push(b'x');
                            }
                        }
                        b'n' => word.push(b'\n'),
                        b'r' => word.push(b'\r'),
                        b't' => word.push(b'\t'),
                        b'b' => word.push(0x08),
                        b'a' => word.push(0x07),
                        other => word.push(other),
                    }
                }
                Some(b'\'') if byte == b'\\' && bytes.get(at + 1) == Some(&b'\'') => {
                    at += 1;
                    word.push(b'\'');
                }
                Some(open) if byte == open => {
                    if bytes
                        .get(at + 1)
                        .is_some_and(|next| !next.is_ascii_whitespace())
                    {
                        return Err("closing quote must be followed by a space or nothing at all");
                    }
                    at += 1;
                    break;
                }
                Some(_) => word.push(byte),
            }
            at += 1;
        }
        words.push(word);
    }
}

/// `help` and `help <command>`, from the same table `COMMAND` answers with.
#[must_use]
pub fn help(topic: Option<&str>) -> String {
    let line = |spec: &CommandSpec| {
        format!(
            "{} {}\n    {}",
            spec.name.to_ascii_uppercase(),
            spec.arguments,
            spec.summary
        )
    };
    match topic {
        None => {
            let mut text = String::from(
                "kv's commands (Tab completes a command; its arguments show as you type):\n\n",
            );
            for spec in COMMANDS {
                text.push_str(&line(spec));
                text.push('\n');
            }
            text.push_str("\nand, here: help [command], clear, exit");
            text
        }
        Some(name) => CommandSpec::find(name)
            .map_or_else(|| format!("no command {name:?}: `help` lists them"), line),
    }
}

/// Completion of command names (and subcommands), and the arguments a command takes shown as
/// a hint after it.
struct CliHelper;

/// The subcommands completion offers after these commands.
const SUBCOMMANDS: &[(&str, &[&str])] = &[
    (
        "client",
        &[
            "SETNAME", "GETNAME", "SETINFO", "ID", "INFO", "LIST", "KILL",
        ],
    ),
    (
        "cluster",
        &["INFO", "MYID", "SLOTS", "NODES", "SHARDS", "KEYSLOT"],
    ),
    ("command", &["COUNT", "INFO", "DOCS"]),
    ("config", &["GET"]),
    ("debug", &["CRASH", "STOP", "PANIC"]),
];

impl Completer for CliHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        let start = before.rfind(' ').map_or(0, |space| space + 1);
        let typed = &before[start..];
        let words: Vec<&str> = before[..start].split_whitespace().collect();
        let candidates: Vec<&str> = match words.as_slice() {
            [] => COMMANDS
                .iter()
                .map(|spec| spec.name)
                .chain(["help", "exit", "clear"])
                .collect(),
            [command] => SUBCOMMANDS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(command))
                .map_or_else(Vec::new, |(_, subcommands)| subcommands.to_vec()),
            _ => Vec::new(),
        };
        let upper = typed.chars().next().is_some_and(char::is_uppercase) || typed.is_empty();
        let pairs = candidates
            .into_iter()
            .filter(|candidate| {
                candidate.len() >= typed.len()
                    && candidate[..typed.len()].eq_ignore_ascii_case(typed)
            })
            .map(|candidate| {
                let shown = if upper {
                    candidate.to_ascii_uppercase()
                } else {
                    candidate.to_ascii_lowercase()
                };
                Pair {
                    display: shown.clone(),
                    replacement: shown + " ",
                }
            })
            .collect();
        Ok((start, pairs))
    }
}

impl Hinter for CliHelper {
    type Hint = String;

    fn hint(&self, line: &str, pos: usize, _: &Context<'_>) -> Option<String> {
        if pos < line.len() {
            return None;
        }
        let mut words = line.split_whitespace();
        let spec = CommandSpec::find(words.next()?)?;
        // The arguments not yet begun: after those typed (the last may be half typed).
        let typed = words.count();
        let rest: Vec<&str> = spec
            .arguments
            .split(' ')
            .filter(|word| !word.is_empty())
            .skip(typed)
            .collect();
        if rest.is_empty() {
            return None;
        }
        let lead = if line.ends_with(' ') { "" } else { " " };
        Some(format!("{lead}{}", rest.join(" ")))
    }
}

impl Highlighter for CliHelper {
    fn highlight_hint<'h>(&self, hint: &'h str) -> Cow<'h, str> {
        // Grey, as redis-cli shows its hints.
        Cow::Owned(format!("\x1b[90m{hint}\x1b[0m"))
    }
}

impl Validator for CliHelper {}

impl Helper for CliHelper {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_split_as_redis_cli_splits_them() {
        let split = |line: &str| split_arguments(line).unwrap();
        assert_eq!(
            split("  PUT  b k   v "),
            [b"PUT".to_vec(), b"b".to_vec(), b"k".to_vec(), b"v".to_vec()]
        );
        assert_eq!(
            split(r#"PUT b "a\x00b\n" 'it\'s'"#)[2..],
            [b"a\x00b\n".to_vec(), b"it's".to_vec()]
        );
        assert_eq!(split(r#"GET "" x"#)[1], b"");
        assert_eq!(split_arguments(r#"GET "open"#), Err("unbalanced quotes"));
        assert!(split_arguments(r#"GET "a"b"#).is_err());
    }

    #[test]
    fn help_shows_a_command_and_lists_them_all() {
        assert_eq!(
            help(Some("put")),
            "PUT bucket key value\n    Sets a key of a bucket."
        );
        assert!(help(None).contains("SCAN cursor [MATCH pattern] [COUNT count]"));
        assert!(help(Some("fly")).starts_with("no command"));
    }

    #[test]
    fn hints_show_the_arguments_still_to_type() {
        let history = rustyline::history::DefaultHistory::new();
        let context = Context::new(&history);
        let hint = |line: &str| CliHelper.hint(line, line.len(), &context);
        assert_eq!(hint("put").as_deref(), Some(" bucket key value"));
        assert_eq!(hint("put ").as_deref(), Some("bucket key value"));
        assert_eq!(hint("put shop ").as_deref(), Some("key value"));
        assert_eq!(hint("put sh").as_deref(), Some(" key value"));
        assert_eq!(hint("put shop milk 1"), None);
        assert_eq!(hint("fly "), None);
    }

    #[test]
    fn completion_offers_commands_then_subcommands() {
        let history = rustyline::history::DefaultHistory::new();
        let context = Context::new(&history);
        let complete = |line: &str| {
            let (start, pairs) = CliHelper.complete(line, line.len(), &context).unwrap();
            (
                start,
                pairs
                    .into_iter()
                    .map(|pair| pair.replacement)
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(complete("cre"), (0, vec!["create ".to_owned()]));
        assert_eq!(complete("CLUSTER SL"), (8, vec!["SLOTS ".to_owned()]));
        assert_eq!(complete("get b"), (4, Vec::<String>::new()));
    }
}
