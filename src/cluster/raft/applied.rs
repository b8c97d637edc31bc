//! What a replica restarts a crashed bucket from: its latest snapshot and the entries of its
//! log it has applied since. Every replica applied the same entries, so a bucket that crashes
//! on one node (the guide's supervision: the registry restarts it) comes back exactly as it
//! was, and the replicas never diverge.
//!
//! While a bucket is restarting, applying the next change to it waits (see
//! `state_machine::apply_change`), so what is read back here is all it had.

use std::collections::HashMap;
use std::sync::Arc;

use openraft::EntryPayload;
use parking_lot::Mutex;

use super::log_store::ShardLog;
use super::state_machine::{SnapshotRecords, read_snapshot_file};
use crate::bucket::BucketName;
use crate::change::Change;
use crate::registry::{DurableState, Entries, ReadBackError};
use crate::shard::wal::record::{ScanEnd, scan};

/// The latest snapshot and how far the state machine has applied, shared with it.
#[derive(Clone)]
pub struct Applied {
    inner: Arc<Mutex<Progress>>,
    log: ShardLog,
}

#[derive(Default)]
struct Progress {
    /// The index of the last entry the latest snapshot holds, and its records.
    snapshot: Option<(u64, SnapshotRecords)>,
    /// The index of the last entry applied (its change made).
    through: Option<u64>,
}

impl Applied {
    /// Nothing applied yet, over `log`.
    pub fn new(log: ShardLog) -> Self {
        Self {
            inner: Arc::default(),
            log,
        }
    }

    /// A snapshot holding every entry through `index` now stands for them.
    pub fn snapshot_taken(&self, index: Option<u64>, records: SnapshotRecords) {
        let mut progress = self.inner.lock();
        progress.snapshot = index.map(|index| (index, records));
        progress.through = progress.through.max(index);
    }

    /// The entry at `index` has been applied.
    pub fn applied(&self, index: u64) {
        self.inner.lock().through = Some(index);
    }

    /// Every bucket as the snapshot and the applied entries after it leave it, or only `only`.
    fn replay(&self, only: Option<&[u8]>) -> Result<HashMap<Vec<u8>, Bucket>, ReadBackError> {
        let (snapshot, through) = {
            let progress = self.inner.lock();
            (progress.snapshot.clone(), progress.through)
        };
        let snapshot = match snapshot {
            None => None,
            Some((index, SnapshotRecords::Memory(records))) => Some((index, records)),
            // The file holds this snapshot or a newer one: the entries after its own index
            // follow it.
            Some((_, SnapshotRecords::File(path))) => match read_snapshot_file(&path)? {
                Some((meta, records)) => meta.last_log_id.map(|id| (id.index, records)),
                None => return Err("the shard's snapshot file is gone".into()),
            },
        };
        let mut buckets = HashMap::new();
        let mut replay = |change: Change<'_>| {
            if only.is_none_or(|only| only == change.bucket()) {
                apply(&mut buckets, &change);
            }
        };
        let from = match &snapshot {
            Some((index, records)) => {
                let end = scan(records, |change, _| {
                    replay(change);
                    Ok::<(), ()>(())
                })
                .unwrap_or(ScanEnd::Clean);
                if end != ScanEnd::Clean {
                    return Err(format!("the shard's snapshot does not read whole: {end:?}").into());
                }
                index + 1
            }
            None => 0,
        };
        let Some(through) = through.filter(|&through| through >= from) else {
            return Ok(buckets);
        };
        let entries = self.log.entries_blocking(from..=through)?;
        let expected = through - from + 1;
        if entries.len() as u64 != expected
            || entries
                .first()
                .is_some_and(|entry| entry.log_id.index != from)
        {
            return Err(format!(
                "the shard's log lacks applied entries {from}..={through} (has {})",
                entries.len()
            )
            .into());
        }
        for entry in &entries {
            if let EntryPayload::Normal(command) = &entry.payload {
                command.changes().flatten().for_each(&mut replay);
            }
        }
        Ok(buckets)
    }
}

/// A bucket as a replay leaves it.
type Bucket = HashMap<Vec<u8>, Vec<u8>>;

/// Makes `change` in `buckets`, as applying it to the registry does.
fn apply(buckets: &mut HashMap<Vec<u8>, Bucket>, change: &Change<'_>) {
    match *change {
        Change::Create { bucket } => {
            buckets.entry(bucket.to_vec()).or_default();
        }
        Change::Drop { bucket } => {
            buckets.remove(bucket);
        }
        Change::Put { bucket, key, value } => {
            if let Some(entries) = buckets.get_mut(bucket) {
                entries.insert(key.to_vec(), value.to_vec());
            }
        }
        Change::Delete { bucket, key } => {
            if let Some(entries) = buckets.get_mut(bucket) {
                entries.remove(key);
            }
        }
    }
}

impl DurableState for Applied {
    fn bucket(&self, name: &[u8]) -> Result<Option<Entries>, ReadBackError> {
        Ok(self
            .replay(Some(name))?
            .remove(name)
            .map(|entries| entries.into_iter().collect()))
    }

    fn buckets(&self) -> Result<Vec<(BucketName, Entries)>, ReadBackError> {
        Ok(self
            .replay(None)?
            .into_iter()
            .map(|(name, entries)| (BucketName::from(&name[..]), entries.into_iter().collect()))
            .collect())
    }
}
