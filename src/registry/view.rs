//! The concurrent read view of the registry's names: many readers, one writer (the loop).

use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use parking_lot::{RwLock, RwLockReadGuard};
use smallvec::SmallVec;

use crate::bucket::{BucketHandle, BucketId, BucketName};
use crate::encoding::shrunk_capacity;

/// Handles indexed by their own names: a slot is one pointer, and comparing a name reads the
/// bucket's shared block, which the operation that follows needs anyway. With many buckets
/// that saves a cache miss per lookup against a map that keeps a copy of each name.
#[derive(Default)]
struct Names {
    handles: HashTable<BucketHandle>,
    /// Seeded at random, so hostile names cannot be chosen to collide.
    hasher: foldhash::fast::RandomState,
    /// Durable buckets that are not live but not gone either: their data is on disk.
    down: std::collections::HashMap<BucketName, Down>,
    /// The names of `handles` in byte order, so that a page of `BUCKETS` costs the page.
    sorted: std::collections::BTreeSet<BucketName>,
}

/// Why a durable bucket's name has no live bucket, though the bucket is not gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    /// It is being read back from disk: after its own crash, the registry's, or a failure of
    /// the log. Requests get "try again", never "not found".
    Restarting,
    /// It crashed too often within a minute and stays down, its data on disk, until dropped.
    Failed,
}

impl Names {
    fn get(&self, name: &[u8]) -> Option<&BucketHandle> {
        self.handles.find(self.hasher.hash_one(name), |bucket| {
            bucket.name().as_bytes() == name
        })
    }

    fn len(&self) -> usize {
        self.handles.len()
    }

    /// Removes `name` if it still belongs to bucket `id` (marking it restarting, with
    /// `restart`); returns the handle removed.
    fn remove(&mut self, name: &[u8], id: BucketId, restart: bool) -> Option<BucketHandle> {
        let Self {
            handles,
            hasher,
            down,
            sorted,
        } = self;
        let found = handles
            .find_entry(hasher.hash_one(name), |bucket| {
                bucket.name().as_bytes() == name
            })
            .ok()
            .filter(|bucket| bucket.get().id() == id)?;
        let (removed, _) = found.remove();
        sorted.remove(removed.name());
        if restart {
            down.insert(removed.name().clone(), Down::Restarting);
        }
        if let Some(capacity) = shrunk_capacity(handles.len(), handles.capacity()) {
            handles.shrink_to(capacity, |bucket| hasher.hash_one(bucket.name().as_bytes()));
        }
        Some(removed)
    }

    fn down(&self, name: &[u8]) -> Option<Down> {
        if self.down.is_empty() {
            return None;
        }
        self.down.get(name).copied()
    }

    /// Why no live bucket answered for `name`: a bucket still named but stopped has crashed
    /// and its exit is not yet taken in, so a durable one is about to restart.
    fn why_missing(&self, name: &[u8], durable: bool) -> Option<Down> {
        match self.get(name) {
            Some(bucket) if bucket.is_stopped() => durable.then_some(Down::Restarting),
            _ => self.down(name),
        }
    }
}

/// The registry's names under a read lock (see [`RegistryView::read`]).
pub(crate) struct ReadNames<'v> {
    names: RwLockReadGuard<'v, Names>,
}

impl ReadNames<'_> {
    /// Finds the buckets of `(bucket, key)` requests, one per request into `found` (`None`
    /// where no bucket has that name; a bucket found may have stopped), and starts loading into
    /// cache what the requests will read. Two stages, each issuing all its loads before waiting
    /// for any, so that the cache misses of a batch of requests to different buckets overlap
    /// instead of following one another: first the blocks of the buckets (probed by the name's
    /// hash, not compared, which would wait for the block), then, with the blocks arriving,
    /// each key's entry in the candidate whose name matches. `meanwhile` runs between the
    /// stages (the caller's own loads, which then overlap too).
    pub(crate) fn resolve<'s>(
        &'s self,
        requests: &[(&[u8], &[u8])],
        meanwhile: impl FnOnce(),
        found: &mut SmallVec<[Option<&'s BucketHandle>; 16]>,
    ) {
        let Names {
            handles, hasher, ..
        } = &*self.names;
        let mut hashes = SmallVec::<[u64; 16]>::with_capacity(requests.len());
        for &(name, _) in requests {
            let hash = hasher.hash_one(name);
            // Every candidate (its hash shares seven bits with the name's; almost always there
            // is one) is prefetched, none is compared: a comparison would wait for its block.
            handles.find(hash, |candidate| {
                candidate.prefetch();
                false
            });
            hashes.push(hash);
        }
        meanwhile();
        for (&(name, key), hash) in requests.iter().zip(hashes) {
            let bucket = handles.find(hash, |bucket| bucket.name().as_bytes() == name);
            if let Some(bucket) = bucket {
                bucket.prefetch_entries([key]);
            }
            found.push(bucket);
        }
    }

    /// Why no live bucket answered for `name` (see [`RegistryView::why_missing`]).
    pub(crate) fn why_missing(&self, name: &[u8], durable: bool) -> Option<Down> {
        self.names.why_missing(name, durable)
    }
}

/// A read-only view of the registry's names, safe to share with every connection.
///
/// It cannot write: only the registry loop holds the writer. Lookups take a short read lock
/// and never wait for the loop.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kv::RegistryError> {
/// let registry = kv::Registry::start(Default::default());
/// let view = registry.view();
/// assert!(view.lookup(b"shopping").is_none());
/// registry.create("shopping").await?;
/// assert!(view.lookup(b"shopping").is_some());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct RegistryView {
    names: Arc<RwLock<Names>>,
    events: Arc<BucketEvents>,
}

/// What has happened to buckets since the registry started, for metrics.
#[derive(Debug, Default)]
pub struct BucketEvents {
    /// Buckets that ended on their own (crashed or stopped), not dropped.
    pub crashes: std::sync::atomic::AtomicU64,
    /// Durable buckets read back from disk after ending on their own.
    pub restarts: std::sync::atomic::AtomicU64,
    /// How many times each bucket that has restarted did so (forgotten when it is dropped).
    restarted: parking_lot::Mutex<std::collections::HashMap<BucketName, u32>>,
}

impl BucketEvents {
    /// Counts a restart of bucket `name`.
    pub(super) fn restarted(&self, name: &BucketName) {
        self.restarts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.restarted.lock().entry(name.clone()).or_default() += 1;
    }

    /// Forgets the restarts of a dropped bucket.
    pub(super) fn forget(&self, name: &BucketName) {
        self.restarted.lock().remove(name);
    }

    /// How many times each bucket that has restarted did so.
    #[must_use]
    pub fn restarts_by_bucket(&self) -> std::collections::HashMap<BucketName, u32> {
        self.restarted.lock().clone()
    }
}

impl RegistryView {
    /// The live bucket called `name`, if there is one. A bucket that has ended is never
    /// returned, even before the registry has processed its exit.
    #[must_use]
    pub fn lookup(&self, name: &[u8]) -> Option<BucketHandle> {
        self.names
            .read()
            .get(name)
            .filter(|bucket| !bucket.is_stopped())
            .cloned()
    }

    /// The names, locked for reading until the guard is dropped: for resolving and running
    /// a batch of requests under one lock. Nothing that locks the view again may run while
    /// it is held (with a writer waiting, that second lock would wait for ever).
    pub(crate) fn read(&self) -> ReadNames<'_> {
        ReadNames {
            names: self.names.read(),
        }
    }

    /// Whether `name` is a durable bucket that crashed too often and stays down.
    #[must_use]
    pub fn is_failed(&self, name: &[u8]) -> bool {
        self.names.read().down(name) == Some(Down::Failed)
    }

    /// Why no live bucket answers for `name` though it is not gone (`None`: it is gone, or
    /// live). `durable` says whether a crashed bucket will be restarted from disk.
    #[must_use]
    pub fn why_missing(&self, name: &[u8], durable: bool) -> Option<Down> {
        self.names.read().why_missing(name, durable)
    }

    /// How many names the registry holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.names.read().len()
    }

    /// Whether the registry holds no names.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One page of bucket names: up to `limit` names greater than `after`, in byte order. It
    /// costs the page, whatever the number of buckets.
    #[must_use]
    pub fn names(&self, after: Option<&[u8]>, limit: usize) -> Vec<BucketName> {
        use std::ops::Bound;
        let names = self.names.read();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        names
            .sorted
            .range::<[u8], _>((from, Bound::Unbounded))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Every live bucket (a copy of the list, for walking all of them, as a snapshot does).
    #[must_use]
    pub fn buckets(&self) -> Vec<BucketHandle> {
        self.names
            .read()
            .handles
            .iter()
            .filter(|bucket| !bucket.is_stopped())
            .cloned()
            .collect()
    }

    /// The name of every bucket the registry holds: live, ended and not yet taken in, and
    /// down (restarting or failed). What a snapshot walks: a bucket that is restarting has its
    /// data all the same.
    #[must_use]
    pub fn every_name(&self) -> Vec<BucketName> {
        let mut every: Vec<BucketName> = {
            let names = self.names.read();
            names
                .handles
                .iter()
                .map(|bucket| bucket.name().clone())
                .chain(names.down.keys().cloned())
                .collect()
        };
        // A restarted bucket may be named in both for a moment.
        every.sort_unstable();
        every.dedup();
        every
    }

    /// The writing half, for the registry loop only.
    pub(super) fn writer(&self) -> ViewWriter {
        ViewWriter {
            names: Arc::clone(&self.names),
            events: Arc::clone(&self.events),
        }
    }

    /// The durable buckets that are down (restarting, or failed), with why.
    #[must_use]
    pub fn down_buckets(&self) -> Vec<(BucketName, Down)> {
        self.names
            .read()
            .down
            .iter()
            .map(|(name, down)| (name.clone(), *down))
            .collect()
    }

    /// What has happened to buckets since the registry started.
    #[must_use]
    pub fn events(&self) -> &BucketEvents {
        &self.events
    }
}

/// The writing half of the view. Only the registry loop (and its supervisor, when the loop has
/// died) holds one.
pub(super) struct ViewWriter {
    names: Arc<RwLock<Names>>,
    events: Arc<BucketEvents>,
}

impl ViewWriter {
    /// Where bucket crashes and restarts are counted.
    pub(super) fn events(&self) -> &BucketEvents {
        &self.events
    }

    pub(super) fn get(&self, name: &[u8]) -> Option<BucketHandle> {
        self.names.read().get(name).cloned()
    }

    pub(super) fn len(&self) -> usize {
        self.names.read().len()
    }

    /// Adds `bucket`, replacing any entry of the same name.
    pub(super) fn insert(&self, bucket: BucketHandle) {
        let mut names = self.names.write();
        let Names {
            handles,
            hasher,
            sorted,
            ..
        } = &mut *names;
        let hash = hasher.hash_one(bucket.name().as_bytes());
        let found = handles.find_entry(hash, |existing| existing.name() == bucket.name());
        match found {
            Ok(mut existing) => *existing.get_mut() = bucket,
            Err(absent) => {
                sorted.insert(bucket.name().clone());
                let table = absent.into_table();
                table.insert_unique(hash, bucket, |existing| {
                    hasher.hash_one(existing.name().as_bytes())
                });
            }
        }
    }

    /// Removes `name` if it still belongs to bucket `id`; returns the handle removed.
    pub(super) fn remove(&self, name: &[u8], id: BucketId) -> Option<BucketHandle> {
        self.names.write().remove(name, id, false)
    }

    pub(super) fn down(&self, name: &[u8]) -> Option<Down> {
        self.names.read().down(name)
    }

    /// Marks `name` as down for `reason`, or (`None`) clears the mark.
    pub(super) fn set_down(&self, name: &BucketName, reason: Option<Down>) {
        let mut names = self.names.write();
        match reason {
            Some(reason) => {
                names.down.insert(name.clone(), reason);
            }
            None => {
                names.down.remove(name);
            }
        }
        if let Some(capacity) = shrunk_capacity(names.down.len(), names.down.capacity()) {
            names.down.shrink_to(capacity);
        }
    }

    /// Every name marked down as restarting.
    pub(super) fn restarting(&self) -> Vec<BucketName> {
        let names = self.names.read();
        names
            .down
            .iter()
            .filter(|(_, reason)| **reason == Down::Restarting)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Removes `name` if it still belongs to bucket `id`, and marks it restarting in the same
    /// step, so that no lookup in between finds neither; returns the handle removed.
    pub(super) fn remove_to_restart(&self, name: &[u8], id: BucketId) -> Option<BucketHandle> {
        self.names.write().remove(name, id, true)
    }

    /// Closes every bucket and takes every name out: the registry that owned them has died, or
    /// (durable) their tables may hold changes the log does not. With `restart`, each name is
    /// marked restarting in the same step, and crashed durable buckets are restarting already.
    pub(super) fn close_all(&self, restart: bool) {
        let handles = {
            let mut names = self.names.write();
            let handles = std::mem::take(&mut names.handles);
            names.sorted.clear();
            if restart {
                for bucket in &handles {
                    names.down.insert(bucket.name().clone(), Down::Restarting);
                }
            } else {
                names.down.clear();
            }
            handles
        };
        for bucket in &handles {
            bucket.close();
        }
    }
}
