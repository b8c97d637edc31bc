//! The concurrent read view of the registry's names: many readers, one writer (the loop).

use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use parking_lot::RwLock;
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
        self.with_bucket(name, BucketHandle::clone)
    }

    /// Runs `operation` on the live bucket called `name`, if there is one, under the view's
    /// read lock: no reference count is taken, which among many buckets saves a locked write
    /// to a cache line that is rarely in cache. `operation` must not use the view itself.
    pub(crate) fn with_bucket<R>(
        &self,
        name: &[u8],
        operation: impl FnOnce(&BucketHandle) -> R,
    ) -> Option<R> {
        self.names
            .read()
            .get(name)
            .filter(|bucket| !bucket.is_stopped())
            .map(operation)
    }

    /// Starts loading into cache what `(bucket, key)` requests will read, without reading it
    /// yet: a connection calls this with the requests it has parsed ahead, so that the cache
    /// misses of a batch of requests to different buckets overlap instead of following one
    /// another. Two stages under one read lock, each issuing all its loads before waiting for
    /// any: first the blocks of the buckets (probed by the name's hash, not compared, which
    /// would wait for the block), then, with the blocks arriving, each key's entry in the
    /// candidate whose name matches. `meanwhile` runs between the stages (the caller's own
    /// loads, which then overlap too).
    pub(crate) fn prefetch(&self, requests: &[(&[u8], &[u8])], meanwhile: impl FnOnce()) {
        if requests.is_empty() {
            meanwhile();
            return;
        }
        let names = self.names.read();
        let mut first_candidates = SmallVec::<[Option<&BucketHandle>; 16]>::new();
        for &(name, _) in requests {
            // Candidates share seven bits of the name's hash; almost always there is one.
            let mut candidates = names.handles.iter_hash(names.hasher.hash_one(name));
            let first = candidates.next();
            for bucket in first.into_iter().chain(candidates) {
                bucket.prefetch();
            }
            first_candidates.push(first);
        }
        meanwhile();
        for (&(name, key), first) in requests.iter().zip(first_candidates) {
            let bucket = match first {
                Some(bucket) if bucket.name().as_bytes() == name => Some(bucket),
                // Another name under the same seven bits: the full probe finds the right one.
                Some(_) => names.get(name),
                None => None,
            };
            if let Some(bucket) = bucket {
                bucket.prefetch_entries([key]);
            }
        }
    }

    /// Whether `name` is a durable bucket that crashed too often and stays down.
    #[must_use]
    pub fn is_failed(&self, name: &[u8]) -> bool {
        let names = self.names.read();
        !names.failed.is_empty() && names.failed.contains(name)
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
