//! The cluster: which shard a bucket belongs to and which nodes hold it; to come, the shards
//! replicated over those nodes with openraft, any node answering any request (the plan is
//! `docs/cluster.md`). Without `--peers`, nothing here is on a request's path.

pub mod network;
pub mod node;
pub mod peer;
pub mod placement;
pub mod raft;
pub mod router;
pub mod slot;
