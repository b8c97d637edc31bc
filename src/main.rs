//! The `kv` binary: `kv serve` runs the server, `kv cli` talks to one.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kv::client::{Client, render};
use kv::config::{ClusterConfig, CoreConfig, DurabilityConfig, FsyncPolicy, ServerConfig};
use kv::protocol::ReplyValue;
use kv::server::Server;

/// jemalloc, with its background threads, which give freed memory back to the system within
/// seconds whether or not the server keeps allocating. With glibc's malloc, a server that had
/// held a million buckets kept all of their memory after they were dropped (docs/performance.md,
/// `bench/give_back.py`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use tokio_util::sync::CancellationToken;

/// kv: a key-value store of named buckets.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Talk to a server: one command from the arguments, or interactively.
    Cli(CliArgs),
    /// Load a server and measure throughput and latency.
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Server host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Server port.
    #[arg(long, env = "PORT", default_value_t = 4040)]
    port: u16,
    /// Several nodes of a cluster, as `host:port,host:port,…`, instead of --host and --port:
    /// connections spread over them in turn.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 50)]
    connections: usize,
    /// Requests per batch (pipeline depth).
    #[arg(long, short = 'P', default_value_t = 1)]
    pipeline: usize,
    /// Requests in all (unless --duration is given).
    #[arg(long, short = 'n', default_value_t = 1_000_000)]
    requests: u64,
    /// Run for this many seconds instead of a request count.
    #[arg(long)]
    duration: Option<f64>,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 32)]
    value_size: usize,
    /// Buckets the keys are spread over.
    #[arg(long, default_value_t = 1)]
    buckets: u64,
    /// Operation mix, e.g. get=0.9,put=0.1.
    #[arg(long, default_value = "get=0.9,put=0.1")]
    mix: kv::bench::Mix,
    /// Protocol: line or resp.
    #[arg(long, default_value = "resp", value_parser = ["line", "resp"])]
    protocol: String,
    /// Create the buckets and put every key before measuring.
    #[arg(long)]
    preload: bool,
    /// Client threads (the server shares the machine; redis-benchmark uses one).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = 4040)]
    port: u16,
    /// Most clients connected at once.
    #[arg(long, default_value_t = ServerConfig::default().max_connections)]
    max_connections: usize,
    /// Longest line-protocol request, in bytes.
    #[arg(long, default_value_t = ServerConfig::default().max_line_len)]
    max_line_len: usize,
    /// Longest RESP bulk string (and all bulks of one request together), in bytes.
    #[arg(long, default_value_t = ServerConfig::default().max_bulk_len,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(1..=kv::config::MAX_BULK_LEN_LIMIT as u64))]
    max_bulk_len: usize,
    /// Most bytes all connections' read and reply buffers may hold together; a client whose
    /// large request or reply would take them past it gets an error and is closed.
    #[arg(long, default_value_t = ServerConfig::default().max_connection_buffers)]
    max_connection_buffers: usize,
    /// Unsent reply bytes at which a client stops being read until it reads them.
    #[arg(long, default_value_t = ServerConfig::default().max_pending_output)]
    max_pending_output: usize,
    /// Most buckets alive at once.
    #[arg(long, default_value_t = CoreConfig::default().max_buckets)]
    max_buckets: usize,
    /// Most bytes all keys and values may take.
    #[arg(long, default_value_t = CoreConfig::default().max_memory)]
    max_memory: usize,
    /// Close clients idle this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    idle_timeout: u64,
    /// Close a client that takes longer than this many seconds to send one whole request,
    /// from its first byte to its last.
    #[arg(long, default_value_t = ServerConfig::default().request_timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout: u64,
    /// Allow DEBUG CRASH, DEBUG STOP and DEBUG PANIC, for fault tests.
    #[arg(long)]
    enable_debug_commands: bool,
    /// Keep data in this directory: every acknowledged change is logged and replayed at start.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// When the log is synced to disk: always (before replying), everysec, or no (by the OS).
    #[arg(long, default_value = "everysec")]
    fsync: FsyncPolicy,
    /// Start even if the log is corrupt, cutting it at the first bad record (what follows is
    /// lost). Without it, corruption stops the start with the file and offset.
    #[arg(long)]
    truncate_corrupt_log: bool,
    /// Compact the log once it passes this many bytes and twice the live data.
    #[arg(long, default_value_t = 64 << 20)]
    compact_min_bytes: u64,
    /// Microseconds a worker keeps polling for requests without sleeping after the last one
    /// (0: sleep at once). Saves the wake-up of a sleeping worker per request at low
    /// pipeline depth, for CPU spent while requests keep coming.
    #[arg(long, default_value_t = ServerConfig::default().busy_poll.as_micros() as u64)]
    busy_poll_us: u64,
    /// Worker threads (default: one per core). A load generator on the same machine needs a
    /// core too: more busy threads than cores only adds switching.
    #[arg(long)]
    threads: Option<usize>,
    /// Join a cluster: every initial member's id and cluster address, this node's included,
    /// as `1=127.0.0.1:7401,2=127.0.0.1:7402,3=127.0.0.1:7403`. Needs --node-id,
    /// --cluster-bind and --data-dir.
    #[arg(long, value_parser = parse_peers, requires_all = ["node_id", "cluster_bind", "data_dir"])]
    peers: Option<BTreeMap<u64, SocketAddr>>,
    /// This node's id among --peers.
    #[arg(long)]
    node_id: Option<u64>,
    /// Where this node listens for the other nodes of the cluster.
    #[arg(long)]
    cluster_bind: Option<SocketAddr>,
    /// How many shards (Raft groups) the slots are cut into.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16384))]
    shards: u16,
    /// Replicas of each shard (every node, if there are fewer).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    replicas: u64,
    /// A shard leader's heartbeat interval, in milliseconds.
    #[arg(long, default_value_t = default_cluster().heartbeat.as_millis() as u64)]
    heartbeat_ms: u64,
    /// The shortest election timeout, in milliseconds (the longest is twice it). A follower
    /// that hears nothing from its leader for the longest timeout plus a random one in between
    /// starts an election.
    #[arg(long, default_value_t = default_cluster().election_timeout.0.as_millis() as u64)]
    election_timeout_ms: u64,
}

/// The cluster settings `kv serve` defaults to.
fn default_cluster() -> kv::config::ClusterConfig {
    kv::config::ClusterConfig::new(0, SocketAddr::from(([127, 0, 0, 1], 0)), BTreeMap::new())
}

/// Parses `--peers`: `id=host:port`, comma-separated, each id once.
fn parse_peers(text: &str) -> Result<BTreeMap<u64, SocketAddr>, String> {
    let mut peers = BTreeMap::new();
    for member in text.split(',') {
        let (id, address) = member
            .split_once('=')
            .ok_or_else(|| format!("{member:?} is not id=host:port"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("{id:?} is not a node id"))?;
        let address: SocketAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("{address:?} is not host:port"))?;
        if peers.insert(id, address).is_some() {
            return Err(format!("node {id} is listed twice"));
        }
    }
    Ok(peers)
}

#[derive(Args)]
struct CliArgs {
    /// Server host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Server port.
    #[arg(long, env = "PORT", default_value_t = 4040)]
    port: u16,
    /// Several nodes of a cluster, as `host:port,host:port,…`, instead of --host and --port:
    /// the first that answers is used, and the next when it stops answering.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// A command to send; without one, an interactive prompt starts.
    command: Vec<String>,
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The error and its causes, one line, for a person: not a debug dump.
            eprintln!("kv: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(arguments) => runtime(arguments.threads)?.block_on(serve(arguments)),
        Command::Cli(arguments) => {
            let code = runtime(Some(1))?.block_on(talk(arguments))?;
            std::process::exit(code);
        }
        Command::Bench(arguments) => runtime(Some(arguments.threads))?.block_on(bench(arguments)),
    }
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads.max(1));
    }
    builder.enable_all().build().context("starting the runtime")
}

async fn serve(arguments: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // openraft warns at every heartbeat a peer misses; the peer connection reports a
            // peer that goes away once (and when it is back).
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=error")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let config = ServerConfig {
        bind: SocketAddr::new(arguments.bind, arguments.port),
        max_connections: arguments.max_connections,
        max_line_len: arguments.max_line_len,
        max_bulk_len: arguments.max_bulk_len,
        max_connection_buffers: arguments.max_connection_buffers,
        max_pending_output: arguments.max_pending_output,
        idle_timeout: (arguments.idle_timeout > 0)
            .then(|| Duration::from_secs(arguments.idle_timeout)),
        request_timeout: Duration::from_secs(arguments.request_timeout),
        enable_debug_commands: arguments.enable_debug_commands,
        busy_poll: Duration::from_micros(arguments.busy_poll_us),
        core: CoreConfig {
            max_buckets: arguments.max_buckets,
            max_memory: arguments.max_memory,
            ..CoreConfig::default()
        },
        durability: arguments.data_dir.clone().map(|data_dir| DurabilityConfig {
            fsync: arguments.fsync,
            truncate_corrupt_log: arguments.truncate_corrupt_log,
            compact_min_bytes: arguments.compact_min_bytes,
            ..DurabilityConfig::new(data_dir)
        }),
        cluster: cluster_config(&arguments)?,
        ..ServerConfig::default()
    };
    let server = Server::bind(config.clone()).await?;
    tracing::info!(
        max_connections = config.max_connections,
        max_line_len = config.max_line_len,
        max_bulk_len = config.max_bulk_len,
        max_connection_buffers = config.max_connection_buffers,
        max_pending_output = config.max_pending_output,
        max_buckets = config.core.max_buckets,
        max_memory = config.core.max_memory,
        threads = arguments.threads.map_or_else(|| "one per core".to_owned(), |n| n.to_string()),
        idle_timeout = ?config.idle_timeout,
        request_timeout = ?config.request_timeout,
        busy_poll = ?config.busy_poll,
        debug_commands = config.enable_debug_commands,
        data_dir = ?config.durability.as_ref().map(|durability| &durability.data_dir),
        "kv listening on {}",
        server.local_addr()
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    server
        .run(shutdown)
        .await
        .context("stopping: the log could not be written and synced")?;
    tracing::info!("kv stopped");
    Ok(())
}

/// The cluster this node joins, if `--peers` says it does.
fn cluster_config(arguments: &ServeArgs) -> anyhow::Result<Option<ClusterConfig>> {
    let Some(peers) = arguments.peers.clone() else {
        return Ok(None);
    };
    let node_id = arguments.node_id.context("--peers needs --node-id")?;
    let bind = arguments
        .cluster_bind
        .context("--peers needs --cluster-bind")?;
    anyhow::ensure!(
        peers.get(&node_id) == Some(&bind),
        "--peers must list this node ({node_id}) at its --cluster-bind ({bind})"
    );
    let election = Duration::from_millis(arguments.election_timeout_ms);
    anyhow::ensure!(
        arguments.heartbeat_ms * 2 < arguments.election_timeout_ms,
        "--heartbeat-ms must be well under --election-timeout-ms"
    );
    Ok(Some(ClusterConfig {
        shards: arguments.shards,
        replicas: usize::try_from(arguments.replicas).unwrap_or(usize::MAX),
        heartbeat: Duration::from_millis(arguments.heartbeat_ms),
        election_timeout: (election, election * 2),
        ..ClusterConfig::new(node_id, bind, peers)
    }))
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
    shutdown.cancel();
}

async fn bench(arguments: BenchArgs) -> anyhow::Result<()> {
    let addresses = if arguments.nodes.is_empty() {
        vec![format!("{}:{}", arguments.host, arguments.port)]
    } else {
        arguments.nodes.clone()
    };
    let config = kv::bench::BenchConfig {
        addresses,
        connections: arguments.connections,
        pipeline: arguments.pipeline,
        requests: arguments.requests,
        duration: arguments.duration.map(Duration::from_secs_f64),
        keys: arguments.keys,
        value_size: arguments.value_size,
        buckets: arguments.buckets,
        mix: arguments.mix,
        dialect: if arguments.protocol == "line" {
            kv::protocol::Dialect::Line
        } else {
            kv::protocol::Dialect::Resp
        },
        preload: arguments.preload,
        progress: true,
    };
    let report = kv::bench::run(config.clone()).await?;
    println!(
        "{} requests in {:.2} s: {:.0} requests/s, {} errors",
        report.requests, report.seconds, report.ops_per_second, report.errors
    );
    println!(
        "latency (µs): p50 {}  p99 {}  p99.9 {}  max {}",
        report.p50_us, report.p99_us, report.p999_us, report.max_us
    );
    if let Some(error) = &report.first_error {
        println!("first wrong reply: {error}");
    }
    let mut json = serde_json::to_value(&report)?;
    json["connections"] = config.connections.into();
    json["pipeline"] = config.pipeline.into();
    json["buckets"] = config.buckets.into();
    json["keys"] = config.keys.into();
    json["value_size"] = config.value_size.into();
    json["protocol"] = arguments.protocol.into();
    println!("{json}");
    if report.errors > 0 {
        anyhow::bail!("{} wrong replies", report.errors);
    }
    Ok(())
}

/// A connection to the first of `nodes` that accepts one, trying them in turn from `from`;
/// which one it is.
async fn connect_to_any(nodes: &[String], from: usize) -> anyhow::Result<(usize, Client)> {
    let mut last_error = None;
    for offset in 0..nodes.len() {
        let at = (from + offset) % nodes.len();
        match Client::connect(&nodes[at]).await {
            Ok(client) => return Ok((at, client)),
            Err(error) => last_error = Some(error),
        }
    }
    let error = last_error.map_or_else(|| "no node given".to_owned(), |error| error.to_string());
    anyhow::bail!("connecting to {}: {error}", nodes.join(", "))
}

/// Runs `kv cli`; returns the exit code: 0, or 1 if the one command got an error reply.
async fn talk(arguments: CliArgs) -> anyhow::Result<i32> {
    let nodes = if arguments.nodes.is_empty() {
        vec![format!("{}:{}", arguments.host, arguments.port)]
    } else {
        arguments.nodes.clone()
    };
    let (mut at, mut client) = connect_to_any(&nodes, 0).await?;
    if !arguments.command.is_empty() {
        let words: Vec<&[u8]> = arguments.command.iter().map(String::as_bytes).collect();
        let reply = client.call(&words).await?;
        return Ok(show(&reply));
    }
    let mut editor = rustyline::DefaultEditor::new()?;
    let history =
        std::env::var_os("HOME").map(|home| std::path::PathBuf::from(home).join(".kv_cli_history"));
    if let Some(history) = &history {
        let _ = editor.load_history(history);
    }
    loop {
        let prompt = format!("{}> ", nodes[at]);
        let line = match editor.readline(&prompt) {
            Ok(line) => line,
            Err(
                rustyline::error::ReadlineError::Interrupted | rustyline::error::ReadlineError::Eof,
            ) => break,
            Err(error) => return Err(error.into()),
        };
        let Some(words) = shlex::split(&line) else {
            eprintln!("(error) unbalanced quotes");
            continue;
        };
        if words.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line.as_str());
        if words[0].eq_ignore_ascii_case("exit") {
            break;
        }
        let words: Vec<&[u8]> = words.iter().map(String::as_bytes).collect();
        match client.call(&words).await {
            Ok(reply) => {
                show(&reply);
            }
            Err(error) => {
                // Not sent again: a write may have been made before the connection broke.
                eprintln!("(error) {error}; the command may or may not have run");
                if nodes.len() == 1 {
                    break;
                }
                (at, client) = connect_to_any(&nodes, at + 1).await?;
                eprintln!("(connected to {})", nodes[at]);
            }
        }
        if words[0].eq_ignore_ascii_case(b"quit") {
            break;
        }
    }
    if let Some(history) = &history {
        let _ = editor.save_history(history);
    }
    Ok(0)
}

/// Prints a reply (errors to stderr); returns 1 for an error reply, else 0.
fn show(reply: &ReplyValue) -> i32 {
    if matches!(reply, ReplyValue::Error(_)) {
        eprintln!("{}", render(reply));
        1
    } else {
        println!("{}", render(reply));
        0
    }
}
