//! A bucket's table: keys to values, shared by every handle, owned in lifetime by the bucket task.
//!
//! An [`EntryIndex`] of 8-byte [`EntryRef`]s over [`Slabs`] that hold the entries themselves.
//!
//! Invariants:
//! - `entries` is `None` exactly when the table is closed; closing frees every entry at once and
//!   returns its charge to the memory budget. A closed table never opens again.
//! - `closed` mirrors `entries.is_none()` so that `is_closed` needs no lock; it is set while the
//!   write lock is held, so a reader that saw an open table under the lock finished before it.
//! - Every live entry has exactly one `EntryRef` in `index`, and it points at that entry's slot,
//!   also after a removal moved the slot.
//! - `charged` is exactly what this table has reserved from the budget.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use parking_lot::RwLock;
use smallvec::SmallVec;

use super::BucketError;
use super::index::EntryIndex;
use super::slab::{self, EntryRef, ScanCursor, Slabs};
use crate::change::{Change, ChangeLog};

/// What one entry costs beyond its slot: its place in the hash index (a 5-byte reference and
/// a control byte, at the index's load: between 7/16 and 7/8). An estimate: the budget bounds
/// memory, it does not measure it exactly.
const ENTRY_OVERHEAD: usize = 12;

/// What an entry counts against the memory budget.
pub(crate) fn charge(key: &[u8], value: &[u8]) -> usize {
    slab::stored_size(slab::encoded_len(key, value)) + ENTRY_OVERHEAD
}

/// The bytes that all tables together may hold, shared by every bucket of a registry.
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicUsize,
    keys: AtomicUsize,
    limit: usize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes, none of it used.
    #[must_use]
    pub fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            keys: AtomicUsize::new(0),
            limit,
        }
    }

    /// Bytes reserved by live entries now.
    #[must_use]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Keys held by all tables together.
    #[must_use]
    pub fn keys(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    /// The most bytes that may be reserved.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Reserves `bytes`, unless that would pass the limit.
    pub(crate) fn reserve(&self, bytes: usize) -> Result<(), BucketError> {
        let before = self.used.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > self.limit {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            return Err(BucketError::OutOfMemory { limit: self.limit });
        }
        Ok(())
    }

    /// Reserves `bytes` even past the limit: for restoring what the log holds, which the
    /// running server accepted within its limits (replay passes through states that never
    /// existed, such as a snapshot's later entries beside the log's earlier ones).
    pub(crate) fn reserve_unchecked(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// The hash of a key in every table. Seeded at random once per process, so hostile keys
/// cannot be chosen to collide; one hasher for all tables keeps a seed out of each table's
/// header, which a lookup among many buckets reads line by line.
fn hash_key(key: &[u8]) -> u64 {
    static HASHER: LazyLock<foldhash::fast::RandomState> = LazyLock::new(Default::default);
    HASHER.hash_one(key)
}

/// Where a change to a table comes from.
#[derive(Clone, Copy)]
enum Origin<'a> {
    /// A client of bucket `bucket`: checked against the memory budget and logged.
    Client { bucket: &'a [u8] },
    /// The log itself, at recovery or a restart from disk: neither checked nor logged again.
    Log,
}

/// `repr(C)`, in the order a lookup reads the fields: the index, then the slab headers.
#[repr(C)]
struct Entries {
    index: EntryIndex,
    slabs: Slabs,
    charged: usize,
}

/// The key → value table of one bucket.
///
/// `repr(C)`: what every operation reads (`closed`, the lock, the index, the slab headers)
/// comes first and together, so that [`HOT_BYTES`](Self::HOT_BYTES) of a table cover it.
#[repr(C)]
pub(crate) struct Table {
    closed: AtomicBool,
    /// Reads, writes and deletes by clients since the table opened, modulo 2^32 (the status
    /// page's "busiest"). In the padding before the lock, whose line every operation writes
    /// anyway: 32 bits fit there, where 64 would push the hot bytes onto another cache line.
    operations: AtomicU32,
    entries: RwLock<Option<Entries>>,
    /// Where changes are logged, when the shard is durable. A change is recorded while the
    /// write lock is held, so the log's order for a key is the order the changes were made.
    log: Option<Arc<dyn ChangeLog>>,
    budget: Arc<MemoryBudget>,
}

impl Table {
    /// The leading bytes of a table that a lookup reads: worth prefetching together. The
    /// lock's data follows its word, and an open table's `Option` holds its entries at offset
    /// zero; neither is promised by the compiler, so a test checks them (were they wrong, only
    /// the prefetch would miss, never a result).
    pub(crate) const HOT_BYTES: usize = std::mem::offset_of!(Table, entries)
        + size_of::<parking_lot::RawRwLock>()
        + std::mem::offset_of!(Entries, slabs)
        + Slabs::HOT_BYTES;

    /// A table that owns `charged` bytes of `budget`, reserved by the caller for the bucket
    /// itself: given back with its entries' when the table closes.
    pub(crate) fn new(
        budget: Arc<MemoryBudget>,
        log: Option<Arc<dyn ChangeLog>>,
        charged: usize,
    ) -> Self {
        Self {
            entries: RwLock::new(Some(Entries {
                index: EntryIndex::default(),
                slabs: Slabs::default(),
                charged,
            })),
            closed: AtomicBool::new(false),
            operations: AtomicU32::new(0),
            budget,
            log,
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Frees every entry and refuses all later operations. Idempotent.
    pub(crate) fn close(&self) {
        let freed = self.entries.write().take();
        self.closed.store(true, Ordering::Release);
        if let Some(entries) = freed {
            self.budget.release(entries.charged);
            self.budget
                .keys
                .fetch_sub(entries.index.len(), Ordering::Relaxed);
        }
    }

    /// Asks the log whether `change` may be made (not once it has failed, nor if it cannot
    /// hold it): nothing may be acknowledged that the log does not hold.
    fn admit(&self, change: &Change<'_>) -> Result<(), BucketError> {
        match &self.log {
            Some(log) => log.admit(change).map_err(BucketError::Refused),
            None => Ok(()),
        }
    }

    /// Records `change` in the log. `_locked` is the table's contents under its write lock,
    /// which the caller must hold to have it: the log's order for a key is then, by
    /// construction, the order in which its changes were applied.
    fn record(&self, _locked: &mut Entries, change: &Change<'_>) {
        if let Some(log) = &self.log {
            log.record(change);
        }
    }

    pub(crate) fn put(&self, bucket: &[u8], key: &[u8], value: &[u8]) -> Result<(), BucketError> {
        self.operations.fetch_add(1, Ordering::Relaxed);
        self.admit(&Change::Put { bucket, key, value })?;
        self.store(key, value, Origin::Client { bucket })
    }

    /// Puts without logging and past the memory limit: for restoring what is already on disk.
    pub(crate) fn restore(&self, key: &[u8], value: &[u8]) -> Result<(), BucketError> {
        self.store(key, value, Origin::Log)
    }

    /// Sets `key` to `value` in memory; logs it, under the write lock, if it is a client's.
    fn store(&self, key: &[u8], value: &[u8], origin: Origin<'_>) -> Result<(), BucketError> {
        let new_charge = charge(key, value);
        let reserve = |bytes| match origin {
            Origin::Client { .. } => self.budget.reserve(bytes),
            Origin::Log => {
                self.budget.reserve_unchecked(bytes);
                Ok(())
            }
        };
        let mut guard = self.entries.write();
        let entries = guard.as_mut().ok_or(BucketError::Stopped)?;
        let hash = hash_key(key);
        let Entries {
            index,
            slabs,
            charged,
        } = entries;
        if let Some(existing) = index.find(hash, |entry| slabs.key(entry) == key) {
            let (old_key, old_value) = slabs.get(existing);
            let old_charge = charge(old_key, old_value);
            // Overwriting with a value of the same size (the common case) touches no shared
            // counter and no allocator.
            if new_charge > old_charge {
                reserve(new_charge - old_charge)?;
            } else if new_charge < old_charge {
                self.budget.release(old_charge - new_charge);
            }
            *charged = *charged + new_charge - old_charge;
            if !slabs.replace(existing, key, value) {
                remove_entry(index, slabs, hash, existing);
                let entry = slabs.insert(key, value);
                index.insert(hash, entry, |entry| hash_key(slabs.key(entry)));
            }
        } else {
            reserve(new_charge)?;
            let entry = slabs.insert(key, value);
            index.insert(hash, entry, |entry| hash_key(slabs.key(entry)));
            *charged += new_charge;
            self.budget.keys.fetch_add(1, Ordering::Relaxed);
        }
        if let Origin::Client { bucket } = origin {
            self.record(entries, &Change::Put { bucket, key, value });
        }
        Ok(())
    }

    /// Runs `read` on the value of `key` (or `None`) while the table is locked for reading, so
    /// a caller can encode the value without copying it first.
    pub(crate) fn get_with<R>(
        &self,
        key: &[u8],
        read: impl FnOnce(Option<&[u8]>) -> R,
    ) -> Result<R, BucketError> {
        self.operations.fetch_add(1, Ordering::Relaxed);
        let guard = self.entries.read();
        let entries = guard.as_ref().ok_or(BucketError::Stopped)?;
        let found = entries
            .index
            .find(hash_key(key), |entry| entries.slabs.key(entry) == key);
        Ok(read(found.map(|entry| entries.slabs.get(entry).1)))
    }

    /// Starts loading into cache the entries that `keys` probably name, under one read lock.
    ///
    /// In two passes over a group of keys: the first reads each key's control bytes and asks
    /// for its index slots, the second reads the slots and asks for the entries. Each pass's
    /// loads are independent of one another, so the misses of a group overlap; one pass per
    /// key would wait for its control bytes, then for its slot, key after key.
    pub(crate) fn prefetch<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        /// Keys per group: enough to keep the processor's outstanding misses busy.
        const GROUP: usize = 16;
        let guard = self.entries.read();
        let Some(Entries { index, slabs, .. }) = guard.as_ref() else {
            return;
        };
        let mut keys = keys.into_iter().map(hash_key).peekable();
        while keys.peek().is_some() {
            let hashes: SmallVec<[u64; GROUP]> = keys.by_ref().take(GROUP).collect();
            for &hash in &hashes {
                index.prefetch_slots(hash);
            }
            for &hash in &hashes {
                index.for_each_candidate(hash, |entry| slabs.prefetch(entry));
            }
        }
    }

    pub(crate) fn delete(&self, bucket: &[u8], key: &[u8]) -> Result<bool, BucketError> {
        self.operations.fetch_add(1, Ordering::Relaxed);
        self.admit(&Change::Delete { bucket, key })?;
        let mut guard = self.entries.write();
        let entries = guard.as_mut().ok_or(BucketError::Stopped)?;
        let hash = hash_key(key);
        let Entries {
            index,
            slabs,
            charged,
        } = entries;
        let Some(found) = index.find(hash, |entry| slabs.key(entry) == key) else {
            return Ok(false);
        };
        let (stored_key, stored_value) = slabs.get(found);
        let freed = charge(stored_key, stored_value);
        remove_entry(index, slabs, hash, found);
        *charged -= freed;
        self.budget.release(freed);
        self.budget.keys.fetch_sub(1, Ordering::Relaxed);
        self.record(entries, &Change::Delete { bucket, key });
        Ok(true)
    }

    /// Calls `visit` with every entry, under the read lock: a consistent copy of this table
    /// (for a snapshot). Writers to this bucket wait meanwhile.
    pub(crate) fn for_each_entry(
        &self,
        mut visit: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), BucketError> {
        let guard = self.entries.read();
        let entries = guard.as_ref().ok_or(BucketError::Stopped)?;
        for entry in entries.index.iter() {
            let (key, value) = entries.slabs.get(entry);
            visit(key, value);
        }
        Ok(())
    }

    pub(crate) fn len(&self) -> Result<usize, BucketError> {
        let guard = self.entries.read();
        Ok(guard.as_ref().ok_or(BucketError::Stopped)?.index.len())
    }

    /// How many keys, and the bytes the table holds against the memory budget.
    pub(crate) fn size(&self) -> Result<(usize, usize), BucketError> {
        let guard = self.entries.read();
        let entries = guard.as_ref().ok_or(BucketError::Stopped)?;
        Ok((entries.index.len(), entries.charged))
    }

    /// Reads, writes and deletes by clients since the table opened, modulo 2^32.
    pub(crate) fn operations(&self) -> u32 {
        self.operations.load(Ordering::Relaxed)
    }

    /// One page of a listing that costs the page: up to `limit` keys from `cursor` (zero:
    /// the start) in the order they are stored, and the cursor of the next page (zero: the
    /// end). See [`ScanCursor`] for what a listing under changes returns.
    pub(crate) fn scan(&self, cursor: u64, limit: usize) -> Result<(u64, Vec<Bytes>), BucketError> {
        let guard = self.entries.read();
        let entries = guard.as_ref().ok_or(BucketError::Stopped)?;
        if limit == 0 {
            return Ok((cursor, Vec::new()));
        }
        let mut page = Vec::with_capacity(limit.min(entries.index.len()));
        let next = entries.slabs.scan(ScanCursor(cursor), |key, _| {
            page.push(Bytes::copy_from_slice(key));
            page.len() < limit
        });
        Ok((next.0, page))
    }

    /// One page of entries, as [`scan`](Self::scan) walks them: `visit` gets each key and
    /// value from `cursor` on until they add up to `bytes` (at least one entry), under the
    /// read lock for that page only. Returns the cursor of the next page (zero: the end).
    pub(crate) fn scan_entries(
        &self,
        cursor: u64,
        bytes: usize,
        mut visit: impl FnMut(&[u8], &[u8]),
    ) -> Result<u64, BucketError> {
        let guard = self.entries.read();
        let entries = guard.as_ref().ok_or(BucketError::Stopped)?;
        let mut left = bytes;
        let next = entries.slabs.scan(ScanCursor(cursor), |key, value| {
            visit(key, value);
            left = left.saturating_sub(key.len() + value.len());
            left > 0
        });
        Ok(next.0)
    }

    /// Up to `limit` keys greater than `after`, in byte order: one page of a sorted listing.
    ///
    /// A full scan per page (O(n)): for small tables and for tests; the server pages with
    /// [`scan`](Self::scan), which costs the page.
    pub(crate) fn keys_after(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Bytes>, BucketError> {
        let guard = self.entries.read();
        let entries = guard.as_ref().ok_or(BucketError::Stopped)?;
        let mut smallest: std::collections::BinaryHeap<&[u8]> =
            std::collections::BinaryHeap::with_capacity(limit.min(entries.index.len()) + 1);
        for key in entries.index.iter().map(|entry| entries.slabs.key(entry)) {
            if after.is_some_and(|after| key <= after)
                || (smallest.len() == limit
                    && smallest.peek().is_none_or(|&largest| key >= largest))
            {
                continue;
            }
            smallest.push(key);
            if smallest.len() > limit {
                smallest.pop();
            }
        }
        let mut page: Vec<Bytes> = smallest.into_iter().map(Bytes::copy_from_slice).collect();
        page.sort_unstable();
        Ok(page)
    }
}

/// Takes `entry` (found under `hash`) out of the index and its slab, and points the index at
/// the slot the slab moved into the hole, if it moved one.
fn remove_entry(index: &mut EntryIndex, slabs: &mut Slabs, hash: u64, entry: EntryRef) {
    index.remove(hash, entry, |entry| hash_key(slabs.key(entry)));
    if let Some(moved) = slabs.remove(entry) {
        let moved_hash = hash_key(slabs.key(moved.to));
        index.redirect(moved_hash, moved.from, moved.to, |entry| {
            hash_key(slabs.key(entry))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table::new(Arc::new(MemoryBudget::new(usize::MAX)), None, 0)
    }

    fn get(table: &Table, key: &[u8]) -> Option<Vec<u8>> {
        table
            .get_with(key, |value| value.map(<[u8]>::to_vec))
            .expect("table is open")
    }

    #[test]
    fn put_get_delete_and_overwrite() {
        let table = table();
        table.put(b"t", b"milk", b"1").unwrap();
        table.put(b"t", b"milk", b"22").unwrap();
        assert_eq!(get(&table, b"milk"), Some(b"22".to_vec()));
        assert_eq!(get(&table, b"eggs"), None);
        assert!(table.delete(b"t", b"milk").unwrap());
        assert!(!table.delete(b"t", b"milk").unwrap());
        assert_eq!(table.len().unwrap(), 0);
    }

    #[test]
    fn closing_frees_the_budget_and_refuses_everything() {
        let budget = Arc::new(MemoryBudget::new(usize::MAX));
        let table = Table::new(Arc::clone(&budget), None, 0);
        table.put(b"t", b"a", b"b").unwrap();
        assert!(budget.used() > 0);
        assert_eq!(budget.keys(), 1);
        table.close();
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.keys(), 0);
        assert!(table.is_closed());
        assert_eq!(table.put(b"t", b"a", b"b"), Err(BucketError::Stopped));
        assert_eq!(table.len(), Err(BucketError::Stopped));
        assert_eq!(table.delete(b"t", b"a"), Err(BucketError::Stopped));
    }

    #[test]
    fn the_budget_refuses_a_put_that_would_pass_it_and_keeps_the_old_value() {
        let budget = Arc::new(MemoryBudget::new(200));
        let table = Table::new(Arc::clone(&budget), None, 0);
        table.put(b"t", b"k", b"small").unwrap();
        let big = vec![0u8; 500];
        assert_eq!(
            table.put(b"t", b"k", &big),
            Err(BucketError::OutOfMemory { limit: 200 })
        );
        assert_eq!(get(&table, b"k"), Some(b"small".to_vec()));
        table.delete(b"t", b"k").unwrap();
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn keys_are_listed_in_pages_after_a_cursor() {
        let table = table();
        for key in [b"d", b"a", b"c", b"b", b"e"] {
            table.put(b"t", key, b"").unwrap();
        }
        let first = table.keys_after(None, 2).unwrap();
        assert_eq!(first, vec![Bytes::from("a"), Bytes::from("b")]);
        let second = table.keys_after(Some(b"b"), 2).unwrap();
        assert_eq!(second, vec![Bytes::from("c"), Bytes::from("d")]);
        let last = table.keys_after(Some(b"d"), 2).unwrap();
        assert_eq!(last, vec![Bytes::from("e")]);
    }

    /// Every key a full scan from zero returns, `limit` at a time, with `between` run after
    /// each page.
    fn scan_all(table: &Table, limit: usize, mut between: impl FnMut()) -> Vec<Vec<u8>> {
        let mut cursor = 0;
        let mut keys = Vec::new();
        loop {
            let (next, page) = table.scan(cursor, limit).unwrap();
            assert!(page.len() <= limit);
            keys.extend(page.iter().map(|key| key.to_vec()));
            if next == 0 {
                return keys;
            }
            cursor = next;
            between();
        }
    }

    #[test]
    fn a_scan_returns_every_key_once_across_slabs_and_large_entries() {
        let table = table();
        let mut expected = Vec::new();
        for index in 0..500u32 {
            // Values of three slot sizes and some too large for any slot.
            let size = [1, 100, 1000, 5000][index as usize % 4];
            let key = index.to_le_bytes().to_vec();
            table.put(b"t", &key, &vec![7; size]).unwrap();
            expected.push(key);
        }
        for limit in [1, 7, 100, 1000] {
            let mut keys = scan_all(&table, limit, || {});
            keys.sort();
            expected.sort();
            assert_eq!(keys, expected, "limit {limit}");
        }
        assert_eq!(
            table.scan(0, 0).unwrap(),
            (0, Vec::new()),
            "a page of nothing goes nowhere"
        );
        // A cursor a client made up is still safe.
        for cursor in [u64::MAX, 1 << 60, 12345] {
            let (_, page) = table.scan(cursor, 10).unwrap();
            assert!(page.len() <= 10);
        }
    }

    #[test]
    fn keys_kept_throughout_a_scan_are_returned_whatever_else_is_removed_or_added() {
        let table = table();
        for index in 0..300u32 {
            table.put(b"t", &index.to_le_bytes(), b"v").unwrap();
        }
        // Between pages, remove ten keys (every 7th, from the low ones up) and add ten.
        let mut removed = 0u32;
        let mut added = 1000u32;
        let keys = scan_all(&table, 13, || {
            for _ in 0..10 {
                table
                    .delete(b"t", &(removed * 7 % 300).to_le_bytes())
                    .unwrap();
                removed += 1;
                table.put(b"t", &added.to_le_bytes(), b"v").unwrap();
                added += 1;
            }
        });
        let returned: std::collections::HashSet<Vec<u8>> = keys.into_iter().collect();
        let gone: std::collections::HashSet<u32> = (0..removed).map(|n| n * 7 % 300).collect();
        for index in (0..300u32).filter(|index| !gone.contains(index)) {
            assert!(
                returned.contains(index.to_le_bytes().as_slice()),
                "key {index} was skipped"
            );
        }
    }

    #[test]
    fn a_table_emptied_after_growth_turns_small_again() {
        let table = table();
        for index in 0..10_000u32 {
            table.put(b"t", &index.to_le_bytes(), b"v").unwrap();
        }
        for index in 0..10_000u32 {
            table.delete(b"t", &index.to_le_bytes()).unwrap();
        }
        assert!(table.entries.read().as_ref().unwrap().index.is_inline());
    }

    #[test]
    fn every_key_is_among_the_candidates_its_hash_gives() {
        // What prefetching relies on: the index's candidates for a key's hash include the
        // key's entry, in the inline form and in the hash table form.
        let table = table();
        for count in [10u32, 1000] {
            for index in 0..count {
                table.put(b"t", &index.to_le_bytes(), b"v").unwrap();
            }
            let guard = table.entries.read();
            let entries = guard.as_ref().unwrap();
            assert_eq!(entries.index.is_inline(), count <= 16);
            for index in 0..count {
                let key = index.to_le_bytes();
                let hash = hash_key(&key);
                let entry = entries
                    .index
                    .find(hash, |entry| entries.slabs.key(entry) == key)
                    .unwrap();
                let mut candidates = Vec::new();
                entries
                    .index
                    .for_each_candidate(hash, |found| candidates.push(found));
                assert!(candidates.contains(&entry));
            }
            drop(guard);
            table.prefetch([&b"absent"[..], &0u32.to_le_bytes()]);
        }
    }

    #[test]
    fn the_hot_bytes_cover_the_lock_the_index_and_the_slab_headers() {
        // `HOT_BYTES` adds up offsets inside the lock and the `Option` that the compiler does
        // not promise; this checks them against where the fields really are.
        let table = table();
        let start = std::ptr::from_ref(&table).addr();
        let guard = table.entries.read();
        let entries = guard.as_ref().unwrap();
        let offset = |field: usize| field - start;
        assert_eq!(
            offset(std::ptr::from_ref(&entries.slabs).addr()) + Slabs::HOT_BYTES,
            Table::HOT_BYTES
        );
        assert!(offset(std::ptr::from_ref(&entries.index).addr()) < Table::HOT_BYTES);
        assert!(offset(std::ptr::from_ref(&table.closed).addr()) < Table::HOT_BYTES);
        assert!(Table::HOT_BYTES <= std::mem::offset_of!(Table, log));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Put(u8, usize),
        Delete(u8),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        // Sizes cross classes and reach past the largest slot, so replacing in place, moving
        // between classes and the large path all happen.
        let size = prop_oneof![0usize..40, 40usize..300, 4000usize..4200, 4300usize..6000];
        prop_oneof![
            3 => (0u8..24, size).prop_map(|(key, size)| Step::Put(key, size)),
            1 => (0u8..24).prop_map(Step::Delete),
        ]
    }

    proptest::proptest! {
        #[test]
        fn the_table_behaves_like_a_hash_map(steps in proptest::collection::vec(step(), 1..300)) {
            let budget = Arc::new(MemoryBudget::new(usize::MAX));
            let table = Table::new(Arc::clone(&budget), None, 0);
            let mut model = std::collections::HashMap::new();
            for (number, step) in steps.into_iter().enumerate() {
                match step {
                    Step::Put(key, size) => {
                        let value = vec![number as u8; size];
                        table.put(b"t", &[key], &value).unwrap();
                        model.insert(key, value);
                    }
                    Step::Delete(key) => {
                        proptest::prop_assert_eq!(
                            table.delete(b"t", &[key]).unwrap(),
                            model.remove(&key).is_some()
                        );
                    }
                }
                for key in 0..24u8 {
                    proptest::prop_assert_eq!(get(&table, &[key]), model.get(&key).cloned());
                }
                proptest::prop_assert_eq!(table.len().unwrap(), model.len());
                proptest::prop_assert_eq!(budget.keys(), model.len());
            }
            for key in 0..24u8 {
                table.delete(b"t", &[key]).unwrap();
            }
            proptest::prop_assert_eq!(budget.used(), 0);
        }
    }
}
