//! What a node tells of the cluster: `CLUSTER INFO|MYID|SLOTS|NODES`, and `INFO`'s cluster
//! section.

use std::fmt::Write as _;
use std::net::SocketAddr;

use bytes::BytesMut;
use openraft::Instant as _;
use openraft::type_config::async_runtime::WatchReceiver as _;

use super::Router;
use crate::cluster::peer::{MemberChange, PeerRequest, PeerResponse};
use crate::cluster::placement::NodeId;
use crate::cluster::slot::{self, slots_of};
use crate::protocol::{
    ClusterQuery, Dialect, ErrorReply, Reply, ReplyValue, SlotRange, encode, encode_value,
};

impl Router {
    /// Answers `CLUSTER INFO|MYID|SLOTS|NODES|SHARDS` from this node's view of the shards.
    pub async fn query(&self, query: ClusterQuery, dialect: Dialect, out: &mut BytesMut) {
        match query {
            ClusterQuery::AddNode(added) => {
                let asked = added
                    .map(|(node, address)| (node, MemberChange::Add(address)))
                    .ok_or("Invalid node id or address: CLUSTER ADDNODE <id> <host:port>");
                self.change_member(asked, dialect, out).await;
            }
            ClusterQuery::RemoveNode(node) => {
                let asked = node
                    .map(|node| (node, MemberChange::Remove))
                    .ok_or(INVALID_ID);
                self.change_member(asked, dialect, out).await;
            }
            ClusterQuery::Forget(node) => {
                let asked = node
                    .map(|node| (node, MemberChange::Forget))
                    .ok_or(INVALID_ID);
                self.change_member(asked, dialect, out).await;
            }
            ClusterQuery::MyId => {
                encode_value(Some(node_name(self.node.id()).as_bytes()), dialect, out);
            }
            ClusterQuery::Info => {
                let shards = self.shards().await;
                let led = shards.iter().filter(|shard| shard.leader.is_some()).count();
                let slots_ok: usize = shards
                    .iter()
                    .filter(|shard| shard.leader.is_some())
                    .map(|shard| shard.slots.len())
                    .sum();
                let term = shards.iter().map(|shard| shard.term).max().unwrap_or(0);
                let state = if led == shards.len() { "ok" } else { "fail" };
                let text = format!(
                    "cluster_state:{state}\r\ncluster_slots_assigned:{}\r\n\
                     cluster_slots_ok:{slots_ok}\r\ncluster_slots_pfail:0\r\n\
                     cluster_slots_fail:{}\r\ncluster_known_nodes:{}\r\ncluster_size:{}\r\n\
                     cluster_current_epoch:{term}\r\ncluster_my_epoch:{term}\r\n",
                    slot::SLOTS,
                    usize::from(slot::SLOTS) - slots_ok,
                    self.node.member_ids().len(),
                    shards.len(),
                );
                encode(&Reply::Text(&text), dialect, out);
            }
            ClusterQuery::Slots => {
                let mut ranges = Vec::new();
                for shard in self.shards().await {
                    let mut nodes = Vec::new();
                    let ordered = shard.leader.into_iter().chain(
                        shard
                            .replicas
                            .iter()
                            .copied()
                            .filter(|&id| Some(id) != shard.leader),
                    );
                    for id in ordered {
                        if let Some(address) = self.client_address_of(id).await {
                            nodes.push((address.ip().to_string(), address.port(), node_name(id)));
                        }
                    }
                    ranges.push(SlotRange {
                        first: *shard.slots.start(),
                        last: *shard.slots.end(),
                        nodes,
                    });
                }
                encode(&Reply::Slots(&ranges), dialect, out);
            }
            ClusterQuery::Shards => {
                let mut described = Vec::new();
                for shard in self.shards().await {
                    let mut nodes = Vec::new();
                    for &id in &shard.replicas {
                        let Some(address) = self.client_address_of(id).await else {
                            continue;
                        };
                        let role = if shard.leader == Some(id) {
                            "master"
                        } else {
                            "replica"
                        };
                        let health = if self.node.seems_down(id) {
                            "failed"
                        } else {
                            "online"
                        };
                        nodes.push(map(vec![
                            ("id", bulk(node_name(id))),
                            ("port", ReplyValue::Integer(i64::from(address.port()))),
                            ("ip", bulk(address.ip().to_string())),
                            ("endpoint", bulk(address.ip().to_string())),
                            ("role", bulk(role.to_owned())),
                            ("replication-offset", ReplyValue::Integer(0)),
                            ("health", bulk(health.to_owned())),
                        ]));
                    }
                    described.push(map(vec![
                        (
                            "slots",
                            ReplyValue::Array(Some(vec![
                                ReplyValue::Integer(i64::from(*shard.slots.start())),
                                ReplyValue::Integer(i64::from(*shard.slots.end())),
                            ])),
                        ),
                        ("nodes", ReplyValue::Array(Some(nodes))),
                    ]));
                }
                encode(
                    &Reply::Tree(&ReplyValue::Array(Some(described))),
                    dialect,
                    out,
                );
            }
            ClusterQuery::Nodes => {
                let shards = self.shards().await;
                let mut text = String::new();
                for id in self.node.member_ids() {
                    let address = self.client_address_of(id).await;
                    let address =
                        address.map_or_else(|| ":0".to_owned(), |address| address.to_string());
                    let (flags, link) = if id == self.node.id() {
                        ("myself,master", "connected")
                    } else if self.node.seems_down(id) {
                        ("master,fail?", "disconnected")
                    } else {
                        ("master", "connected")
                    };
                    let term = shards.iter().map(|shard| shard.term).max().unwrap_or(0);
                    let _ = write!(
                        text,
                        "{} {address}@0 {flags} - 0 0 {term} {link}",
                        node_name(id)
                    );
                    for shard in shards.iter().filter(|shard| shard.leader == Some(id)) {
                        let _ = write!(text, " {}-{}", shard.slots.start(), shard.slots.end());
                    }
                    text.push('\n');
                }
                encode(&Reply::Text(&text), dialect, out);
            }
        }
    }

    /// Makes the change `asked` (or answers why the request was not one) and answers what was
    /// done.
    async fn change_member(
        &self,
        asked: Result<(NodeId, MemberChange), &str>,
        dialect: Dialect,
        out: &mut BytesMut,
    ) {
        let done = match asked {
            Ok((node, change)) => self
                .node
                .change_member(node, change)
                .await
                .map_err(|refusal| refusal.to_string()),
            Err(reason) => Err(reason.to_owned()),
        };
        match done {
            Ok(text) => encode(&Reply::Text(&text), dialect, out),
            Err(reason) => encode(&Reply::Error(ErrorReply::new(reason)), dialect, out),
        }
    }

    /// The state of each shard this node holds a replica of, as its Raft group reports it.
    #[must_use]
    pub fn shard_states(&self) -> Vec<ShardState> {
        let index = |log_id: Option<
            &openraft::type_config::alias::LogIdOf<crate::cluster::raft::ShardRaft>,
        >| { log_id.map_or(0, |log_id| log_id.index) };
        (0..self.node.shards())
            .filter_map(|shard| {
                let metrics = self.node.group(shard)?.metrics().borrow_watched().clone();
                let followers = metrics
                    .replication
                    .iter()
                    .flatten()
                    .map(|(&follower, matched)| {
                        let contact = metrics
                            .heartbeat
                            .as_ref()
                            .and_then(|heartbeat| heartbeat.get(&follower).copied().flatten())
                            .map(|at| at.elapsed());
                        FollowerState {
                            node: follower,
                            matched: index(matched.as_ref()),
                            last_contact: contact,
                        }
                    })
                    .collect();
                Some(ShardState {
                    shard,
                    voters: metrics.membership_config.membership().voter_ids().collect(),
                    placed: self.node.placement_of(shard),
                    leader_changes: self.node.leader_changes(shard),
                    leads: metrics.current_leader == Some(self.node.id()),
                    leader: metrics.current_leader,
                    term: metrics.current_term,
                    last_log: metrics.last_log_index.unwrap_or(0),
                    committed: index(metrics.cluster_committed.as_ref()),
                    applied: index(metrics.last_applied.as_ref()),
                    log_bytes: self
                        .node
                        .replica(shard)
                        .map_or(0, |replica| replica.log_bytes()),
                    followers,
                })
            })
            .collect()
    }

    /// Appends the cluster's lines of `INFO`: this node, and for each shard it holds its role,
    /// leader, term, last log, committed and applied index, and (if it leads) how far each
    /// follower has replicated and when it last answered; the requests it forwarded to other
    /// nodes; what the node's logs hold in memory and their budget.
    pub fn info(&self, text: &mut String) {
        let _ = write!(text, "cluster_node:{}\r\n", self.node.id());
        let _ = write!(text, "cluster_shards:{}\r\n", self.node.shards());
        let members: Vec<String> = self.node.member_ids().iter().map(u64::to_string).collect();
        let _ = write!(text, "cluster_members:{}\r\n", members.join(","));
        let states = self.shard_states();
        for state in &states {
            let _ = write!(
                text,
                "shard_{}:role={},leader={},term={},last_log={},committed={},applied={},log_bytes={}",
                state.shard,
                if state.leads { "leader" } else { "follower" },
                state.leader.unwrap_or(0),
                state.term,
                state.last_log,
                state.committed,
                state.applied,
                state.log_bytes,
            );
            let joined = |nodes: &[u64]| {
                nodes
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join("+")
            };
            let _ = write!(
                text,
                ",voters={},placed={}",
                joined(&state.voters),
                joined(&state.placed)
            );
            for follower in &state.followers {
                let _ = write!(text, ",matched_{}={}", follower.node, follower.matched);
            }
            // How long ago each follower last answered this leader, in milliseconds.
            for follower in &state.followers {
                match follower.last_contact {
                    Some(ago) => {
                        let _ = write!(
                            text,
                            ",last_contact_ms_{}={}",
                            follower.node,
                            ago.as_millis()
                        );
                    }
                    None => {
                        let _ = write!(text, ",last_contact_ms_{}=never", follower.node);
                    }
                }
            }
            text.push_str("\r\n");
        }
        let led = states.iter().filter(|state| state.leads).count();
        let _ = write!(text, "cluster_shards_led:{led}\r\n");
        let _ = write!(text, "cluster_shards_followed:{}\r\n", states.len() - led);
        let _ = write!(text, "cluster_forwarded_requests:{}\r\n", self.forwarded());
        let log_memory = self.node.log_memory();
        let _ = write!(text, "cluster_log_memory:{}\r\n", log_memory.held());
        let _ = write!(
            text,
            "cluster_log_memory_budget:{}\r\n",
            log_memory.budget()
        );
    }

    /// Every shard's slots, replicas, leader (as this node knows it) and term.
    async fn shards(&self) -> Vec<ShardView> {
        let count = self.node.shards();
        let placement: Vec<Vec<NodeId>> = (0..count)
            .map(|shard| self.node.placement_of(shard))
            .collect();
        // A shard not held here is led by whichever of its replicas says it leads it (the one
        // of the highest term, should two say so across an election): each is asked once.
        let mut to_ask: Vec<NodeId> = (0..count)
            .filter(|&shard| self.node.group(shard).is_none())
            .flat_map(|shard| placement[usize::from(shard)].iter().copied())
            .filter(|&id| id != self.node.id())
            .collect();
        to_ask.sort_unstable();
        to_ask.dedup();
        let told: Vec<(NodeId, Vec<(u16, u64)>)> =
            futures::future::join_all(to_ask.into_iter().map(|id| async move {
                (
                    id,
                    self.describe(id)
                        .await
                        .map(|(_, leads)| leads)
                        .unwrap_or_default(),
                )
            }))
            .await;
        let mut shards = Vec::with_capacity(usize::from(count));
        for (shard, replicas) in (0..count).zip(placement) {
            let (leader, term) = match self.node.group(shard) {
                Some(group) => {
                    let metrics = group.metrics().borrow_watched().clone();
                    (metrics.current_leader, metrics.current_term)
                }
                None => told
                    .iter()
                    .filter_map(|(id, leads)| {
                        let &(_, term) = leads.iter().find(|&&(led, _)| led == shard)?;
                        Some((Some(*id), term))
                    })
                    .max_by_key(|&(_, term)| term)
                    .unwrap_or((None, 0)),
            };
            shards.push(ShardView {
                slots: slots_of(shard, count),
                replicas,
                leader,
                term,
            });
        }
        shards
    }

    /// Where node `id`'s clients connect, as the node itself says (it may have restarted on
    /// another port); what it said last if it does not answer within [`DESCRIBE_WITHIN`]
    /// (down, or paused), so that `CLUSTER` never waits long on a node that is not there.
    async fn client_address_of(&self, id: NodeId) -> Option<SocketAddr> {
        if id == self.node.id() {
            return Some(self.client_address);
        }
        match self.describe(id).await {
            Some((address, _)) => Some(address),
            None => self.client_addresses.lock().await.get(&id).copied(),
        }
    }

    /// Where node `id`'s clients connect and the shards it leads (with their terms), as it
    /// says within [`DESCRIBE_WITHIN`]; `None` if it does not.
    pub(super) async fn describe(&self, id: NodeId) -> Option<(SocketAddr, Vec<(u16, u64)>)> {
        let client = self.node.peers().get(id)?;
        match tokio::time::timeout(DESCRIBE_WITHIN, client.call(PeerRequest::Describe)).await {
            Ok(Ok(PeerResponse::Described { address, leads })) => {
                self.client_addresses.lock().await.insert(id, address);
                Some((address, leads))
            }
            _ => None,
        }
    }

    /// The shards this node leads, each with its term.
    pub(super) fn led_shards(&self) -> Vec<(u16, u64)> {
        (0..self.node.shards())
            .filter_map(|shard| {
                let metrics = self.node.group(shard)?.metrics().borrow_watched().clone();
                (metrics.current_leader == Some(self.node.id()))
                    .then_some((shard, metrics.current_term))
            })
            .collect()
    }
}

/// The refusal of a `CLUSTER` command given something that is not a node id.
const INVALID_ID: &str = "Invalid node id: give it as CLUSTER NODES lists it, or as a number";

/// How long `CLUSTER` waits for a node to say where its clients connect.
const DESCRIBE_WITHIN: std::time::Duration = std::time::Duration::from_millis(300);

/// A shard as `CLUSTER` shows it.
struct ShardView {
    slots: std::ops::RangeInclusive<u16>,
    replicas: Vec<NodeId>,
    leader: Option<NodeId>,
    term: u64,
}

/// A node's id as Redis Cluster clients expect one: forty hexadecimal digits.
fn node_name(id: NodeId) -> String {
    format!("{id:040x}")
}

/// A bulk string of `text`.
fn bulk(text: String) -> ReplyValue {
    ReplyValue::Bulk(Some(bytes::Bytes::from(text)))
}

/// A map as RESP2 gives one: an array of its names and values, in turn.
fn map(entries: Vec<(&'static str, ReplyValue)>) -> ReplyValue {
    ReplyValue::Array(Some(
        entries
            .into_iter()
            .flat_map(|(name, value)| [bulk(name.to_owned()), value])
            .collect(),
    ))
}

/// A shard's state on this node (see [`Router::shard_states`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardState {
    /// The shard.
    pub shard: u16,
    /// Whether this node leads it.
    pub leads: bool,
    /// Its leader, as this node knows it.
    pub leader: Option<u64>,
    /// Leader changes this node has seen since it started.
    pub leader_changes: u64,
    /// Its voters, as this replica's membership has them (the leader's is the latest).
    pub voters: Vec<u64>,
    /// The nodes the layout places it on: where the voters are headed while it moves.
    pub placed: Vec<u64>,
    /// Its Raft term.
    pub term: u64,
    /// The last index in this replica's log.
    pub last_log: u64,
    /// The last index known committed.
    pub committed: u64,
    /// The last index applied here.
    pub applied: u64,
    /// What the log's unpurged entries take in memory here, in bytes.
    pub log_bytes: u64,
    /// When this node leads: each follower's progress.
    pub followers: Vec<FollowerState>,
}

/// How far a follower has replicated a shard this node leads.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FollowerState {
    /// The follower.
    pub node: u64,
    /// The last index it holds.
    pub matched: u64,
    /// How long ago it last answered, if it has.
    #[serde(skip)]
    pub last_contact: Option<std::time::Duration>,
}
