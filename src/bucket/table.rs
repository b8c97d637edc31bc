//! A bucket's table: keys to values, shared by every handle, owned in lifetime by the bucket task.
//!
//! Invariants:
//! - `entries` is `None` exactly when the table is closed; closing frees every entry at once and
//!   returns its charge to the memory budget. A closed table never opens again.
//! - `closed` mirrors `entries.is_none()` so that `is_closed` needs no lock; it is set while the
//!   write lock is held, so a reader that saw an open table under the lock finished before it.
//! - `charged` is exactly what this table has reserved from the budget.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use hashbrown::HashTable;
use parking_lot::RwLock;

use super::BucketError;

/// What one entry costs beyond its bytes: its slot in the hash table and allocator rounding.
/// An estimate: the budget bounds memory, it does not measure it exactly.
const ENTRY_OVERHEAD: usize = 32;

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

    fn reserve(&self, bytes: usize) -> Result<(), BucketError> {
        let before = self.used.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > self.limit {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            return Err(BucketError::OutOfMemory { limit: self.limit });
        }
        Ok(())
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// One key and its value in a single allocation: `varint(key length) ++ key ++ value`.
///
/// Keeping both in one block instead of two separately allocated strings halves the
/// allocations per key and drops a pointer pair from every slot; the memory target of kv
/// (under 100 bytes per small key) depends on it.
struct Entry(Box<[u8]>);

impl Entry {
    fn new(key: &[u8], value: &[u8]) -> Self {
        let mut block = Vec::with_capacity(varint_len(key.len()) + key.len() + value.len());
        write_varint(&mut block, key.len());
        block.extend_from_slice(key);
        block.extend_from_slice(value);
        Self(block.into_boxed_slice())
    }

    fn split(&self) -> (&[u8], &[u8]) {
        let (key_len, header) = read_varint(&self.0);
        self.0[header..].split_at(key_len)
    }

    fn key(&self) -> &[u8] {
        self.split().0
    }

    fn value(&self) -> &[u8] {
        self.split().1
    }

    fn charge(&self) -> usize {
        self.0.len() + ENTRY_OVERHEAD
    }
}

// LEB128 by hand: seven lines, and the only crates for it bring far more than this needs.
fn write_varint(out: &mut Vec<u8>, mut value: usize) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Returns the value and how many bytes it took. Only ever reads what `write_varint` wrote.
fn read_varint(bytes: &[u8]) -> (usize, usize) {
    let mut value = 0usize;
    for (index, byte) in bytes.iter().enumerate() {
        value |= usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return (value, index + 1);
        }
    }
    unreachable!("entries always start with a complete varint")
}

fn varint_len(value: usize) -> usize {
    (usize::BITS - value.leading_zeros()).max(1).div_ceil(7) as usize
}

struct Entries {
    map: HashTable<Entry>,
    /// Seeded at random per table, so hostile keys cannot be chosen to collide in every server.
    hasher: foldhash::fast::RandomState,
    charged: usize,
}

impl Entries {
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }
}

/// The key → value table of one bucket.
pub(crate) struct Table {
    entries: RwLock<Option<Entries>>,
    closed: AtomicBool,
    budget: Arc<MemoryBudget>,
}

impl Table {
    pub(crate) fn new(budget: Arc<MemoryBudget>) -> Self {
        Self {
            entries: RwLock::new(Some(Entries {
                map: HashTable::new(),
                hasher: foldhash::fast::RandomState::default(),
                charged: 0,
            })),
            closed: AtomicBool::new(false),
            budget,
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
                .fetch_sub(entries.map.len(), Ordering::Relaxed);
        }
    }

    pub(crate) fn put(&self, key: &[u8], value: &[u8]) -> Result<(), BucketError> {
        let entry = Entry::new(key, value);
        let mut guard = self.entries.write();
        let entries = guard.as_mut().ok_or(BucketError::Stopped)?;
        let hash = entries.hash(key);
        let hasher = &entries.hasher;
        match entries.map.entry(
            hash,
            |existing| existing.key() == key,
            |existing| hasher.hash_one(existing.key()),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut occupied) => {
                let old_charge = occupied.get().charge();
                let new_charge = entry.charge();
                // Overwriting with a value of the same size (the common case) touches no
                // shared counter.
                if new_charge > old_charge {
                    self.budget.reserve(new_charge - old_charge)?;
                } else if new_charge < old_charge {
                    self.budget.release(old_charge - new_charge);
                }
                *occupied.get_mut() = entry;
                entries.charged = entries.charged + new_charge - old_charge;
            }
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                let charge = entry.charge();
                self.budget.reserve(charge)?;
                vacant.insert(entry);
                entries.charged += charge;
                self.budget.keys.fetch_add(1, Ordering::Relaxed);
            }
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
        let guard = self.entries.read();
        let entries = guard.as_ref().ok_or(BucketError::Stopped)?;
        let found = entries
            .map
            .find(entries.hash(key), |entry| entry.key() == key);
        Ok(read(found.map(Entry::value)))
    }

    pub(crate) fn delete(&self, key: &[u8]) -> Result<bool, BucketError> {
        let mut guard = self.entries.write();
        let entries = guard.as_mut().ok_or(BucketError::Stopped)?;
        let hash = entries.hash(key);
        let Ok(found) = entries.map.find_entry(hash, |entry| entry.key() == key) else {
            return Ok(false);
        };
        let (removed, _) = found.remove();
        let charge = removed.charge();
        entries.charged -= charge;
        self.budget.release(charge);
        self.budget.keys.fetch_sub(1, Ordering::Relaxed);
        // A table that shrank to a quarter of its capacity gives the rest back, so a bucket
        // that once held many keys does not keep their slots for ever.
        if entries.map.capacity() > 64 && entries.map.len() * 4 < entries.map.capacity() {
            let hasher = &entries.hasher;
            entries
                .map
                .shrink_to(entries.map.len() * 2, |entry| hasher.hash_one(entry.key()));
        }
        Ok(true)
    }

    pub(crate) fn len(&self) -> Result<usize, BucketError> {
        let guard = self.entries.read();
        Ok(guard.as_ref().ok_or(BucketError::Stopped)?.map.len())
    }

    /// Up to `limit` keys greater than `after`, in byte order: one page of a listing.
    ///
    /// A full scan per page (O(n log limit)); the reply stays bounded by `limit`, and a cursor
    /// that is a key stays valid however the table changes between pages.
    pub(crate) fn keys_after(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Bytes>, BucketError> {
        let guard = self.entries.read();
        let entries = guard.as_ref().ok_or(BucketError::Stopped)?;
        let mut smallest: std::collections::BinaryHeap<&[u8]> =
            std::collections::BinaryHeap::with_capacity(limit.min(entries.map.len()) + 1);
        for key in entries.map.iter().map(Entry::key) {
            if after.is_some_and(|after| key <= after) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table::new(Arc::new(MemoryBudget::new(usize::MAX)))
    }

    fn get(table: &Table, key: &[u8]) -> Option<Vec<u8>> {
        table
            .get_with(key, |value| value.map(<[u8]>::to_vec))
            .expect("table is open")
    }

    #[test]
    fn varint_round_trips_at_every_width() {
        for value in [
            0,
            1,
            127,
            128,
            255,
            16_383,
            16_384,
            1 << 21,
            usize::MAX >> 1,
        ] {
            let mut out = Vec::new();
            write_varint(&mut out, value);
            assert_eq!(out.len(), varint_len(value));
            assert_eq!(read_varint(&out), (value, out.len()));
        }
    }

    #[test]
    fn entries_keep_key_and_value_apart() {
        let long_key = vec![7u8; 300];
        for (key, value) in [(&b""[..], &b""[..]), (b"k", b"v"), (&long_key, b"value")] {
            let entry = Entry::new(key, value);
            assert_eq!(entry.split(), (key, value));
        }
    }

    #[test]
    fn put_get_delete_and_overwrite() {
        let table = table();
        table.put(b"milk", b"1").unwrap();
        table.put(b"milk", b"22").unwrap();
        assert_eq!(get(&table, b"milk"), Some(b"22".to_vec()));
        assert_eq!(get(&table, b"eggs"), None);
        assert!(table.delete(b"milk").unwrap());
        assert!(!table.delete(b"milk").unwrap());
        assert_eq!(table.len().unwrap(), 0);
    }

    #[test]
    fn closing_frees_the_budget_and_refuses_everything() {
        let budget = Arc::new(MemoryBudget::new(usize::MAX));
        let table = Table::new(Arc::clone(&budget));
        table.put(b"a", b"b").unwrap();
        assert!(budget.used() > 0);
        assert_eq!(budget.keys(), 1);
        table.close();
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.keys(), 0);
        assert!(table.is_closed());
        assert_eq!(table.put(b"a", b"b"), Err(BucketError::Stopped));
        assert_eq!(table.len(), Err(BucketError::Stopped));
        assert_eq!(table.delete(b"a"), Err(BucketError::Stopped));
    }

    #[test]
    fn the_budget_refuses_a_put_that_would_pass_it_and_keeps_the_old_value() {
        let budget = Arc::new(MemoryBudget::new(200));
        let table = Table::new(Arc::clone(&budget));
        table.put(b"k", b"small").unwrap();
        let big = vec![0u8; 500];
        assert_eq!(
            table.put(b"k", &big),
            Err(BucketError::OutOfMemory { limit: 200 })
        );
        assert_eq!(get(&table, b"k"), Some(b"small".to_vec()));
        table.delete(b"k").unwrap();
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn keys_are_listed_in_pages_after_a_cursor() {
        let table = table();
        for key in [b"d", b"a", b"c", b"b", b"e"] {
            table.put(key, b"").unwrap();
        }
        let first = table.keys_after(None, 2).unwrap();
        assert_eq!(first, vec![Bytes::from("a"), Bytes::from("b")]);
        let second = table.keys_after(Some(b"b"), 2).unwrap();
        assert_eq!(second, vec![Bytes::from("c"), Bytes::from("d")]);
        let last = table.keys_after(Some(b"d"), 2).unwrap();
        assert_eq!(last, vec![Bytes::from("e")]);
    }

    #[test]
    fn a_table_emptied_after_growth_shrinks() {
        let table = table();
        for index in 0..10_000u32 {
            table.put(&index.to_le_bytes(), b"v").unwrap();
        }
        for index in 0..10_000u32 {
            table.delete(&index.to_le_bytes()).unwrap();
        }
        let capacity = table.entries.read().as_ref().unwrap().map.capacity();
        assert!(capacity <= 128, "capacity stayed at {capacity}");
    }
}
