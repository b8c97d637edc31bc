//! openraft's view of the peers: a shard's Raft group reaches the same shard on other nodes
//! through the node's shared peer connections.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use openraft::BasicNode;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};

use super::peer::{PeerClient, PeerError, PeerRequest, PeerResponse};
use super::placement::NodeId;
use super::raft::{ShardRaft, SnapshotBytes};

/// Every peer of this node, by id.
pub type Peers = Arc<HashMap<NodeId, Arc<PeerClient>>>;

/// The network of one shard's Raft group.
pub struct ShardNetwork {
    shard: u16,
    peers: Peers,
}

impl ShardNetwork {
    /// The network of shard `shard`, over `peers`.
    #[must_use]
    pub fn new(shard: u16, peers: Peers) -> Self {
        Self { shard, peers }
    }
}

/// One shard's link to one peer.
pub struct ShardPeer {
    shard: u16,
    client: Option<Arc<PeerClient>>,
}

impl RaftNetworkFactory<ShardRaft> for ShardNetwork {
    type Network = ShardPeer;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> ShardPeer {
        ShardPeer {
            shard: self.shard,
            client: self.peers.get(&target).cloned(),
        }
    }
}

fn unreachable(error: &PeerError) -> RPCError<ShardRaft> {
    RPCError::Unreachable(Unreachable::new(error))
}

impl ShardPeer {
    async fn call(
        &self,
        request: PeerRequest,
        option: &RPCOption,
    ) -> Result<PeerResponse, RPCError<ShardRaft>> {
        let Some(client) = &self.client else {
            return Err(RPCError::Unreachable(Unreachable::from_string(
                "not a member this node knows",
            )));
        };
        match tokio::time::timeout(option.soft_ttl(), client.call(request)).await {
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
        rpc: AppendEntriesRequest<ShardRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<ShardRaft>, RPCError<ShardRaft>> {
        match self
            .call(PeerRequest::AppendEntries(self.shard, rpc), &option)
            .await?
        {
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
            .call(PeerRequest::Vote(self.shard, rpc), &option)
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
            .call(PeerRequest::TransferLeader(self.shard, rpc), &option)
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
        let request = PeerRequest::Snapshot(self.shard, vote, snapshot.meta, snapshot.snapshot);
        match self.call(request, &option).await {
            Ok(PeerResponse::Snapshot(Ok(response))) => Ok(response),
            Ok(PeerResponse::Snapshot(Err(error))) => {
                Err(StreamingError::Network(NetworkError::from_string(error)))
            }
            Ok(_) => Err(StreamingError::Network(NetworkError::from_string(
                "an answer to another request",
            ))),
            Err(RPCError::Unreachable(error)) => Err(StreamingError::Unreachable(error)),
            Err(error) => Err(StreamingError::Network(NetworkError::new(&error))),
        }
    }
}
