//! The one module that knows openraft: the type configuration of a shard's Raft group, what
//! its entries carry, and its storage (a durable log per shard, a registry per shard as the
//! state machine). openraft is pinned at one exact alpha (`Cargo.toml`): its API changes
//! between alphas, and its wire encoding is not stable across them.

mod applied;
mod log_memory;
mod log_store;
mod snapshot_records;
mod state_machine;

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use log_memory::LogMemory;
pub use log_store::ShardLog;
pub use snapshot_records::{map as map_snapshot_file, release};
pub use state_machine::{ShardStateMachine, SnapshotBytes};

use crate::change::Change;
use crate::shard::wal::record;

openraft::declare_raft_types!(
    /// The types of a shard's Raft group.
    pub ShardRaft:
        D = ShardCommand,
        R = Vec<Outcome>,
        Node = openraft::BasicNode,
);

/// What a Raft entry of a shard carries: changes to the shard's buckets, made in order, in the
/// encoding the single-node log uses (one vocabulary of changes, logged and replicated alike).
/// A connection's consecutive writes to a shard travel as one entry: Raft's costs per entry
/// (appending it on every replica, replicating it, answering it) are then shared by the batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCommand {
    /// `Bytes`, not `Vec<u8>`: serde writes it as one byte string rather than element by
    /// element, and openraft's clones of an entry (one per replication stream) share it.
    changes: Bytes,
}

/// The most bytes of changes one entry gathers; a single larger change travels alone. Keeps an
/// entry, and the replication messages carrying entries, to a size the peer frames hold.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

impl ShardCommand {
    /// The command that makes `change`.
    #[must_use]
    pub fn new(change: &Change<'_>) -> Self {
        Self::batch(std::slice::from_ref(change))
    }

    /// The command that makes `changes`, in order.
    #[must_use]
    pub fn batch(changes: &[Change<'_>]) -> Self {
        // Sized once: grown by doubling, a batch of sixteen writes reallocated about six times.
        let mut bytes = Vec::with_capacity(changes.iter().map(record::encoded_bound).sum());
        for change in changes {
            record::encode_change(change, &mut bytes);
        }
        Self {
            changes: bytes.into(),
        }
    }

    /// The bytes the changes take, encoded.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        self.changes.len()
    }

    /// The changes, in order; a `None` where the bytes stop being changes (a damaged or
    /// foreign entry), after which there are no more.
    pub fn changes(&self) -> impl Iterator<Item = Option<Change<'_>>> {
        let mut rest = &self.changes[..];
        let mut damaged = false;
        std::iter::from_fn(move || {
            if rest.is_empty() || damaged {
                return None;
            }
            match record::decode_change_prefix(rest) {
                Some((change, taken)) => {
                    rest = &rest[taken..];
                    Some(Some(change))
                }
                None => {
                    damaged = true;
                    Some(None)
                }
            }
        })
    }
}

impl fmt::Display for ShardCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, change) in self.changes().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            match change {
                Some(change) => write!(f, "{change:?}")?,
                None => f.write_str("(not a change)")?,
            }
        }
        Ok(())
    }
}

/// What applying a change did, the same on every replica: what the client is answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done (a `CREATE` of an existing bucket included).
    Done,
    /// `DROP` of a bucket that was not there.
    NothingToDrop,
    /// `PUT` or `DELETE` in a bucket that does not exist.
    NoSuchBucket,
    /// The entry's bytes held no change kv knows here.
    NotAChange,
}
