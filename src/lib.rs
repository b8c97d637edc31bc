//! kv: a networked key-value store of named buckets, after the KV application of the Elixir
//! "Mix and OTP" guide.
//!
//! # Architecture
//!
//! ```text
//! server → dispatch → shard → registry → bucket
//!             │         │         ↑ supervisor (starts, monitors, restarts)
//!             │         └ wal (the log: journal, records, data directory)
//!             └ cluster: router → (peer) → raft group per shard → registry → bucket
//! protocol, config, change, stats: depend on nothing of ours
//! client, bench: the other end of the wire, on protocol only
//! ```
//!
//! - [`server`]: the listener (accept within the limits, graceful shutdown) and one task per
//!   connection (read, dispatch, wait at the shard's commit barrier, write the replies of one
//!   read together).
//! - `dispatch`: from a parsed request to its encoded reply, through the shard; `INFO` and
//!   `DEBUG` apart.
//! - [`cluster`] (with `--peers`): requests on buckets go to the router, which runs them where
//!   their shard's Raft group is led, here or on a peer; each replica's state machine is a
//!   registry, applied the way recovery replays the log.
//! - [`shard`]: the seam where the cluster plugs in. A [`LocalShard`](shard::LocalShard) owns
//!   the registry and, when durable, its log ([`shard::wal`]): the commit barrier, recovery,
//!   compaction and restarting buckets from disk live there.
//! - [`registry`]: the only writer of name → bucket; monitors every bucket it starts and
//!   forgets a name when its bucket ends; a concurrent read view for lookups.
//! - `bucket`: one table of keys to values, owned by a supervised task.
//! - `supervisor`: the bucket supervisor (temporary children, never revived empty) and the
//!   one-for-all restart of registry and buckets together.
//! - [`change`]: the one vocabulary of changes (create, drop, put, delete) that dispatch
//!   makes, the log encodes and replays, and Raft entries carry; and the
//!   [`ChangeLog`](change::ChangeLog) the registry and buckets record them through, under the
//!   lock that orders them.
//! - [`protocol`]: parsing and encoding of the line protocol and RESP; no I/O.
//! - [`client`]: a RESP client, used by `kv cli` and the tests; [`bench`](mod@bench): the load
//!   generator behind `kv bench`.
//! - [`config`]: every limit and knob, with its default and why; `stats`: the counters of
//!   `INFO`.
//!
//! Dependencies point one way, down the picture: the registry and buckets know the log only
//! as a [`ChangeLog`](change::ChangeLog), and the shard only through the
//! [`registry::DurableState`] trait the registry defines for reading buckets back.

//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = kv::Registry::start(kv::CoreConfig::default());
//! let shopping = registry.create("shopping").await?;
//! shopping.put(b"milk", b"1")?;
//! assert_eq!(shopping.get(b"milk")?.as_deref(), Some(&b"1"[..]));
//! # Ok(())
//! # }
//! ```

pub mod bench;
mod bucket;
pub mod change;
pub mod client;
pub mod cluster;
pub mod config;
mod dispatch;
mod encoding;
pub mod observe;
mod prefetch;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod shard;
mod stats;
mod supervisor;

pub use bucket::{BucketError, BucketFault, BucketHandle, BucketId, BucketName, MemoryBudget};
pub use config::CoreConfig;
pub use registry::{Registry, RegistryError, RegistryView};
