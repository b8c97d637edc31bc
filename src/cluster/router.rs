//! The guide's `KV.Router`: a request on a bucket goes to the leader of its shard. This node
//! runs it if it leads the shard; otherwise it forwards it to the leader and relays the reply.
//!
//! - Writes (`CREATE`, `DROP`, `PUT`, `DELETE`) are proposed to the shard's Raft group and
//!   answered once committed and applied: on a majority of the shard's logs.
//! - Reads (`GET`, `KEYS`) are linearizable by ReadIndex: the leader confirms with a quorum
//!   that it still leads, and waits until it has applied everything committed before it reads.
//!   A lease would save that round trip but trusts clocks and pauses: an old leader stopped and
//!   woken later must not answer from what it had.
//! - While a shard has no leader (a failover), a request waits up to [`UNAVAILABLE_AFTER`] for
//!   one, then is answered `cluster unavailable, try again` (`-TRYAGAIN` in RESP).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use openraft::ReadPolicy;
use openraft::type_config::async_runtime::WatchReceiver as _;

use super::node::Node;
use super::peer::{self, PeerHandler, PeerRequest, PeerResponse};
use super::placement::{NodeId, replicas_of};
use super::raft::{Outcome, ShardCommand};
use super::slot::{shard_of, slot_of, slots_of};
use crate::change::Change;
use crate::protocol::{
    ClusterQuery, Dialect, ErrorReply, KeyAction, KeyRequest, ParseLimits, Parsed, Reply, Request,
    SlotRange, encode, encode_page, encode_request, encode_value, parse,
};

/// How long a request waits for its shard to have a reachable leader before it is refused.
pub const UNAVAILABLE_AFTER: Duration = Duration::from_secs(5);

/// A pause between tries while a shard elects a leader.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Routes requests on buckets to their shard's leader.
pub struct Router {
    node: std::sync::Arc<Node>,
    members: Vec<NodeId>,
    replicas: usize,
    /// Where this node's clients connect.
    client_address: SocketAddr,
    /// Keys in one page of `KEYS`.
    page_size: usize,
    /// Where each node's clients connect, as far as they have said.
    client_addresses: tokio::sync::Mutex<HashMap<NodeId, SocketAddr>>,
}

/// Why this node could not run a request as its shard's leader.
enum NotHere {
    /// Another node leads the shard (if this one knows which).
    Leader(Option<NodeId>),
}

impl Router {
    /// A router over `node`'s shards.
    #[must_use]
    pub fn new(
        node: std::sync::Arc<Node>,
        members: Vec<NodeId>,
        replicas: usize,
        client_address: SocketAddr,
        page_size: usize,
    ) -> Self {
        Self {
            node,
            members,
            replicas,
            client_address,
            page_size,
            client_addresses: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Answers `CLUSTER INFO|MYID|SLOTS|NODES` from this node's view of the shards.
    pub async fn query(&self, query: ClusterQuery, dialect: Dialect, out: &mut BytesMut) {
        match query {
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
                    "cluster_state:{state}\ncluster_slots_assigned:{}\ncluster_slots_ok:{slots_ok}\n\
                     cluster_slots_pfail:0\ncluster_slots_fail:{}\ncluster_known_nodes:{}\n\
                     cluster_size:{}\ncluster_current_epoch:{term}\ncluster_my_epoch:{term}\n",
                    super::slot::SLOTS,
                    usize::from(super::slot::SLOTS) - slots_ok,
                    self.members.len(),
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
            ClusterQuery::Nodes => {
                let shards = self.shards().await;
                let mut text = String::new();
                for &id in &self.members {
                    let address = self.client_address_of(id).await;
                    let address =
                        address.map_or_else(|| ":0".to_owned(), |address| address.to_string());
                    let flags = if id == self.node.id() {
                        "myself,master"
                    } else {
                        "master"
                    };
                    let term = shards.iter().map(|shard| shard.term).max().unwrap_or(0);
                    let _ = write!(
                        text,
                        "{} {address}@0 {flags} - 0 0 {term} connected",
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

    /// Appends the cluster's lines of `INFO`: this node, and for each shard it holds its role,
    /// leader, term, last log, committed and applied index, and (if it leads) how far each
    /// follower has replicated.
    pub fn info(&self, text: &mut String) {
        let _ = writeln!(text, "cluster_node:{}", self.node.id());
        let _ = writeln!(text, "cluster_shards:{}", self.node.shards());
        let mut led = 0;
        let mut followed = 0;
        for shard in 0..self.node.shards() {
            let Some(group) = self.node.group(shard) else {
                continue;
            };
            let metrics = group.metrics().borrow_watched().clone();
            let role = if metrics.current_leader == Some(self.node.id()) {
                led += 1;
                "leader"
            } else {
                followed += 1;
                "follower"
            };
            let index = |log_id: Option<
                &openraft::type_config::alias::LogIdOf<super::raft::ShardRaft>,
            >| { log_id.map_or(0, |log_id| log_id.index) };
            let _ = write!(
                text,
                "shard_{shard}:role={role},leader={},term={},last_log={},committed={},applied={}",
                metrics.current_leader.map_or(0, |leader| leader),
                metrics.current_term,
                metrics.last_log_index.unwrap_or(0),
                index(metrics.cluster_committed.as_ref()),
                index(metrics.last_applied.as_ref()),
            );
            if let Some(replication) = &metrics.replication {
                for (follower, matched) in replication {
                    let _ = write!(text, ",matched_{follower}={}", index(matched.as_ref()));
                }
            }
            text.push('\n');
        }
        let _ = writeln!(text, "cluster_shards_led:{led}");
        let _ = writeln!(text, "cluster_shards_followed:{followed}");
    }

    /// Every shard's slots, replicas, leader (as this node knows it) and term.
    async fn shards(&self) -> Vec<ShardView> {
        let count = self.node.shards();
        let mut shards = Vec::with_capacity(usize::from(count));
        for shard in 0..count {
            let replicas = replicas_of(shard, &self.members, self.replicas);
            let (leader, term) = match self.node.group(shard) {
                Some(group) => {
                    let metrics = group.metrics().borrow_watched().clone();
                    (metrics.current_leader, metrics.current_term)
                }
                None => (None, 0),
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

    /// Where node `id`'s clients connect: asked once of the node itself.
    async fn client_address_of(&self, id: NodeId) -> Option<SocketAddr> {
        if id == self.node.id() {
            return Some(self.client_address);
        }
        if let Some(&address) = self.client_addresses.lock().await.get(&id) {
            return Some(address);
        }
        let client = self.node.peers().get(&id)?;
        let Ok(PeerResponse::Described(address)) = client.call(PeerRequest::Describe).await else {
            return None;
        };
        self.client_addresses.lock().await.insert(id, address);
        Some(address)
    }

    /// Whether `request` is one the router runs: a request on a bucket.
    #[must_use]
    pub fn routes(request: &Request<'_>) -> bool {
        matches!(
            request,
            Request::Key(_) | Request::Create { .. } | Request::Drop { .. } | Request::Keys { .. }
        )
    }

    /// Runs `request` where its shard is led and appends the reply, in `dialect`, to `out`.
    /// Returns whether the reply is an error.
    pub async fn run(&self, request: &Request<'_>, dialect: Dialect, out: &mut BytesMut) -> bool {
        let Some(bucket) = bucket_of(request) else {
            encode(&Reply::UnknownCommand, dialect, out);
            return true;
        };
        let shard = shard_of(slot_of(bucket), self.node.shards());
        let deadline = tokio::time::Instant::now() + UNAVAILABLE_AFTER;
        loop {
            let leader = match self.run_here(shard, request, dialect, out).await {
                Ok(failed) => return failed,
                Err(NotHere::Leader(leader)) => leader,
            };
            let target = leader.or_else(|| {
                replicas_of(shard, &self.members, self.replicas)
                    .into_iter()
                    .find(|&node| node != self.node.id())
            });
            if let Some(target) = target.filter(|&node| node != self.node.id())
                && let Some(reply) = self.forward(target, request, dialect).await
            {
                out.extend_from_slice(&reply);
                return reply.first() == Some(&b'-') || reply.starts_with(b"ERROR");
            }
            if tokio::time::Instant::now() >= deadline {
                let error = ErrorReply {
                    code: "TRYAGAIN",
                    message: "cluster unavailable, try again".into(),
                };
                encode(&Reply::Error(error), dialect, out);
                return true;
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Runs `request` on this node, if it leads `shard`; `Ok(failed)` once the reply is in
    /// `out`.
    async fn run_here(
        &self,
        shard: u16,
        request: &Request<'_>,
        dialect: Dialect,
        out: &mut BytesMut,
    ) -> Result<bool, NotHere> {
        let Some(group) = self.node.group(shard) else {
            return Err(NotHere::Leader(None));
        };
        let leader = group.current_leader().await;
        if leader != Some(self.node.id()) {
            return Err(NotHere::Leader(leader));
        }
        let not_leader = |error: &dyn std::fmt::Display| {
            tracing::debug!(%error, shard, "not the leader after all");
            NotHere::Leader(None)
        };
        if let Some(change) = change_of(request) {
            let response = group
                .client_write(ShardCommand::new(&change))
                .await
                .map_err(|error| not_leader(&error))?;
            let reply = match response.data {
                Outcome::Done => Reply::Ok,
                Outcome::NoSuchBucket | Outcome::NothingToDrop => Reply::NotFound,
                Outcome::NotAChange => Reply::Error(ErrorReply::new("not a change")),
            };
            encode(&reply, dialect, out);
            return Ok(!matches!(reply, Reply::Ok));
        }
        group
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map_err(|error| not_leader(&error))?;
        let Some(machine) = self.node.state(shard) else {
            return Err(NotHere::Leader(None));
        };
        let registry = machine.registry().await;
        let found = bucket_of(request).and_then(|bucket| registry.lookup(bucket));
        let Some(bucket) = found else {
            encode(&Reply::NotFound, dialect, out);
            return Ok(true);
        };
        match *request {
            Request::Key(KeyRequest { key, .. }) => {
                if bucket
                    .get_with(key, |value| encode_value(value, dialect, out))
                    .is_err()
                {
                    encode(&Reply::NotFound, dialect, out);
                    return Ok(true);
                }
                Ok(false)
            }
            Request::Keys { cursor, .. } => match bucket.scan(cursor, self.page_size) {
                Ok((next, keys)) => {
                    encode_page(next, &keys, dialect, out);
                    Ok(false)
                }
                Err(_) => {
                    encode(&Reply::NotFound, dialect, out);
                    Ok(true)
                }
            },
            _ => {
                encode(&Reply::UnknownCommand, dialect, out);
                Ok(true)
            }
        }
    }

    /// Sends `request` to `target` and returns its encoded reply; `None` if it could not be
    /// reached.
    async fn forward(
        &self,
        target: NodeId,
        request: &Request<'_>,
        dialect: Dialect,
    ) -> Option<Vec<u8>> {
        let client = self.node.peers().get(&target)?;
        let words = words_of(request)?;
        let words: Vec<&[u8]> = words.iter().map(Vec::as_slice).collect();
        let mut bytes = BytesMut::new();
        encode_request(&words, &mut bytes);
        let forwarded = PeerRequest::Forward {
            request: bytes.to_vec(),
            resp: dialect == Dialect::Resp,
        };
        match client.call(forwarded).await {
            Ok(PeerResponse::Forwarded(reply)) => Some(reply),
            // Not the leader (any more), or out of reach: the caller tries again.
            _ => None,
        }
    }
}

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

impl PeerHandler for Router {
    async fn handle(&self, request: PeerRequest) -> PeerResponse {
        if matches!(request, PeerRequest::Describe) {
            return PeerResponse::Described(self.client_address);
        }
        let PeerRequest::Forward { request, resp } = request else {
            return peer::handle_raft(self.node.groups(), request)
                .await
                .unwrap_or(PeerResponse::NoSuchShard);
        };
        let dialect = if resp { Dialect::Resp } else { Dialect::Line };
        let mut out = BytesMut::new();
        match parse(&request, &ParseLimits::default()) {
            Parsed::Request { request, .. } => {
                let Some(bucket) = bucket_of(&request) else {
                    return PeerResponse::NoSuchShard;
                };
                let shard = shard_of(slot_of(bucket), self.node.shards());
                // One hop only: a node that does not lead the shard says so rather than
                // forwarding on, so that requests never circle; the sender tries again.
                if let Err(NotHere::Leader(leader)) =
                    self.run_here(shard, &request, dialect, &mut out).await
                {
                    return PeerResponse::NotLeader(leader);
                }
            }
            _ => encode(&Reply::UnknownCommand, dialect, &mut out),
        }
        PeerResponse::Forwarded(out.to_vec())
    }
}

/// The bucket a routed request is about.
fn bucket_of<'a>(request: &Request<'a>) -> Option<&'a [u8]> {
    match *request {
        Request::Key(KeyRequest { bucket, .. })
        | Request::Create { bucket }
        | Request::Drop { bucket }
        | Request::Keys { bucket, .. } => Some(bucket),
        _ => None,
    }
}

/// The change a write request makes; `None` for a read.
fn change_of<'a>(request: &Request<'a>) -> Option<Change<'a>> {
    match *request {
        Request::Create { bucket } => Some(Change::Create { bucket }),
        Request::Drop { bucket } => Some(Change::Drop { bucket }),
        Request::Key(KeyRequest {
            bucket,
            key,
            action: KeyAction::Put { value },
        }) => Some(Change::Put { bucket, key, value }),
        Request::Key(KeyRequest {
            bucket,
            key,
            action: KeyAction::Delete,
        }) => Some(Change::Delete { bucket, key }),
        _ => None,
    }
}

/// The words of a routed request, to forward it.
fn words_of(request: &Request<'_>) -> Option<Vec<Vec<u8>>> {
    let words: Vec<&[u8]> = match *request {
        Request::Create { bucket } => vec![b"CREATE", bucket],
        Request::Drop { bucket } => vec![b"DROP", bucket],
        Request::Key(KeyRequest {
            bucket,
            key,
            action,
        }) => match action {
            KeyAction::Get => vec![b"GET", bucket, key],
            KeyAction::Put { value } => vec![b"PUT", bucket, key, value],
            KeyAction::Delete => vec![b"DELETE", bucket, key],
        },
        Request::Keys { bucket, cursor } => {
            return Some(vec![
                b"KEYS".to_vec(),
                bucket.to_vec(),
                cursor.to_string().into_bytes(),
            ]);
        }
        _ => return None,
    };
    Some(words.into_iter().map(<[u8]>::to_vec).collect())
}
