//! The cluster: which shard a bucket belongs to and which nodes hold it (`slot`,
//! `placement`, and the `layout` a metadata group keeps; `membership` changes it as nodes join
//! and leave), each shard a Raft group replicated over those nodes (`raft`, `node`), the
//! nodes talking over one connection per pair (`peer`, `network`), and any node answering any
//! request by running it where its shard is led (`router`). `docs/cluster.md` has the design
//! and its guarantees. Without `--peers`, nothing here is on a request's path.

pub mod identity;
pub mod layout;
pub mod membership;
pub mod network;
pub mod node;
pub mod peer;
pub mod placement;
pub mod raft;
pub mod router;
pub mod slot;
