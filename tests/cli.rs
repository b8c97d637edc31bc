//! `kv cli` as a person and a script use it: in a pseudo-terminal (prompt, local help,
//! completion, hints, reconnection), with commands piped in, and with one command from the
//! arguments (raw or formatted output, escapes, exit codes, error texts).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::process::{Command, Stdio};

use common::Binary;

/// A port nothing listens on (yet).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kv_cli(port: u16) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kv"));
    command
        .args(["cli", "-p", &port.to_string()])
        .env("HOME", std::env::temp_dir())
        .env_remove("PORT");
    command
}

/// Runs `kv cli` with `arguments`, `stdin` piped in; its exit code, stdout and stderr.
fn run(port: u16, arguments: &[&str], stdin: &[u8]) -> (i32, Vec<u8>, String) {
    use std::io::Write;
    let mut child = kv_cli(port)
        .args(arguments)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        output.stdout,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn one_command_prints_raw_when_piped_and_exits_non_zero_on_an_error() {
    let server = Binary::start(&[]);
    let port = server.address.port();
    assert_eq!(
        run(port, &["CREATE", "b"], b""),
        (0, b"OK\n".to_vec(), String::new())
    );
    // Escapes in double quotes, as redis-cli reads them; the value comes back as its bytes.
    assert_eq!(run(port, &[], b"PUT b k \"a\\x00b\\n\"\n").0, 0);
    let (code, stdout, _) = run(port, &["GET", "b", "k"], b"");
    assert_eq!((code, stdout), (0, b"a\x00b\n\n".to_vec()));
    let (code, stdout, _) = run(port, &["--no-raw", "GET", "b", "k"], b"");
    assert_eq!((code, stdout), (0, b"\"a\\x00b\\n\"\n".to_vec()));
    let (code, stdout, stderr) = run(port, &["GET", "nowhere", "k"], b"");
    assert_eq!((code, stdout), (1, Vec::new()));
    assert_eq!(stderr, "NOTFOUND bucket 'nowhere' does not exist\n");
    // Piped commands: each line runs; any error makes the exit code 1.
    let script = b"PUT b k2 \"x\\x01y\"\nGET b k2\nGET nowhere k\nGET b k2\n";
    let (code, stdout, stderr) = run(port, &[], script);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stdout, b"OK\nx\x01y\nx\x01y\n");
    assert_eq!(stderr, "NOTFOUND bucket 'nowhere' does not exist\n");
    let (code, _, stderr) = run(port, &[], b"GET b \"open\n");
    assert_eq!((code, stderr.as_str()), (1, "(error) unbalanced quotes\n"));
    assert_eq!(run(port, &[], b"GET b k2\n").0, 0);
}

#[test]
fn without_a_server_the_error_is_said_once_and_the_exit_code_is_one() {
    let port = free_port();
    let (code, stdout, stderr) = run(port, &["PING"], b"");
    assert_eq!((code, stdout), (1, Vec::new()));
    assert_eq!(
        stderr,
        format!("Could not connect to kv at 127.0.0.1:{port}: Connection refused (os error 111)\n")
    );
}

#[test]
fn a_uri_gives_the_address_and_the_password() {
    let server = Binary::start(&["--requirepass", "sesame"]);
    let address = server.address;
    let (code, stdout, stderr) = run(address.port(), &["PING"], b"");
    assert_eq!((code, stdout), (1, Vec::new()));
    assert_eq!(stderr, "NOAUTH Authentication required.\n");
    let uri = format!("kv://:sesame@{address}");
    let (code, stdout, stderr) = run(0, &["-u", &uri, "PING"], b"");
    assert_eq!(
        (code, stdout, stderr),
        (0, b"PONG\n".to_vec(), String::new())
    );
    let (code, stdout, _) = run(address.port(), &["-a", "sesame", "PING"], b"");
    assert_eq!((code, stdout), (0, b"PONG\n".to_vec()));
}

#[test]
fn the_prompt_helps_completes_and_reconnects() {
    let port = free_port();
    let timeout = Some(10_000);
    let mut command = kv_cli(port);
    // A terminal that line editing knows (CI runs without one).
    command.env("TERM", "xterm");
    let mut session = rexpect::session::spawn_command(command, timeout).unwrap();
    session.exp_string("Could not connect to kv at").unwrap();
    session.exp_string("not connected> ").unwrap();
    // Help is local: it works without a server.
    session.send_line("help put").unwrap();
    session.exp_string("PUT bucket key value").unwrap();
    session.exp_string("Sets a key of a bucket.").unwrap();
    session.exp_string("not connected> ").unwrap();
    // A command with no server says so, and the prompt stays.
    session.send_line("ping").unwrap();
    session.exp_string("Could not connect").unwrap();
    session.exp_string("not connected> ").unwrap();

    let server = Binary::start(&["--port", &port.to_string()]);
    session.send_line("ping").unwrap();
    session.exp_string("PONG").unwrap();
    session.exp_string(&format!("127.0.0.1:{port}> ")).unwrap();
    // Tab completes a command; its arguments show as a hint.
    session.send("cre\t").unwrap();
    session.flush().unwrap();
    session.exp_string("create ").unwrap();
    session.exp_string("bucket").unwrap();
    session.send_line("shop").unwrap();
    session.exp_string("OK").unwrap();
    session.send_line(r#"put shop k "a\x00b""#).unwrap();
    session.exp_string("OK").unwrap();
    session.send_line("get shop k").unwrap();
    // Formatted on a terminal: quoted, escaped.
    session.exp_string(r#""a\x00b""#).unwrap();

    // The server goes away: the next command fails, the prompt says so, and once the server
    // is back the next command reconnects.
    drop(server);
    session.send_line("ping").unwrap();
    session
        .exp_string("Reconnecting on the next command")
        .unwrap();
    session.exp_string("not connected> ").unwrap();
    let _server = Binary::start(&["--port", &port.to_string()]);
    session.send_line("ping").unwrap();
    session.exp_string("PONG").unwrap();
    session.exp_string(&format!("127.0.0.1:{port}> ")).unwrap();
    session.send_line("exit").unwrap();
    session.exp_eof().unwrap();
}
