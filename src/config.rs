//! Every limit and knob of kv, with its default and the reason for it.
//!
//! Each bound here protects the server from a client: anything a client can make kv allocate
//! (buckets, keys, bytes, connections, line length) is capped, and reaching the cap gives that
//! client an error reply instead of growing memory.

use std::path::PathBuf;
use std::time::Duration;

/// The most `max_bulk_len` may be: every change a request can make then fits one record of
/// the log (a gigabyte) with room to spare, so nothing is acknowledged that the log would
/// refuse to read back.
pub const MAX_BULK_LEN_LIMIT: usize = 512 << 20;

/// Limits of the core: the registry and its buckets.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Most buckets alive at once. Each bucket costs a task and a table even when empty, so an
    /// unbounded count would let one client exhaust memory with `CREATE` alone.
    pub max_buckets: usize,
    /// Longest bucket name, in bytes.
    pub max_name_len: usize,
    /// Bytes that keys and values (plus a per-entry overhead estimate) may take in all buckets
    /// together. A `PUT` that would pass it is refused.
    pub max_memory: usize,
    /// Capacity of the registry's mailbox. A full mailbox makes `create` and `drop` wait: that
    /// wait is the back-pressure the guide's synchronous calls give.
    pub registry_mailbox: usize,
    /// How often the registry may fail before its supervisor gives up (OTP's restart intensity:
    /// at most `max_restarts` within `restart_period`).
    pub restart_intensity: RestartIntensity,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            max_buckets: 1_000_000,
            max_name_len: 1024,
            max_memory: 4 << 30,
            registry_mailbox: 1024,
            restart_intensity: RestartIntensity::default(),
        }
    }
}

/// At most `max_restarts` restarts within `period`; one more and the supervisor gives up.
#[derive(Debug, Clone, Copy)]
pub struct RestartIntensity {
    /// Restarts allowed within `period`.
    pub max_restarts: usize,
    /// The sliding window over which restarts are counted.
    pub period: Duration,
}

impl Default for RestartIntensity {
    /// OTP's supervisor default: three restarts in five seconds.
    fn default() -> Self {
        Self {
            max_restarts: 3,
            period: Duration::from_secs(5),
        }
    }
}

/// Limits and knobs of the network server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen.
    pub bind: std::net::SocketAddr,
    /// Most clients connected at once. One more gets an error reply and is closed: each
    /// connection holds buffers and a task, so the count bounds memory.
    pub max_connections: usize,
    /// Longest line-protocol request (and RESP header line). 64 KiB, as Redis's inline limit.
    pub max_line_len: usize,
    /// Longest RESP bulk string, and the most bytes the bulks of one request may take
    /// together. This bounds each connection's read buffer. At most [`MAX_BULK_LEN_LIMIT`].
    pub max_bulk_len: usize,
    /// Most elements in one RESP array.
    pub max_args: usize,
    /// Most bytes the read and reply buffers of all connections may hold together. Every
    /// connection starts with small buffers that this never refuses; one whose buffer grows
    /// past them for a large request or reply, and finds all buffers together over this, gets
    /// an error and is closed. Without it, `max_connections` clients each sending most of a
    /// `max_bulk_len` request, or asking for a large value and not reading it, could hold tens
    /// of gigabytes.
    pub max_connection_buffers: usize,
    /// Unsent reply bytes at which a connection stops reading its client until they are
    /// written: a client that sends without reading cannot make the server buffer for it.
    pub max_pending_output: usize,
    /// Close a connection that sends nothing for this long; `None` never does.
    pub idle_timeout: Option<Duration>,
    /// Most time one request may take to arrive, from its first byte to its last. The idle
    /// timeout cannot catch a client that trickles a byte at a time and never finishes a
    /// request; this can, so a few hundred such clients cannot hold every connection slot.
    /// Long enough for a full `max_bulk_len` request over a slow link.
    pub request_timeout: Duration,
    /// Names or keys in one page of `BUCKETS` or `KEYS`.
    pub page_size: usize,
    /// Whether `DEBUG CRASH` and `DEBUG STOP` are allowed (off by default, like Redis's
    /// `enable-debug-command`).
    pub enable_debug_commands: bool,
    /// How long a graceful shutdown waits for connections to finish before closing them.
    pub shutdown_grace: Duration,
    /// How long a worker keeps polling for I/O without sleeping after the last request
    /// (see `server::busy_poll`); zero turns it off.
    pub busy_poll: Duration,
    /// The core's limits.
    pub core: CoreConfig,
    /// Where and how to keep data on disk; `None` keeps it in memory only.
    pub durability: Option<DurabilityConfig>,
    /// The cluster this node is part of; `None`: a single node, with nothing of the cluster on
    /// its path. A cluster needs `durability` (for its data directory).
    pub cluster: Option<ClusterConfig>,
    /// The password clients must give (`AUTH`, or `HELLO … AUTH`) before anything else;
    /// `None`: none is asked.
    pub requirepass: Option<String>,
    /// Where the HTTP listener of metrics and the status page listens; `None`: nowhere.
    pub http_bind: Option<std::net::SocketAddr>,
    /// Whether the server may start without its HTTP listener when `http_bind` cannot be
    /// bound (in use): true for the default address, which the user did not ask for by name.
    pub http_bind_optional: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: std::net::SocketAddr::from(([127, 0, 0, 1], 4040)),
            max_connections: 10_000,
            max_line_len: 64 * 1024,
            max_bulk_len: 8 * 1024 * 1024,
            max_args: 1024,
            max_connection_buffers: 1 << 30,
            max_pending_output: 1024 * 1024,
            idle_timeout: None,
            request_timeout: Duration::from_secs(30),
            page_size: 100,
            enable_debug_commands: false,
            shutdown_grace: Duration::from_secs(5),
            busy_poll: Duration::from_micros(20),
            core: CoreConfig::default(),
            durability: None,
            cluster: None,
            requirepass: None,
            http_bind: None,
            http_bind_optional: false,
        }
    }
}

impl ServerConfig {
    /// The settings as `CONFIG GET` shows them: Redis's names where they mean the same, then
    /// kv's own.
    #[must_use]
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        let yes_no = |yes: bool| if yes { "yes" } else { "no" }.to_owned();
        let seconds = |duration: Option<Duration>| duration.map_or(0, |d| d.as_secs()).to_string();
        vec![
            ("bind", self.bind.ip().to_string()),
            ("port", self.bind.port().to_string()),
            ("maxclients", self.max_connections.to_string()),
            ("maxmemory", self.core.max_memory.to_string()),
            ("timeout", seconds(self.idle_timeout)),
            ("proto-max-bulk-len", self.max_bulk_len.to_string()),
            ("databases", "1".to_owned()),
            ("save", String::new()),
            ("appendonly", yes_no(self.durability.is_some())),
            (
                "appendfsync",
                self.durability
                    .as_ref()
                    .map_or_else(|| "no".to_owned(), |d| d.fsync.to_string()),
            ),
            (
                "dir",
                self.durability
                    .as_ref()
                    .map_or_else(String::new, |d| d.data_dir.display().to_string()),
            ),
            ("cluster-enabled", yes_no(self.cluster.is_some())),
            ("max-buckets", self.core.max_buckets.to_string()),
            ("max-name-len", self.core.max_name_len.to_string()),
            ("max-line-len", self.max_line_len.to_string()),
            (
                "max-connection-buffers",
                self.max_connection_buffers.to_string(),
            ),
            ("max-pending-output", self.max_pending_output.to_string()),
            (
                "request-timeout",
                self.request_timeout.as_secs().to_string(),
            ),
            ("page-size", self.page_size.to_string()),
            ("busy-poll-us", self.busy_poll.as_micros().to_string()),
        ]
    }
}

/// How a durable server keeps its data.
#[derive(Debug, Clone)]
pub struct DurabilityConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// When the log is synced.
    pub fsync: FsyncPolicy,
    /// Cut a corrupt log at the first bad record instead of refusing to start.
    pub truncate_corrupt_log: bool,
    /// Compact once the log is larger than this many bytes and ...
    pub compact_min_bytes: u64,
    /// ... larger than this many times the live data.
    pub compact_ratio: u64,
}

impl DurabilityConfig {
    /// Defaults for `data_dir`: fsync every second (Redis's default), compaction once the
    /// log passes 64 MiB and twice the live data.
    #[must_use]
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            fsync: FsyncPolicy::EverySecond,
            truncate_corrupt_log: false,
            compact_min_bytes: 64 << 20,
            compact_ratio: 2,
        }
    }
}

/// When the log is synced to disk, with Redis's `appendfsync` meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// A write is acknowledged only once it is on disk. Writes that arrive while one sync runs
    /// share the next one (group commit).
    Always,
    /// The log is synced once a second: a power cut may lose about a second of writes, a
    /// process crash loses nothing (every acknowledged write has reached the kernel).
    EverySecond,
    /// The operating system syncs when it likes.
    No,
}

impl std::fmt::Display for FsyncPolicy {
    /// The policy as `--fsync` spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Always => "always",
            Self::EverySecond => "everysec",
            Self::No => "no",
        })
    }
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "always" => Ok(Self::Always),
            "everysec" => Ok(Self::EverySecond),
            "no" => Ok(Self::No),
            other => Err(format!("{other:?} is not always, everysec or no")),
        }
    }
}

/// How a node takes part in a cluster (`--peers` and the flags around it).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's id (`--node-id`), one of `peers`.
    pub node_id: u64,
    /// Where this node listens for the other nodes (`--cluster-bind`).
    pub bind: std::net::SocketAddr,
    /// Every initial member's cluster address, this node's included (`--peers`); empty when
    /// joining a running cluster.
    pub peers: std::collections::BTreeMap<u64, std::net::SocketAddr>,
    /// Members' cluster addresses to ask to admit this node (`--join`).
    pub join: Vec<std::net::SocketAddr>,
    /// How many shards the slots are cut into (`--shards`): each is one Raft group.
    pub shards: u16,
    /// Replicas per shard (`--replicas`; every node if fewer).
    pub replicas: usize,
    /// A leader's heartbeat interval.
    pub heartbeat: Duration,
    /// The range a follower's election timeout is drawn from: how long a shard goes without a
    /// leader after its leader dies, at least.
    pub election_timeout: (Duration, Duration),
    /// The fewest entries between two snapshots of a shard, after which its log is purged; a
    /// shard snapshots once its log has grown by twice as many entries as its last snapshot
    /// holds records, so its log stays within about three times its data.
    pub snapshot_every: u64,
    /// The bytes a node's shard logs may hold together, however few their entries,
    /// before the largest are compacted (or twice their last snapshots' size, if that is more).
    /// Entries batch changes and may be megabytes each, so a count of entries alone bounds
    /// nothing, and a node may hold many shards.
    pub log_memory: u64,
    /// Bytes per piece a snapshot is sent to a lagging replica in (each piece is one frame of
    /// the peer connection, which holds at most 1 GiB).
    pub snapshot_piece: usize,
}

impl ClusterConfig {
    /// Heartbeats and timeouts sized for three nodes and a load generator sharing two cores:
    /// a heartbeat every 200 ms costs an idle cluster little. openraft starts an election once
    /// a follower has heard nothing for its leader lease (the longest election timeout, 1.2 s)
    /// plus an election timeout (0.6 to 1.2 s): 1.8 to 2.4 s of silence, which rides out a busy
    /// moment without a spurious failover and keeps a failover under 3 s.
    #[must_use]
    pub fn new(
        node_id: u64,
        bind: std::net::SocketAddr,
        peers: std::collections::BTreeMap<u64, std::net::SocketAddr>,
    ) -> Self {
        Self {
            node_id,
            bind,
            peers,
            join: Vec::new(),
            shards: 3,
            replicas: 3,
            heartbeat: Duration::from_millis(200),
            election_timeout: (Duration::from_millis(600), Duration::from_millis(1200)),
            snapshot_every: 10_000,
            log_memory: 64 << 20,
            snapshot_piece: 16 << 20,
        }
    }
}
