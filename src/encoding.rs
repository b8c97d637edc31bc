//! Two small things several parts of kv need in the same form: LEB128 lengths (a bucket's
//! slots and the log's records), and when a collection that has emptied gives its room back.

/// The most bytes a `usize` takes as a varint.
pub(crate) const MAX_VARINT_LEN: usize = 10;

// LEB128 by hand: a few lines, and the crates for it bring far more than this needs.

/// Appends `value` as a LEB128 varint.
#[inline]
pub(crate) fn write_varint(out: &mut impl Extend<u8>, mut value: usize) {
    while value >= 0x80 {
        out.extend([(value as u8) | 0x80]);
        value >>= 7;
    }
    out.extend([value as u8]);
}

/// The varint at the start of `bytes`: its value and how many bytes it took; `None` if the
/// bytes end first or it does not fit a `usize`.
#[inline]
pub(crate) fn read_varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (index, &byte) in bytes.iter().enumerate().take(MAX_VARINT_LEN) {
        value |= usize::from(byte & 0x7f).checked_shl(7 * index as u32)?;
        if byte & 0x80 == 0 {
            return Some((value, index + 1));
        }
    }
    None
}

/// How many bytes `value` takes as a varint.
#[inline]
pub(crate) fn varint_len(value: usize) -> usize {
    (usize::BITS - value.leading_zeros()).max(1).div_ceil(7) as usize
}

/// The capacity a collection of `len` items should shrink to, if it holds a quarter of its
/// `capacity` or less (and is not small): half its room stays, so that one item in and out
/// at the boundary does not resize it each time. Creating and dropping many buckets, or
/// filling and emptying one, then leaves memory where it started.
#[inline]
pub(crate) fn shrunk_capacity(len: usize, capacity: usize) -> Option<usize> {
    (capacity > 64 && len * 4 < capacity).then_some(len * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_every_width() {
        for shift in 0..usize::BITS {
            for value in [1usize << shift, (1usize << shift) - 1, usize::MAX >> shift] {
                let mut bytes = Vec::new();
                write_varint(&mut bytes, value);
                assert_eq!(bytes.len(), varint_len(value), "{value}");
                assert_eq!(read_varint(&bytes), Some((value, bytes.len())), "{value}");
                assert_eq!(read_varint(&bytes[..bytes.len() - 1]), None, "cut {value}");
            }
        }
        assert_eq!(read_varint(&[0xff; 11]), None, "too long");
    }

    #[test]
    fn only_a_sparse_collection_that_is_not_small_shrinks() {
        assert_eq!(shrunk_capacity(10, 64), None);
        assert_eq!(shrunk_capacity(16, 128), Some(32));
        assert_eq!(shrunk_capacity(32, 128), None);
        assert_eq!(shrunk_capacity(0, 1024), Some(0));
    }
}
