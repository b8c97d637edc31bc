//! A table's hash index: from a key's hash to the [`EntryRef`] of its entry.
//!
//! Most buckets are small. A small index lives inline in the table's header, up to
//! [`INLINE_ENTRIES`] one-byte references ([`CompactRef`]) beside a one-byte tag of each key's
//! hash, matched eight tags at a time: a lookup among thousands of small buckets then reads
//! the header it needs for the lock anyway (one cache line for all of it), instead of following
//! a pointer to a separate hash table. Past that size, or for a reference that does not fit in
//! one byte, the index is a `hashbrown` table, and it turns small again when it has shrunk well
//! below.
//!
//! Invariant: in the inline form, `tags[..len]` and `references[..len]` describe exactly the
//! live entries (no holes; removal moves the last one into the gap), and every tag past `len`
//! is [`NO_TAG`], which no hash has, so a scan of all sixteen tags finds only live entries.

use hashbrown::HashTable;

use super::slab::{CompactRef, EntryRef, PackedRef};
use crate::encoding::shrunk_capacity;

/// References held inline before the index becomes a hash table.
pub(super) const INLINE_ENTRIES: usize = 16;
/// A hash table that falls to this many entries turns inline again (below
/// `INLINE_ENTRIES`, so that one key in and out at the boundary does not convert each time).
const BACK_INLINE_AT: usize = INLINE_ENTRIES / 2;

pub(super) enum EntryIndex {
    Inline {
        len: u8,
        tags: [u8; INLINE_ENTRIES],
        references: [CompactRef; INLINE_ENTRIES],
    },
    Table(HashTable<PackedRef>),
}

impl Default for EntryIndex {
    fn default() -> Self {
        Self::Inline {
            len: 0,
            tags: [NO_TAG; INLINE_ENTRIES],
            references: [CompactRef::default(); INLINE_ENTRIES],
        }
    }
}

/// The top seven bits of the hash (hashbrown uses the same ones for its control bytes).
fn tag(hash: u64) -> u8 {
    (hash >> 57) as u8
}

/// The tag of an unused inline slot: tags have seven bits, so no hash has this one.
const NO_TAG: u8 = 0x80;

/// The references of an inline index whose tags match `hash`'s, in slot order.
fn inline_matches<'i>(
    tags: &[u8; INLINE_ENTRIES],
    references: &'i [CompactRef; INLINE_ENTRIES],
    hash: u64,
) -> impl Iterator<Item = EntryRef> + 'i {
    let mut slots = matching_slots(tags, tag(hash));
    std::iter::from_fn(move || {
        if slots == 0 {
            return None;
        }
        let slot = slots.trailing_zeros() / 8;
        slots &= slots - 1;
        Some(references[slot as usize].expand())
    })
}

/// The slots whose tag is `wanted`, as the top bit of byte `slot` of the result.
///
/// Eight tags at a time in a `u64` (the way hashbrown matches its control bytes where it has no
/// SIMD): a byte-by-byte scan cost five instructions per entry, and a lookup among many small
/// buckets scans a whole inline index twice per request (once to prefetch, once to read).
fn matching_slots(tags: &[u8; INLINE_ENTRIES], wanted: u8) -> u128 {
    const LOW_SEVEN: u64 = u64::from_ne_bytes([0x7f; 8]);
    let wanted = u64::from_ne_bytes([wanted; 8]);
    // Little-endian words, so that slot `n` is byte `n` of the result on every target.
    let [low, high] = [&tags[..8], &tags[8..]].map(|half| {
        let mut word = [0; 8];
        word.copy_from_slice(half);
        let differs = u64::from_le_bytes(word) ^ wanted;
        // The top bit of a byte of `carried` is set when the byte's low seven bits are not all
        // zero; no sum carries into the next byte. Or-ing in the byte itself adds its top bit:
        // what is left clear is exactly the bytes that are zero, where the tag matched.
        let carried = (differs & LOW_SEVEN).wrapping_add(LOW_SEVEN);
        !(carried | differs | LOW_SEVEN)
    });
    u128::from(low) | (u128::from(high) << 64)
}

impl EntryIndex {
    pub(super) fn len(&self) -> usize {
        match self {
            Self::Inline { len, .. } => usize::from(*len),
            Self::Table(table) => table.len(),
        }
    }

    /// The entry under `hash` for which `is_key` holds.
    pub(super) fn find(&self, hash: u64, is_key: impl Fn(EntryRef) -> bool) -> Option<EntryRef> {
        match self {
            Self::Inline {
                tags, references, ..
            } => inline_matches(tags, references, hash).find(|&entry| is_key(entry)),
            Self::Table(table) => table
                .find(hash, |&entry| is_key(entry.into()))
                .map(|&entry| entry.into()),
        }
    }

    /// Calls `visit` with every entry that may be the one under `hash` (its hash shares seven
    /// bits), without reading the entries: for prefetching them. A plain loop per form rather
    /// than one chained iterator, which cost a copy of its state per key, so that the loads of
    /// successive keys' index slots overlap.
    pub(super) fn for_each_candidate(&self, hash: u64, mut visit: impl FnMut(EntryRef)) {
        match self {
            Self::Inline {
                tags, references, ..
            } => inline_matches(tags, references, hash).for_each(visit),
            Self::Table(table) => {
                for &entry in table.iter_hash(hash) {
                    visit(entry.into());
                }
            }
        }
    }

    /// Starts loading the index slots that may hold `hash`'s reference, without reading
    /// them: the first stage of a prefetch, whose second ([`Self::for_each_candidate`]) then
    /// finds the slots arriving. Only the control bytes that locate them are read. An inline
    /// index lives in the table's header and needs nothing.
    pub(super) fn prefetch_slots(&self, hash: u64) {
        if let Self::Table(table) = self {
            for slot in table.iter_hash(hash) {
                crate::prefetch::prefetch(slot, size_of::<PackedRef>());
            }
        }
    }

    /// Adds `entry` under `hash`; the caller knows its key is not in the index yet. `rehash`
    /// gives the hash of any entry, for growing.
    pub(super) fn insert(&mut self, hash: u64, entry: EntryRef, rehash: impl Fn(EntryRef) -> u64) {
        match self {
            Self::Inline {
                len,
                tags,
                references,
            } => {
                let slot = usize::from(*len);
                if slot < INLINE_ENTRIES
                    && let Some(compact) = entry.compact()
                {
                    tags[slot] = tag(hash);
                    references[slot] = compact;
                    *len += 1;
                    return;
                }
                let mut table: HashTable<PackedRef> = HashTable::with_capacity(2 * INLINE_ENTRIES);
                for existing in references[..slot]
                    .iter()
                    .map(|reference| reference.expand())
                {
                    table.insert_unique(rehash(existing), existing.into(), |&entry| {
                        rehash(entry.into())
                    });
                }
                table.insert_unique(hash, entry.into(), |&entry| rehash(entry.into()));
                *self = Self::Table(table);
            }
            Self::Table(table) => {
                table.insert_unique(hash, entry.into(), |&entry| rehash(entry.into()));
            }
        }
    }

    /// Takes `entry` (under `hash`) out of the index.
    pub(super) fn remove(&mut self, hash: u64, entry: EntryRef, rehash: impl Fn(EntryRef) -> u64) {
        match self {
            Self::Inline {
                len,
                tags,
                references,
            } => {
                let last = usize::from(*len) - 1;
                if let Some(slot) = references[..=last]
                    .iter()
                    .position(|found| found.expand() == entry)
                {
                    tags[slot] = tags[last];
                    references[slot] = references[last];
                    tags[last] = NO_TAG;
                    *len -= 1;
                }
            }
            Self::Table(table) => {
                let packed = PackedRef::from(entry);
                if let Ok(found) = table.find_entry(hash, |&candidate| candidate == packed) {
                    found.remove();
                }
                if table.len() <= BACK_INLINE_AT
                    && table
                        .iter()
                        .all(|&remaining| EntryRef::from(remaining).compact().is_some())
                {
                    let mut inline = Self::default();
                    for &remaining in table.iter() {
                        let remaining = EntryRef::from(remaining);
                        inline.insert(rehash(remaining), remaining, &rehash);
                    }
                    *self = inline;
                } else if let Some(capacity) = shrunk_capacity(table.len(), table.capacity()) {
                    table.shrink_to(capacity, |&entry| rehash(entry.into()));
                }
            }
        }
    }

    /// Points the reference `from` (under `hash`) at `to`: its entry moved.
    pub(super) fn redirect(
        &mut self,
        hash: u64,
        from: EntryRef,
        to: EntryRef,
        rehash: impl Fn(EntryRef) -> u64,
    ) {
        match self {
            Self::Inline {
                len, references, ..
            } => {
                let Some(slot) = references[..usize::from(*len)]
                    .iter()
                    .position(|found| found.expand() == from)
                else {
                    return;
                };
                if let Some(compact) = to.compact() {
                    references[slot] = compact;
                } else {
                    // Cannot happen while slabs are dense (a move only lowers an index), but
                    // a reference that does not fit is never truncated: the index grows instead.
                    self.remove(hash, from, &rehash);
                    self.insert(hash, to, &rehash);
                }
            }
            Self::Table(table) => {
                let from = PackedRef::from(from);
                if let Some(reference) = table.find_mut(hash, |&candidate| candidate == from) {
                    *reference = to.into();
                }
            }
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = EntryRef> + '_ {
        let (inline, table): (&[CompactRef], _) = match self {
            Self::Inline {
                len, references, ..
            } => (&references[..usize::from(*len)], None),
            Self::Table(table) => (&[], Some(table)),
        };
        inline.iter().map(|reference| reference.expand()).chain(
            table
                .into_iter()
                .flat_map(|table| table.iter().map(|&entry| entry.into())),
        )
    }

    #[cfg(test)]
    pub(super) fn is_inline(&self) -> bool {
        matches!(self, Self::Inline { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_to_a_reference_too_wide_for_the_inline_form_turns_it_into_a_table() {
        // Dense slabs never produce such a move; if one came, the reference must not be cut
        // to one byte (it would name another slot).
        let entries: Vec<(EntryRef, u64)> = (0..4)
            .map(|index| (EntryRef::new(0, index), 0x1000 + index as u64))
            .collect();
        let wide = EntryRef::new(0, 1000);
        let hash_of = |entry: EntryRef| {
            entries
                .iter()
                .find(|(known, _)| *known == entry)
                .map_or(0x1002, |&(_, hash)| hash)
        };
        let mut index = EntryIndex::default();
        for &(entry, hash) in &entries {
            index.insert(hash, entry, hash_of);
        }
        assert!(index.is_inline());
        index.redirect(0x1002, entries[2].0, wide, hash_of);
        assert!(!index.is_inline());
        assert_eq!(index.find(0x1002, |entry| entry == wide), Some(wide));
        assert_eq!(index.find(0x1002, |entry| entry == entries[2].0), None);
        assert_eq!(index.len(), 4);
    }
}

#[cfg(test)]
mod tag_matching {
    use super::*;
    use proptest::prelude::*;

    fn slot_tag() -> impl Strategy<Value = u8> {
        // Live slots hold seven-bit tags, unused ones NO_TAG; a few values cover the
        // byte-boundary cases (0, 0x7f) often.
        prop_oneof![0..=0x7f_u8, Just(0), Just(0x7f), Just(NO_TAG)]
    }

    proptest! {
        #[test]
        fn the_word_at_a_time_match_finds_exactly_the_equal_tags(
            tags in proptest::array::uniform16(slot_tag()),
            wanted in 0..=0x7f_u8,
        ) {
            let mut expected = 0_u128;
            for (slot, &tag) in tags.iter().enumerate() {
                if tag == wanted {
                    expected |= 0x80 << (8 * slot);
                }
            }
            prop_assert_eq!(matching_slots(&tags, wanted), expected);
        }
    }
}
