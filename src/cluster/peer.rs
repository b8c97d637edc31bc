//! Node to node: one TCP connection per pair of nodes, shared by every shard's Raft traffic.
//!
//! Frames are length-delimited (at most [`MAX_FRAME`]) and hold a request id and a message,
//! serialised with serde and postcard. A client sends requests as they come and matches the
//! replies by id, so many shards' RPCs are in flight on one connection at once. A connection
//! opens with a [`PeerRequest::Hello`] each way, in which each node checks the other's
//! incarnation ([`Handshake`]): nothing else passes before both have.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use openraft::Raft;
use openraft::error::RaftError;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, VoteOf};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::codec::{Decoder, Encoder, Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::identity::Handshake;
use super::layout::Settings;
use super::placement::NodeId;
use super::raft::{ShardRaft, ShardStateMachine, SnapshotBytes, map_snapshot_file};
use super::router::Replies;
use crate::protocol::Dialect;

/// The largest frame a node sends or accepts: a whole snapshot travels in one.
pub const MAX_FRAME: usize = 1 << 30;

/// Requests in flight on one connection before a sender waits.
const IN_FLIGHT: usize = 1024;

/// How long a node waits before asking a peer that refused it again.
const ASK_AGAIN_AFTER_REFUSAL: std::time::Duration = std::time::Duration::from_secs(1);

/// How long either side waits for the other's hello on a new connection.
const HELLO_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// A shard's Raft group as this node runs it.
pub type ShardGroup = Raft<ShardRaft, ShardStateMachine>;

/// A request from a replica on one node to a replica of the same shard on another.
#[derive(Serialize, Deserialize)]
pub enum PeerRequest {
    /// The first request on a connection: who sends it, and the incarnation of its data
    /// directory.
    Hello {
        /// The sender's node id.
        node: NodeId,
        /// The sender's incarnation (see [`Handshake`]).
        incarnation: u64,
    },
    /// A node asks to join the cluster, as the first request of a connection of its own (it
    /// is no member yet, so it says no hello), or forwarded by a member to the metadata
    /// group's leader.
    Join {
        /// The node's id: never one a member had.
        node: NodeId,
        /// Its data directory's incarnation.
        incarnation: u64,
        /// Where the members will reach it.
        address: SocketAddr,
    },
    /// A member is to be added (expected to join), removed (drained first) or forgotten
    /// (dead: its replicas rebuilt from the others), for the metadata group's leader.
    ChangeMember {
        /// The member.
        node: NodeId,
        /// Which.
        change: MemberChange,
    },
    /// Which nodes the receiver's replica of a shard has in its committed membership, if it
    /// leads the shard (a node asks before dropping a replica that has moved away).
    ShardMembers(u16),
    /// Raft's append-entries (and heartbeat).
    AppendEntries(u16, AppendEntriesRequest<ShardRaft>),
    /// Raft's vote request.
    Vote(u16, VoteRequest<ShardRaft>),
    /// A piece of a snapshot, for a replica too far behind for the log. The pieces of one
    /// transfer come one after another from offset 0, each once the one before is answered;
    /// the last carries the snapshot's vote and metadata, and the receiver installs the whole
    /// snapshot then.
    SnapshotPiece {
        /// The shard.
        shard: u16,
        /// Which transfer the piece belongs to (a new one starts at offset 0).
        transfer: u64,
        /// Where the piece starts in the snapshot.
        offset: u64,
        /// The piece.
        bytes: Bytes,
        /// On the last piece: the leader's vote and the snapshot's metadata.
        last: Option<(VoteOf<ShardRaft>, SnapshotMetaOf<ShardRaft>)>,
    },
    /// Raft's leader transfer: the receiver should campaign now.
    TransferLeader(u16, TransferLeaderRequest<ShardRaft>),
    /// What the receiving node's client address is, and which shards it leads (for
    /// `CLUSTER SLOTS`, `NODES` and the like, on a node that does not hold every shard).
    Describe,
    /// `BUCKETS`' share of one shard, for the node that leads it: up to `limit` names after
    /// `after`, read after a ReadIndex round.
    ListBuckets {
        /// The shard.
        shard: u16,
        /// The last name of the previous page.
        after: Option<Vec<u8>>,
        /// Most names to give.
        limit: u32,
    },
    /// A client's requests on buckets of one shard, for the node that leads it, to run in
    /// order: the requests as RESP, and the dialect the client wants its replies in.
    Forward {
        /// The shard the requests' buckets belong to.
        shard: u16,
        /// The requests, encoded as RESP one after another.
        requests: Bytes,
        /// The client's dialect.
        dialect: Dialect,
    },
    /// Whether the receiver's replica of a shard holds an entry or a vote: a node about to
    /// form the group on the cluster's first start asks, and leaves a formed group alone.
    Formed(u16),
}

/// The answer to a [`PeerRequest`].
#[derive(Serialize, Deserialize)]
pub enum PeerResponse {
    /// To [`PeerRequest::Hello`]: the answering node's id and incarnation, or why it refuses
    /// the sender.
    Hello(Result<(NodeId, u64), String>),
    /// To [`PeerRequest::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<ShardRaft>, RaftError<ShardRaft>>),
    /// To [`PeerRequest::Vote`].
    Vote(Result<VoteResponse<ShardRaft>, RaftError<ShardRaft>>),
    /// To [`PeerRequest::SnapshotPiece`]: taken (`None`), or, to the last piece, what
    /// installing the snapshot answered.
    Snapshot(Result<Option<SnapshotResponse<ShardRaft>>, String>),
    /// To [`PeerRequest::TransferLeader`].
    TransferLeader(Result<TransferLeaderResponse<ShardRaft>, String>),
    /// To [`PeerRequest::Describe`]: where the node's clients connect, and the shards it
    /// leads, each with its term.
    Described {
        /// Where the node's clients connect.
        address: SocketAddr,
        /// The shards the node leads, each with its term.
        leads: Vec<(u16, u64)>,
    },
    /// To [`PeerRequest::Forward`]: the replies, encoded for the client, to the first of the
    /// requests or all of them (see [`Replies::not_led`]).
    Forwarded(Replies),
    /// To [`PeerRequest::ListBuckets`]: the names, or (`Err`) this node does not lead the
    /// shard (the node it believes does, if any).
    Buckets(Result<Vec<Vec<u8>>, Option<u64>>),
    /// To [`PeerRequest::Join`].
    Joined(Result<Admitted, JoinRefusal>),
    /// To [`PeerRequest::ChangeMember`]: what was done, or why not.
    MemberChanged(Result<String, JoinRefusal>),
    /// To [`PeerRequest::ShardMembers`]: the voters and learners, if the receiver leads the
    /// shard and its membership is committed and not mid-change.
    ShardMembers(Option<Vec<NodeId>>),
    /// This node holds no replica of the shard.
    NoSuchShard,
    /// To [`PeerRequest::Formed`].
    Formed(bool),
}

/// How a member comes or leaves, by an operator's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// It is expected to join, at this cluster address: replicas are placed on it now.
    Add(SocketAddr),
    /// Its replicas move to the other members first, then it is removed.
    Remove,
    /// It is dead and not coming back: removed at once, its replicas rebuilt from the others.
    Forget,
}

/// What a node admitted to the cluster is told.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Admitted {
    /// How the cluster cuts and replicates its slots.
    pub settings: Settings,
    /// Every member (the new one included) and where it is reached.
    pub members: Vec<(NodeId, SocketAddr)>,
}

/// Why a change to the layout was not made.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum JoinRefusal {
    /// The receiver does not lead the metadata group; the one it believes does, if any.
    #[error("not the leader of the cluster's metadata")]
    NotLeader(Option<SocketAddr>),
    /// Not now, and why: asking again later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// Refused, and why.
    #[error("{0}")]
    Refused(String),
}

/// What answers the requests that come from peers.
pub trait PeerHandler: Send + Sync + 'static {
    /// The answer to `request`.
    fn handle(&self, request: PeerRequest) -> impl Future<Output = PeerResponse> + Send;
}

/// What answers a node's peers, named once the node is open.
///
/// A node greets its peers from the moment it starts, before its replicas are open: nodes
/// forming a cluster together each ask the others whether they knew it (`node.rs`), and would
/// otherwise each wait out the others' start. Requests that come before the node is open wait
/// for it, as they would for a slow node.
pub struct PeerGate<H> {
    handler: tokio::sync::SetOnce<Arc<H>>,
}

impl<H> PeerGate<H> {
    /// A gate that holds requests until [`Self::open`].
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            handler: tokio::sync::SetOnce::new(),
        })
    }

    /// Answers requests with `handler` from now on; a gate opens once, and later calls change
    /// nothing.
    pub fn open(&self, handler: Arc<H>) {
        let _ = self.handler.set(handler);
    }
}

impl<H: PeerHandler> PeerHandler for PeerGate<H> {
    async fn handle(&self, request: PeerRequest) -> PeerResponse {
        self.handler.wait().await.handle(request).await
    }
}

/// Why a request to a peer got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The connection could not be made, or the request could not be written: the peer never
    /// got it.
    #[error("peer {address}: {source}")]
    Io {
        /// The peer.
        address: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// A frame that is not a message.
    #[error("peer {0}: a frame that is not a message")]
    Malformed(SocketAddr),
    /// The connection closed before the answer came: the peer may have got the request.
    #[error("peer {0}: connection closed")]
    Closed(SocketAddr),
    /// The handshake failed: one of the two nodes refuses the other (a wiped data directory,
    /// or an address that answers as another node). Nothing was sent.
    #[error("peer {address}: {reason}")]
    Refused {
        /// The peer.
        address: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// A connection to one peer, opened on first use and again after it breaks.
pub struct PeerClient {
    /// The node expected at `address`.
    id: NodeId,
    address: SocketAddr,
    handshake: Arc<Handshake>,
    connection: Mutex<Option<mpsc::Sender<Call>>>,
    /// Whether the last attempt to connect succeeded: a peer that goes away is reported once,
    /// not at every heartbeat that cannot reach it.
    reachable: std::sync::atomic::AtomicBool,
    /// When and why the peer last refused this node.
    refused: parking_lot::Mutex<Option<(std::time::Instant, String)>>,
    /// When the oldest request still unanswered was sent, in milliseconds after `created`
    /// plus one; 0 once an answer has come to every request sent before it. Set by the first
    /// request after an answer, cleared by the next answer (a request given up on stays
    /// unanswered until then).
    unanswered_since: std::sync::atomic::AtomicU64,
    created: std::time::Instant,
}

type Call = (
    PeerRequest,
    oneshot::Sender<Result<PeerResponse, PeerError>>,
);

impl PeerClient {
    /// A client of node `id` at `address`, introducing this node with `handshake`; nothing is
    /// connected until the first request.
    #[must_use]
    pub fn new(id: NodeId, address: SocketAddr, handshake: Arc<Handshake>) -> Self {
        Self {
            id,
            address,
            handshake,
            connection: Mutex::new(None),
            reachable: std::sync::atomic::AtomicBool::new(true),
            refused: parking_lot::Mutex::new(None),
            unanswered_since: std::sync::atomic::AtomicU64::new(0),
            created: std::time::Instant::now(),
        }
    }

    /// How long the peer has left a request unanswered (the oldest sent since its last
    /// answer), if it has.
    #[must_use]
    pub fn unanswered_for(&self) -> Option<std::time::Duration> {
        use std::sync::atomic::Ordering;
        match self.unanswered_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(
                self.created
                    .elapsed()
                    .saturating_sub(std::time::Duration::from_millis(since - 1)),
            ),
        }
    }

    /// Where the peer is reached.
    #[must_use]
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Connects to the peer, saying hello, unless connected already.
    ///
    /// # Errors
    /// If the peer cannot be reached, or refuses this node ([`PeerError::Refused`]).
    pub async fn connect(&self) -> Result<(), PeerError> {
        self.connected().await.map(drop)
    }

    /// Sends `request` and waits for its answer.
    ///
    /// # Errors
    /// If the peer cannot be reached or the connection breaks first.
    pub async fn call(&self, request: PeerRequest) -> Result<PeerResponse, PeerError> {
        use std::sync::atomic::Ordering;
        let sent = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let _ =
            self.unanswered_since
                .compare_exchange(0, sent, Ordering::Relaxed, Ordering::Relaxed);
        let sender = self.connected().await?;
        let (reply, answer) = oneshot::channel();
        if sender.send((request, reply)).await.is_err() {
            *self.connection.lock().await = None;
            return Err(PeerError::Closed(self.address));
        }
        let answered = answer.await.unwrap_or(Err(PeerError::Closed(self.address)));
        if answered.is_err() {
            *self.connection.lock().await = None;
        } else {
            self.unanswered_since.store(0, Ordering::Relaxed);
        }
        answered
    }

    async fn connected(&self) -> Result<mpsc::Sender<Call>, PeerError> {
        if let Some((at, reason)) = self.refused.lock().clone()
            && at.elapsed() < ASK_AGAIN_AFTER_REFUSAL
        {
            return Err(PeerError::Refused {
                address: self.address,
                reason,
            });
        }
        let mut connection = self.connection.lock().await;
        if let Some(sender) = connection.as_ref().filter(|sender| !sender.is_closed()) {
            return Ok(sender.clone());
        }
        use std::sync::atomic::Ordering;
        let stream = match TcpStream::connect(self.address).await {
            Ok(stream) => {
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!(peer = %self.address, "peer reachable again");
                }
                stream
            }
            Err(source) => {
                if self.reachable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(peer = %self.address, error = %source, "peer unreachable; trying again as Raft needs it");
                }
                return Err(PeerError::Io {
                    address: self.address,
                    source,
                });
            }
        };
        stream.set_nodelay(true).map_err(|source| PeerError::Io {
            address: self.address,
            source,
        })?;
        let mut framed = framed(stream);
        if let Err(error) = self.introduce(&mut framed).await {
            if let PeerError::Refused { reason, .. } = &error {
                if self.handshake.refusals_to_tell() {
                    tracing::error!(peer = self.id, address = %self.address, "{reason}");
                }
                // Asked again at once, it would refuse again: Raft's next tries wait.
                *self.refused.lock() = Some((std::time::Instant::now(), reason.clone()));
            }
            return Err(error);
        }
        let (sender, calls) = mpsc::channel(IN_FLIGHT);
        tokio::spawn(drive(self.address, framed, calls));
        *connection = Some(sender.clone());
        Ok(sender)
    }
}

impl PeerClient {
    /// Says hello on a new connection and checks the answer: the node expected, under the
    /// incarnation this node knew it by (or first seen now).
    async fn introduce(&self, framed: &mut PeerFramed) -> Result<(), PeerError> {
        let address = self.address;
        let (node, incarnation) = self.handshake.hello();
        framed
            .send((0u64, PeerRequest::Hello { node, incarnation }))
            .await
            .map_err(|source| PeerError::Io { address, source })?;
        let Ok(Some(Ok(answer))) = tokio::time::timeout(HELLO_WITHIN, framed.next()).await else {
            return Err(PeerError::Closed(address));
        };
        let refused = |reason: String| PeerError::Refused { address, reason };
        match postcard::from_bytes::<(u64, PeerResponse)>(&answer) {
            Ok((0, PeerResponse::Hello(Ok((peer, incarnation))))) => {
                if peer != self.id {
                    return Err(refused(format!(
                        "{address} answers as node {peer}, not node {}: check --peers",
                        self.id
                    )));
                }
                self.handshake.admit(peer, incarnation).map_err(refused)
            }
            Ok((0, PeerResponse::Hello(Err(reason)))) => Err(refused(reason)),
            _ => Err(PeerError::Malformed(address)),
        }
    }
}

/// Sends `join` (a [`PeerRequest::Join`]) to the member at `address` on a connection of its
/// own, and waits up to `within` for the answer.
///
/// # Errors
/// If the member cannot be reached or does not answer in time.
pub async fn ask_to_join(
    address: SocketAddr,
    join: PeerRequest,
    within: std::time::Duration,
) -> Result<PeerResponse, PeerError> {
    let io = |source| PeerError::Io { address, source };
    let exchange = async {
        let stream = TcpStream::connect(address).await.map_err(io)?;
        let mut framed = framed(stream);
        framed.send((1u64, join)).await.map_err(io)?;
        match framed.next().await {
            Some(Ok(frame)) => match postcard::from_bytes::<(u64, PeerResponse)>(&frame) {
                Ok((1, response)) => Ok(response),
                _ => Err(PeerError::Malformed(address)),
            },
            _ => Err(PeerError::Closed(address)),
        }
    };
    tokio::time::timeout(within, exchange)
        .await
        .unwrap_or(Err(PeerError::Closed(address)))
}

/// A peer connection, framed.
type PeerFramed = Framed<TcpStream, PeerCodec>;

fn framed(stream: TcpStream) -> PeerFramed {
    Framed::new(stream, PeerCodec::new())
}

/// The peer wire: a frame is a 4-byte big-endian length and that many bytes of postcard, a
/// request id and a message ([`LengthDelimitedCodec`]'s default framing, which reads them).
/// A message is serialised straight into the connection's write buffer, whose memory is reused
/// from frame to frame: serialised into a `Vec` of its own first, every replication message
/// was a fresh allocation grown by doubling (large ones faulting their pages in anew) and was
/// then copied into that buffer.
struct PeerCodec {
    frames: LengthDelimitedCodec,
}

impl PeerCodec {
    fn new() -> Self {
        Self {
            frames: LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME)
                .new_codec(),
        }
    }
}

/// A message the codec could not make a frame of; the frames before it are unharmed.
#[derive(Debug, thiserror::Error)]
#[error("a peer message could not be framed: {0}")]
struct Unsendable(String);

impl Unsendable {
    fn is(error: &std::io::Error) -> bool {
        matches!(error.get_ref(), Some(inner) if inner.is::<Self>())
    }
}

impl Decoder for PeerCodec {
    type Item = BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, source: &mut BytesMut) -> std::io::Result<Option<BytesMut>> {
        self.frames.decode(source)
    }
}

impl<T: Serialize> Encoder<(u64, T)> for PeerCodec {
    type Error = std::io::Error;

    fn encode(&mut self, message: (u64, T), buffer: &mut BytesMut) -> std::io::Result<()> {
        const LENGTH: usize = 4;
        let start = buffer.len();
        buffer.put_u32(0);
        let serialised = postcard::to_io(&message, (&mut *buffer).writer()).map(drop);
        let length = buffer.len() - start - LENGTH;
        let unsendable = match serialised {
            Err(error) => Some(Unsendable(error.to_string())),
            Ok(()) if length > MAX_FRAME => {
                Some(Unsendable(format!("{length} bytes, over the frame limit")))
            }
            Ok(()) => None,
        };
        if let Some(unsendable) = unsendable {
            // The buffer holds the frames before this one only: the connection goes on.
            buffer.truncate(start);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                unsendable,
            ));
        }
        let length = u32::try_from(length).expect("MAX_FRAME fits the length field");
        buffer[start..start + LENGTH].copy_from_slice(&length.to_be_bytes());
        Ok(())
    }
}

/// One connection's life on the client side: sends each call with a fresh id, answers each
/// caller when its id comes back, and fails every caller left when the connection ends.
async fn drive(address: SocketAddr, framed: PeerFramed, mut calls: mpsc::Receiver<Call>) {
    let (mut sink, mut stream) = framed.split();
    let mut waiting: HashMap<u64, oneshot::Sender<Result<PeerResponse, PeerError>>> =
        HashMap::new();
    let mut next_id = 0u64;
    let failure = loop {
        tokio::select! {
            call = calls.recv() => {
                let Some(mut call) = call else { break None };
                // The calls queued meanwhile go out with it, in one write.
                let fed = loop {
                    let (request, reply) = call;
                    next_id += 1;
                    match sink.feed((next_id, request)).await {
                        Ok(()) => {
                            waiting.insert(next_id, reply);
                        }
                        Err(error) if Unsendable::is(&error) => {
                            tracing::warn!(%address, %error);
                            let _ = reply.send(Err(PeerError::Malformed(address)));
                        }
                        Err(source) => {
                            let _ = reply.send(Err(PeerError::Io { address, source }));
                            break false;
                        }
                    }
                    match calls.try_recv() {
                        Ok(next) => call = next,
                        Err(_) => break true,
                    }
                };
                if !fed || sink.flush().await.is_err() {
                    break Some(());
                }
            }
            frame = stream.next() => {
                let Some(Ok(frame)) = frame else { break Some(()) };
                let Ok((id, response)) = postcard::from_bytes::<(u64, PeerResponse)>(&frame) else {
                    break Some(());
                };
                if let Some(reply) = waiting.remove(&id) {
                    let _ = reply.send(Ok(response));
                }
            }
        }
    };
    if failure.is_some() {
        tracing::debug!(%address, "peer connection ended");
    }
    for (_, reply) in waiting {
        let _ = reply.send(Err(PeerError::Closed(address)));
    }
}

/// Answers peers on `listener` until `shutdown`, each connection once its hello has passed
/// `handshake`: every request runs on its own task, so that one slow shard never holds up
/// another's on the same connection.
pub async fn serve<H: PeerHandler>(
    listener: TcpListener,
    handler: Arc<H>,
    handshake: Arc<Handshake>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(answer(
                    framed(stream),
                    Arc::clone(&handler),
                    Arc::clone(&handshake),
                    shutdown.clone(),
                ));
            }
            Err(error) => tracing::warn!(%error, "accepting a peer failed"),
        }
    }
}

/// What a new connection opened with.
enum Opening {
    /// A hello this node took: the connection goes on.
    Admitted,
    /// A node that is not a member asks to join: the connection carries that request alone.
    Join(u64, PeerRequest),
    /// Anything else, or a refused hello (answered): the connection is closed.
    Refused,
}

/// Takes a new connection's first frame: a hello, answered with this node's or with the
/// refusal; or a node's request to join.
async fn greet(framed: &mut PeerFramed, handshake: &Handshake) -> Opening {
    let Ok(Some(Ok(hello))) = tokio::time::timeout(HELLO_WITHIN, framed.next()).await else {
        return Opening::Refused;
    };
    let answer = match postcard::from_bytes::<(u64, PeerRequest)>(&hello) {
        Ok((0, PeerRequest::Hello { node, incarnation })) => handshake
            .admit(node, incarnation)
            .map(|()| handshake.hello())
            .inspect_err(|reason| {
                if handshake.refusals_to_tell() {
                    tracing::error!(peer = node, "refusing a peer: {reason}");
                }
            }),
        Ok((id, join @ PeerRequest::Join { .. })) => return Opening::Join(id, join),
        _ => {
            tracing::warn!("a peer connection did not open with a hello; closing it");
            return Opening::Refused;
        }
    };
    let admitted = answer.is_ok();
    if framed
        .send((0u64, PeerResponse::Hello(answer)))
        .await
        .is_ok()
        && admitted
    {
        Opening::Admitted
    } else {
        Opening::Refused
    }
}

async fn answer<H: PeerHandler>(
    mut framed: PeerFramed,
    handler: Arc<H>,
    handshake: Arc<Handshake>,
    shutdown: CancellationToken,
) {
    match greet(&mut framed, &handshake).await {
        Opening::Admitted => {}
        Opening::Refused => return,
        Opening::Join(id, join) => {
            let response = handler.handle(join).await;
            let _ = framed.send((id, response)).await;
            return;
        }
    }
    let (mut sink, mut stream) = framed.split();
    let (answers, mut outgoing) = mpsc::channel::<(u64, PeerResponse)>(IN_FLIGHT);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let writer = tokio::spawn(async move {
        while let Some(mut frame) = outgoing.recv().await {
            // The answers ready meanwhile go out with it, in one write.
            loop {
                match sink.feed(frame).await {
                    Ok(()) => {}
                    // Its asker hears nothing and gives up at its bound.
                    Err(error) if Unsendable::is(&error) => tracing::warn!(%error),
                    Err(_) => return,
                }
                match outgoing.try_recv() {
                    Ok(next) => frame = next,
                    Err(_) => break,
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    loop {
        let frame = tokio::select! {
            () = shutdown.cancelled() => break,
            frame = stream.next() => frame,
        };
        let Some(Ok(frame)) = frame else { break };
        let Ok((id, request)) = postcard::from_bytes::<(u64, PeerRequest)>(&frame) else {
            tracing::warn!("a peer sent a frame that is not a request; closing its connection");
            break;
        };
        if matches!(request, PeerRequest::Hello { .. }) {
            tracing::warn!("a peer said hello twice; closing its connection");
            break;
        }
        // A peer's requests in flight are bounded: past the bound, its connection is not read
        // until one is answered.
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break;
        };
        let handler = Arc::clone(&handler);
        let answers = answers.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let response = handler.handle(request).await;
            let _ = answers.send((id, response)).await;
        });
    }
    drop(answers);
    let _ = writer.await;
}

/// The snapshots being received, a shard's pieces gathered until the last arrives: written to
/// a file at their offsets, as they come, where the node has a directory (a snapshot may be
/// gigabytes); else kept in memory apart and joined once, off the runtime's thread (one buffer
/// grown as they came would be copied whole at every doubling).
pub struct SnapshotInbox {
    /// The largest snapshot this node takes: a peer cannot make it hold more.
    limit: u64,
    /// Where received snapshots are written, in files without a name; `None`: in memory.
    directory: Option<PathBuf>,
    transfers: parking_lot::Mutex<HashMap<u16, Transfer>>,
}

/// The smallest snapshot piece kept apart from the one before it in memory.
const KEPT_APART_FROM: usize = 1 << 20;

/// A snapshot being received.
struct Transfer {
    id: u64,
    /// Bytes received so far.
    received: u64,
    pieces: Received,
}

/// A snapshot's pieces as they are received.
enum Received {
    /// In memory, in order.
    Memory(Vec<Vec<u8>>),
    /// Written to this file, each at its offset. A piece is taken only while no other is
    /// being written (a sender waits for each piece's answer before the next), and the file
    /// is mapped only once no piece is: a mapped file must not change.
    File(Arc<tokio::sync::Mutex<std::fs::File>>),
}

impl SnapshotInbox {
    /// An inbox that takes snapshots of up to `limit` bytes, into files in `directory` if
    /// there is one.
    #[must_use]
    pub fn new(limit: u64, directory: Option<PathBuf>) -> Self {
        Self {
            limit,
            directory,
            transfers: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// Takes a piece of transfer `transfer` of `shard`'s snapshot.
    async fn receive(
        &self,
        shard: u16,
        transfer: u64,
        offset: u64,
        bytes: Bytes,
    ) -> Result<(), String> {
        let new_file = match &self.directory {
            Some(directory) if offset == 0 => Some(Arc::new(tokio::sync::Mutex::new(
                tempfile::tempfile_in(directory)
                    .map_err(|error| format!("no file for a snapshot: {error}"))?,
            ))),
            _ => None,
        };
        let Some(writing) = self.accept(shard, transfer, offset, &bytes, new_file)? else {
            return Ok(());
        };
        // Written off the runtime's thread, the file held until it is.
        let written = tokio::task::spawn_blocking(move || {
            std::os::unix::fs::FileExt::write_all_at(&*writing, &bytes, offset)
        })
        .await
        .map_err(|error| error.to_string())
        .and_then(|written| written.map_err(|error| format!("writing a snapshot: {error}")));
        if written.is_err() {
            let mut transfers = self.transfers.lock();
            if transfers
                .get(&shard)
                .is_some_and(|under_way| under_way.id == transfer)
            {
                transfers.remove(&shard);
            }
        }
        written
    }

    /// Checks a piece against its transfer and counts it in; keeps it if the transfer is in
    /// memory, else answers the file to write it to, held until it is written. `file`: the
    /// file a transfer starting with this piece is written to.
    fn accept(
        &self,
        shard: u16,
        transfer: u64,
        offset: u64,
        bytes: &[u8],
        file: Option<Arc<tokio::sync::Mutex<std::fs::File>>>,
    ) -> Result<Option<tokio::sync::OwnedMutexGuard<std::fs::File>>, String> {
        let mut transfers = self.transfers.lock();
        if offset == 0 {
            // A new transfer replaces any that was left unfinished.
            transfers.insert(
                shard,
                Transfer {
                    id: transfer,
                    received: 0,
                    pieces: file.map_or_else(|| Received::Memory(Vec::new()), Received::File),
                },
            );
        }
        let Some(under_way) = transfers
            .get_mut(&shard)
            .filter(|under_way| under_way.id == transfer)
        else {
            return Err(format!(
                "no snapshot transfer {transfer} of shard {shard} under way"
            ));
        };
        if under_way.received != offset {
            let expected = under_way.received;
            transfers.remove(&shard);
            return Err(format!(
                "a snapshot piece at offset {offset}; expected {expected}"
            ));
        }
        if offset + bytes.len() as u64 > self.limit {
            transfers.remove(&shard);
            return Err(format!(
                "a snapshot larger than this node takes ({} bytes)",
                self.limit
            ));
        }
        let writing = match &under_way.pieces {
            Received::File(file) => match Arc::clone(file).try_lock_owned() {
                Ok(writing) => Some(writing),
                Err(_) => {
                    transfers.remove(&shard);
                    return Err("a snapshot piece while the one before is written".to_owned());
                }
            },
            Received::Memory(_) => None,
        };
        under_way.received += bytes.len() as u64;
        match &mut under_way.pieces {
            Received::File(_) => Ok(writing),
            // Small pieces join the last one: a piece kept apart costs a vector's header and
            // an allocation, so a peer sending many tiny pieces could hold many times the
            // limit.
            Received::Memory(pieces) => {
                match pieces.last_mut() {
                    Some(last) if bytes.len() < KEPT_APART_FROM => last.extend_from_slice(bytes),
                    _ => pieces.push(bytes.to_vec()),
                }
                Ok(None)
            }
        }
    }

    /// The snapshot of transfer `transfer` of `shard`, once its last piece is in; `None` if
    /// another transfer replaced it.
    async fn complete(&self, shard: u16, transfer: u64) -> Result<Option<SnapshotBytes>, String> {
        let pieces = {
            let mut transfers = self.transfers.lock();
            match transfers.get(&shard) {
                Some(under_way) if under_way.id == transfer => {
                    transfers.remove(&shard).map(|under_way| under_way.pieces)
                }
                _ => None,
            }
        };
        let Some(pieces) = pieces else {
            return Ok(None);
        };
        tokio::task::spawn_blocking(move || match pieces {
            Received::Memory(mut pieces) if pieces.len() <= 1 => {
                Ok(SnapshotBytes::from(pieces.pop().unwrap_or_default()))
            }
            Received::Memory(pieces) => Ok(SnapshotBytes::from(pieces.concat())),
            Received::File(file) => map_snapshot_file(&file.blocking_lock())
                .map_err(|error| format!("reading a received snapshot: {error}")),
        })
        .await
        .map_err(|error| error.to_string())?
        .map(Some)
    }
}

/// Answers a Raft RPC from the group `group_of` gives for its shard (snapshots gathered in
/// `inbox`); `None` for a request that is not one.
pub async fn handle_raft(
    group_of: impl Fn(u16) -> Option<ShardGroup>,
    inbox: &SnapshotInbox,
    request: PeerRequest,
) -> Option<PeerResponse> {
    let response = match request {
        PeerRequest::AppendEntries(shard, rpc) => match group_of(shard) {
            Some(group) => PeerResponse::AppendEntries(group.append_entries(rpc).await),
            None => PeerResponse::NoSuchShard,
        },
        PeerRequest::Vote(shard, rpc) => match group_of(shard) {
            Some(group) => PeerResponse::Vote(group.vote(rpc).await),
            None => PeerResponse::NoSuchShard,
        },
        PeerRequest::SnapshotPiece {
            shard,
            transfer,
            offset,
            bytes,
            last,
        } => match group_of(shard) {
            Some(group) => PeerResponse::Snapshot(
                install_piece(&group, inbox, shard, transfer, offset, bytes, last).await,
            ),
            None => PeerResponse::NoSuchShard,
        },
        PeerRequest::TransferLeader(shard, rpc) => match group_of(shard) {
            Some(group) => PeerResponse::TransferLeader(
                group
                    .handle_transfer_leader(rpc)
                    .await
                    .map_err(|error| error.to_string()),
            ),
            None => PeerResponse::NoSuchShard,
        },
        PeerRequest::Formed(shard) => PeerResponse::Formed(match group_of(shard) {
            Some(group) => group.is_initialized().await.unwrap_or(false),
            None => false,
        }),
        PeerRequest::Forward { .. }
        | PeerRequest::ListBuckets { .. }
        | PeerRequest::Describe
        | PeerRequest::Hello { .. }
        | PeerRequest::Join { .. }
        | PeerRequest::ShardMembers(_)
        | PeerRequest::ChangeMember { .. } => {
            return None;
        }
    };
    Some(response)
}

/// Takes a snapshot piece; with the last, installs the snapshot and answers what that did.
async fn install_piece(
    group: &ShardGroup,
    inbox: &SnapshotInbox,
    shard: u16,
    transfer: u64,
    offset: u64,
    bytes: Bytes,
    last: Option<(VoteOf<ShardRaft>, SnapshotMetaOf<ShardRaft>)>,
) -> Result<Option<SnapshotResponse<ShardRaft>>, String> {
    inbox.receive(shard, transfer, offset, bytes).await?;
    let Some((vote, meta)) = last else {
        return Ok(None);
    };
    let snapshot = inbox
        .complete(shard, transfer)
        .await?
        .ok_or_else(|| "the snapshot transfer was replaced meanwhile".to_owned())?;
    let snapshot =
        openraft::type_config::alias::SnapshotOf::<ShardRaft, SnapshotBytes> { meta, snapshot };
    group
        .install_full_snapshot(vote, snapshot)
        .await
        .map(Some)
        .map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};
    use tokio_util::codec::{Decoder, Encoder};

    use std::sync::Arc;

    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;

    use super::{
        PeerClient, PeerCodec, PeerGate, PeerHandler, PeerRequest, PeerResponse, Received,
        SnapshotInbox, Transfer, Unsendable, serve,
    };
    use crate::cluster::identity::Handshake;

    /// Answers every request that it has no such shard.
    struct NoShards;

    impl PeerHandler for NoShards {
        async fn handle(&self, _: PeerRequest) -> PeerResponse {
            PeerResponse::NoSuchShard
        }
    }

    /// A node greets its peers while it opens (nodes forming a cluster together each wait for
    /// the others' hello before they open), and answers their requests once its gate opens.
    #[tokio::test]
    async fn a_node_greets_its_peers_before_its_gate_opens_and_answers_them_after() {
        let directories = [(); 2].map(|()| tempfile::tempdir().unwrap());
        let handshake = |node, directory: &tempfile::TempDir| {
            Arc::new(Handshake::open(directory.path(), node, [1, 2]).unwrap())
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let gate = PeerGate::<NoShards>::new();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            Arc::clone(&gate),
            handshake(1, &directories[0]),
            shutdown.clone(),
        ));
        let client = PeerClient::new(1, address, handshake(2, &directories[1]));
        client
            .connect()
            .await
            .expect("greeted before the gate opens");
        let call = tokio::spawn(async move { client.call(PeerRequest::Describe).await });
        gate.open(Arc::new(NoShards));
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), call)
            .await
            .expect("answered within 10 s of the gate opening")
            .unwrap()
            .expect("answered once the gate opens");
        assert!(matches!(answer, PeerResponse::NoSuchShard));
        shutdown.cancel();
    }

    /// A message whose serialisation fails.
    struct Unserialisable;

    impl serde::Serialize for Unserialisable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("not this one"))
        }
    }

    #[test]
    fn a_message_is_framed_as_its_length_and_its_postcard_and_one_that_fails_leaves_the_rest() {
        let mut codec = PeerCodec::new();
        let mut buffer = BytesMut::new();
        codec.encode((7u64, "first"), &mut buffer).unwrap();
        let error = codec
            .encode((8u64, Unserialisable), &mut buffer)
            .unwrap_err();
        assert!(Unsendable::is(&error), "{error}");
        assert!(!Unsendable::is(&std::io::Error::other("a socket's error")));
        codec.encode((9u64, vec![1u8, 2, 3]), &mut buffer).unwrap();

        let first = postcard::to_stdvec(&(7u64, "first")).unwrap();
        assert_eq!(
            buffer[..4],
            u32::try_from(first.len()).unwrap().to_be_bytes()
        );
        let frame = codec.decode(&mut buffer).unwrap().unwrap();
        assert_eq!(frame[..], first[..]);
        let frame = codec.decode(&mut buffer).unwrap().unwrap();
        assert_eq!(
            postcard::from_bytes::<(u64, Vec<u8>)>(&frame).unwrap(),
            (9, vec![1, 2, 3])
        );
        assert!(codec.decode(&mut buffer).unwrap().is_none());
    }

    /// Every piece of an inbox's transfer, `bytes` at `offset` each.
    async fn take(inbox: &SnapshotInbox, shard: u16, transfer: u64, pieces: &[(u64, &[u8])]) {
        for &(offset, bytes) in pieces {
            inbox
                .receive(shard, transfer, offset, Bytes::copy_from_slice(bytes))
                .await
                .unwrap();
        }
    }

    async fn received(inbox: &SnapshotInbox, shard: u16, transfer: u64) -> Option<Vec<u8>> {
        inbox
            .complete(shard, transfer)
            .await
            .unwrap()
            .map(|bytes| bytes.to_vec())
    }

    #[tokio::test]
    async fn a_snapshot_is_taken_in_order_within_its_limit_in_memory() {
        snapshot_taken_in_order_within_its_limit(|limit| SnapshotInbox::new(limit, None)).await;
    }

    /// The same where pieces are written to a file as they come.
    #[tokio::test]
    async fn a_snapshot_is_taken_in_order_within_its_limit_into_a_file() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().to_owned();
        snapshot_taken_in_order_within_its_limit(|limit| {
            SnapshotInbox::new(limit, Some(path.clone()))
        })
        .await;
        // Files without a name: nothing is left in the directory.
        assert_eq!(std::fs::read_dir(directory.path()).unwrap().count(), 0);
    }

    /// A piece that comes while the one before is still being written is refused, and ends
    /// the transfer: only a sender that does not wait for answers sends it, and the file must
    /// not change once mapped.
    #[tokio::test]
    async fn a_snapshot_piece_is_refused_while_the_one_before_is_written() {
        let directory = tempfile::tempdir().unwrap();
        let inbox = SnapshotInbox::new(100, Some(directory.path().to_owned()));
        let file = tempfile::tempfile_in(directory.path()).unwrap();
        let file = std::sync::Arc::new(tokio::sync::Mutex::new(file));
        let writing = inbox.accept(0, 1, 0, b"abc", Some(file)).unwrap();
        assert!(writing.is_some(), "the first piece is to be written");
        assert!(inbox.accept(0, 1, 3, b"def", None).is_err());
        drop(writing);
        assert_eq!(received(&inbox, 0, 1).await, None, "the transfer ended");
    }

    async fn snapshot_taken_in_order_within_its_limit(inbox_of: impl Fn(u64) -> SnapshotInbox) {
        let inbox = inbox_of(10);
        take(&inbox, 0, 7, &[(0, b"abc"), (3, b"def")]).await;
        assert_eq!(
            received(&inbox, 0, 7).await.as_deref(),
            Some(&b"abcdef"[..])
        );
        assert_eq!(received(&inbox, 0, 7).await, None, "taken once");

        take(&inbox, 0, 8, &[(0, b"abc")]).await;
        let piece = |bytes: &'static [u8]| Bytes::from_static(bytes);
        assert!(inbox.receive(0, 8, 5, piece(b"x")).await.is_err(), "a gap");
        assert!(
            inbox.receive(0, 8, 3, piece(b"d")).await.is_err(),
            "the transfer was dropped"
        );

        take(&inbox, 0, 9, &[(0, b"abcdefgh")]).await;
        assert!(
            inbox.receive(0, 9, 8, piece(b"ijk")).await.is_err(),
            "past the limit"
        );
        assert_eq!(received(&inbox, 0, 9).await, None);

        take(&inbox, 1, 1, &[(0, b"old")]).await;
        take(&inbox, 1, 2, &[(0, b"new")]).await;
        assert!(
            inbox.receive(1, 1, 3, piece(b"!")).await.is_err(),
            "replaced by a newer transfer"
        );
        take(&inbox, 1, 2, &[(3, b"er")]).await;
        let tiny = inbox_of(1 << 20);
        for offset in 0..1000 {
            take(&tiny, 2, 1, &[(offset, b"x")]).await;
        }
        assert_eq!(received(&tiny, 2, 1).await, Some(vec![b'x'; 1000]));
        assert_eq!(received(&inbox, 1, 2).await.as_deref(), Some(&b"newer"[..]));
    }

    /// In memory, tiny pieces join the one before as they come.
    #[tokio::test]
    async fn tiny_snapshot_pieces_in_memory_are_joined_as_they_come() {
        let tiny = SnapshotInbox::new(1 << 20, None);
        for offset in 0..1000 {
            take(&tiny, 2, 1, &[(offset, b"x")]).await;
        }
        match tiny.transfers.lock().get(&2) {
            Some(Transfer {
                pieces: Received::Memory(pieces),
                ..
            }) => assert_eq!(pieces.len(), 1, "tiny pieces are joined as they come"),
            _ => panic!("no transfer in memory under way"),
        }
        assert_eq!(received(&tiny, 2, 1).await, Some(vec![b'x'; 1000]));
    }
}
