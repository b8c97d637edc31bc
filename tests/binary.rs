//! The real `kv` binary: `PORT`, graceful shutdown on a signal, and `kv cli`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::Raw;

struct Running {
    child: Child,
    address: SocketAddr,
}

/// Starts `kv serve` with `PORT=0` and reads its startup line for the address.
fn start(extra: &[&str]) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kv"))
        .arg("serve")
        .args(extra)
        .env("PORT", "0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let address = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(rest) = line.split("kv listening on ").nth(1) {
            let address = rest.split_whitespace().next().unwrap();
            break address.parse::<SocketAddr>().unwrap();
        }
    };
    // Keep draining the logs so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Running { child, address }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the process to exit (failing after the common patience) and returns its code.
async fn exit_code(mut child: Child) -> i32 {
    let status = common::within(tokio::task::spawn_blocking(move || child.wait()))
        .await
        .unwrap()
        .unwrap();
    status.code().expect("exited by a signal, not gracefully")
}

#[tokio::test]
async fn port_from_the_environment_and_graceful_shutdown_on_sigterm() {
    let server = start(&[]);
    assert_ne!(server.address.port(), 4040, "PORT=0 was honoured");
    let mut client = Raw::connect(server.address).await;
    client.send(b"CREATE s\nPUT s k v\nGET s k\n").await;
    client.expect(b"OK\r\nOK\r\nv\r\nOK\r\n").await;

    signal(&server.child, "TERM");
    // The connection is closed cleanly and the process exits 0.
    assert_eq!(client.until_closed().await, b"");
    assert_eq!(exit_code(server.child).await, 0);
}

#[tokio::test]
async fn requests_already_sent_are_answered_before_sigint_closes() {
    let server = start(&[]);
    let mut client = Raw::connect(server.address).await;
    let mut requests = b"CREATE s\n".to_vec();
    let mut replies = b"OK\r\n".to_vec();
    for index in 0..2000 {
        requests.extend_from_slice(format!("PUT s k{index} v\n").as_bytes());
        replies.extend_from_slice(b"OK\r\n");
    }
    client.send(&requests).await;
    // The first reply proves the server has read the start of the batch.
    client.expect(b"OK\r\n").await;
    signal(&server.child, "INT");
    let rest = client.until_closed().await;
    // Whatever it had read is answered whole: a prefix of the replies, ending on a reply.
    assert!(replies[4..].starts_with(&rest));
    assert!(rest.is_empty() || rest.ends_with(b"\r\n"));
    assert_eq!(exit_code(server.child).await, 0);
}

fn cli(address: SocketAddr, arguments: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kv"))
        .arg("cli")
        .args(["--port", &address.port().to_string()])
        .args(arguments)
        .output()
        .unwrap()
}

#[tokio::test]
async fn kv_cli_runs_one_command_with_an_honest_exit_code() {
    let server = start(&[]);
    let created = cli(server.address, &["CREATE", "shopping"]);
    assert!(created.status.success());
    assert_eq!(created.stdout, b"OK\n");
    assert!(
        cli(server.address, &["PUT", "shopping", "milk", "1"])
            .status
            .success()
    );
    let got = cli(server.address, &["GET", "shopping", "milk"]);
    assert_eq!(got.stdout, b"\"1\"\n");
    let missing = cli(server.address, &["GET", "nowhere", "milk"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(missing.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "(error) NOTFOUND bucket does not exist\n"
    );
    signal(&server.child, "TERM");
    assert_eq!(exit_code(server.child).await, 0);
}

#[tokio::test]
async fn kv_cli_reads_commands_from_a_pipe() {
    let server = start(&[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_kv"))
        .arg("cli")
        .args(["--port", &server.address.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"CREATE s\nPUT s k \"two words\"\nGET s k\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("OK\nOK\n\"two words\"\n"), "{stdout}");
    signal(&server.child, "TERM");
    assert_eq!(exit_code(server.child).await, 0);
}
