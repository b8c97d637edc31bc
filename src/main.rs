//! The `kv` binary: `kv serve` runs the server, `kv cli` talks to one.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kv::config::{ClusterConfig, CoreConfig, DurabilityConfig, FsyncPolicy, ServerConfig};
use kv::server::{CpuBudget, Server};

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
    /// Look at a running cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Each node up or down, and each shard's leader, term, indexes and followers' lag.
    Status(StatusArgs),
    /// Add a node before starting it: replicas are placed on it at once, and move there once
    /// it is started with its --node-id, --cluster-bind and --join.
    AddNode(AddNodeArgs),
    /// Remove a member: its replicas move to the others first, then it leaves (stop it then).
    RemoveNode(MemberArgs),
    /// Forget a member that died for good: its replicas are rebuilt from the others, and it
    /// is refused if it comes back. Its id is never reused.
    Forget(MemberArgs),
}

#[derive(Args)]
#[command(disable_help_flag = true)]
struct AddNodeArgs {
    #[command(flatten)]
    member: MemberArgs,
    /// Where the members will reach it (its --cluster-bind).
    cluster_address: SocketAddr,
}

#[derive(Args)]
#[command(disable_help_flag = true)]
struct MemberArgs {
    /// The node's id (a new one for add-node: ids are never reused).
    id: u64,
    #[command(flatten)]
    node: NodeArgs,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

#[derive(Args)]
#[command(disable_help_flag = true)]
struct StatusArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

/// Which server to talk to, as redis-cli takes it (`-h` is the host, so help is `--help`).
#[derive(Args)]
struct NodeArgs {
    /// Server host (-h, as redis-cli has it; --help for help).
    #[arg(short = 'h', long, default_value = "127.0.0.1")]
    host: String,
    /// Server port.
    #[arg(short = 'p', long, env = "PORT", default_value_t = 4040)]
    port: u16,
    /// The password to give on connecting (better in KV_PASSWORD than on the command line).
    #[arg(
        short = 'a',
        long = "pass",
        env = "KV_PASSWORD",
        hide_env_values = true
    )]
    password: Option<String>,
    /// Several nodes of a cluster, as `host:port,host:port,…`, instead of -h and -p: the
    /// first that answers is used (`kv cli` goes on to the next when it stops answering).
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
}

impl NodeArgs {
    /// The addresses to try, in order.
    fn addresses(&self) -> Vec<String> {
        if self.nodes.is_empty() {
            vec![format!("{}:{}", self.host, self.port)]
        } else {
            self.nodes.clone()
        }
    }
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
    /// Leave the buckets (`bench-0`, …) and their keys behind; by default they are dropped.
    #[arg(long)]
    keep: bool,
    /// Print the results as one JSON object instead of a table.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print the results as CSV (a header, then a row per operation and one for all).
    #[arg(long)]
    csv: bool,
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
    /// Longest line-protocol request (a size: 65536, 64kb, 1mb).
    #[arg(long, default_value = "64kb", value_parser = parse_bytes)]
    max_line_len: usize,
    /// Longest RESP bulk string, and all bulks of one request together (at most 512mb).
    #[arg(long, default_value = "8mb", value_parser = parse_bulk_len)]
    max_bulk_len: usize,
    /// Most bytes all connections' read and reply buffers may hold together; a client whose
    /// large request or reply would take them past it gets an error and is closed.
    #[arg(long, default_value = "1gb", value_parser = parse_bytes)]
    max_connection_buffers: usize,
    /// Unsent reply bytes at which a client stops being read until it reads them.
    #[arg(long, default_value = "1mb", value_parser = parse_bytes)]
    max_pending_output: usize,
    /// Most buckets alive at once.
    #[arg(long, default_value_t = CoreConfig::default().max_buckets)]
    max_buckets: usize,
    /// Most bytes all keys and values may take (4gb, 512mb; kb, mb, gb are powers of 1024).
    #[arg(long, default_value = "4gb", value_parser = parse_bytes)]
    max_memory: usize,
    /// Close clients idle this long (300, 5m, 1h; a bare number is seconds; 0: never).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Close a client that takes longer than this to send one whole request, from its first
    /// byte to its last (a bare number is seconds).
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    request_timeout: Duration,
    /// Where to serve Prometheus metrics (/metrics), the status page (/), /health and /ready:
    /// host:port, or `off`. Default: loopback, at the client port + 5081 (9121 for 4040).
    #[arg(long)]
    http_bind: Option<String>,
    /// A password clients must give (`AUTH password`, or `HELLO 3 AUTH default password`)
    /// before any other command. Better passed in the environment than on the command line,
    /// where other users of the machine can read it.
    #[arg(long, env = "KV_REQUIREPASS", hide_env_values = true)]
    requirepass: Option<String>,
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
    /// Compact the log once it passes this size and twice the live data.
    #[arg(long, default_value = "64mb", value_parser = parse_bytes)]
    compact_min_bytes: usize,
    /// Microseconds a worker keeps polling for requests without sleeping after the last one
    /// (0: sleep at once). Saves the wake-up of a sleeping worker per request at low
    /// pipeline depth, for CPU spent while requests keep coming; it pauses while the worker
    /// waits for a CPU. Default: 20, or 0 under a CPU quota that leaves no core spare.
    #[arg(long)]
    busy_poll_us: Option<u64>,
    /// Worker threads. Default: one per core the process may run on but one (left for the
    /// network and the clients), at least one, at most the whole cores of a cgroup CPU quota.
    #[arg(long)]
    threads: Option<usize>,
    /// Form a cluster: every initial member's id and cluster address, this node's included,
    /// as `1=127.0.0.1:7401,2=127.0.0.1:7402,3=127.0.0.1:7403`. Needs --node-id,
    /// --cluster-bind and --data-dir.
    #[arg(long, value_parser = parse_peers, requires_all = ["node_id", "cluster_bind", "data_dir"])]
    peers: Option<BTreeMap<u64, SocketAddr>>,
    /// Join a running cluster through any of its members' cluster addresses
    /// (`host:port,host:port,…`), under a --node-id no member ever had. Needs --node-id,
    /// --cluster-bind and --data-dir; once joined, the data directory remembers the cluster.
    #[arg(long, value_delimiter = ',', conflicts_with = "peers", requires_all = ["node_id", "cluster_bind", "data_dir"])]
    join: Vec<SocketAddr>,
    /// This node's id in the cluster: one of --peers, or a new one to --join with.
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
    /// What this node's shard logs may hold together (entries not yet compacted into a
    /// snapshot, on disk; of each log, the newest 4 MiB in memory too); past it the largest
    /// are compacted at once. Twice the shards' snapshots, if that is more.
    #[arg(long, default_value = "64mb", value_parser = parse_log_memory)]
    log_memory: usize,
}

/// A size: bytes, or with a unit (`kb`, `mb`, `gb`, `tb`, as Redis reads them: powers of
/// 1024; `KiB`… too).
fn parse_bytes(text: &str) -> Result<usize, String> {
    let bytes = parse_size::Config::new()
        .with_binary()
        .parse_size(text.trim())
        .map_err(|error| format!("{text:?} is not a size (such as 4096, 64kb, 4gb): {error}"))?;
    usize::try_from(bytes).map_err(|_| format!("{text:?} is too large"))
}

/// `--max-bulk-len`: a size from 1 byte to [`kv::config::MAX_BULK_LEN_LIMIT`].
fn parse_bulk_len(text: &str) -> Result<usize, String> {
    let bytes = parse_bytes(text)?;
    if (1..=kv::config::MAX_BULK_LEN_LIMIT).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(format!(
            "{text:?} is outside 1 byte to {} bytes",
            kv::config::MAX_BULK_LEN_LIMIT
        ))
    }
}

/// `--log-memory`: a size of at least 1 MiB. Below that the logs would be compacted at almost
/// every write (each compaction copies a shard's data into a snapshot).
fn parse_log_memory(text: &str) -> Result<usize, String> {
    let bytes = parse_bytes(text)?;
    if bytes >= 1 << 20 {
        Ok(bytes)
    } else {
        Err(format!("{text:?} is under 1mb"))
    }
}

/// A duration: seconds, or with units (`500ms`, `5s`, `2m`, `1h`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text)
        .map_err(|error| format!("{text:?} is not a duration (such as 30, 500ms, 5m): {error}"))
}

/// A duration longer than zero.
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    parse_duration(text).and_then(|duration| {
        if duration.is_zero() {
            Err("must be longer than zero".to_owned())
        } else {
            Ok(duration)
        }
    })
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
#[command(disable_help_flag = true)]
struct CliArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The server as a URI, instead of -h and -p: kv://[:password@]host[:port] (redis:// is
    /// read the same way).
    #[arg(short = 'u', long)]
    uri: Option<String>,
    /// Print replies as they are (values bare, one element a line), as when stdout is not a
    /// terminal.
    #[arg(long, conflicts_with = "no_raw")]
    raw: bool,
    /// Print replies formatted (quoted, numbered) even when stdout is not a terminal.
    #[arg(long)]
    no_raw: bool,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// A command to send; without one, commands are read from stdin (a prompt on a
    /// terminal).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// `kv://[:password@]host[:port][/0]` as a node and a password.
fn parse_uri(uri: &str) -> anyhow::Result<(String, Option<String>)> {
    let rest = uri
        .strip_prefix("kv://")
        .or_else(|| uri.strip_prefix("redis://"))
        .with_context(|| format!("{uri:?} is not a kv:// URI"))?;
    let rest = rest.split('/').next().unwrap_or_default();
    let (password, address) = match rest.rsplit_once('@') {
        Some((user_info, address)) => {
            let password = user_info
                .split_once(':')
                .map_or(user_info, |(_, password)| password);
            (
                Some(password.to_owned()).filter(|password| !password.is_empty()),
                address,
            )
        }
        None => (None, rest),
    };
    anyhow::ensure!(!address.is_empty(), "{uri:?} names no host");
    let address = if address
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    {
        address.to_owned()
    } else {
        format!("{address}:4040")
    };
    Ok((address, password))
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kv: {}", one_line(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `kv cluster add-node|remove-node|forget`: asks a node to run `CLUSTER words…` and prints
/// what it did.
fn cluster_command(node: &NodeArgs, words: &[&[u8]]) -> anyhow::Result<()> {
    let request: Vec<&[u8]> = std::iter::once(&b"CLUSTER"[..])
        .chain(words.iter().copied())
        .collect();
    let done = runtime(Some(1))?.block_on(kv::client::status::ask_any(
        &node.addresses(),
        node.password.as_deref(),
        &request,
    ))?;
    println!("{done}");
    Ok(())
}

/// The error and its causes, one line, for a person: each cause once, though many errors
/// (io's among them) repeat their source in their own text.
fn one_line(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if !text.ends_with(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(arguments) => {
            let budget = CpuBudget::of_this_process();
            let workers = arguments.threads.unwrap_or_else(|| budget.workers()).max(1);
            runtime(Some(workers))?.block_on(serve(arguments, budget, workers))
        }
        Command::Cli(arguments) => {
            let code = runtime(Some(1))?.block_on(talk(arguments))?;
            std::process::exit(code);
        }
        Command::Bench(arguments) => runtime(Some(arguments.threads))?.block_on(bench(arguments)),
        Command::Cluster(ClusterCommand::AddNode(arguments)) => {
            let id = arguments.member.id.to_string();
            let address = arguments.cluster_address.to_string();
            cluster_command(
                &arguments.member.node,
                &[b"ADDNODE", id.as_bytes(), address.as_bytes()],
            )
        }
        Command::Cluster(ClusterCommand::RemoveNode(arguments)) => {
            let id = arguments.id.to_string();
            cluster_command(&arguments.node, &[b"REMOVENODE", id.as_bytes()])
        }
        Command::Cluster(ClusterCommand::Forget(arguments)) => {
            let id = arguments.id.to_string();
            cluster_command(&arguments.node, &[b"FORGET", id.as_bytes()])
        }
        Command::Cluster(ClusterCommand::Status(arguments)) => {
            let status = runtime(Some(1))?.block_on(kv::client::status::cluster_status(
                &arguments.node.addresses(),
                arguments.node.password.as_deref(),
            ))?;
            print!("{status}");
            Ok(())
        }
    }
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads.max(1));
    }
    builder.enable_all().build().context("starting the runtime")
}

async fn serve(arguments: ServeArgs, budget: CpuBudget, workers: usize) -> anyhow::Result<()> {
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
        idle_timeout: (!arguments.idle_timeout.is_zero()).then_some(arguments.idle_timeout),
        request_timeout: arguments.request_timeout,
        requirepass: arguments.requirepass.clone(),
        http_bind: http_bind(&arguments)?,
        http_bind_optional: arguments.http_bind.is_none(),
        enable_debug_commands: arguments.enable_debug_commands,
        busy_poll: arguments.busy_poll_us.map_or_else(
            || {
                if budget.allows_busy_polling(workers) {
                    ServerConfig::default().busy_poll
                } else {
                    Duration::ZERO
                }
            },
            Duration::from_micros,
        ),
        core: CoreConfig {
            max_buckets: arguments.max_buckets,
            max_memory: arguments.max_memory,
            ..CoreConfig::default()
        },
        durability: arguments.data_dir.clone().map(|data_dir| DurabilityConfig {
            fsync: arguments.fsync,
            truncate_corrupt_log: arguments.truncate_corrupt_log,
            compact_min_bytes: arguments.compact_min_bytes as u64,
            ..DurabilityConfig::new(data_dir)
        }),
        cluster: cluster_config(&arguments)?,
        ..ServerConfig::default()
    };
    let server = Server::bind(config.clone()).await?;
    tracing::info!("kv listening on {}", server.local_addr());
    if let Some(http) = server.http_addr() {
        tracing::info!("metrics on http://{http}/metrics, the status page on http://{http}/");
    }
    for line in describe(&config, &budget, workers) {
        tracing::info!("{line}");
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    server
        .run(shutdown)
        .await
        .context("stopping: the log could not be written and synced")?;
    tracing::info!("kv stopped");
    Ok(())
}

/// Where the HTTP listener goes: `--http-bind`, or loopback at the client port + 5081 (any
/// free port when the client port is 0); nowhere with `off`.
/// Where the HTTP listener goes: `--http-bind`, or by default loopback at the client port
/// plus 5081 (any free port with port 0). The default is given up, with a warning, where it
/// cannot be had (past port 65535 here, in use at bind); an address asked for by name is not.
fn http_bind(arguments: &ServeArgs) -> anyhow::Result<Option<SocketAddr>> {
    match arguments.http_bind.as_deref() {
        Some("off") => Ok(None),
        Some(address) => Ok(Some(address.parse().with_context(|| {
            format!("--http-bind {address:?} is not host:port or off")
        })?)),
        None => {
            let port = match arguments.port {
                0 => Some(0),
                port => port.checked_add(5081),
            };
            if port.is_none() {
                tracing::warn!(
                    port = arguments.port,
                    "no metrics or status page: the default HTTP port (the client port + 5081) \
                     is past 65535 (--http-bind sets one)"
                );
            }
            Ok(port.map(|port| SocketAddr::from(([127, 0, 0, 1], port))))
        }
    }
}

/// The cluster this node forms or joins, if `--peers` or `--join` says it does.
fn cluster_config(arguments: &ServeArgs) -> anyhow::Result<Option<ClusterConfig>> {
    let peers = match (&arguments.peers, arguments.join.is_empty()) {
        (None, true) => return Ok(None),
        (Some(peers), _) => peers.clone(),
        (None, false) => BTreeMap::new(),
    };
    let node_id = arguments
        .node_id
        .context("--peers and --join need --node-id")?;
    let bind = arguments
        .cluster_bind
        .context("--peers and --join need --cluster-bind")?;
    anyhow::ensure!(
        peers.is_empty() || peers.get(&node_id) == Some(&bind),
        "--peers must list this node ({node_id}) at its --cluster-bind ({bind})"
    );
    anyhow::ensure!(node_id > 0, "--node-id starts at 1");
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
        join: arguments.join.clone(),
        log_memory: u64::try_from(arguments.log_memory).unwrap_or(u64::MAX),
        ..ClusterConfig::new(node_id, bind, peers)
    }))
}

/// What the server was started with, in words, a line a subject.
fn describe(config: &ServerConfig, budget: &CpuBudget, workers: usize) -> Vec<String> {
    let size = |bytes: usize| {
        let mut value = bytes as f64;
        let mut unit = "bytes";
        for larger in ["KiB", "MiB", "GiB", "TiB"] {
            if value < 1024.0 {
                break;
            }
            value /= 1024.0;
            unit = larger;
        }
        format!("{value:.1} {unit}").replace(".0 ", " ")
    };
    let data = match &config.durability {
        None => {
            "data: in memory only (lost when the process stops; --data-dir keeps it)".to_owned()
        }
        Some(durability) => format!(
            "data: logged in {} and synced to disk {}",
            durability.data_dir.display(),
            match durability.fsync {
                FsyncPolicy::Always => "before each reply",
                FsyncPolicy::EverySecond => "once a second",
                FsyncPolicy::No => "when the operating system chooses",
            }
        ),
    };
    vec![
        format!(
            "limits: {} clients, {} buckets, {} of keys and values, requests up to {} (lines up to {})",
            config.max_connections,
            config.core.max_buckets,
            size(config.core.max_memory),
            size(config.max_bulk_len),
            size(config.max_line_len),
        ),
        format!(
            "clients: {}; a request must arrive whole within {}; {}",
            config.idle_timeout.map_or_else(
                || "never closed for idling".to_owned(),
                |timeout| format!("closed after {} idle", humantime::format_duration(timeout))
            ),
            humantime::format_duration(config.request_timeout),
            if config.requirepass.is_some() {
                "a password is required (AUTH)"
            } else {
                "no password is asked (--requirepass sets one)"
            },
        ),
        data,
        format!(
            "workers: {workers} ({}); {}{}",
            budget.describe(),
            if config.busy_poll.is_zero() {
                "no busy polling".to_owned()
            } else {
                format!(
                    "busy polling for {} µs after a request while a core is free",
                    config.busy_poll.as_micros()
                )
            },
            if config.enable_debug_commands {
                "; DEBUG fault injection is on"
            } else {
                ""
            }
        ),
    ]
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
        progress: std::io::stderr().is_terminal(),
        keep: arguments.keep,
    };
    let report = kv::bench::run(config.clone()).await?;
    let rows: Vec<(&str, u64, f64, [u64; 5])> = report
        .operations
        .iter()
        .map(|row| {
            (
                row.operation,
                row.requests,
                row.ops_per_second,
                row.latency.columns(),
            )
        })
        .chain(std::iter::once((
            "all",
            report.requests,
            report.ops_per_second,
            report.latency.columns(),
        )))
        .collect();
    if arguments.json {
        let mut json = serde_json::to_value(&report)?;
        json["connections"] = config.connections.into();
        json["pipeline"] = config.pipeline.into();
        json["buckets"] = config.buckets.into();
        json["keys"] = config.keys.into();
        json["value_size"] = config.value_size.into();
        json["protocol"] = arguments.protocol.into();
        println!("{json}");
    } else if arguments.csv {
        println!("operation,requests,ops_per_second,p50_us,p90_us,p99_us,p999_us,max_us");
        for (operation, requests, rate, [p50, p90, p99, p999, max]) in &rows {
            println!("{operation},{requests},{rate:.0},{p50},{p90},{p99},{p999},{max}");
        }
    } else {
        println!(
            "{} requests in {:.2} s, {} connections, pipeline {}, {} errors, {} answered TRYAGAIN",
            report.requests,
            report.seconds,
            config.connections,
            config.pipeline,
            report.errors,
            report.unavailable
        );
        println!(
            "{:<9} {:>10} {:>12} {:>8} {:>8} {:>8} {:>8} {:>8}   latency in µs",
            "operation", "requests", "requests/s", "p50", "p90", "p99", "p99.9", "max"
        );
        for (operation, requests, rate, [p50, p90, p99, p999, max]) in &rows {
            println!(
                "{operation:<9} {requests:>10} {rate:>12.0} {p50:>8} {p90:>8} {p99:>8} {p999:>8} {max:>8}"
            );
        }
    }
    if let Some(error) = &report.first_error {
        eprintln!("first wrong reply: {error}");
    }
    if report.errors > 0 {
        anyhow::bail!("{} wrong replies", report.errors);
    }
    Ok(())
}

/// Runs `kv cli`; returns the exit code: 0, or 1 if a command failed.
async fn talk(arguments: CliArgs) -> anyhow::Result<i32> {
    let (nodes, uri_password) = match &arguments.uri {
        Some(uri) => {
            let (node, password) = parse_uri(uri)?;
            (vec![node], password)
        }
        None => (arguments.node.addresses(), None),
    };
    let raw = if arguments.raw {
        Some(true)
    } else if arguments.no_raw {
        Some(false)
    } else {
        None
    };
    Ok(kv::client::cli::run(kv::client::cli::CliOptions {
        nodes,
        password: arguments.node.password.clone().or(uri_password),
        raw,
        command: arguments.command.clone(),
    })
    .await)
}
