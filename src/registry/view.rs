//! The concurrent read view of the registry's names: many readers, one writer (the loop).

use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use parking_lot::{RwLock, RwLockReadGuard};
use smallvec::SmallVec;

use crate::bucket::{BucketHandle, BucketId, BucketName};

/// Handles indexed by their own names: a slot is one pointer, and comparing a name reads the
/// bucket's shared block, which the operation that follows needs anyway. With many buckets
/// that saves a cache miss per lookup against a map that keeps a copy of each name.
#[derive(Default)]
struct Names {
    handles: HashTable<BucketHandle>,
    /// Seeded at random, so hostile names cannot be chosen to collide.
    hasher: foldhash::fast::RandomState,
    /// Durable buckets that crashed too often: down, with their data on disk, until dropped.
    failed: std::collections::HashSet<BucketName>,
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

    fn is_failed(&self, name: &[u8]) -> bool {
        !self.failed.is_empty() && self.failed.contains(name)
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

    /// Whether `name` is a durable bucket that crashed too often and stays down.
    pub(crate) fn is_failed(&self, name: &[u8]) -> bool {
        self.names.is_failed(name)
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
        self.names.read().is_failed(name)
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

    /// One page of bucket names: up to `limit` names greater than `after`, in byte order.
    #[must_use]
    pub fn names(&self, after: Option<&[u8]>, limit: usize) -> Vec<BucketName> {
        let names = self.names.read();
        let mut page: Vec<&BucketName> = names
            .handles
            .iter()
            .map(BucketHandle::name)
            .filter(|name| after.is_none_or(|after| name.as_bytes() > after))
            .collect();
        let limit = limit.min(page.len());
        if limit < page.len() {
            page.select_nth_unstable(limit);
            page.truncate(limit);
        }
        page.sort_unstable();
        page.into_iter().cloned().collect()
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

    /// The writing half, for the registry loop only.
    pub(super) fn writer(&self) -> ViewWriter {
        ViewWriter {
            names: Arc::clone(&self.names),
        }
    }
}

/// The writing half of the view. Only the registry loop (and its supervisor, when the loop has
/// died) holds one.
pub(super) struct ViewWriter {
    names: Arc<RwLock<Names>>,
}

impl ViewWriter {
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
            handles, hasher, ..
        } = &mut *names;
        let hash = hasher.hash_one(bucket.name().as_bytes());
        let found = handles.find_entry(hash, |existing| existing.name() == bucket.name());
        match found {
            Ok(mut existing) => *existing.get_mut() = bucket,
            Err(absent) => {
                let table = absent.into_table();
                table.insert_unique(hash, bucket, |existing| {
                    hasher.hash_one(existing.name().as_bytes())
                });
            }
        }
    }

    /// Removes `name` if it still belongs to bucket `id`; returns the handle removed.
    pub(super) fn remove(&self, name: &[u8], id: BucketId) -> Option<BucketHandle> {
        let mut names = self.names.write();
        let Names {
            handles, hasher, ..
        } = &mut *names;
        let found = handles
            .find_entry(hasher.hash_one(name), |bucket| {
                bucket.name().as_bytes() == name
            })
            .ok()
            .filter(|bucket| bucket.get().id() == id)?;
        let (removed, _) = found.remove();
        if handles.capacity() > 64 && handles.len() * 4 < handles.capacity() {
            handles.shrink_to(handles.len() * 2, |bucket| {
                hasher.hash_one(bucket.name().as_bytes())
            });
        }
        Some(removed)
    }

    pub(super) fn is_failed(&self, name: &[u8]) -> bool {
        self.names.read().failed.contains(name)
    }

    /// Marks `name` as failed, or clears the mark.
    pub(super) fn set_failed(&self, name: &BucketName, failed: bool) {
        let mut names = self.names.write();
        if failed {
            names.failed.insert(name.clone());
        } else {
            names.failed.remove(name);
        }
    }

    /// Closes every bucket and forgets every name: the registry that owned them has died.
    pub(super) fn close_all(&self) {
        let names = std::mem::take(&mut *self.names.write());
        for bucket in &names.handles {
            bucket.close();
        }
    }
}
