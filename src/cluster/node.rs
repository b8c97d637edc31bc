//! A cluster node: the Raft groups of the shards placed on it, and the peer listener that
//! answers the other nodes' replicas of them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{InitializeError, RaftError};
use openraft::type_config::async_runtime::WatchReceiver as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::identity::{Handshake, IdentityError};
use super::network::{Peers, ShardNetwork};
use super::peer::{self, Groups, PeerClient, PeerHandler, PeerRequest, PeerResponse, ShardGroup};
use super::placement::{NodeId, preferred_leader, replicas_of};
use super::raft::{ShardLog, ShardStateMachine};
use crate::bucket::MemoryBudget;
use crate::config::{CoreConfig, FsyncPolicy};

/// How often a node syncs logs (under `everysec`), starts due snapshots and spreads leaders.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// How long a node on a new data directory waits for its peers to say whether they knew it.
const ASK_PEERS_WITHIN: Duration = Duration::from_secs(2);

/// How a node joins the cluster and what it holds.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (`--node-id`).
    pub id: NodeId,
    /// Every initial member's cluster address, this node's included (`--peers`).
    pub members: BTreeMap<NodeId, SocketAddr>,
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
    /// This node is not among the members.
    #[error("node {0} is not in --peers")]
    NotAMember(NodeId),
    /// The node's identity on disk could not be read or made.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A peer refuses this node: it knew another data directory under this id.
    #[error("refused by the cluster: {0}")]
    Refused(String),
}

/// A running node.
pub struct Node {
    id: NodeId,
    groups: Groups,
    /// Each local shard's replicas.
    replicas: HashMap<u16, Vec<NodeId>>,
    machines: HashMap<u16, ShardStateMachine>,
    /// Each local shard's log, and whether to sync them every second (`--fsync everysec`).
    logs: HashMap<u16, ShardLog>,
    sync_every_second: bool,
    peers: Peers,
    /// This node's identity and its peers', checked on every peer connection.
    handshake: Arc<Handshake>,
    shards: u16,
    /// The fewest entries between two snapshots of a shard.
    snapshot_every: u64,
    /// The memory the node's shards share.
    budget: Arc<MemoryBudget>,
    /// The snapshots peers are sending this node.
    inbox: peer::SnapshotInbox,
    shutdown: CancellationToken,
    /// Each local shard's leader changes seen since start (for metrics).
    leader_changes: HashMap<u16, Arc<std::sync::atomic::AtomicU64>>,
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

impl Node {
    /// Leader changes shard `shard` has gone through since start, as this node saw them.
    #[must_use]
    pub fn leader_changes(&self, shard: u16) -> u64 {
        self.leader_changes.get(&shard).map_or(0, |changes| {
            changes.load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// [`open`](Self::open)s the node and answers its peers' Raft traffic on `listener`.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn start(config: NodeConfig, listener: TcpListener) -> Result<Arc<Self>, NodeError> {
        let node = Arc::new(Self::open(config).await?);
        node.serve(listener, Arc::clone(&node));
        Ok(node)
    }

    /// Opens every shard placed on this node, starts its Raft group, and initialises the
    /// groups this node is the first replica of (a restart finds them initialised and skips
    /// that). Peers are answered once [`serve`](Self::serve) is called.
    ///
    /// # Errors
    /// If a log cannot be opened or openraft refuses to start.
    pub async fn open(config: NodeConfig) -> Result<Self, NodeError> {
        if !config.members.contains_key(&config.id) {
            return Err(NodeError::NotAMember(config.id));
        }
        let handshake = Arc::new(Handshake::open(
            &config.data_dir,
            config.id,
            config.members.keys().copied(),
        )?);
        let peers: Peers = Arc::new(
            config
                .members
                .iter()
                .filter(|(id, _)| **id != config.id)
                .map(|(&id, &address)| {
                    let client = PeerClient::new(id, address, Arc::clone(&handshake));
                    (id, Arc::new(client))
                })
                .collect(),
        );
        if handshake.is_fresh() {
            ask_peers_whether_they_knew_this_node(&peers).await?;
        }
        let raft_config = Arc::new(
            openraft::Config {
                cluster_name: "kv".into(),
                heartbeat_interval: millis(config.heartbeat),
                election_timeout_min: millis(config.election_timeout.0),
                election_timeout_max: millis(config.election_timeout.1),
                // Snapshots are started by `compact_log`, at a pace set by their cost.
                snapshot_policy: openraft::SnapshotPolicy::Never,
                max_in_snapshot_log_to_keep: config.snapshot_every / 10,
                ..openraft::Config::default()
            }
            .validate()
            .map_err(|error| NodeError::Raft {
                shard: 0,
                message: error.to_string(),
            })?,
        );
        let member_ids: Vec<NodeId> = config.members.keys().copied().collect();
        // Memory is the node's: its shards' buckets draw on one budget.
        let budget = Arc::new(MemoryBudget::new(config.core.max_memory));
        let mut groups = HashMap::new();
        let mut machines = HashMap::new();
        let mut logs = HashMap::new();
        let mut replica_sets = HashMap::new();
        let mut leader_changes = HashMap::new();
        for shard in 0..config.shards {
            let replicas = replicas_of(shard, &member_ids, config.replicas);
            if !replicas.contains(&config.id) {
                continue;
            }
            let directory = config.data_dir.join("shards").join(shard.to_string());
            let log = ShardLog::open(&directory, config.fsync)
                .map_err(|source| NodeError::Log { shard, source })?;
            let machine = ShardStateMachine::open(
                &directory,
                config.core.clone(),
                Arc::clone(&budget),
                log.clone(),
            )
            .await
            .map_err(|source| NodeError::Log { shard, source })?;
            machines.insert(shard, machine.clone());
            logs.insert(shard, log.clone());
            let network = ShardNetwork::new(shard, Arc::clone(&peers), config.snapshot_piece);
            let group = ShardGroup::new(config.id, Arc::clone(&raft_config), network, log, machine)
                .await
                .map_err(|error| NodeError::Raft {
                    shard,
                    message: error.to_string(),
                })?;
            if replicas.first() == Some(&config.id) {
                let members: BTreeMap<NodeId, BasicNode> = replicas
                    .iter()
                    .map(|id| (*id, BasicNode::new(config.members[id].to_string())))
                    .collect();
                match group.initialize(members).await {
                    Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                    Err(error) => {
                        return Err(NodeError::Raft {
                            shard,
                            message: error.to_string(),
                        });
                    }
                }
            }
            leader_changes.insert(shard, count_leader_changes(&group));
            groups.insert(shard, group);
            replica_sets.insert(shard, replicas);
        }
        Ok(Self {
            id: config.id,
            groups: Arc::new(groups),
            replicas: replica_sets,
            machines,
            logs,
            sync_every_second: config.fsync == FsyncPolicy::EverySecond,
            peers,
            handshake,
            shards: config.shards,
            snapshot_every: config.snapshot_every,
            budget,
            // A snapshot holds about the data of a shard; a node's shards together hold no more
            // than its memory limit.
            inbox: peer::SnapshotInbox::new(
                u64::try_from(config.core.max_memory)
                    .unwrap_or(u64::MAX)
                    .saturating_mul(2)
                    .max(64 << 20),
            ),
            shutdown: CancellationToken::new(),
            leader_changes,
        })
    }

    /// Answers peers on `listener` with `handler`, and keeps leadership spread, until the
    /// node stops.
    pub fn serve<H: PeerHandler>(self: &Arc<Self>, listener: TcpListener, handler: Arc<H>) {
        tokio::spawn(peer::serve(
            listener,
            handler,
            Arc::clone(&self.handshake),
            self.shutdown.clone(),
        ));
        tokio::spawn(Arc::clone(self).maintain());
    }

    /// Once a second, until the node stops: syncs the shards' logs under `--fsync everysec`,
    /// starts the snapshots that are due, and hands leadership to preferred leaders.
    async fn maintain(self: Arc<Self>) {
        let mut tick = tokio::time::interval(MAINTAIN_EVERY);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for (&shard, group) in self.groups.iter() {
                if self.sync_every_second
                    && let Err(error) = self.logs[&shard].sync().await
                {
                    tracing::error!(%error, shard, "syncing a shard's log failed");
                }
                self.compact_log(shard, group).await;
                self.spread_leadership(shard, group).await;
            }
        }
    }

    /// Starts a snapshot of `shard` once its log has grown since the last one by twice as many
    /// entries as that snapshot holds records (and at least `snapshot_every`); its log is
    /// purged behind it. So a shard's log stays within about three times its data, and the
    /// cost of a snapshot, which copies every key, is spread over twice as many writes as it
    /// copies keys; a fixed number of entries would copy a large shard over and over.
    async fn compact_log(&self, shard: u16, group: &ShardGroup) {
        let metrics = group.metrics().borrow_watched().clone();
        let applied = metrics.last_applied.map_or(0, |log_id| log_id.index);
        let snapshot = metrics.snapshot.map_or(0, |log_id| log_id.index);
        let records = self.machines[&shard].snapshot_records().await;
        if applied.saturating_sub(snapshot) >= self.snapshot_every.max(records * 2)
            && let Err(error) = group.trigger().snapshot().await
        {
            tracing::warn!(%error, shard, "could not start a snapshot");
        }
    }

    /// If this node leads `shard` and its preferred leader (see [`preferred_leader`]) is
    /// another replica that has every entry, hands leadership to that one. Leaders spread
    /// evenly this way, and come back to even after a node returns.
    async fn spread_leadership(&self, shard: u16, group: &ShardGroup) {
        let metrics = group.metrics().borrow_watched().clone();
        if metrics.current_leader != Some(self.id) {
            return;
        }
        let Some(preferred) = preferred_leader(shard, &self.replicas[&shard]) else {
            return;
        };
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
        peer::handle_raft(&self.groups, &self.inbox, request).await
    }

    /// The memory this node's shards share: what their buckets hold, against the limit.
    #[must_use]
    pub fn memory(&self) -> &MemoryBudget {
        &self.budget
    }

    /// How many buckets this node's replicas hold, across its shards.
    #[must_use]
    pub fn buckets(&self) -> usize {
        self.machines
            .values()
            .map(|machine| machine.registry().view().len())
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
        self.shards
    }

    /// The Raft groups of the shards this node holds.
    #[must_use]
    pub fn groups(&self) -> &Groups {
        &self.groups
    }

    /// The connections to the other nodes.
    #[must_use]
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// The Raft group of `shard`, if this node holds a replica of it.
    #[must_use]
    pub fn group(&self, shard: u16) -> Option<&ShardGroup> {
        self.groups.get(&shard)
    }

    /// The state of `shard` as this node's replica has applied it.
    #[must_use]
    pub fn state(&self, shard: u16) -> Option<&ShardStateMachine> {
        self.machines.get(&shard)
    }

    /// Stops answering peers and shuts every group down.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        for group in self.groups.values() {
            if let Err(error) = group.shutdown().await {
                tracing::warn!(%error, "a Raft group did not shut down cleanly");
            }
        }
    }
}

/// On a new data directory: says hello to every peer that answers within
/// [`ASK_PEERS_WITHIN`]. One that knew this node under another data directory refuses it, and
/// the node stops with its reason instead of rejoining empty. Peers that do not answer (a
/// cluster starting for the first time) are not waited for; they check again when they
/// connect.
async fn ask_peers_whether_they_knew_this_node(peers: &Peers) -> Result<(), NodeError> {
    let answers =
        futures::future::join_all(peers.values().map(|client| {
            tokio::time::timeout(ASK_PEERS_WITHIN, client.call(PeerRequest::Describe))
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
    /// Raft traffic only: a node without a router forwards nothing.
    async fn handle(&self, request: PeerRequest) -> PeerResponse {
        self.handle_raft(request)
            .await
            .unwrap_or(PeerResponse::NoSuchShard)
    }
}
