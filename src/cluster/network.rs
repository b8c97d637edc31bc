//! openraft's view of the peers: a shard's Raft group reaches the same shard on other nodes
//! through the node's shared peer connections.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use openraft::EntryPayload;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotOf, VoteOf};

use super::identity::Handshake;
use super::peer::{PeerClient, PeerError, PeerRequest, PeerResponse};
use super::placement::NodeId;
use super::raft::{ShardRaft, SnapshotBytes, release};

/// Every peer of this node, by id: the members of the layout as this node last read it.
pub type Peers = Arc<PeerBook>;

/// The connections to the other members, kept in step with the layout.
pub struct PeerBook {
    node: NodeId,
    handshake: Arc<Handshake>,
    clients: parking_lot::RwLock<HashMap<NodeId, Arc<PeerClient>>>,
}

impl PeerBook {
    /// No peers yet, for node `node` introducing itself with `handshake`.
    #[must_use]
    pub fn new(node: NodeId, handshake: Arc<Handshake>) -> Self {
        Self {
            node,
            handshake,
            clients: parking_lot::RwLock::default(),
        }
    }

    /// The connection to `peer`, if it is a member.
    #[must_use]
    pub fn get(&self, peer: NodeId) -> Option<Arc<PeerClient>> {
        self.clients.read().get(&peer).cloned()
    }

    /// Every peer's connection.
    #[must_use]
    pub fn clients(&self) -> Vec<Arc<PeerClient>> {
        self.clients.read().values().cloned().collect()
    }

    /// Makes the book hold `members` (this node aside): a connection for each one new or at a
    /// new address, none for one no longer there.
    pub fn set(&self, members: impl IntoIterator<Item = (NodeId, SocketAddr)>) {
        let members: HashMap<NodeId, SocketAddr> = members
            .into_iter()
            .filter(|(id, _)| *id != self.node)
            .collect();
        let mut clients = self.clients.write();
        clients.retain(|id, client| members.get(id) == Some(&client.address()));
        for (id, address) in members {
            clients.entry(id).or_insert_with(|| {
                Arc::new(PeerClient::new(id, address, Arc::clone(&self.handshake)))
            });
        }
    }
}

/// The network of one shard's Raft group.
pub struct ShardNetwork {
    shard: u16,
    peers: Peers,
    snapshot_piece: usize,
}

impl ShardNetwork {
    /// The network of shard `shard`, over `peers`, sending snapshots in pieces of
    /// `snapshot_piece` bytes (each its own frame).
    #[must_use]
    pub fn new(shard: u16, peers: Peers, snapshot_piece: usize) -> Self {
        Self {
            shard,
            peers,
            snapshot_piece: snapshot_piece.max(1),
        }
    }
}

/// One shard's link to one peer, looked up in the peer book at each call (a member that
/// joined after the link was made is reached as soon as the layout names it).
pub struct ShardPeer {
    shard: u16,
    target: NodeId,
    peers: Peers,
    snapshot_piece: usize,
}

impl RaftNetworkFactory<ShardRaft> for ShardNetwork {
    type Network = ShardPeer;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> ShardPeer {
        ShardPeer {
            shard: self.shard,
            target,
            peers: Arc::clone(&self.peers),
            snapshot_piece: self.snapshot_piece,
        }
    }
}

fn unreachable(error: &PeerError) -> RPCError<ShardRaft> {
    RPCError::Unreachable(Unreachable::new(error))
}

impl ShardPeer {
    /// Sends `request` and waits up to `within` for the answer.
    async fn call(
        &self,
        request: PeerRequest,
        within: Duration,
    ) -> Result<PeerResponse, RPCError<ShardRaft>> {
        let Some(client) = self.peers.get(self.target) else {
            return Err(RPCError::Unreachable(Unreachable::from_string(
                "not a member this node knows",
            )));
        };
        match tokio::time::timeout(within, client.call(request)).await {
            Ok(Ok(PeerResponse::NoSuchShard)) => Err(RPCError::Unreachable(
                Unreachable::from_string("the peer holds no replica of this shard"),
            )),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(unreachable(&error)),
            Err(_) => Err(RPCError::Network(NetworkError::from_string(
                "no answer in time",
            ))),
        }
    }
}

impl RaftNetworkV2<ShardRaft> for ShardPeer {
    type SnapshotData = SnapshotBytes;

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<ShardRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<ShardRaft>, RPCError<ShardRaft>> {
        let cut_after = keep_within_a_frame(&mut rpc.entries);
        match self
            .call(
                PeerRequest::AppendEntries(self.shard, rpc),
                option.soft_ttl(),
            )
            .await?
        {
            // Only the first of the entries went: openraft sends the rest next.
            PeerResponse::AppendEntries(Ok(AppendEntriesResponse::Success))
                if cut_after.is_some() =>
            {
                Ok(AppendEntriesResponse::PartialSuccess(cut_after))
            }
            PeerResponse::AppendEntries(Ok(response)) => Ok(response),
            PeerResponse::AppendEntries(Err(error)) => {
                Err(RPCError::Network(NetworkError::new(&error)))
            }
            _ => Err(RPCError::Network(NetworkError::from_string(
                "an answer to another request",
            ))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<ShardRaft>,
        option: RPCOption,
    ) -> Result<VoteResponse<ShardRaft>, RPCError<ShardRaft>> {
        match self
            .call(PeerRequest::Vote(self.shard, rpc), option.soft_ttl())
            .await?
        {
            PeerResponse::Vote(Ok(response)) => Ok(response),
            PeerResponse::Vote(Err(error)) => Err(RPCError::Network(NetworkError::new(&error))),
            _ => Err(RPCError::Network(NetworkError::from_string(
                "an answer to another request",
            ))),
        }
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<ShardRaft>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<ShardRaft>, RPCError<ShardRaft>> {
        match self
            .call(
                PeerRequest::TransferLeader(self.shard, rpc),
                option.soft_ttl(),
            )
            .await?
        {
            PeerResponse::TransferLeader(Ok(response)) => Ok(response),
            PeerResponse::TransferLeader(Err(error)) => {
                Err(RPCError::Network(NetworkError::from_string(error)))
            }
            _ => Err(RPCError::Network(NetworkError::from_string(
                "an answer to another request",
            ))),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<ShardRaft>,
        snapshot: SnapshotOf<ShardRaft, SnapshotBytes>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<ShardRaft>, StreamingError<ShardRaft>> {
        let transfer = fastrand::u64(..);
        let sending = Sending(snapshot.snapshot);
        let bytes = &sending.0;
        // The last piece is answered once the snapshot is installed, which takes time by its
        // size (a gigabyte: seconds); an answer too late for the wait means sending it all
        // again.
        let install_within = option.soft_ttl()
            + Duration::from_secs_f64(bytes.len() as f64 / INSTALLED_BYTES_PER_SECOND);
        let mut offset = 0;
        loop {
            let end = bytes.len().min(offset + self.snapshot_piece);
            let last = end == bytes.len();
            let piece = PeerRequest::SnapshotPiece {
                shard: self.shard,
                transfer,
                offset: offset as u64,
                bytes: bytes.slice(offset..end),
                last: last.then(|| (vote, snapshot.meta.clone())),
            };
            let within = if last {
                install_within
            } else {
                option.soft_ttl()
            };
            match self.call(piece, within).await {
                Ok(PeerResponse::Snapshot(Ok(Some(response)))) if last => return Ok(response),
                Ok(PeerResponse::Snapshot(Ok(None))) if !last => offset = end,
                Ok(PeerResponse::Snapshot(Err(error))) => {
                    return Err(StreamingError::Network(NetworkError::from_string(error)));
                }
                Ok(_) => {
                    return Err(StreamingError::Network(NetworkError::from_string(
                        "an answer to another request",
                    )));
                }
                Err(RPCError::Unreachable(error)) => {
                    return Err(StreamingError::Unreachable(error));
                }
                Err(error) => return Err(StreamingError::Network(NetworkError::new(&error))),
            }
        }
    }
}

/// A snapshot's records being sent, let go of on a blocking thread however sending ends: they
/// may be the last hold on a snapshot file replaced since (see `release`).
struct Sending(SnapshotBytes);

impl Drop for Sending {
    fn drop(&mut self) {
        release(std::mem::take(&mut self.0));
    }
}

/// The slowest a replica is expected to install a snapshot, for how long the last piece's
/// answer is waited for: far below what one here installs (a gigabyte in about two seconds
/// on this two-core machine, with two other nodes on it).
const INSTALLED_BYTES_PER_SECOND: f64 = 16.0 * (1 << 20) as f64;

/// The most bytes of changes one append message carries: openraft hands over up to
/// `max_payload_entries` entries whatever their size, and a frame holds at most
/// [`MAX_FRAME`](super::peer::MAX_FRAME).
const MAX_APPEND_BYTES: usize = 64 << 20;

/// Cuts `entries` after those that fit in [`MAX_APPEND_BYTES`] (at least one, which fits a
/// frame alone: a change is at most half a frame); the log id of the last one kept if any were
/// cut.
fn keep_within_a_frame(entries: &mut Vec<EntryOf<ShardRaft>>) -> Option<LogIdOf<ShardRaft>> {
    let mut bytes = 0;
    let keep = entries
        .iter()
        .position(|entry| {
            bytes += match &entry.payload {
                EntryPayload::Normal(command) => command.encoded_len(),
                _ => 0,
            };
            bytes > MAX_APPEND_BYTES
        })
        .map_or(entries.len(), |over| over.max(1));
    if keep == entries.len() {
        return None;
    }
    entries.truncate(keep);
    entries.last().map(|entry| entry.log_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Change;
    use crate::cluster::raft::ShardCommand;

    fn entries(sizes: &[usize]) -> Vec<EntryOf<ShardRaft>> {
        sizes
            .iter()
            .zip(1..)
            .map(|(&size, index)| {
                let value = vec![b'v'; size];
                openraft::Entry {
                    log_id: openraft::testing::log_id::<ShardRaft>(1, 1, index),
                    payload: EntryPayload::Normal(ShardCommand::new(&Change::Put {
                        bucket: b"b",
                        key: b"k",
                        value: &value,
                    })),
                }
            })
            .collect()
    }

    #[test]
    fn an_append_carries_entries_up_to_its_byte_budget_and_always_one() {
        let mut three = entries(&[30 << 20, 30 << 20, 30 << 20]);
        let cut = keep_within_a_frame(&mut three);
        assert_eq!(three.len(), 2);
        assert_eq!(cut, Some(three[1].log_id));

        let mut one_large = entries(&[100 << 20, 1]);
        assert_eq!(
            keep_within_a_frame(&mut one_large),
            Some(one_large[0].log_id)
        );
        assert_eq!(one_large.len(), 1);

        let mut small = entries(&[10, 10, 10]);
        assert_eq!(keep_within_a_frame(&mut small), None);
        assert_eq!(small.len(), 3);
    }
}
