//! Shared by the server tests: a real server on 127.0.0.1:0, and a raw socket client.

#![allow(dead_code, clippy::unwrap_used)] // each test file uses its own part of this

use std::net::SocketAddr;
use std::time::Duration;

use kv::config::ServerConfig;
use kv::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A bound on every wait: a hang fails the test instead of stalling the suite.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .expect("waited too long: something hangs")
}

pub struct TestServer {
    pub address: SocketAddr,
    pub shutdown: CancellationToken,
    /// The server's task: its result says whether the log was written and synced at the end.
    pub task: JoinHandle<Result<(), kv::shard::wal::LogFailed>>,
    pub registry: kv::Registry,
    /// Weak: the shard (and its data directory's lock) goes when the server stops.
    shard: std::sync::Weak<kv::shard::LocalShard>,
}

impl TestServer {
    pub async fn start(config: ServerConfig) -> Self {
        let config = ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..config
        };
        let server = Server::bind(config).await.unwrap();
        let address = server.local_addr();
        let registry = server.registry().clone();
        let shard = std::sync::Arc::downgrade(server.shard());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Self {
            address,
            shutdown,
            task,
            registry,
            shard,
        }
    }

    /// The server's shard, while the server runs.
    pub fn shard(&self) -> std::sync::Arc<kv::shard::LocalShard> {
        self.shard.upgrade().expect("the server is running")
    }

    pub async fn default() -> Self {
        Self::start(ServerConfig::default()).await
    }

    pub async fn connect(&self) -> Raw {
        Raw::connect(self.address).await
    }

    pub async fn client(&self) -> kv::client::Client {
        kv::client::Client::connect(self.address).await.unwrap()
    }

    /// Proves the server still serves: a new client gets its PING answered.
    pub async fn still_serves(&self) {
        let mut raw = self.connect().await;
        raw.send(b"PING\n").await;
        raw.expect(b"+PONG\r\n").await;
    }
}

/// A client that writes raw bytes and reads exactly what it expects.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    pub async fn connect(address: SocketAddr) -> Self {
        let stream = TcpStream::connect(address).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self { stream }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads exactly `expected.len()` bytes and compares them.
    pub async fn expect(&mut self, expected: &[u8]) {
        let mut got = vec![0u8; expected.len()];
        within(self.stream.read_exact(&mut got)).await.unwrap();
        assert_eq!(
            got.escape_ascii().to_string(),
            expected.escape_ascii().to_string()
        );
    }

    /// Reads one line (up to and including `\n`).
    pub async fn line(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.last() != Some(&b'\n') {
            let read = within(self.stream.read(&mut byte)).await.unwrap();
            assert_eq!(
                read,
                1,
                "closed after {:?}",
                line.escape_ascii().to_string()
            );
            line.push(byte[0]);
        }
        line
    }

    /// Reads whole lines until what was read ends with `end`; returns all of it.
    pub async fn lines_until(&mut self, end: &[u8]) -> Vec<u8> {
        let mut read = Vec::new();
        while !read.ends_with(end) {
            read.extend(self.line().await);
        }
        read
    }

    /// Waits for the server to close the connection; returns what came before.
    pub async fn until_closed(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        within(self.stream.read_to_end(&mut rest)).await.unwrap();
        rest
    }
}

/// A `kv serve` process, started with `PORT=0`; its address is read from its startup line.
/// Killed when dropped, so that a failing test leaves no server behind.
pub struct Binary {
    child: Option<std::process::Child>,
    pub address: SocketAddr,
    /// Its log lines so far (the last 10,000), and a signal for each new one.
    logs: std::sync::Arc<(std::sync::Mutex<Vec<String>>, std::sync::Condvar)>,
}

impl Binary {
    pub fn start(arguments: &[&str]) -> Self {
        Self::start_under(&[], arguments)
    }

    /// `kv serve arguments` run by `wrapper` (such as `taskset -c 0`), which is given the
    /// binary's path and `serve arguments` as its last arguments.
    pub fn start_under(wrapper: &[&str], arguments: &[&str]) -> Self {
        use std::io::BufRead;
        let kv = env!("CARGO_BIN_EXE_kv");
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_arguments)) => {
                let mut command = std::process::Command::new(program);
                command.args(wrapper_arguments).arg(kv);
                command
            }
            None => std::process::Command::new(kv),
        };
        let mut child = command
            .arg("serve")
            .args(arguments)
            .env("PORT", "0")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(stderr).lines();
        let logs =
            std::sync::Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Condvar::new()));
        let address = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            logs.0.lock().unwrap().push(line.clone());
            if let Some(rest) = line.split("kv listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        // Keep draining the logs so the server never blocks on a full pipe.
        let kept = std::sync::Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut logs = kept.0.lock().unwrap();
                if logs.len() == 10_000 {
                    logs.remove(0);
                }
                logs.push(line);
                kept.1.notify_all();
            }
        });
        Self {
            child: Some(child),
            address,
            logs,
        }
    }

    /// The first log line containing `text`, waiting for it to be written (within the bound).
    pub fn log_line(&self, text: &str) -> String {
        let (lines, written) = &*self.logs;
        let deadline = std::time::Instant::now() + PATIENCE;
        let mut lines = lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().find(|line| line.contains(text)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "no log line with {text:?} in {lines:#?}");
            lines = written.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Where its HTTP listener (metrics, the status page) listens, from its log.
    pub fn http_address(&self) -> SocketAddr {
        let line = self.log_line("metrics on http://");
        let rest = line.split("metrics on http://").nth(1).unwrap();
        rest.split('/').next().unwrap().parse().unwrap()
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.0.lock().unwrap().clone()
    }

    /// `kv serve` as node `id` of the cluster `peers`, its cluster port `bind`, its data in
    /// `directory/<id>`, with timings for a test (heartbeats every 50 ms, elections after
    /// 300 ms) and `extra` arguments.
    pub fn cluster_node(
        id: usize,
        peers: &str,
        bind: SocketAddr,
        directory: &std::path::Path,
        extra: &[&str],
    ) -> Self {
        Self::member(id, ["--peers", peers], bind, directory, extra)
    }

    /// `kv serve` as node `id` joining the cluster that `via` (a member's cluster address)
    /// belongs to, otherwise as [`cluster_node`](Self::cluster_node).
    pub fn joining_node(
        id: usize,
        via: SocketAddr,
        bind: SocketAddr,
        directory: &std::path::Path,
    ) -> Self {
        Self::member(id, ["--join", &via.to_string()], bind, directory, &[])
    }

    /// `kv serve` as node `id`, forming (`--peers`) or joining (`--join`) a cluster as
    /// `membership` says.
    fn member(
        id: usize,
        membership: [&str; 2],
        bind: SocketAddr,
        directory: &std::path::Path,
        extra: &[&str],
    ) -> Self {
        let id = id.to_string();
        let bind = bind.to_string();
        let data = directory.join(&id);
        let mut arguments = vec!["--node-id", &id, "--cluster-bind", &bind];
        arguments.extend_from_slice(&membership);
        arguments.extend_from_slice(&[
            "--data-dir",
            data.to_str().unwrap(),
            "--heartbeat-ms",
            "50",
            "--election-timeout-ms",
            "300",
        ]);
        arguments.extend_from_slice(extra);
        Self::start(&arguments)
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), self.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its status.
    pub async fn wait(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        within(tokio::task::spawn_blocking(move || child.wait()))
            .await
            .unwrap()
            .unwrap()
    }
}

/// `GET path` over HTTP/1.0: the status code and the body.
pub async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: kv\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    within(stream.read_to_end(&mut response)).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// `CLUSTER INFO` from `client`'s node, once it says `cluster_state:ok` (every shard led, as
/// that node knows); within [`PATIENCE`].
pub async fn cluster_ok(client: &mut kv::client::Client) -> String {
    cluster_text_until(client, b"INFO", |info| info.contains("cluster_state:ok")).await
}

/// Waits until `masters` nodes lead shards, as `CLUSTER NODES` on `client`'s node shows it (a
/// master's line lists its slots after the eight fields every line has). Until then a shard
/// may be without a leader, or about to change it, and a request caught then may be answered
/// "try again".
pub async fn masters_until(client: &mut kv::client::Client, masters: usize) -> String {
    cluster_text_until(client, b"NODES", |nodes| {
        nodes
            .lines()
            .filter(|line| line.split_whitespace().count() > 8)
            .count()
            == masters
    })
    .await
}

/// The text `CLUSTER <subcommand>` gives on `client`'s node, once `wanted` holds of it;
/// within [`PATIENCE`].
pub async fn cluster_text_until(
    client: &mut kv::client::Client,
    subcommand: &[u8],
    wanted: impl Fn(&str) -> bool,
) -> String {
    within(async {
        loop {
            let reply = client.call(&[b"CLUSTER", subcommand]).await.unwrap();
            let kv::protocol::ReplyValue::Bulk(Some(text)) = reply else {
                panic!("CLUSTER answers text: {reply:?}");
            };
            let text = String::from_utf8(text.to_vec()).unwrap();
            if wanted(&text) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A bucket name (`b{N}`) whose slot falls in `shard` of `shards`.
pub fn bucket_in(shard: u16, shards: u16) -> Vec<u8> {
    use kv::cluster::slot::{shard_of, slot_of};
    (0u32..)
        .map(|n| format!("b{{{n}}}").into_bytes())
        .find(|name| shard_of(slot_of(name), shards) == shard)
        .unwrap()
}

/// `count` free loopback addresses for cluster ports, and the `--peers` list naming them as
/// nodes 1, 2, …
pub fn cluster_peers(count: usize) -> (Vec<SocketAddr>, String) {
    let binds: Vec<SocketAddr> = (0..count)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        })
        .collect();
    let peers = binds
        .iter()
        .enumerate()
        .map(|(index, bind)| format!("{}={bind}", index + 1))
        .collect::<Vec<_>>()
        .join(",");
    (binds, peers)
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Opens a durable shard of `durability` with the limits of `core`.
pub async fn open_shard(
    durability: kv::config::DurabilityConfig,
    core: kv::config::CoreConfig,
) -> Result<
    (
        std::sync::Arc<kv::shard::LocalShard>,
        kv::shard::RecoveryReport,
    ),
    kv::shard::wal::WalError,
> {
    let (shard, report) = kv::shard::LocalShard::open(core, Some(durability)).await?;
    Ok((
        std::sync::Arc::new(shard),
        report.expect("a durable shard reports its recovery"),
    ))
}
