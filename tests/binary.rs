//! The real `kv` binary: `PORT`, graceful shutdown on a signal, and `kv cli`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use common::{Binary, Raw};

#[tokio::test]
async fn port_from_the_environment_and_graceful_shutdown_on_sigterm() {
    let server = Binary::start(&[]);
    assert_ne!(server.address.port(), 4040, "PORT=0 was honoured");
    let mut client = Raw::connect(server.address).await;
    client.send(b"CREATE s\nPUT s k v\nGET s k\n").await;
    client.expect(b"OK\r\nOK\r\nv\r\nOK\r\n").await;

    server.signal("TERM");
    // The connection is closed cleanly and the process exits 0.
    assert_eq!(client.until_closed().await, b"");
    assert_eq!(server.wait().await.code(), Some(0));
}

#[tokio::test]
async fn requests_already_sent_are_answered_before_sigint_closes() {
    let server = Binary::start(&[]);
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
    server.signal("INT");
    let rest = client.until_closed().await;
    // Whatever it had read is answered whole: a prefix of the replies, ending on a reply.
    assert!(replies[4..].starts_with(&rest));
    assert!(rest.is_empty() || rest.ends_with(b"\r\n"));
    assert_eq!(server.wait().await.code(), Some(0));
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
    let server = Binary::start(&[]);
    let created = cli(server.address, &["CREATE", "shopping"]);
    assert!(created.status.success());
    assert_eq!(created.stdout, b"OK\n");
    assert!(
        cli(server.address, &["PUT", "shopping", "milk", "1"])
            .status
            .success()
    );
    // Raw when stdout is not a terminal, as redis-cli prints.
    let got = cli(server.address, &["GET", "shopping", "milk"]);
    assert_eq!(got.stdout, b"1\n");
    let missing = cli(server.address, &["GET", "nowhere", "milk"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(missing.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "NOTFOUND bucket 'nowhere' does not exist\n"
    );
    server.signal("TERM");
    assert_eq!(server.wait().await.code(), Some(0));
}

#[tokio::test]
async fn kv_cli_reads_commands_from_a_pipe() {
    let server = Binary::start(&[]);
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
    assert!(stdout.contains("OK\nOK\ntwo words\n"), "{stdout}");
    server.signal("TERM");
    assert_eq!(server.wait().await.code(), Some(0));
}

/// What `kv serve` with `arguments` says on stderr as it refuses to start.
fn refused_at_start(arguments: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_kv"))
        .arg("serve")
        .args(arguments)
        .env("PORT", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_bulk_limit_the_log_could_not_hold_is_refused_at_start() {
    let message = refused_at_start(&["--max-bulk-len", "2000000000"]);
    assert!(message.contains("--max-bulk-len"), "{message}");
    assert!(message.contains("536870912"), "{message}");
}

#[test]
fn a_log_memory_under_a_mebibyte_is_refused_at_start() {
    let message = refused_at_start(&["--log-memory", "64kb"]);
    assert!(
        message.contains("--log-memory") && message.contains("under 1mb"),
        "{message}"
    );
}

/// What the server says about clients, each line with the client's address; and how it says
/// what it was started with: in words, sizes and durations with units.
#[tokio::test]
async fn the_log_names_each_client_that_is_refused_or_closed() {
    let server = Binary::start(&[
        "--max-connections",
        "1",
        "--idle-timeout",
        "300ms",
        "--max-memory",
        "1gb",
    ]);
    server.log_line("workers:");
    let startup = server.logs().join("\n");
    assert!(startup.contains("1 GiB of keys and values"), "{startup}");
    assert!(startup.contains("closed after 300ms idle"), "{startup}");
    assert!(
        !startup.contains("None") && !startup.contains("Some("),
        "{startup}"
    );

    let mut first = Raw::connect(server.address).await;
    first.send(b"PING\n").await;
    first.expect(b"+PONG\r\n").await;
    let mut second = Raw::connect(server.address).await;
    let second_address = second.stream.local_addr().unwrap();
    assert!(
        common::within(second.until_closed())
            .await
            .starts_with(b"ERROR max number of clients reached")
    );
    let refused = server.log_line("refusing a connection");
    assert!(refused.contains(&second_address.to_string()), "{refused}");
    // The first client idles past the timeout.
    let first_address = first.stream.local_addr().unwrap();
    assert_eq!(common::within(first.until_closed()).await, b"");
    let idle = server.log_line("closing an idle connection");
    assert!(idle.contains(&first_address.to_string()), "{idle}");

    let mut broken = Raw::connect(server.address).await;
    let broken_address = broken.stream.local_addr().unwrap();
    broken.send(b"*1\r\n$x\r\n").await;
    assert!(
        common::within(broken.until_closed())
            .await
            .starts_with(b"-ERR Protocol error")
    );
    let protocol = server.log_line("a protocol error it cannot recover from");
    assert!(protocol.contains(&broken_address.to_string()), "{protocol}");
}

/// The worker count kv picks where it runs: on one core, or in a cgroup allowed half of one
/// core's time, one worker; under that quota no busy polling either (spinning would spend the
/// quota the requests need). The cgroup case needs a writable cgroup file system (root, as in
/// CI); without one it is said and skipped, the single-core case still checked.
#[tokio::test]
async fn one_core_or_a_fraction_of_one_gets_one_worker() {
    let pinned = Binary::start_under(&["taskset", "-c", "0"], &[]);
    let workers = pinned.log_line("workers:");
    assert!(workers.contains("workers: 1 (of 1 core)"), "{workers}");
    assert!(workers.contains("busy polling for 20 µs"), "{workers}");
    let mut client = kv::client::Client::connect(pinned.address).await.unwrap();
    assert_eq!(client.info_field("worker_threads").await.unwrap(), 1);
    assert_eq!(client.info_field("busy_poll_us").await.unwrap(), 20);

    let Some(cgroup) = CpuQuotaGroup::create(50_000, 100_000) else {
        eprintln!("no writable cgroup file system: the quota case is not checked here");
        return;
    };
    let procs = cgroup.procs.display().to_string();
    let limited = Binary::start_under(
        &[
            "sh",
            "-c",
            &format!("echo $$ > {procs} && exec \"$0\" \"$@\""),
        ],
        &[],
    );
    let workers = limited.log_line("workers:");
    assert!(
        workers.contains("workers: 1 (of ") && workers.contains("CPU quota of 0.50 cores"),
        "{workers}"
    );
    assert!(workers.contains("no busy polling"), "{workers}");
    let mut client = kv::client::Client::connect(limited.address).await.unwrap();
    assert_eq!(client.info_field("worker_threads").await.unwrap(), 1);
    assert_eq!(client.info_field("busy_poll_us").await.unwrap(), 0);
}

/// A cgroup with a CPU quota (v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), removed when dropped.
struct CpuQuotaGroup {
    directory: std::path::PathBuf,
    procs: std::path::PathBuf,
}

impl CpuQuotaGroup {
    fn create(quota_us: u64, period_us: u64) -> Option<Self> {
        let name = format!("kv-test-{}", std::process::id());
        let v2 = std::path::Path::new("/sys/fs/cgroup");
        let v1 = std::path::Path::new("/sys/fs/cgroup/cpu");
        // The files that set the quota, in the order they must be written.
        let (directory, settings) = if v2.join("cgroup.controllers").exists() {
            (
                v2.join(&name),
                vec![("cpu.max", format!("{quota_us} {period_us}"))],
            )
        } else if v1.join("cpu.cfs_quota_us").exists() {
            (
                v1.join(&name),
                vec![
                    ("cpu.cfs_period_us", period_us.to_string()),
                    ("cpu.cfs_quota_us", quota_us.to_string()),
                ],
            )
        } else {
            return None;
        };
        std::fs::create_dir(&directory).ok()?;
        let group = Self {
            procs: directory.join("cgroup.procs"),
            directory,
        };
        for (file, value) in settings {
            std::fs::write(group.directory.join(file), value).ok()?;
        }
        Some(group)
    }
}

impl Drop for CpuQuotaGroup {
    fn drop(&mut self) {
        // Its processes have exited by now (servers are dropped first: declared after).
        let _ = std::fs::remove_dir(&self.directory);
    }
}
