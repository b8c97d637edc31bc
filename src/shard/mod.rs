//! The seam between dispatch and the state: a shard owns a set of buckets and decides when a
//! reply may leave. A [`LocalShard`] holds them here, with its own log when durable; a
//! replicated shard (the cluster) will be a second kind behind the same calls.
//!
//! What dispatch asks of a shard: its registry (to find buckets and create or drop them), the
//! commit barrier a connection's replies wait at ([`LocalShard::commit`]), and its state for
//! `INFO`. Recovery, compaction, restarting buckets from disk and the reaction to a failed log
//! are the shard's own business.

mod local;
pub mod wal;

pub(crate) use local::export;
pub use local::{LocalShard, LogStatus, RecoveryReport};
