//! kv: a networked key-value store of named buckets, after the KV application of the Elixir
//! "Mix and OTP" guide.
//!
//! # Architecture
//!
//! ```text
//! server → dispatch → durability → registry → bucket → storage
//!                                     ↑ supervisor (starts, monitors, restarts)
//! protocol: pure parsing and encoding, depends on nothing of ours
//! client, bench: the other end of the wire, on protocol only
//! ```
//!
//! - [`server`]: the listener (accept within the limits, graceful shutdown) and one task per
//!   connection (read, dispatch, write the replies of one read together).
//! - [`dispatch`]: the one bridge from a parsed request to the registry or a bucket.
//! - [`protocol`]: parsing and encoding of the line protocol and RESP; no I/O.
//! - [`client`]: a RESP client, used by `kv cli` and the tests.
//! - [`bucket`]: one table of keys to values, owned by a supervised task.
//! - [`registry`]: the only writer of name → bucket; monitors every bucket it starts and
//!   forgets a name when its bucket ends; a concurrent read view for lookups.
//! - [`supervisor`]: the bucket supervisor (temporary children, never revived empty) and the
//!   one-for-all restart of registry and buckets together.
//! - [`durability`]: a registry recovered from a data directory, compaction, and restarting
//!   failed buckets from disk.
//! - [`storage`]: the append-only log: checksummed records, the journal (group commit, fsync
//!   policy), the data directory (lock, snapshots, recovery).
//! - [`config`]: every limit, with its default and why.
//! - [`bench`](mod@bench): the load generator behind `kv bench`.
//!
//! Dependencies point one way, down the picture: the registry reaches back up to the
//! durability layer only through the [`registry::DurableState`] trait it defines. `protocol`
//! and `config` use nothing of ours; `client` and `bench` use only `protocol`.
//!
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
pub mod bucket;
pub mod client;
pub mod config;
pub mod dispatch;
pub mod durability;
mod prefetch;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod storage;
pub mod supervisor;

pub use bucket::{BucketError, BucketFault, BucketHandle, BucketId, BucketName};
pub use config::CoreConfig;
pub use registry::{Registry, RegistryError, RegistryView};
