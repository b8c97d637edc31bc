//! The write-ahead log of a local shard: the append-only log, its fsync policy, snapshots,
//! and recovery.
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
//! Dependencies point down: the registry and the tables record their changes through the
//! [`ChangeLog`](crate::change::ChangeLog) that the [`Journal`] implements; this module knows
//! nothing of them. Its errors are its own ([`WalError`], [`LogFailed`]).

mod directory;
mod error;
mod journal;
pub mod record;

use std::collections::{BTreeMap, HashMap};

pub use directory::{DataDir, Recovered};
pub use error::{LogFailed, ReplayError, WalError};
pub use journal::Journal;

use crate::change::Change;

/// Buckets as the files hold them: the one place where changes read back from the files
/// become state again, for restarting a bucket from disk and for compacting a bucket that is
/// down (recovery replays them into the registry instead).
#[derive(Default)]
pub(crate) struct FileState {
    pub(crate) buckets: BTreeMap<Vec<u8>, HashMap<Vec<u8>, Vec<u8>>>,
}

impl FileState {
    /// The state of the buckets `wanted` picks (of all but their entries, with `names_only`)
    /// as the current files say, or (with `before`) as they said when generation `before`
    /// began.
    ///
    /// # Errors
    /// [`WalError::Corrupt`] or I/O errors.
    pub(crate) fn read(
        directory: &DataDir,
        before: Option<u64>,
        names_only: bool,
        wanted: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Self, WalError> {
        let mut state = Self::default();
        directory.read_state(before, &mut |change| {
            if wanted(change.bucket()) {
                state.apply(change, names_only);
            }
        })?;
        Ok(state)
    }

    fn apply(&mut self, change: Change<'_>, names_only: bool) {
        match change {
            Change::Create { bucket } => {
                self.buckets.entry(bucket.to_vec()).or_default();
            }
            Change::Drop { bucket } => {
                self.buckets.remove(bucket);
            }
            Change::Put { .. } | Change::Delete { .. } if names_only => {}
            Change::Put { bucket, key, value } => {
                if let Some(table) = self.buckets.get_mut(bucket) {
                    table.insert(key.to_vec(), value.to_vec());
                }
            }
            Change::Delete { bucket, key } => {
                if let Some(table) = self.buckets.get_mut(bucket) {
                    table.remove(key);
                }
            }
        }
    }
}
