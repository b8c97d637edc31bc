//! The concurrent read view of the registry's names: many readers, one writer (the loop).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::bucket::{BucketHandle, BucketId, BucketName};

type Names = HashMap<BucketName, BucketHandle, foldhash::fast::RandomState>;

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
            .keys()
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

    pub(super) fn insert(&self, bucket: BucketHandle) {
        self.names.write().insert(bucket.name().clone(), bucket);
    }

    /// Removes `name` if it still belongs to bucket `id`; returns the handle removed.
    pub(super) fn remove(&self, name: &[u8], id: BucketId) -> Option<BucketHandle> {
        let mut names = self.names.write();
        if names.get(name).is_none_or(|bucket| bucket.id() != id) {
            return None;
        }
        let removed = names.remove(name);
        shrink_if_sparse(&mut names);
        removed
    }

    /// Closes every bucket and forgets every name: the registry that owned them has died.
    pub(super) fn close_all(&self) {
        let names = std::mem::take(&mut *self.names.write());
        for bucket in names.values() {
            bucket.close();
        }
    }
}

/// Gives back the room of a map that has fallen to a quarter of its capacity, so that creating
/// and dropping many buckets leaves memory where it started.
pub(super) fn shrink_if_sparse<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, V, S>,
) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}
