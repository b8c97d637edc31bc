//! A cluster node: the Raft groups of the shards placed on it, and the peer listener that
//! answers the other nodes' replicas of them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{InitializeError, RaftError};
use openraft::type_config::alias::LogIdOf;
use openraft::type_config::async_runtime::WatchReceiver as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::identity::{Handshake, IdentityError};
use super::layout::{Layout, META_SHARD, Settings};
use super::membership::join;
use super::network::{PeerBook, Peers, ShardNetwork};
use super::peer::{self, PeerGate, PeerHandler, PeerRequest, PeerResponse, ShardGroup};
use super::placement::NodeId;
use super::raft::{LogMemory, ShardLog, ShardRaft, ShardStateMachine};
use crate::bucket::MemoryBudget;
use crate::config::{CoreConfig, FsyncPolicy};

/// How long a node waits for a peer to take one piece of a snapshot.
const SNAPSHOT_PIECE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a node syncs logs (under `everysec`), starts due snapshots and spreads leaders.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);
/// The least time between two passes that relieve the logs on appends past their alarm.
const RELIEVE_PAUSE: Duration = Duration::from_millis(50);

/// How many times slower the metadata group's heartbeats and elections are than a data
/// shard's: it changes only when members come and go, and a while without its leader stops
/// no client, so it is kept cheap (idle, each group's heartbeats are most of a node's CPU).
const META_PACE: u32 = 5;

/// How long a node on a new data directory waits for its peers to say whether they knew it.
const ASK_PEERS_WITHIN: Duration = Duration::from_secs(2);
/// How long a node forming a group waits for a peer to say whether it formed it already.
const ASK_FORMED_WITHIN: Duration = Duration::from_secs(1);

/// How a node joins the cluster and what it holds.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (`--node-id`).
    pub id: NodeId,
    /// Every initial member's cluster address, this node's included (`--peers`); empty for
    /// a node that joins a running cluster.
    pub members: BTreeMap<NodeId, SocketAddr>,
    /// Members to ask to admit this node (`--join`), when `members` is empty.
    pub join: Vec<SocketAddr>,
    /// This node's cluster address, as the members will reach it (`--cluster-bind`).
    pub address: SocketAddr,
    /// How many shards the slots are cut into (`--shards`).
    pub shards: u16,
    /// Replicas per shard (`--replicas`).
    pub replicas: usize,
    /// Where the shards' logs live: `DIR/shards/<shard>/`.
    pub data_dir: PathBuf,
    /// When the Raft logs are synced.
    pub fsync: FsyncPolicy,
    /// A leader's heartbeat interval.
    pub heartbeat: Duration,
    /// The range an election timeout is drawn from.
    pub election_timeout: (Duration, Duration),
    /// The limits of each shard's registry.
    pub core: CoreConfig,
    /// The fewest entries between two snapshots of a shard (after which its log is purged); a
    /// shard snapshots less often the more it holds (see `Node::compact_log`).
    pub snapshot_every: u64,
    /// The bytes the node's shard logs may hold together (their unpurged entries) before the
    /// largest are compacted, at least (see `Node::relieve_log_memory`).
    pub log_memory: u64,
    /// Bytes per piece a snapshot is sent in, each piece its own frame.
    pub snapshot_piece: usize,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A shard's log could not be opened.
    #[error("shard {shard}: {source}")]
    Log {
        /// The shard.
        shard: u16,
        /// Why.
        source: std::io::Error,
    },
    /// openraft refused the configuration or failed.
    #[error("shard {shard}: {message}")]
    Raft {
        /// The shard.
        shard: u16,
        /// What openraft said.
        message: String,
    },
    /// This node is not among the members, and joins none.
    #[error("node {0} is not in --peers, and no --join names a cluster to join")]
    NotAMember(NodeId),
    /// The file saying the node formed or joined a cluster could not be read or written.
    #[error("{path}: {source}")]
    Formed {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The node's identity on disk could not be read or made.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A peer refuses this node: it knew another data directory under this id, or the
    /// cluster would not admit it.
    #[error("refused by the cluster: {0}")]
    Refused(String),
    /// A start after one cut short while forming the cluster names other members than the
    /// cluster began forming with: its groups must form with the same members everywhere.
    #[error(
        "this node began forming a cluster of nodes {began:?} and stopped before it finished; \
         --peers now names nodes {named:?}: start it with the same members, or with an empty \
         data directory"
    )]
    FormingWithOtherMembers {
        /// The members formation began with.
        began: Vec<NodeId>,
        /// The members `--peers` names now.
        named: Vec<NodeId>,
    },
    /// No member named by `--join` answered.
    #[error("no member to join answered: {0}")]
    NoOneToJoin(String),
}

/// A running node.
pub struct Node {
    id: NodeId,
    /// The replicas this node holds, the metadata group's ([`META_SHARD`]) included: shards
    /// are added as placement brings them here and dropped once they have moved away.
    replicas: Replicas,
    /// What opening a replica needs.
    opener: ReplicaOpener,
    sync_every_second: bool,
    pub(super) peers: Peers,
    /// This node's identity and its peers', checked on every peer connection.
    pub(super) handshake: Arc<Handshake>,
    /// How the slots are cut and replicated: the cluster's, fixed when it formed.
    pub(super) settings: Settings,
    /// The members `--peers` named, that the first layout is made of (empty on a node that
    /// joined).
    pub(super) initial: BTreeMap<NodeId, SocketAddr>,
    /// The layout as the metadata group's replica here has applied it, read again each tick.
    pub(super) layout: parking_lot::RwLock<Arc<Layout>>,
    /// Serialises this node's changes to the layout (when it leads the metadata group).
    pub(super) layout_writes: tokio::sync::Mutex<()>,
    /// Whether the node has said it was drained and may be stopped.
    pub(super) told_drained: std::sync::atomic::AtomicBool,
    /// Whether this node's formation has finished (its `cluster` file no longer says
    /// forming). Until then it gives up no replica: a restart would form it again.
    pub(super) formation_finished: Arc<std::sync::atomic::AtomicBool>,
    /// The fewest entries between two snapshots of a shard.
    snapshot_every: u64,
    /// The memory the node's shards share.
    budget: Arc<MemoryBudget>,
    /// The snapshots peers are sending this node.
    inbox: peer::SnapshotInbox,
    /// How long a shard's followers wait without hearing from its leader before they elect
    /// another: a peer silent that long is taken for down.
    silence_before_election: Duration,
    pub(super) shutdown: CancellationToken,
}

/// A shard's replica on this node.
pub struct Replica {
    /// Its Raft group.
    pub group: ShardGroup,
    /// Its state, as applied here.
    pub machine: ShardStateMachine,
    log: ShardLog,
    /// Leader changes seen since it opened (for metrics).
    leader_changes: Arc<std::sync::atomic::AtomicU64>,
}

impl Replica {
    /// What its log's unpurged entries take, in bytes.
    #[must_use]
    pub fn log_bytes(&self) -> u64 {
        self.log.held_bytes()
    }
}

/// A replica's log and its last snapshot, as compaction weighs them.
struct LogSize {
    shard: u16,
    replica: Arc<Replica>,
    /// What the log's unpurged entries hold.
    held: u64,
    /// The records (buckets and keys) the last snapshot holds.
    records: u64,
    /// The last snapshot's size.
    snapshot_bytes: u64,
}

impl LogSize {
    /// What the log may hold whatever the node's budget: twice its snapshot (compacting below
    /// that would copy the data more often than the log takes writes).
    fn kept(&self) -> u64 {
        self.snapshot_bytes.saturating_mul(2)
    }
}

/// A log id's index; 0 for none.
fn log_index(log_id: Option<&LogIdOf<ShardRaft>>) -> u64 {
    log_id.map_or(0, |log_id| log_id.index)
}

/// The replicas a node holds, by shard.
pub type Replicas = parking_lot::RwLock<HashMap<u16, Arc<Replica>>>;

/// What opening a replica on this node takes.
struct ReplicaOpener {
    id: NodeId,
    data_dir: PathBuf,
    fsync: FsyncPolicy,
    core: CoreConfig,
    raft_config: Arc<openraft::Config>,
    /// The metadata group's: [`META_PACE`] times slower.
    meta_raft_config: Arc<openraft::Config>,
    snapshot_piece: usize,
    /// What the node's logs hold, together.
    log_memory: Arc<LogMemory>,
}

impl ReplicaOpener {
    /// Where `shard`'s replica keeps its log and snapshots.
    fn directory(&self, shard: u16) -> PathBuf {
        if shard == META_SHARD {
            self.data_dir.join("meta")
        } else {
            self.data_dir.join("shards").join(shard.to_string())
        }
    }

    /// Opens `shard`'s replica from its directory (a new one if there is none) and starts its
    /// Raft group.
    async fn open(
        &self,
        shard: u16,
        peers: &Peers,
        budget: &Arc<MemoryBudget>,
    ) -> Result<Replica, NodeError> {
        let directory = self.directory(shard);
        let log = ShardLog::open_counted(&directory, self.fsync, &self.log_memory)
            .map_err(|source| NodeError::Log { shard, source })?;
        let machine = ShardStateMachine::open(
            &directory,
            self.core.clone(),
            Arc::clone(budget),
            log.clone(),
        )
        .await
        .map_err(|source| NodeError::Log { shard, source })?;
        let network = ShardNetwork::new(shard, Arc::clone(peers), self.snapshot_piece);
        let group = ShardGroup::new(
            self.id,
            Arc::clone(if shard == META_SHARD {
                &self.meta_raft_config
            } else {
                &self.raft_config
            }),
            network,
            log.clone(),
            machine.clone(),
        )
        .await
        .map_err(|error| NodeError::Raft {
            shard,
            message: error.to_string(),
        })?;
        Ok(Replica {
            leader_changes: count_leader_changes(&group),
            group,
            machine,
            log,
        })
    }
}

/// Counts the leader changes `group` goes through: a task waits on the group's server metrics
/// (which change with its role and leader, not with every entry) until the group stops.
fn count_leader_changes(group: &ShardGroup) -> Arc<std::sync::atomic::AtomicU64> {
    let changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = Arc::clone(&changes);
    let mut server = group.server_metrics();
    tokio::spawn(async move {
        let mut leader = server.borrow_watched().current_leader;
        while server.changed().await.is_ok() {
            let now = server.borrow_watched().current_leader;
            if now.is_some() && now != leader {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            leader = now;
        }
    });
    changes
}

/// The file that says a data directory's node has formed or joined a cluster, and how that
/// cluster cuts and replicates its slots. A node with it takes the cluster's settings from it
/// rather than from its flags, and never initialises a Raft group again once its formation
/// has finished (a replica it gave up, re-created and initialised, would split its shard).
const FORMED_FILE: &str = "cluster";

/// What a data directory's [`FORMED_FILE`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Formed {
    settings: Settings,
    /// While this node has not finished forming its groups of the cluster's first start: the
    /// ids of the initial members they are formed with. A start cut short then forms them
    /// again, with the same members.
    forming: Option<Vec<NodeId>>,
}

fn read_formed(data_dir: &Path) -> Result<Option<Formed>, NodeError> {
    let path = data_dir.join(FORMED_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(NodeError::Formed { path, source }),
    };
    parse_formed(&text)
        .map(Some)
        .ok_or_else(|| NodeError::Formed {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a file kv wrote"),
        })
}

fn parse_formed(text: &str) -> Option<Formed> {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
            .map(str::trim)
    };
    let settings = Settings {
        shards: field("shards")?.parse().ok()?,
        replicas: field("replicas")?.parse().ok()?,
    };
    let forming = match field("forming") {
        None => None,
        Some(ids) => Some(
            ids.split(',')
                .map(|id| id.parse().ok())
                .collect::<Option<Vec<NodeId>>>()?,
        ),
    };
    Some(Formed { settings, forming })
}

fn write_formed(data_dir: &Path, formed: &Formed) -> Result<(), NodeError> {
    let path = data_dir.join(FORMED_FILE);
    let Formed { settings, forming } = formed;
    let mut text = format!(
        "shards={}\nreplicas={}\n",
        settings.shards, settings.replicas
    );
    if let Some(ids) = forming {
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        text.push_str(&format!("forming={}\n", ids.join(",")));
    }
    super::identity::write_durably(&path, &text).map_err(|error| match error {
        IdentityError::Io { path, source } => NodeError::Formed { path, source },
        other => NodeError::Identity(other),
    })
}

impl Node {
    /// Leader changes shard `shard` has gone through since its replica here opened.
    #[must_use]
    pub fn leader_changes(&self, shard: u16) -> u64 {
        self.replica(shard).map_or(0, |replica| {
            replica
                .leader_changes
                .load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// [`open`](Self::open)s the node, answers its peers' Raft traffic on `listener`, and
    /// starts its [maintenance](Self::start_maintenance).
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn start(config: NodeConfig, listener: TcpListener) -> Result<Arc<Self>, NodeError> {
        let gate = PeerGate::new();
        let node = Arc::new(Self::open(config, listener, Arc::clone(&gate)).await?);
        gate.open(Arc::clone(&node));
        node.start_maintenance();
        Ok(node)
    }

    /// Opens the node's replicas and starts their Raft groups.
    ///
    /// - A node forming a cluster (`--peers`, first start) opens the shards the initial
    ///   layout places on it and the metadata group, and, in the background, initialises
    ///   those it is the preferred leader of, and the others if still pristine a while later,
    ///   each unless another replica has formed it (see `form`). A start cut short before
    ///   formation finished here forms again, with the members it began with (see
    ///   [`Formed`]; a group initialised already refuses, and formation goes on).
    /// - A node joining (`--join`, first start) asks the cluster to admit it and opens only
    ///   the metadata group; its shards come as the layout places them on it.
    /// - A node that has formed or joined before reopens the replicas in its data directory.
    ///
    /// Peers are greeted on `listener` from the start (see [`PeerGate`]); their requests are
    /// answered once the caller opens `gate`.
    ///
    /// # Errors
    /// If a log cannot be opened, openraft refuses to start, or the cluster refuses the node.
    pub async fn open<H: PeerHandler>(
        config: NodeConfig,
        listener: TcpListener,
        gate: Arc<PeerGate<H>>,
    ) -> Result<Self, NodeError> {
        let joining = config.members.is_empty();
        if joining && config.join.is_empty() {
            return Err(NodeError::NotAMember(config.id));
        }
        if !joining && !config.members.contains_key(&config.id) {
            return Err(NodeError::NotAMember(config.id));
        }
        let handshake = Arc::new(Handshake::open(
            &config.data_dir,
            config.id,
            config.members.keys().copied(),
        )?);
        let shutdown = CancellationToken::new();
        // A node that does not open stops greeting its peers.
        let stop_greeting = shutdown.clone().drop_guard();
        tokio::spawn(peer::serve(
            listener,
            gate,
            Arc::clone(&handshake),
            shutdown.clone(),
        ));
        let peers: Peers = Arc::new(PeerBook::new(config.id, Arc::clone(&handshake)));
        peers.set(config.members.iter().map(|(&id, &address)| (id, address)));
        let formed = read_formed(&config.data_dir)?;
        let flags = Settings {
            shards: config.shards,
            replicas: config.replicas,
        };
        let settings = match &formed {
            Some(Formed { settings, .. }) => {
                if *settings != flags && !joining {
                    tracing::warn!(
                        shards = settings.shards,
                        replicas = settings.replicas,
                        "the cluster formed with other --shards or --replicas; keeping the cluster's"
                    );
                }
                *settings
            }
            None if joining => {
                let admitted = join(&config, &handshake).await?;
                peers.set(admitted.members.iter().copied());
                handshake.set_members(admitted.members.iter().map(|(id, _)| *id));
                admitted.settings
            }
            None => {
                if handshake.is_fresh() {
                    ask_peers_whether_they_knew_this_node(&peers).await?;
                }
                flags
            }
        };
        // Whether this start forms the groups of the cluster's first start: a node's first
        // start with `--peers`, and any start after one cut short before it finished.
        let forming = match &formed {
            None => !joining,
            Some(Formed {
                forming: Some(began),
                ..
            }) => {
                let named: Vec<NodeId> = config.members.keys().copied().collect();
                if *began != named {
                    return Err(NodeError::FormingWithOtherMembers {
                        began: began.clone(),
                        named,
                    });
                }
                true
            }
            Some(_) => false,
        };
        if formed.is_none() {
            // Before any replica exists, so that a start cut short from here on forms again
            // with these members.
            write_formed(
                &config.data_dir,
                &Formed {
                    settings,
                    forming: forming.then(|| config.members.keys().copied().collect()),
                },
            )?;
        }
        let raft_config = |pace: u32| {
            openraft::Config {
                cluster_name: "kv".into(),
                heartbeat_interval: millis(config.heartbeat * pace),
                election_timeout_min: millis(config.election_timeout.0 * pace),
                election_timeout_max: millis(config.election_timeout.1 * pace),
                // Snapshots are started by `compact_log`, at a pace set by their cost.
                snapshot_policy: openraft::SnapshotPolicy::Never,
                max_in_snapshot_log_to_keep: config.snapshot_every / 10,
                // How long a snapshot's piece may take to be answered (three quarters of it;
                // the last piece, which installs the snapshot, gets more: see
                // `ShardPeer::full_snapshot`). openraft's 200 ms asks 100 MB/s of the network
                // for a piece of 16 MiB, and a snapshot whose every sending timed out would be
                // sent again and again, its replica never catching up.
                install_snapshot_timeout: SNAPSHOT_PIECE_TIMEOUT.as_millis() as u64,
                ..openraft::Config::default()
            }
            .validate()
            .map(Arc::new)
            .map_err(|error| NodeError::Raft {
                shard: 0,
                message: error.to_string(),
            })
        };
        let opener = ReplicaOpener {
            id: config.id,
            data_dir: config.data_dir.clone(),
            fsync: config.fsync,
            core: config.core.clone(),
            raft_config: raft_config(1)?,
            meta_raft_config: raft_config(META_PACE)?,
            snapshot_piece: config.snapshot_piece,
            log_memory: LogMemory::new(config.log_memory),
        };
        // Memory is the node's: its shards' buckets draw on one budget.
        let budget = Arc::new(MemoryBudget::new(config.core.max_memory));
        let initial_layout = Layout::initial(settings, &config.members);
        let placed_initially =
            |shard: u16| shard == META_SHARD || initial_layout.replicas(shard).contains(&config.id);
        let mut replicas = HashMap::new();
        let mut shards = match formed {
            Some(_) => shards_on_disk(&config.data_dir, settings.shards),
            None => Vec::new(),
        };
        if forming {
            shards.extend((0..settings.shards).filter(|&shard| placed_initially(shard)));
            shards.sort_unstable();
            shards.dedup();
        }
        // Each shard is initialized by its preferred leader, which stands for election at
        // once and so leads from the start: no hand-over of every shard a second after
        // formation, during which writes in flight could be answered TRYAGAIN. Its other
        // replicas initialize it too, with the same members, if it is still pristine a while
        // later. Either only if no other replica has formed it meanwhile (see `form`).
        let initializers = initial_layout.preferred_leaders();
        let mut preferred = Vec::new();
        let mut others = Vec::new();
        for shard in std::iter::once(META_SHARD).chain(shards) {
            let replica = Arc::new(opener.open(shard, &peers, &budget).await?);
            if forming && placed_initially(shard) {
                let members: BTreeMap<NodeId, BasicNode> = initial_layout
                    .replicas(shard)
                    .iter()
                    .map(|id| (*id, BasicNode::new(config.members[id].to_string())))
                    .collect();
                let unformed = Unformed {
                    shard,
                    replica: Arc::clone(&replica),
                    members,
                };
                if initializers.get(&shard) == Some(&config.id) {
                    preferred.push(unformed);
                } else {
                    others.push(unformed);
                }
            }
            replicas.insert(shard, replica);
        }
        let formation_finished = Arc::new(std::sync::atomic::AtomicBool::new(!forming));
        if forming {
            tokio::spawn(form(
                Forming {
                    id: config.id,
                    peers: Arc::clone(&peers),
                    shutdown: shutdown.clone(),
                    data_dir: config.data_dir.clone(),
                    settings,
                    finished: Arc::clone(&formation_finished),
                },
                preferred,
                others,
                config.election_timeout.1 * 2,
            ));
        }
        let node = Self {
            id: config.id,
            replicas: parking_lot::RwLock::new(replicas),
            opener,
            sync_every_second: config.fsync == FsyncPolicy::EverySecond,
            peers,
            handshake,
            settings,
            initial: config.members,
            layout: parking_lot::RwLock::default(),
            layout_writes: tokio::sync::Mutex::new(()),
            told_drained: std::sync::atomic::AtomicBool::new(false),
            formation_finished,
            snapshot_every: config.snapshot_every,
            budget,
            // A snapshot holds about the data of a shard; a node's shards together hold no more
            // than its memory limit.
            inbox: peer::SnapshotInbox::new(
                u64::try_from(config.core.max_memory)
                    .unwrap_or(u64::MAX)
                    .saturating_mul(2)
                    .max(64 << 20),
                Some(config.data_dir.clone()),
            ),
            // openraft elects once a follower has heard nothing for its leader lease (the
            // longest election timeout) and then an election timeout.
            silence_before_election: config.election_timeout.1 * 2,
            shutdown,
        };
        stop_greeting.disarm();
        node.refresh_layout();
        Ok(node)
    }

    /// Keeps the node's replicas in step with the layout, and its logs' memory within its
    /// bound, until the node stops.
    pub fn start_maintenance(self: &Arc<Self>) {
        tokio::spawn(Arc::clone(self).maintain());
        tokio::spawn(Arc::clone(self).relieve_log_memory_when_exceeded());
    }

    /// Once a second, until the node stops: reads the layout again and brings the replicas
    /// in line with it (see `membership.rs`), syncs the shards' logs under `--fsync
    /// everysec`, starts the snapshots that are due, and hands leadership to preferred
    /// leaders.
    async fn maintain(self: Arc<Self>) {
        let mut tick = tokio::time::interval(MAINTAIN_EVERY);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.refresh_layout();
            self.follow_layout().await;
            let preferred = self.layout().preferred_leaders();
            let logs = self.log_sizes().await;
            for log in &logs {
                let (shard, replica) = (log.shard, &log.replica);
                if self.sync_every_second
                    && let Err(error) = replica.log.sync().await
                {
                    tracing::error!(%error, shard, "syncing a shard's log failed");
                }
                self.compact_log(log).await;
                if let Some(&preferred) = preferred.get(&shard) {
                    self.spread_leadership(shard, &replica.group, preferred)
                        .await;
                }
            }
            self.relieve_log_memory(logs).await;
        }
    }

    /// What each replica's log holds and its last snapshot's size, as compaction weighs them.
    async fn log_sizes(&self) -> Vec<LogSize> {
        let mut logs = Vec::new();
        for (shard, replica) in self.replica_list() {
            let (records, snapshot_bytes) = replica.machine.snapshot_size().await;
            logs.push(LogSize {
                shard,
                held: replica.log.held_bytes(),
                records,
                snapshot_bytes,
                replica,
            });
        }
        logs
    }

    /// Relieves the logs whenever an append takes what they hold past its alarm, until the node
    /// stops; at most once per [`RELIEVE_PAUSE`], so that appends while a snapshot is being
    /// made do not run the pass over and over.
    async fn relieve_log_memory_when_exceeded(self: Arc<Self>) {
        let memory = Arc::clone(&self.opener.log_memory);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = memory.exceeded() => {}
            }
            self.relieve_log_memory(self.log_sizes().await).await;
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(RELIEVE_PAUSE) => {}
            }
        }
    }

    /// Keeps what the shard logs hold within the node's `log_memory`, or within twice
    /// their snapshots if that is more (a log compacted below twice its snapshot would copy
    /// its data more often than it takes writes). Past it, the logs holding most beyond twice
    /// their snapshot are compacted, largest first, until what is left fits: each is purged up
    /// to its snapshot, whatever openraft keeps behind snapshots for replicas a little behind,
    /// or, with nothing left to purge, a snapshot is started (and the log is purged once it is
    /// made). Entries batch changes, up to megabytes each, so counting entries
    /// (`compact_log`) bounds nothing on its own, and a bound per shard would not bound a node
    /// of many shards.
    async fn relieve_log_memory(&self, mut logs: Vec<LogSize>) {
        let memory = &self.opener.log_memory;
        let allowed = memory.budget().max(logs.iter().map(LogSize::kept).sum());
        memory.set_alarm(allowed);
        let mut held = memory.held();
        logs.sort_by_key(|log| std::cmp::Reverse(log.held.saturating_sub(log.kept())));
        for log in logs {
            if held <= allowed || log.held <= log.kept() {
                break;
            }
            held = held.saturating_sub(log.held - log.kept());
            let metrics = log.replica.group.metrics().borrow_watched().clone();
            let snapshot = log_index(metrics.snapshot.as_ref());
            let trigger = log.replica.group.trigger();
            let triggered = if log_index(metrics.purged.as_ref()) < snapshot {
                trigger.purge_log(snapshot).await
            } else {
                trigger.snapshot().await
            };
            if let Err(error) = triggered {
                tracing::warn!(%error, shard = log.shard, "could not compact the log");
            }
        }
    }

    /// Starts a snapshot of `shard` once its log has grown since the last one by twice as many
    /// entries as that snapshot holds records (and at least `snapshot_every`); its log is
    /// purged behind it. So a shard's log stays within about three times its data, and the
    /// cost of a snapshot, which copies every key, is spread over twice as many writes as it
    /// copies keys; a fixed number of entries would copy a large shard over and over. What
    /// the logs hold in bytes is bounded by `relieve_log_memory`.
    async fn compact_log(&self, log: &LogSize) {
        let group = &log.replica.group;
        let metrics = group.metrics().borrow_watched().clone();
        let grown = log_index(metrics.last_applied.as_ref())
            .saturating_sub(log_index(metrics.snapshot.as_ref()));
        if grown >= self.snapshot_every.max(log.records * 2)
            && let Err(error) = group.trigger().snapshot().await
        {
            tracing::warn!(%error, shard = log.shard, "could not compact the log");
        }
    }

    /// If this node leads `shard` and its `preferred` leader (see
    /// [`Layout::preferred_leaders`]) is another voter that has every entry, hands leadership
    /// to that one. Leaders spread evenly this way, and come back to even after a node returns.
    async fn spread_leadership(&self, shard: u16, group: &ShardGroup, preferred: NodeId) {
        let metrics = group.metrics().borrow_watched().clone();
        if metrics.current_leader != Some(self.id)
            || !metrics
                .membership_config
                .membership()
                .voter_ids()
                .any(|voter| voter == preferred)
        {
            return;
        }
        let caught_up = metrics.replication.as_ref().is_some_and(|replication| {
            replication
                .get(&preferred)
                .is_some_and(|matched| *matched == metrics.last_applied)
        });
        if preferred != self.id && caught_up {
            tracing::info!(
                shard,
                to = preferred,
                "handing leadership to the shard's preferred leader"
            );
            if let Err(error) = group.trigger().transfer_leader(preferred).await {
                tracing::warn!(%error, shard, "could not hand leadership over");
            }
        }
    }

    /// Answers a peer's Raft RPC; `None` for a request that is not one.
    pub async fn handle_raft(&self, request: PeerRequest) -> Option<PeerResponse> {
        peer::handle_raft(|shard| self.group(shard), &self.inbox, request).await
    }

    /// What this node's shard logs hold in memory together, against their budget.
    #[must_use]
    pub fn log_memory(&self) -> &LogMemory {
        &self.opener.log_memory
    }

    /// The memory this node's shards share: what their buckets hold, against the limit.
    #[must_use]
    pub fn memory(&self) -> &MemoryBudget {
        &self.budget
    }

    /// How many buckets this node's replicas hold, across its shards.
    #[must_use]
    pub fn buckets(&self) -> usize {
        self.replicas
            .read()
            .iter()
            .filter(|(shard, _)| **shard != META_SHARD)
            .map(|(_, replica)| replica.machine.registry().view().len())
            .sum()
    }

    /// This node's id.
    #[must_use]
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// How many shards the slots are cut into.
    #[must_use]
    pub fn shards(&self) -> u16 {
        self.settings.shards
    }

    /// The replicas this node holds, the metadata group's included, by shard.
    #[must_use]
    pub fn replica_list(&self) -> Vec<(u16, Arc<Replica>)> {
        let mut list: Vec<_> = self
            .replicas
            .read()
            .iter()
            .map(|(&shard, replica)| (shard, Arc::clone(replica)))
            .collect();
        list.sort_unstable_by_key(|(shard, _)| *shard);
        list
    }

    /// This node's replica of `shard`, if it holds one.
    #[must_use]
    pub fn replica(&self, shard: u16) -> Option<Arc<Replica>> {
        self.replicas.read().get(&shard).cloned()
    }

    pub(super) fn add_replica(&self, shard: u16, replica: Replica) {
        self.replicas.write().insert(shard, Arc::new(replica));
    }

    pub(super) fn take_replica(&self, shard: u16) -> Option<Arc<Replica>> {
        self.replicas.write().remove(&shard)
    }

    pub(super) async fn open_replica(&self, shard: u16) -> Result<Replica, NodeError> {
        self.opener.open(shard, &self.peers, &self.budget).await
    }

    pub(super) fn replica_directory(&self, shard: u16) -> PathBuf {
        self.opener.directory(shard)
    }

    /// The connections to the other nodes.
    #[must_use]
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Whether node `id` looks down from here: it has left a request of this node's
    /// unanswered for as long as a shard's followers wait before electing another leader.
    /// This node's view only (Redis's `fail?`); a node this node does not talk to is not
    /// judged.
    #[must_use]
    pub fn seems_down(&self, id: NodeId) -> bool {
        id != self.id
            && self.peers.get(id).is_some_and(|peer| {
                peer.unanswered_for()
                    .is_some_and(|silent| silent >= self.silence_before_election)
            })
    }

    /// The Raft group of `shard`, if this node holds a replica of it.
    #[must_use]
    pub fn group(&self, shard: u16) -> Option<ShardGroup> {
        self.replicas
            .read()
            .get(&shard)
            .map(|replica| replica.group.clone())
    }

    /// The state of `shard` as this node's replica has applied it.
    #[must_use]
    pub fn state(&self, shard: u16) -> Option<ShardStateMachine> {
        self.replicas
            .read()
            .get(&shard)
            .map(|replica| replica.machine.clone())
    }

    /// The cluster's layout as this node last read it.
    #[must_use]
    pub fn layout(&self) -> Arc<Layout> {
        Arc::clone(&self.layout.read())
    }

    /// The members that hold replicas or may (active and draining), by id.
    #[must_use]
    pub fn member_ids(&self) -> Vec<NodeId> {
        self.layout().present().map(|(id, _)| id).collect()
    }

    /// The nodes `shard` is placed on, by the layout.
    #[must_use]
    pub fn placement_of(&self, shard: u16) -> Vec<NodeId> {
        self.layout().replicas(shard)
    }

    /// Stops answering peers and shuts every group down.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        for (_, replica) in self.replica_list() {
            if let Err(error) = replica.group.shutdown().await {
                tracing::warn!(%error, "a Raft group did not shut down cleanly");
            }
        }
    }
}

/// The data shards below `shards` whose directories are in `data_dir`.
fn shards_on_disk(data_dir: &Path, shards: u16) -> Vec<u16> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("shards")) else {
        return Vec::new();
    };
    let mut found: Vec<u16> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&shard| shard < shards)
        .collect();
    found.sort_unstable();
    found
}

/// One of this node's replicas of a group of the initial layout, on the cluster's first start.
struct Unformed {
    shard: u16,
    replica: Arc<Replica>,
    /// The group's initial members.
    members: BTreeMap<NodeId, BasicNode>,
}

/// What forming the groups needs of the node.
struct Forming {
    id: NodeId,
    peers: Peers,
    shutdown: CancellationToken,
    /// Where to record that formation finished, and the settings the record keeps.
    data_dir: PathBuf,
    settings: Settings,
    /// Set once that is recorded.
    finished: Arc<std::sync::atomic::AtomicBool>,
}

/// Forms the groups of a cluster's first start, once the node answers its peers:
/// - `preferred`, the groups this node is the preferred leader of, at once;
/// - `others`, this node's replicas of groups another node was to form, if still pristine
///   `after` (no entry and no vote: that node has not formed them, or it would have
///   replicated its first entry here, or asked for this replica's vote, within an election or
///   two). A cluster then forms with any majority of its initial nodes started, as a Raft
///   cluster does.
///
/// A group another replica has formed is left alone: its replica here hears from the group's
/// leader instead (which then hands leadership to its preferred leader), rather than standing
/// for an election the others refuse, which cost the group a second election when a node
/// started after its group formed without it. openraft allows a group to be initialized by
/// several of its members with the same members, so a replica that initializes while another
/// does, or that misses a peer's answer, costs an election at worst: its election picks one
/// leader, and the others' first entries are replaced by the leader's. A group formed or voted
/// on here meanwhile refuses (`NotAllowed`), and so does a replica given up since (its group
/// has stopped).
async fn form(forming: Forming, preferred: Vec<Unformed>, others: Vec<Unformed>, after: Duration) {
    let forming = &forming;
    let form_all = |groups: Vec<Unformed>, preferred: bool| {
        futures::future::join_all(
            groups
                .into_iter()
                .map(move |group| form_unless_formed(forming, group, preferred)),
        )
    };
    let formation = async {
        form_all(preferred, true).await;
        tokio::time::sleep(after).await;
        form_all(others, false).await;
    };
    tokio::select! {
        () = forming.shutdown.cancelled() => return,
        () = formation => {}
    }
    let finished = Formed {
        settings: forming.settings,
        forming: None,
    };
    let data_dir = forming.data_dir.clone();
    match tokio::task::spawn_blocking(move || write_formed(&data_dir, &finished)).await {
        Ok(Ok(())) => {
            forming
                .finished
                .store(true, std::sync::atomic::Ordering::Release);
            tracing::debug!("formation finished");
        }
        Ok(Err(error)) => tracing::error!(
            %error,
            "could not record that formation finished: a restart forms the groups still \
             pristine here again"
        ),
        Err(error) => tracing::error!(%error, "could not record that formation finished"),
    }
}

/// Initializes `group` here unless another of its replicas has formed it; `preferred` if
/// this node is its preferred leader.
async fn form_unless_formed(forming: &Forming, group: Unformed, preferred: bool) {
    let Unformed {
        shard,
        replica,
        members,
    } = group;
    // Formed here already (this replica has heard from the group, or the group stopped):
    // nothing to ask.
    if replica.group.is_initialized().await.unwrap_or(true) {
        return;
    }
    if formed_elsewhere(forming, shard, &members).await {
        tracing::info!(
            shard,
            "another replica formed the group: following its leader"
        );
        return;
    }
    match replica.group.initialize(members).await {
        Ok(()) if preferred => tracing::debug!(shard, "formed the group"),
        Ok(()) => tracing::warn!(
            shard,
            "formed a group its preferred leader has not: that node has not started yet"
        ),
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
        Err(error) => tracing::error!(shard, %error, "could not form a group"),
    }
}

/// Whether another of `members` holds an entry or a vote of `shard`'s group. A peer that does
/// not answer within [`ASK_FORMED_WITHIN`] (not started, or paused) counts as not.
async fn formed_elsewhere(
    forming: &Forming,
    shard: u16,
    members: &BTreeMap<NodeId, BasicNode>,
) -> bool {
    let asks = members
        .keys()
        .filter(|&&id| id != forming.id)
        .filter_map(|&id| forming.peers.get(id))
        .map(|client| async move {
            matches!(
                tokio::time::timeout(ASK_FORMED_WITHIN, client.call(PeerRequest::Formed(shard)))
                    .await,
                Ok(Ok(PeerResponse::Formed(true)))
            )
        });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .any(|formed| formed)
}

/// On a new data directory: says hello to every peer, waiting up to [`ASK_PEERS_WITHIN`]
/// for each. One that knew this node under another data directory refuses it, and the node
/// stops with its reason instead of rejoining empty. A peer greets from the moment it starts
/// ([`PeerGate`]), so nodes forming a cluster together hear each other at once; one not
/// started yet is not waited for, and checks when it connects.
async fn ask_peers_whether_they_knew_this_node(peers: &Peers) -> Result<(), NodeError> {
    let answers = futures::future::join_all(peers.clients().into_iter().map(|client| async move {
        tokio::time::timeout(ASK_PEERS_WITHIN, client.connect()).await
    }))
    .await;
    for answer in answers {
        if let Ok(Err(peer::PeerError::Refused { reason, .. })) = answer {
            return Err(NodeError::Refused(reason));
        }
    }
    Ok(())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl PeerHandler for Node {
    /// Raft traffic and membership: a node without a router forwards nothing.
    async fn handle(&self, request: PeerRequest) -> PeerResponse {
        match self.handle_membership(request).await {
            Ok(response) => response,
            Err(request) => self
                .handle_raft(request)
                .await
                .unwrap_or(PeerResponse::NoSuchShard),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_file_reads_back_what_was_written() {
        let directory = tempfile::tempdir().unwrap();
        let settings = Settings {
            shards: 3,
            replicas: 3,
        };
        for forming in [Some(vec![1, 2, 3]), None] {
            let formed = Formed { settings, forming };
            write_formed(directory.path(), &formed).unwrap();
            assert_eq!(read_formed(directory.path()).unwrap(), Some(formed));
        }
    }

    #[test]
    fn a_cluster_file_without_forming_is_formed_and_one_kv_did_not_write_is_refused() {
        let settings = Settings {
            shards: 3,
            replicas: 2,
        };
        // As nodes wrote it before formation was recorded.
        assert_eq!(
            parse_formed("shards=3\nreplicas=2\n"),
            Some(Formed {
                settings,
                forming: None
            })
        );
        assert_eq!(parse_formed("shards=3\n"), None);
        assert_eq!(parse_formed("shards=3\nreplicas=2\nforming=1,x\n"), None);
    }
}
