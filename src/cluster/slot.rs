//! Placement: a bucket's slot is CRC16 of its name mod 16384, exactly as Redis Cluster computes
//! a key's slot, `{hash tags}` included, so that Redis Cluster clients route kv's buckets as
//! they route Redis's keys. Slots fall into shards in contiguous ranges.

/// How many slots there are: Redis Cluster's number, which its clients assume.
pub const SLOTS: u16 = 16384;

/// CRC-16/XMODEM, the checksum Redis Cluster hashes keys with.
const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);

/// The slot of a bucket called `name`: CRC16 of its hash tag (the bytes between the first `{`
/// and the first `}` after it, if there are any between them), or of the whole name.
#[must_use]
pub fn slot_of(name: &[u8]) -> u16 {
    CRC16.checksum(hash_tag(name)) % SLOTS
}

/// The part of `name` that is hashed.
fn hash_tag(name: &[u8]) -> &[u8] {
    let Some(open) = memchr::memchr(b'{', name) else {
        return name;
    };
    match memchr::memchr(b'}', &name[open + 1..]) {
        Some(length) if length > 0 => &name[open + 1..open + 1 + length],
        _ => name,
    }
}

/// The shard that holds `slot` when the slots are cut into `shards` contiguous ranges of as
/// equal a size as can be (the first `SLOTS % shards` ranges one slot larger).
#[must_use]
pub fn shard_of(slot: u16, shards: u16) -> u16 {
    debug_assert!(shards > 0 && shards <= SLOTS && slot < SLOTS);
    let (size, larger) = (SLOTS / shards, SLOTS % shards);
    let in_larger = larger * (size + 1);
    if slot < in_larger {
        slot / (size + 1)
    } else {
        larger + (slot - in_larger) / size
    }
}

/// The slots of shard `shard` of `shards`, as an inclusive range: what `CLUSTER SLOTS` shows.
#[must_use]
pub fn slots_of(shard: u16, shards: u16) -> std::ops::RangeInclusive<u16> {
    let (size, larger) = (SLOTS / shards, SLOTS % shards);
    let start = shard * size + shard.min(larger);
    let length = size + u16::from(shard < larger);
    start..=start + length - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // What `CLUSTER KEYSLOT` answers on Redis 7.0.15 in cluster mode.
        assert_eq!(CRC16.checksum(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"somekey"), 11058);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"hello"), 866);
        assert_eq!(slot_of(b"{user1000}.following"), 3443);
        assert_eq!(slot_of(b"foo{{bar}}zap"), 4015);
        assert_eq!(slot_of(b"foo{}{bar}"), 8363);
        assert_eq!(slot_of(b""), 0);
    }

    #[test]
    fn hash_tags_pick_the_part_that_is_hashed() {
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"{user1000}.followers"), slot_of(b"user1000"));
        assert_eq!(
            slot_of(b"foo{}{bar}"),
            slot_of(b"foo{}{bar}"),
            "empty tag: the whole name"
        );
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"no tag}{"), b"no tag}{");
    }

    #[test]
    fn shards_cut_the_slots_into_ranges_that_agree_with_shard_of() {
        for shards in [1u16, 3, 7, 16, 100, 16384] {
            let mut next = 0u32;
            for shard in 0..shards {
                let range = slots_of(shard, shards);
                assert_eq!(u32::from(*range.start()), next, "{shards} shards");
                for slot in [*range.start(), *range.end()] {
                    assert_eq!(
                        shard_of(slot, shards),
                        shard,
                        "slot {slot} of {shards} shards"
                    );
                }
                next = u32::from(*range.end()) + 1;
            }
            assert_eq!(next, u32::from(SLOTS), "{shards} shards cover every slot");
        }
    }
}
