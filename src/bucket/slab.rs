//! Where a table's entries live: packed by size class into a few slabs of large byte vectors.
//!
//! Each entry is `varint(key length) ++ varint(value length) ++ key ++ value`, stored in a slot
//! of the smallest size class that holds it (16 to 4096 bytes, classes at most 12.5% apart);
//! larger entries get an allocation of their own. An [`EntryRef`] names a slot by its slab
//! and index: eight bytes, where a boxed entry would cost a 16-byte fat pointer in the hash table
//! plus an allocator header and rounding per entry. That difference is what takes a key of 16
//! bytes with a 32-byte value under 100 bytes of resident memory.
//!
//! Invariant: every slab is dense. Removing a slot moves the slab's last slot into the hole
//! (and reports the move, so the index can follow it); slabs shrink as they empty, so a bucket
//! gives memory back as its keys go.

use smallvec::SmallVec;

use crate::encoding::{MAX_VARINT_LEN, read_varint, shrunk_capacity, varint_len, write_varint};

/// A slot's address: the slab's position in its table's list in the top byte (or [`LARGE`]),
/// the index in the slab below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct EntryRef(u64);

const INDEX_BITS: u32 = 56;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;

impl EntryRef {
    pub(super) fn new(position: usize, index: usize) -> Self {
        Self(((position as u64) << INDEX_BITS) | index as u64)
    }

    fn position(self) -> usize {
        (self.0 >> INDEX_BITS) as usize
    }

    fn index(self) -> usize {
        (self.0 & INDEX_MASK) as usize
    }

    /// This reference in one byte, if its slab position and slot index are both below 16
    /// (or it is a large entry with an index below 16): what a small index stores.
    pub(super) fn compact(self) -> Option<CompactRef> {
        let position = match self.position() {
            LARGE => COMPACT_LARGE,
            position => u8::try_from(position)
                .ok()
                .filter(|&position| position < COMPACT_LARGE)?,
        };
        let index = u8::try_from(self.index())
            .ok()
            .filter(|&index| index < 16)?;
        Some(CompactRef((position << 4) | index))
    }
}

/// An [`EntryRef`] as a table's hash index keeps it: five bytes with an alignment of one, the
/// slab's position and then the slot index's low 32 bits (slabs never hold more slots, see
/// [`MAX_SLOTS`]). The index of a table of a million keys has two million places: five bytes
/// each instead of eight is six bytes a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PackedRef([u8; 5]);

impl From<EntryRef> for PackedRef {
    fn from(entry: EntryRef) -> Self {
        let [position, ..] = (entry.position() as u8).to_le_bytes();
        let [a, b, c, d] = (entry.index() as u32).to_le_bytes();
        Self([position, a, b, c, d])
    }
}

impl From<PackedRef> for EntryRef {
    fn from(PackedRef([position, a, b, c, d]): PackedRef) -> Self {
        EntryRef::new(
            usize::from(position),
            u32::from_le_bytes([a, b, c, d]) as usize,
        )
    }
}

/// The most slots one slab holds, so that a slot index fits a [`PackedRef`]; a table with more
/// entries of one size opens another slab of that size. Large entries (over 4096 bytes each)
/// cannot reach it: 2^32 of them would be 16 TiB.
const MAX_SLOTS: usize = 1 << 32;

/// An [`EntryRef`] in one byte: four bits of slab position above four bits of slot index. A
/// table of at most 16 entries has dense slabs of at most 16 slots each, and most tables use
/// their first few slabs, so its references almost always fit; one that does not is never
/// stored in this form (the index turns into a hash table instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct CompactRef(u8);

/// The position [`LARGE`] takes in a [`CompactRef`]; slab positions 0 to 14 fit beside it.
const COMPACT_LARGE: u8 = 0xF;

impl CompactRef {
    pub(super) fn expand(self) -> EntryRef {
        let position = match self.0 >> 4 {
            COMPACT_LARGE => LARGE,
            position => usize::from(position),
        };
        EntryRef::new(position, usize::from(self.0 & 0xF))
    }
}

/// Slot sizes: steps of 4 up to 128 bytes (the small entries most keys are, where each byte of
/// rounding is a byte per key), then eight classes per doubling up to 4096.
const SLOT_SIZES: [usize; 69] = [
    16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 84, 88, 92, 96, 100, 104,
    108, 112, 116, 120, 124, 128, // by 4
    144, 160, 176, 192, 208, 224, 240, 256, // by 16
    288, 320, 352, 384, 416, 448, 480, 512, // by 32
    576, 640, 704, 768, 832, 896, 960, 1024, // by 64
    1152, 1280, 1408, 1536, 1664, 1792, 1920, 2048, // by 128
    2304, 2560, 2816, 3072, 3328, 3584, 3840, 4096, // by 256
];
/// The position of entries too large for any slot: one allocation each.
const LARGE: usize = 255;

/// What an entry of this many bytes costs in its slab: its slot, or its own allocation.
pub(super) fn stored_size(encoded_len: usize) -> usize {
    match size_class(encoded_len) {
        LARGE => encoded_len,
        class => SLOT_SIZES[class],
    }
}

fn size_class(encoded_len: usize) -> usize {
    match SLOT_SIZES.partition_point(|&size| size < encoded_len) {
        class if class == SLOT_SIZES.len() => LARGE,
        class => class,
    }
}

pub(super) fn encoded_len(key: &[u8], value: &[u8]) -> usize {
    varint_len(key.len()) + varint_len(value.len()) + key.len() + value.len()
}

/// The most bytes a slab reallocates: past a segment of this size (rounded down to a power
/// of two of slots) it grows by another segment rather than by copying what it holds.
const SEGMENT_BYTES: usize = 16 << 20;

/// Slots of one size, laid end to end in segments. A slab whose `slot_size` is zero has never
/// been used.
///
/// The first `1 << shift` slots are in `first`, which grows by doubling as a vector does; the
/// rest are in `more`, segments of `1 << shift` slots each, every one allocated whole (its
/// pages are taken only as its slots are written). A slab of gigabytes grown by doubling would
/// copy all it holds on the thread writing to the table (a third of a second at 512 MiB, with
/// writers to the bucket waiting) and hold the old and the new copy at once. Most tables never
/// pass their first segment, and reading their entries is one index into it.
///
/// Invariant: while `more` is not empty, `first` is full and so is every segment of `more`
/// but the last, which is not empty.
#[derive(Default)]
struct Slab {
    slot_size: u32,
    /// The base-2 logarithm of the slots a segment holds.
    shift: u32,
    first: Vec<u8>,
    more: Vec<Vec<u8>>,
}

impl Slab {
    fn new(slot_size: usize) -> Self {
        Self {
            slot_size: slot_size as u32,
            shift: (SEGMENT_BYTES / slot_size).ilog2(),
            first: Vec::new(),
            more: Vec::new(),
        }
    }

    fn slot_size(&self) -> usize {
        self.slot_size as usize
    }

    /// Slots per segment.
    fn segment_slots(&self) -> usize {
        1 << self.shift
    }

    /// How many slots are in use.
    fn len(&self) -> usize {
        match self.more.last() {
            None => self.first.len() / self.slot_size(),
            Some(last) => self.segment_slots() * self.more.len() + last.len() / self.slot_size(),
        }
    }

    /// Where slot `index` is: its segment (`None`: `first`) and its byte offset there.
    fn locate(&self, index: usize) -> (Option<usize>, usize) {
        match index.checked_sub(self.segment_slots()) {
            None => (None, index * self.slot_size()),
            Some(beyond) => (
                Some(beyond >> self.shift),
                (beyond & (self.segment_slots() - 1)) * self.slot_size(),
            ),
        }
    }

    fn slot(&self, index: usize) -> &[u8] {
        let (segment, offset) = self.locate(index);
        let segment = segment.map_or(&self.first, |segment| &self.more[segment]);
        &segment[offset..][..self.slot_size()]
    }

    fn slot_mut(&mut self, index: usize) -> &mut [u8] {
        let size = self.slot_size();
        let (segment, offset) = self.locate(index);
        let segment = match segment {
            None => &mut self.first,
            Some(segment) => &mut self.more[segment],
        };
        &mut segment[offset..][..size]
    }

    /// Stores an entry in a new last slot; its index.
    fn push(&mut self, key: &[u8], value: &[u8]) -> usize {
        let size = self.slot_size();
        let index = self.len();
        let segment_bytes = self.segment_slots() * size;
        let segment = if self.more.is_empty() && self.first.len() < segment_bytes {
            &mut self.first
        } else {
            if self
                .more
                .last()
                .is_none_or(|last| last.len() == segment_bytes)
            {
                self.more.push(Vec::with_capacity(segment_bytes));
            }
            self.more.last_mut().expect("a segment was just ensured")
        };
        let start = segment.len();
        encode(segment, key, value);
        segment.resize(start + size, 0);
        index
    }

    /// Moves the last slot into `hole` (unless it is the last) and drops the last slot;
    /// returns the last slot's index.
    fn remove(&mut self, hole: usize) -> usize {
        let size = self.slot_size();
        let last = self.len() - 1;
        if hole != last {
            match (self.locate(hole), self.locate(last)) {
                ((None, to), (None, from)) => self.first.copy_within(from..from + size, to),
                _ => {
                    // In different vectors: through a buffer (a slot is at most 4096 bytes).
                    let mut moving = [0; SLOT_SIZES[SLOT_SIZES.len() - 1]];
                    moving[..size].copy_from_slice(self.slot(last));
                    self.slot_mut(hole).copy_from_slice(&moving[..size]);
                }
            }
        }
        match self.more.last_mut() {
            None => {
                self.first.truncate(last * size);
                shrink(&mut self.first);
            }
            Some(segment) => {
                segment.truncate(segment.len() - size);
                if segment.is_empty() {
                    self.more.pop();
                }
            }
        }
        last
    }

    /// Whether the slab holds no memory.
    #[cfg(test)]
    fn is_freed(&self) -> bool {
        self.first.capacity() == 0 && self.more.is_empty()
    }
}

/// Slabs held inline in a table's header, before any go to the heap.
const INLINE_SLABS: usize = 2;

/// The entries of one table.
///
/// `repr(C)`: the first slab's header, which reading an entry of a table with one size of
/// value goes through, comes first, so that a table's hot bytes end at
/// [`HOT_BYTES`](Self::HOT_BYTES).
#[derive(Default)]
#[repr(C)]
pub(super) struct Slabs {
    /// One slab per slot size in use, in the order first needed: positions below
    /// `INLINE_SLABS` here, the rest in `spilled`. An [`EntryRef`] names its slab by position,
    /// so reading an entry is one index, no search. Most tables hold values of one or two
    /// sizes, and then reading an entry follows no pointer but the slab's own. A slab that
    /// empties keeps its place (and gives back its bytes), so positions never change; there
    /// is one per slot size, and one more per [`MAX_SLOTS`] entries of a size (below
    /// [`LARGE`] for any memory there is).
    inline: [Slab; INLINE_SLABS],
    spilled: Vec<Slab>,
    large: Vec<Box<[u8]>>,
}

/// A slot moved by a removal: the entry at `from` is now at `to`.
pub(super) struct Moved {
    pub(super) from: EntryRef,
    pub(super) to: EntryRef,
}

impl Slabs {
    /// The leading bytes that reading an entry in the first slab uses.
    pub(super) const HOT_BYTES: usize =
        std::mem::offset_of!(Slabs, inline) + std::mem::offset_of!(Slab, more);

    fn slab(&self, position: usize) -> &Slab {
        match position.checked_sub(INLINE_SLABS) {
            None => &self.inline[position],
            Some(spilled) => &self.spilled[spilled],
        }
    }

    fn slab_mut(&mut self, position: usize) -> &mut Slab {
        match position.checked_sub(INLINE_SLABS) {
            None => &mut self.inline[position],
            Some(spilled) => &mut self.spilled[spilled],
        }
    }

    fn in_use(&self) -> impl Iterator<Item = &Slab> {
        self.inline
            .iter()
            .chain(&self.spilled)
            .take_while(|slab| slab.slot_size != 0)
    }

    /// The position of a slab of slots of `size` with room for one more, made if there is
    /// none yet.
    fn position_for(&mut self, size: usize) -> usize {
        if let Some(position) = self
            .in_use()
            .position(|slab| slab.slot_size() == size && slab.len() < MAX_SLOTS)
        {
            return position;
        }
        let used = self.in_use().count();
        let slab = Slab::new(size);
        match self.inline.get_mut(used) {
            Some(unused) => *unused = slab,
            None => self.spilled.push(slab),
        }
        used
    }

    /// Stores a new entry and returns its address.
    pub(super) fn insert(&mut self, key: &[u8], value: &[u8]) -> EntryRef {
        let length = encoded_len(key, value);
        let class = size_class(length);
        if class == LARGE {
            let mut block = Vec::with_capacity(length);
            encode(&mut block, key, value);
            self.large.push(block.into_boxed_slice());
            return EntryRef::new(LARGE, self.large.len() - 1);
        }
        let position = self.position_for(SLOT_SIZES[class]);
        let index = self.slab_mut(position).push(key, value);
        EntryRef::new(position, index)
    }

    /// Replaces the entry at `entry` in place, if the new one needs a slot of the same size.
    /// Returns whether it did.
    pub(super) fn replace(&mut self, entry: EntryRef, key: &[u8], value: &[u8]) -> bool {
        let class = size_class(encoded_len(key, value));
        if class == LARGE || entry.position() == LARGE {
            return false;
        }
        let slab = self.slab_mut(entry.position());
        if SLOT_SIZES[class] != slab.slot_size() {
            return false;
        }
        let slot = slab.slot_mut(entry.index());
        // On the stack: overwriting a value is the common write, and allocates nothing.
        let mut header = SmallVec::<[u8; 2 * MAX_VARINT_LEN]>::new();
        write_varint(&mut header, key.len());
        write_varint(&mut header, value.len());
        let (head, rest) = slot.split_at_mut(header.len());
        head.copy_from_slice(&header);
        rest[..key.len()].copy_from_slice(key);
        rest[key.len()..key.len() + value.len()].copy_from_slice(value);
        true
    }

    /// The key and value at `entry`.
    pub(super) fn get(&self, entry: EntryRef) -> (&[u8], &[u8]) {
        decode(self.bytes(entry))
    }

    pub(super) fn key(&self, entry: EntryRef) -> &[u8] {
        self.get(entry).0
    }

    /// Starts loading the slot of `entry` into cache.
    pub(super) fn prefetch(&self, entry: EntryRef) {
        crate::prefetch::prefetch_bytes(self.bytes(entry));
    }

    fn bytes(&self, entry: EntryRef) -> &[u8] {
        match entry.position() {
            LARGE => &self.large[entry.index()],
            position => self.slab(position).slot(entry.index()),
        }
    }

    /// Removes the entry at `entry`, moving the last slot of its slab into the hole.
    pub(super) fn remove(&mut self, entry: EntryRef) -> Option<Moved> {
        let position = entry.position();
        let (last, moved) = if position == LARGE {
            let last = self.large.len() - 1;
            self.large.swap_remove(entry.index());
            shrink(&mut self.large);
            (last, entry.index() != last)
        } else {
            let last = self.slab_mut(position).remove(entry.index());
            (last, entry.index() != last)
        };
        moved.then(|| Moved {
            from: EntryRef::new(position, last),
            to: entry,
        })
    }
}

/// Where a scan of a table's entries stands, as a number a client can hand back: the slab's
/// position in the top byte (slabs in position order, then [`LARGE`]), and below it how far
/// down that slab the scan has come. Zero is both the start and the end.
///
/// Each slab is walked from its last slot down. A removal moves a slab's last slot into the
/// hole, and the last slot is one the scan has passed already (or, if the slab has shrunk
/// below the cursor, one still ahead moving further ahead), so an entry that stays in its slab
/// throughout is never skipped; it may be returned twice. An entry that moves to another
/// slab (its value changed size) may be missed, and one added during the scan may or may not
/// be returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanCursor(pub(crate) u64);

impl ScanCursor {
    /// At slab `position`, with the slots below `below` still to visit (`INDEX_MASK`: all).
    fn at(position: usize, below: usize) -> Self {
        Self(((position as u64) << INDEX_BITS) | (INDEX_MASK - below as u64))
    }

    fn position(self) -> usize {
        (self.0 >> INDEX_BITS) as usize
    }

    fn below(self) -> usize {
        (INDEX_MASK - (self.0 & INDEX_MASK)) as usize
    }
}

impl Slabs {
    /// Calls `visit` with the key and value of each entry from `cursor` on, until it says to
    /// stop (returns `false`) or the end; returns where to go on from (zero at the end). Costs
    /// the entries visited plus at most one step per slab passed: never a walk over the whole
    /// table.
    pub(super) fn scan(
        &self,
        cursor: ScanCursor,
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> ScanCursor {
        let used = self.in_use().count();
        let mut position = cursor.position();
        let mut below = cursor.below();
        if position >= used && position != LARGE {
            position = LARGE;
        }
        loop {
            let len = match position {
                LARGE => self.large.len(),
                position => self.slab(position).len(),
            };
            let mut index = below.min(len);
            let mut go_on = true;
            while index > 0 && go_on {
                index -= 1;
                let (key, value) = self.get(EntryRef::new(position, index));
                go_on = visit(key, value);
            }
            if index > 0 {
                return ScanCursor::at(position, index);
            }
            below = INDEX_MASK as usize;
            position = match position {
                LARGE => return ScanCursor(0),
                position if position + 1 < used => position + 1,
                _ => LARGE,
            };
            if !go_on {
                return ScanCursor::at(position, below);
            }
        }
    }
}

/// Gives back the room of a vector that has fallen to a quarter of its capacity, or emptied.
fn shrink<T>(vector: &mut Vec<T>) {
    if vector.is_empty() {
        *vector = Vec::new();
    } else if let Some(capacity) = shrunk_capacity(vector.len(), vector.capacity()) {
        vector.shrink_to(capacity);
    }
}

fn encode(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    write_varint(out, key.len());
    write_varint(out, value.len());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
}

fn decode(bytes: &[u8]) -> (&[u8], &[u8]) {
    let (key_len, first) = read_varint(bytes).expect("a slot starts with the varints encode wrote");
    let (value_len, second) =
        read_varint(&bytes[first..]).expect("a slot starts with the varints encode wrote");
    let rest = &bytes[first + second..];
    (&rest[..key_len], &rest[key_len..key_len + value_len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compact_reference_is_the_same_reference_or_none() {
        for position in (0..SLOT_SIZES.len()).chain([LARGE]) {
            for index in 0..16 {
                let entry = EntryRef::new(position, index);
                let expected = (position < 15 || position == LARGE).then_some(entry);
                assert_eq!(entry.compact().map(CompactRef::expand), expected);
            }
            assert_eq!(EntryRef::new(position, 16).compact(), None);
            assert_eq!(EntryRef::new(position, 1 << 40).compact(), None);
        }
    }

    #[test]
    fn a_packed_reference_is_the_same_reference() {
        for position in (0..SLOT_SIZES.len()).chain([LARGE]) {
            for index in [0, 1, 255, 65_536, MAX_SLOTS - 1] {
                let entry = EntryRef::new(position, index);
                assert_eq!(EntryRef::from(PackedRef::from(entry)), entry);
            }
        }
        assert_eq!(size_of::<PackedRef>(), 5);
        assert_eq!(align_of::<PackedRef>(), 1);
    }

    #[test]
    fn classes_fit_their_entries_closely() {
        assert_eq!(stored_size(encoded_len(&[0; 16], &[0; 32])), 52);
        assert_eq!(stored_size(1), 16);
        assert_eq!(stored_size(4096), 4096);
        assert_eq!(stored_size(4097), 4097);
        for length in 1..=4096 {
            let stored = stored_size(length);
            assert!(
                stored >= length && stored <= (length * 9 / 8 + 8).max(16),
                "{length}"
            );
        }
    }

    #[test]
    fn entries_of_every_size_round_trip_and_removal_keeps_classes_dense() {
        let mut slabs = Slabs::default();
        let mut live: Vec<(EntryRef, Vec<u8>, Vec<u8>)> = Vec::new();
        for size in [0usize, 1, 13, 40, 200, 3000, 5000, 70_000] {
            for copy in 0..3u8 {
                let key = vec![copy; size % 50 + 1];
                let value = vec![copy.wrapping_add(1); size];
                live.push((slabs.insert(&key, &value), key, value));
            }
        }
        while !live.is_empty() {
            for (entry, key, value) in &live {
                assert_eq!(slabs.get(*entry), (&key[..], &value[..]));
            }
            let (entry, _, _) = live.remove(live.len() / 2);
            if let Some(moved) = slabs.remove(entry) {
                let mover = live
                    .iter_mut()
                    .find(|(live_entry, _, _)| *live_entry == moved.from)
                    .expect("the moved entry was live");
                mover.0 = moved.to;
            }
        }
        assert!(slabs.in_use().all(Slab::is_freed));
        assert!(slabs.large.is_empty());
    }

    #[test]
    fn a_slab_past_its_first_segment_grows_and_shrinks_by_whole_segments() {
        let mut slabs = Slabs::default();
        // 4,000-byte values take the largest slots: a segment holds 4,096 of them.
        let value = |i: u32| vec![i as u8; 4000];
        let per_segment = SEGMENT_BYTES / 4096;
        let count = (per_segment * 5 / 2) as u32;
        let mut live: Vec<(EntryRef, u32)> = (0..count)
            .map(|i| (slabs.insert(&i.to_le_bytes(), &value(i)), i))
            .collect();
        let slab = slabs.slab(0);
        assert_eq!(slab.first.len(), SEGMENT_BYTES);
        assert_eq!(slab.more.len(), 2);
        assert!(
            slab.more
                .iter()
                .all(|segment| segment.capacity() == SEGMENT_BYTES)
        );
        let reads_back = |slabs: &Slabs, live: &[(EntryRef, u32)]| {
            for &(entry, i) in live {
                assert_eq!(slabs.get(entry), (&i.to_le_bytes()[..], &value(i)[..]));
            }
        };
        reads_back(&slabs, &live);
        // Removed from the front: each hole is filled from the last segment.
        let mut removed = 0;
        while let Some(&(entry, _)) = live.first() {
            live.swap_remove(0);
            if let Some(moved) = slabs.remove(entry) {
                let mover = live
                    .iter_mut()
                    .find(|(live_entry, _)| *live_entry == moved.from)
                    .expect("the moved entry was live");
                mover.0 = moved.to;
            }
            removed += 1;
            if removed % 2048 == 0 {
                reads_back(&slabs, &live);
                let slab = slabs.slab(0);
                let segments = live.len().div_ceil(per_segment).saturating_sub(1);
                assert_eq!(slab.more.len(), segments, "{} live", live.len());
            }
        }
        assert!(slabs.in_use().all(Slab::is_freed));
    }

    #[test]
    fn same_class_values_are_replaced_in_place() {
        let mut slabs = Slabs::default();
        let entry = slabs.insert(b"key", b"value-1");
        assert!(slabs.replace(entry, b"key", b"value-2"));
        assert_eq!(slabs.get(entry), (&b"key"[..], &b"value-2"[..]));
        assert!(!slabs.replace(entry, b"key", &[0; 100]));
    }
}
