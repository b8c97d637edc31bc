//! Durability: the append-only log, its fsync policy, snapshots, and recovery.
//!
//! # A log written by hand, not an embedded engine
//!
//! kv keeps its data in memory and needs the disk only to get it back after a restart. What
//! that asks of storage is an ordered stream of small changes, written with as few `write`
//! and `fsync` calls as possible (group commit across connections), with exact control over
//! when a reply may leave relative to them, and read back once at start. That is a log, as
//! Redis's AOF is. An embedded engine (redb, fjall) would keep a second, indexed copy of the
//! data on disk that kv never reads while running, pay for B-tree or LSM maintenance on every
//! write, and commit on its own schedule, which would have to be batched around to share
//! syncs. The log here is a few hundred lines: framing with checksums ([`record`]), the
//! journal that writes and syncs it ([`journal`]), and the directory that holds it, with
//! snapshots for compaction ([`directory`]).
//!
//! Dependencies point down: the registry and the tables append to the [`Journal`]; this
//! module knows nothing of them.

pub mod directory;
pub mod journal;
pub mod record;

pub use directory::{DataDir, Recovered, StorageError};
pub use journal::{FsyncPolicy, Journal, JournalError};
pub use record::Record;
