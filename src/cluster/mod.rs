//! The cluster: which shard a bucket belongs to, and (to come) the shards replicated over
//! several nodes with openraft, any node answering any request. Without `--peers`, nothing
//! here is on a request's path.

pub mod slot;
