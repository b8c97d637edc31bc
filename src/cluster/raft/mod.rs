//! The one module that knows openraft: the type configuration of a shard's Raft group, what
//! its entries carry, and its storage (a durable log per shard, a registry per shard as the
//! state machine). openraft is pinned at one exact alpha (`Cargo.toml`): its API changes
//! between alphas, and its wire encoding is not stable across them.

mod applied;
mod log_store;
mod state_machine;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use log_store::ShardLog;
pub use state_machine::{ShardStateMachine, SnapshotBytes};

use crate::change::Change;
use crate::shard::wal::record;

openraft::declare_raft_types!(
    /// The types of a shard's Raft group.
    pub ShardRaft:
        D = ShardCommand,
        R = Outcome,
        Node = openraft::BasicNode,
);

/// What a Raft entry of a shard carries: one change, in the encoding the single-node log uses
/// (one vocabulary of changes, logged and replicated alike).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCommand {
    change: Vec<u8>,
}

impl ShardCommand {
    /// The command that makes `change`.
    #[must_use]
    pub fn new(change: &Change<'_>) -> Self {
        let mut bytes = Vec::new();
        record::encode_change(change, &mut bytes);
        Self { change: bytes }
    }

    /// The change; `None` if the bytes are not one (a damaged or foreign entry).
    #[must_use]
    pub fn change(&self) -> Option<Change<'_>> {
        record::decode_change(&self.change)
    }
}

impl fmt::Display for ShardCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.change() {
            Some(change) => write!(f, "{change:?}"),
            None => f.write_str("(not a change)"),
        }
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
    /// The entry held no change kv knows.
    NotAChange,
}
