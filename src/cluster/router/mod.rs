//! The guide's `KV.Router`: a request on a bucket goes to the leader of its shard. This node
//! runs it if it leads the shard; otherwise it forwards it to the leader and relays the reply.
//!
//! A connection hands the router its pipelined requests in batches. The router splits a batch
//! by shard, runs each shard's share at once (on this node, or forwarded to the leader in one
//! message over the kept peer connection), and puts the replies back in the requests' order.
//! Within a shard the requests run in order; across shards they touch different buckets, so
//! running them side by side changes nothing a client can see.
//!
//! - Writes (`CREATE`, `DROP`, `PUT`, `DELETE`) are proposed to the shard's Raft group, a
//!   batch's consecutive writes in one proposal, and answered once committed and applied: on
//!   a majority of the shard's logs.
//! - Reads (`GET`, `KEYS`) are linearizable by the leader's lease, checked before and after
//!   reading. openraft grants the lease while a quorum has acknowledged the leader within the
//!   longest election timeout, and a follower votes for no one else until that long after it
//!   last heard from its leader: so a read under the lease needs no round trip to the
//!   followers (ReadIndex would cost one per batch). Checking the lease again after reading
//!   closes the gap a pause opens: an old leader stopped (SIGSTOP) between its check and its
//!   read, and woken after another was elected, finds its lease gone and reads again where the
//!   shard is led now. The lease assumes the nodes' clocks run at about the same rate: a
//!   follower may elect only after the lease plus an election timeout (0.6 s more, by default).
//! - While a shard has no leader (a failover), its requests wait up to [`UNAVAILABLE_AFTER`]
//!   for one, then are answered `cluster unavailable, try again` (`-TRYAGAIN` in RESP). A
//!   write is proposed at most once: if its fate cannot be known (the leader was lost after
//!   it was sent), it is answered that way too rather than sent again.

mod buckets;
mod led;
mod replies;
mod views;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use openraft::type_config::async_runtime::WatchReceiver as _;
use smallvec::SmallVec;
use tokio::time::{Instant, timeout_at};

use super::node::Node;
use super::peer::{PeerError, PeerHandler, PeerRequest, PeerResponse};
use super::placement::NodeId;
use super::slot::{shard_of, slot_of};
use crate::change::Change;
use crate::config::MAX_BULK_LEN_LIMIT;
use crate::protocol::{
    Dialect, KeyAction, KeyRequest, ParseLimits, Parsed, Request, encode_request, parse,
};

pub use replies::Replies;
pub use views::{FollowerState, ShardState};

/// Most bucket names one shard lists for one page (`BUCKETS`, or a `SCAN` with a large
/// `COUNT`).
pub const MAX_LISTED: usize = 1000;

/// How long a request waits for its shard to have a reachable leader before it is refused.
pub const UNAVAILABLE_AFTER: Duration = Duration::from_secs(5);

/// A pause between tries while a shard elects a leader.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// How often a node holding no replica of a shard asks the shard's other replicas whether one
/// of them leads it now, while a batch it forwarded waits for an answer.
const LEADER_ASKED_EVERY: Duration = Duration::from_millis(500);

/// Most requests a forwarded batch may carry (a connection sends far fewer at once).
const MAX_FORWARDED: usize = 4096;

/// Routes requests on buckets to their shard's leader.
pub struct Router {
    node: std::sync::Arc<Node>,
    /// Where this node's clients connect.
    client_address: SocketAddr,
    /// Keys in one page of `KEYS`.
    page_size: usize,
    /// Where each node's clients connect, as far as they have said.
    client_addresses: tokio::sync::Mutex<HashMap<NodeId, SocketAddr>>,
    /// Requests sent to another node to run, since start.
    forwarded: std::sync::atomic::AtomicU64,
    /// The node that last ran requests of each shard this node does not hold (it has no
    /// Raft metrics of its own to say who leads): where they go first.
    known_leaders: parking_lot::Mutex<HashMap<u16, NodeId>>,
}

/// This node does not lead the shard (this node does, as far as it knows): the requests not
/// yet answered were neither proposed nor read, and may be run elsewhere.
struct NotLed(Option<NodeId>);

/// Paces the tries of a shard's requests while its leader is sought.
#[derive(Default)]
struct Seeking {
    hints_followed: u8,
}

impl Seeking {
    /// Waits before the next try, after `asked` named `named` as the shard's leader: a node
    /// named so is tried at once (twice at most: during an election two nodes may name each
    /// other); otherwise the shard is given [`RETRY_PAUSE`] to elect one.
    async fn pause(&mut self, asked: Option<NodeId>, named: Option<NodeId>) {
        if named.is_some() && named != asked && self.hints_followed < 2 {
            self.hints_followed += 1;
        } else {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// Where a shard's requests go next.
#[derive(Clone, Copy)]
enum Led {
    /// This node leads the shard.
    Here,
    /// Another node leads it, or may.
    Elsewhere(NodeId),
    /// No node to try: this node believes it leads none and holds the only replica.
    Unknown,
}

impl Router {
    /// A router over `node`'s shards.
    #[must_use]
    pub fn new(node: std::sync::Arc<Node>, client_address: SocketAddr, page_size: usize) -> Self {
        Self {
            node,
            client_address,
            page_size,
            client_addresses: tokio::sync::Mutex::new(HashMap::new()),
            forwarded: std::sync::atomic::AtomicU64::new(0),
            known_leaders: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// Requests sent to another node to run, since start.
    #[must_use]
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This node's id.
    #[must_use]
    pub fn node_id(&self) -> NodeId {
        self.node.id()
    }

    /// Every member of the cluster that holds replicas or may (active and draining).
    #[must_use]
    pub fn members(&self) -> Vec<NodeId> {
        self.node.member_ids()
    }

    /// The node this router routes for.
    #[must_use]
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Whether `request` is one the router runs: a request on a bucket.
    #[must_use]
    pub fn routes(request: &Request<'_>) -> bool {
        bucket_of(request).is_some()
    }

    /// How many buckets this node's replicas hold, and the memory they share (for `INFO`).
    #[must_use]
    pub fn holdings(&self) -> (usize, &crate::bucket::MemoryBudget) {
        (self.node.buckets(), self.node.memory())
    }

    /// The registries of this node's replicas, by shard.
    #[must_use]
    pub fn replica_registries(&self) -> Vec<(u16, crate::registry::Registry)> {
        (0..self.node.shards())
            .filter_map(|shard| Some((shard, self.node.state(shard)?.registry().clone())))
            .collect()
    }

    /// This node's replica of the shard of `bucket` (what `DEBUG CRASH` acts on in a
    /// cluster); `None` if this node holds none.
    pub async fn replica_registry(&self, bucket: &[u8]) -> Option<crate::registry::Registry> {
        let shard = shard_of(slot_of(bucket), self.node.shards());
        Some(self.node.state(shard)?.registry().clone())
    }

    /// Runs `requests` (a connection's consecutive requests on buckets, in one dialect) where
    /// their shards are led, and appends their replies to `out` in the requests' order.
    /// Returns which replies are errors: bit `i` for the `i`th request (of the first 64).
    pub async fn run(&self, requests: &[Request<'_>], dialect: Dialect, out: &mut BytesMut) -> u64 {
        let shards = self.node.shards();
        let shard_of_request: SmallVec<[u16; 16]> = requests
            .iter()
            .map(|request| bucket_of(request).map_or(0, |bucket| shard_of(slot_of(bucket), shards)))
            .collect();
        // The common case, a batch on one shard, runs as it came, without copying it by shard.
        if let Some(&shard) = shard_of_request.first()
            && shard_of_request.iter().all(|&other| other == shard)
        {
            let replies = self.run_shard(shard, requests, dialect).await;
            out.extend_from_slice(replies.bytes());
            return replies.error_mask();
        }
        let mut by_shard: SmallVec<[(u16, Vec<Request<'_>>); 4]> = SmallVec::new();
        for (request, &shard) in requests.iter().zip(&shard_of_request) {
            match by_shard.iter_mut().find(|(known, _)| *known == shard) {
                Some((_, share)) => share.push(*request),
                None => by_shard.push((shard, vec![*request])),
            }
        }
        let answers = futures::future::join_all(
            by_shard
                .iter()
                .map(|(shard, share)| self.run_shard(*shard, share, dialect)),
        )
        .await;
        let mut taken = vec![0; answers.len()];
        let mut errors = 0;
        for (index, shard) in shard_of_request.into_iter().enumerate() {
            let at = by_shard
                .iter()
                .position(|(known, _)| *known == shard)
                .unwrap_or_default();
            out.extend_from_slice(answers[at].get(taken[at]));
            if answers[at].is_error(taken[at]) && index < 64 {
                errors |= 1 << index;
            }
            taken[at] += 1;
        }
        errors
    }

    /// Runs one shard's requests, in order, where the shard is led: here, or forwarded to the
    /// leader in one message. Waits up to [`UNAVAILABLE_AFTER`] for a leader, then answers
    /// what is left unavailable.
    async fn run_shard(&self, shard: u16, requests: &[Request<'_>], dialect: Dialect) -> Replies {
        let deadline = Instant::now() + UNAVAILABLE_AFTER;
        let mut replies = Replies::default();
        let mut hint = None;
        let mut seeking = Seeking::default();
        for attempt in 0usize.. {
            let rest = &requests[replies.len()..];
            let tried = self.where_led(shard, hint.take(), attempt).await;
            let ran = match tried {
                Led::Here => {
                    self.run_led(shard, rest, dialect, deadline, &mut replies)
                        .await
                }
                Led::Elsewhere(target) => {
                    let ran = self
                        .forward(target, shard, rest, dialect, deadline, &mut replies)
                        .await;
                    self.learn_leader(shard, ran.is_ok().then_some(target));
                    ran
                }
                Led::Unknown => Err(NotLed(None)),
            };
            match ran {
                Ok(()) => return replies,
                Err(NotLed(leader)) => hint = leader,
            }
            if Instant::now() >= deadline {
                break;
            }
            seeking.pause(self.asked(&tried), hint).await;
        }
        replies.push_unavailable(requests.len() - replies.len(), dialect);
        replies
    }

    /// Where to run requests on `shard` next: here if this node leads it; else on the node
    /// the last one asked named (`hint`), or the one this node believes leads (as its replica
    /// of the shard knows, or, holding none, as the last forward to it went), or (while it
    /// knows none) each replica in turn by `attempt`.
    async fn where_led(&self, shard: u16, hint: Option<NodeId>, attempt: usize) -> Led {
        let leader = match self.node.group(shard) {
            Some(group) => group.current_leader().await,
            None => self.known_leaders.lock().get(&shard).copied(),
        };
        if leader == Some(self.node.id()) {
            return Led::Here;
        }
        let replicas = self.node.placement_of(shard);
        hint.or(leader)
            .or_else(|| replicas.get(attempt % replicas.len().max(1)).copied())
            .filter(|&target| target != self.node.id())
            .map_or(Led::Unknown, Led::Elsewhere)
    }

    /// The node `led` sends requests to, if any.
    fn asked(&self, led: &Led) -> Option<NodeId> {
        match led {
            Led::Here => Some(self.node.id()),
            Led::Elsewhere(target) => Some(*target),
            Led::Unknown => None,
        }
    }

    /// Remembers which node ran requests of `shard` (`None`: the one tried did not), when this
    /// node holds no replica of it.
    fn learn_leader(&self, shard: u16, leader: Option<NodeId>) {
        if self.node.group(shard).is_some() {
            return;
        }
        let mut known = self.known_leaders.lock();
        match leader {
            Some(leader) => known.insert(shard, leader),
            None => known.remove(&shard),
        };
    }

    /// Sends `requests` to `target` in one message and appends the replies it gives.
    /// `Err(NotLed)` if it answered only some (or none): it does not lead the shard, and the
    /// rest may be run elsewhere. Requests that may have reached it but got no answer are
    /// answered unavailable if any is a write (it may have been made, and is never made
    /// twice); reads are simply tried again. No answer is waited for once this node's replica
    /// of the shard knows another leader (the target was paused, say, and the others elected
    /// one): the reads go there at once, rather than when the deadline has passed.
    async fn forward(
        &self,
        target: NodeId,
        shard: u16,
        requests: &[Request<'_>],
        dialect: Dialect,
        deadline: Instant,
        replies: &mut Replies,
    ) -> Result<(), NotLed> {
        let client = self.node.peers().get(target).ok_or(NotLed(None))?;
        self.forwarded
            .fetch_add(requests.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut encoded = BytesMut::new();
        for request in requests {
            encode_routed(request, &mut encoded);
        }
        let forwarded = PeerRequest::Forward {
            shard,
            requests: encoded.freeze(),
            dialect,
        };
        let answered = tokio::select! {
            answered = timeout_at(deadline, client.call(forwarded)) => answered.ok(),
            () = self.led_elsewhere(shard, target) => None,
        };
        let fate_unknown = match answered {
            Some(Ok(PeerResponse::Forwarded(answer))) => {
                let answered = answer.len();
                let not_led = answer.not_led();
                if answered > requests.len() || replies.append(&answer).is_none() {
                    tracing::warn!(target, "a peer answered a forwarded batch with nonsense");
                    true
                } else if answered == requests.len() {
                    return Ok(());
                } else {
                    return Err(NotLed(not_led.flatten()));
                }
            }
            // Never sent: the peer could not be reached.
            Some(Err(PeerError::Io { .. } | PeerError::Refused { .. })) => {
                return Err(NotLed(None));
            }
            Some(Ok(PeerResponse::NoSuchShard)) => return Err(NotLed(None)),
            // Sent, and no answer came (in time, or before another node led).
            _ => true,
        };
        if fate_unknown && requests.iter().any(|request| change_of(request).is_some()) {
            replies.push_unavailable(requests.len(), dialect);
            return Ok(());
        }
        Err(NotLed(None))
    }

    /// Returns once this node comes to know a leader of `shard` other than `target`: as its
    /// replica of the shard learns (a change: what it knew when asked may be older than the
    /// hint that named `target`), or, holding none, as the shard's other replicas say when
    /// asked every [`LEADER_ASKED_EVERY`].
    async fn led_elsewhere(&self, shard: u16, target: NodeId) {
        if let Some(group) = self.node.group(shard) {
            let mut server = group.server_metrics();
            let known = server.borrow_watched().current_leader;
            while server.changed().await.is_ok() {
                let leader = server.borrow_watched().current_leader;
                if leader.is_some_and(|leader| leader != target) && leader != known {
                    return;
                }
            }
            std::future::pending::<()>().await;
        }
        loop {
            tokio::time::sleep(LEADER_ASKED_EVERY).await;
            for replica in self.node.placement_of(shard) {
                if replica == target || replica == self.node.id() {
                    continue;
                }
                if let Some((_, leads)) = self.describe(replica).await
                    && leads.iter().any(|&(led, _)| led == shard)
                {
                    return;
                }
            }
        }
    }
}

impl PeerHandler for Router {
    async fn handle(&self, request: PeerRequest) -> PeerResponse {
        match request {
            PeerRequest::Describe => PeerResponse::Described {
                address: self.client_address,
                leads: self.led_shards(),
            },
            PeerRequest::ListBuckets {
                shard,
                after,
                limit,
            } => {
                let limit = usize::try_from(limit).unwrap_or(usize::MAX).min(MAX_LISTED);
                PeerResponse::Buckets(
                    self.list_led(shard, after.as_deref(), limit)
                        .await
                        .map_err(|NotLed(leader)| leader),
                )
            }
            PeerRequest::Forward {
                shard,
                requests,
                dialect,
            } => {
                let deadline = Instant::now() + UNAVAILABLE_AFTER;
                match parse_forwarded(&requests, shard, self.node.shards()) {
                    Some(requests) => {
                        let mut replies = Replies::default();
                        // One hop only: a node that does not lead the shard says so rather
                        // than forwarding on, so that requests never circle.
                        if let Err(NotLed(leader)) = self
                            .run_led(shard, &requests, dialect, deadline, &mut replies)
                            .await
                        {
                            replies.stop_short(leader);
                        }
                        PeerResponse::Forwarded(replies)
                    }
                    None => PeerResponse::NoSuchShard,
                }
            }
            other => self.node.handle(other).await,
        }
    }
}

/// The requests of a forwarded batch; `None` unless every one is a well-formed request on a
/// bucket of `shard`, and there are at most [`MAX_FORWARDED`].
fn parse_forwarded(bytes: &[u8], shard: u16, shards: u16) -> Option<Vec<Request<'_>>> {
    // Peers forward what their clients sent within their own limits; these only keep a
    // malformed batch from growing without bound.
    let limits = ParseLimits {
        max_line_len: 64 * 1024,
        max_bulk_len: MAX_BULK_LEN_LIMIT,
        max_args: 8,
    };
    let mut requests = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Parsed::Request {
            request, consumed, ..
        } = parse(&bytes[at..], &limits)
        else {
            return None;
        };
        let bucket = bucket_of(&request)?;
        if shard_of(slot_of(bucket), shards) != shard || requests.len() == MAX_FORWARDED {
            return None;
        }
        requests.push(request);
        at += consumed;
    }
    Some(requests)
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

/// Appends a routed request to `out` as RESP, to forward it.
fn encode_routed(request: &Request<'_>, out: &mut BytesMut) {
    let mut digits = itoa::Buffer::new();
    match *request {
        Request::Create { bucket } => encode_request(&[b"CREATE", bucket], out),
        Request::Drop { bucket } => encode_request(&[b"DROP", bucket], out),
        Request::Key(KeyRequest {
            bucket,
            key,
            action,
        }) => match action {
            KeyAction::Get => encode_request(&[b"GET", bucket, key], out),
            KeyAction::Put { value } => encode_request(&[b"PUT", bucket, key, value], out),
            KeyAction::Delete => encode_request(&[b"DELETE", bucket, key], out),
        },
        Request::Keys { bucket, cursor } => {
            let cursor = digits.format(cursor).as_bytes();
            encode_request(&[b"KEYS", bucket, cursor], out);
        }
        // Only requests on buckets are routed.
        _ => {}
    }
}
