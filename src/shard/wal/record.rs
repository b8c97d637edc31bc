//! The log's records: the framing of a [`Change`]. Pure: no I/O, so every torn or corrupt shape can be
//! tested byte by byte.
//!
//! A frame is `length (u32 LE) ++ crc32c(length) ++ payload ++ crc32c(payload)`. The length
//! carries its own checksum so that a damaged length in the middle of a file is reported as
//! corruption, not mistaken for a torn end (which would silently drop everything after it).
//! A payload is an operation byte and its fields, each a varint length and bytes.

use crate::change::Change;
use crate::encoding::{read_varint, write_varint};

const CREATE: u8 = 1;
const PUT: u8 = 2;
const DELETE: u8 = 3;
const DROP: u8 = 4;

const HEADER_LEN: usize = 8;
const TRAILER_LEN: usize = 4;
/// The largest payload a frame may claim: a bound on what a damaged length can make the reader
/// believe. Far above any record the server accepts (bulks are capped well below).
const MAX_PAYLOAD: u32 = 1 << 30;

/// The largest change the log can hold: a bound on what a client may store in a durable
/// bucket (its key, value and bucket name together, with a few bytes of framing).
pub const MAX_CHANGE_LEN: usize = MAX_PAYLOAD as usize - 64;

/// The bytes of `change`'s fields: at most [`MAX_CHANGE_LEN`] for a change the log holds.
#[must_use]
pub fn size(change: &Change<'_>) -> usize {
    match *change {
        Change::Create { bucket } | Change::Drop { bucket } => bucket.len(),
        Change::Put { bucket, key, value } => bucket.len() + key.len() + value.len(),
        Change::Delete { bucket, key } => bucket.len() + key.len(),
    }
}

/// At most the bytes [`encode_change`] appends for `change`: its fields, the operation byte
/// and a length of at most five bytes per field (a field the log holds is under 2^30 bytes).
#[must_use]
pub fn encoded_bound(change: &Change<'_>) -> usize {
    size(change) + 1 + 3 * 5
}

/// Appends the frame of `change` to `out`. A change over [`MAX_CHANGE_LEN`] must have been
/// refused before it was made.
pub fn encode(change: &Change<'_>, out: &mut Vec<u8>) {
    encode_frame(out, |out| encode_change(change, out));
}

/// Appends `change` as a payload, unframed: what a Raft entry of the cluster carries.
pub fn encode_change(change: &Change<'_>, out: &mut Vec<u8>) {
    match *change {
        Change::Create { bucket } => {
            out.push(CREATE);
            put_field(out, bucket);
        }
        Change::Put { bucket, key, value } => {
            out.push(PUT);
            put_field(out, bucket);
            put_field(out, key);
            put_field(out, value);
        }
        Change::Delete { bucket, key } => {
            out.push(DELETE);
            put_field(out, bucket);
            put_field(out, key);
        }
        Change::Drop { bucket } => {
            out.push(DROP);
            put_field(out, bucket);
        }
    }
}

/// Appends a frame whose payload `write` appends: the framing of every file kv logs to.
///
/// # Panics
/// If the payload passes the frame's limit: callers refuse such payloads before they exist.
pub fn encode_frame(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let framed: Result<(), std::convert::Infallible> = try_encode_frame(out, |out| {
        write(out);
        Ok(())
    });
    let Ok(()) = framed;
}

/// [`encode_frame`] with a payload whose making may fail: on failure `out` is left as it was.
///
/// # Errors
/// What `write` returned.
///
/// # Panics
/// If the payload passes the frame's limit: callers refuse such payloads before they exist.
pub fn try_encode_frame<E>(
    out: &mut Vec<u8>,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(error) = write(out) {
        out.truncate(start);
        return Err(error);
    }
    let payload_len = out.len() - start - HEADER_LEN;
    let length = u32::try_from(payload_len)
        .ok()
        .filter(|&length| length <= MAX_PAYLOAD)
        .expect("payloads that do not fit a frame are refused before they are made");
    let length = length.to_le_bytes();
    out[start..start + 4].copy_from_slice(&length);
    out[start + 4..start + 8].copy_from_slice(&crc32c::crc32c(&length).to_le_bytes());
    let checksum = crc32c::crc32c(&out[start + HEADER_LEN..]);
    out.extend_from_slice(&checksum.to_le_bytes());
    Ok(())
}

fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    write_varint(out, field.len());
    out.extend_from_slice(field);
}

/// Reads one field at `*at`, advancing it; `None` if the payload ends early or lies.
fn take_field<'a>(payload: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let (length, taken) = read_varint(payload.get(*at..)?)?;
    let start = *at + taken;
    let field = payload.get(start..start.checked_add(length)?)?;
    *at = start + length;
    Some(field)
}

/// The change a payload of [`encode_change`] holds; `None` if it is not one.
#[must_use]
pub fn decode_change(payload: &[u8]) -> Option<Change<'_>> {
    let (change, taken) = decode_change_prefix(payload)?;
    (taken == payload.len()).then_some(change)
}

/// The change that `bytes` start with, and how many bytes it takes; `None` if they do not start
/// with a whole one. Changes encoded one after another read back this way.
pub fn decode_change_prefix(bytes: &[u8]) -> Option<(Change<'_>, usize)> {
    let payload = bytes;
    let (&operation, _) = payload.split_first()?;
    let mut at = 1;
    let record = match operation {
        CREATE => Change::Create {
            bucket: take_field(payload, &mut at)?,
        },
        PUT => Change::Put {
            bucket: take_field(payload, &mut at)?,
            key: take_field(payload, &mut at)?,
            value: take_field(payload, &mut at)?,
        },
        DELETE => Change::Delete {
            bucket: take_field(payload, &mut at)?,
            key: take_field(payload, &mut at)?,
        },
        DROP => Change::Drop {
            bucket: take_field(payload, &mut at)?,
        },
        _ => return None,
    };
    Some((record, at))
}

/// How a scan of a log ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte was a whole, valid record.
    Clean,
    /// The bytes from `offset` on hold no whole record: what a crash mid-write leaves at the
    /// end of a log. Cutting them off loses nothing that was ever written whole.
    Torn {
        /// Where the torn tail starts.
        offset: u64,
        /// What the tail looks like.
        reason: &'static str,
    },
    /// A damaged record: a whole one that fails its checksum, or bytes that are no record
    /// with whole records after them. Not what a crash mid-write leaves.
    Corrupt {
        /// Where the damaged record starts.
        offset: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// What the frame at the start of `rest` is.
enum Frame<'a> {
    /// A whole frame with valid checksums: its payload and its length in bytes.
    Whole { payload: &'a [u8], len: usize },
    /// A valid header whose frame runs past the end of `rest`.
    Incomplete,
    /// A valid header and a whole frame whose payload fails its checksum; `unwritten` when its
    /// checksum bytes are all zero (the end of the frame never reached the disk).
    BadPayload { len: usize, unwritten: bool },
    /// No valid header.
    BadHeader { reason: &'static str },
}

fn frame(rest: &[u8]) -> Frame<'_> {
    if rest.len() < HEADER_LEN {
        return Frame::Incomplete;
    }
    let length_bytes: [u8; 4] = rest[..4].try_into().expect("four bytes");
    let length_checksum = u32::from_le_bytes(rest[4..8].try_into().expect("four bytes"));
    if crc32c::crc32c(&length_bytes) != length_checksum {
        return Frame::BadHeader {
            reason: "record length fails its checksum",
        };
    }
    let length = u32::from_le_bytes(length_bytes);
    if length > MAX_PAYLOAD {
        return Frame::BadHeader {
            reason: "record length is impossibly large",
        };
    }
    let len = HEADER_LEN + length as usize + TRAILER_LEN;
    if rest.len() < len {
        return Frame::Incomplete;
    }
    let payload = &rest[HEADER_LEN..HEADER_LEN + length as usize];
    let trailer = &rest[len - TRAILER_LEN..len];
    let checksum = u32::from_le_bytes(trailer.try_into().expect("four bytes"));
    if crc32c::crc32c(payload) != checksum {
        return Frame::BadPayload {
            len,
            unwritten: trailer == [0; TRAILER_LEN],
        };
    }
    Frame::Whole { payload, len }
}

/// Whether a whole, valid frame starts anywhere in `bytes`: what tells damage (records after
/// it would be lost by a cut) from a torn tail (nothing whole after it).
fn holds_a_whole_frame(bytes: &[u8]) -> bool {
    (0..bytes.len()).any(|start| matches!(frame(&bytes[start..]), Frame::Whole { .. }))
}

/// Whether `rest` is one frame whose payload checksum holds and whose header is damaged: the
/// last record of a log with a flipped bit in its length, which is no tear.
fn is_whole_but_its_header(rest: &[u8]) -> bool {
    let Some(payload_end) = rest.len().checked_sub(TRAILER_LEN) else {
        return false;
    };
    if payload_end <= HEADER_LEN {
        return false;
    }
    let trailer: [u8; TRAILER_LEN] = rest[payload_end..].try_into().expect("four bytes");
    crc32c::crc32c(&rest[HEADER_LEN..payload_end]) == u32::from_le_bytes(trailer)
}

/// Calls `visit` with every valid record of `bytes` and its offset, in order, and says how the
/// bytes ended. Stops early if `visit` fails.
///
/// A tail is torn, not corrupt, when it holds no whole record: a frame cut short, a whole
/// frame whose checksum was never written (zeros), or bytes that are no frame with no whole
/// frame after them (a zeroed or garbage tail left by a power cut). A whole last frame that
/// fails its checksum is corrupt: cutting it would silently lose a write that was complete.
///
/// # Errors
/// Whatever `visit` returns.
pub fn scan<'a, E>(
    bytes: &'a [u8],
    visit: impl FnMut(Change<'a>, u64) -> Result<(), E>,
) -> Result<ScanEnd, E> {
    scan_frames(bytes, decode_change, visit)
}

/// [`scan`] for frames of any payload: `decode` makes each payload a `T` (`None`: the payload
/// is not one, which is corruption).
///
/// # Errors
/// Whatever `visit` returns.
pub fn scan_frames<'a, T, E>(
    bytes: &'a [u8],
    decode: impl Fn(&'a [u8]) -> Option<T>,
    mut visit: impl FnMut(T, u64) -> Result<(), E>,
) -> Result<ScanEnd, E> {
    let mut at = 0usize;
    while at < bytes.len() {
        let offset = at as u64;
        let rest = &bytes[at..];
        let (payload, len) = match frame(rest) {
            Frame::Whole { payload, len } => (payload, len),
            Frame::Incomplete => {
                return Ok(ScanEnd::Torn {
                    offset,
                    reason: "an incomplete record",
                });
            }
            Frame::BadPayload { len, unwritten } => {
                return Ok(if rest.len() == len && unwritten {
                    ScanEnd::Torn {
                        offset,
                        reason: "a record whose checksum was never written",
                    }
                } else if rest.len() == len {
                    ScanEnd::Corrupt {
                        offset,
                        reason: "the last record is whole but fails its checksum",
                    }
                } else {
                    ScanEnd::Corrupt {
                        offset,
                        reason: "record fails its checksum",
                    }
                });
            }
            Frame::BadHeader { reason } => {
                return Ok(
                    if is_whole_but_its_header(rest) || holds_a_whole_frame(&rest[1..]) {
                        ScanEnd::Corrupt { offset, reason }
                    } else {
                        ScanEnd::Torn {
                            offset,
                            reason: "bytes that hold no whole record",
                        }
                    },
                );
            }
        };
        let Some(record) = decode(payload) else {
            return Ok(ScanEnd::Corrupt {
                offset,
                reason: "record has a valid checksum but is not a record",
            });
        };
        visit(record, offset)?;
        at += len;
    }
    Ok(ScanEnd::Clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Change<'static>> {
        vec![
            Change::Create {
                bucket: b"shopping",
            },
            Change::Put {
                bucket: b"shopping",
                key: b"milk",
                value: b"1",
            },
            Change::Put {
                bucket: b"shopping",
                key: &[0, 255, 13, 10],
                value: &[7; 300],
            },
            Change::Delete {
                bucket: b"shopping",
                key: b"milk",
            },
            Change::Drop {
                bucket: b"shopping",
            },
        ]
    }

    fn encode_all(records: &[Change<'_>]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        for record in records {
            starts.push(bytes.len());
            encode(record, &mut bytes);
        }
        (bytes, starts)
    }

    fn read_all(bytes: &[u8]) -> (Vec<Change<'_>>, ScanEnd) {
        let mut records = Vec::new();
        let end = scan(bytes, |record, _| {
            records.push(record);
            Ok::<(), ()>(())
        })
        .unwrap();
        (records, end)
    }

    #[test]
    fn a_change_takes_no_more_than_its_bound() {
        let long = vec![1; 3 << 20]; // a length of four bytes
        let mut changes = sample();
        changes.push(Change::Put {
            bucket: &long,
            key: &long,
            value: &long,
        });
        for change in &changes {
            let mut out = Vec::new();
            encode_change(change, &mut out);
            assert!(out.len() <= encoded_bound(change), "{}", out.len());
        }
    }

    #[test]
    fn records_round_trip() {
        let records = sample();
        let (bytes, _) = encode_all(&records);
        assert_eq!(read_all(&bytes), (records, ScanEnd::Clean));
    }

    #[test]
    fn a_log_cut_at_any_byte_keeps_every_whole_record_and_reports_the_tear() {
        let records = sample();
        let (bytes, starts) = encode_all(&records);
        let ends: Vec<usize> = starts[1..].iter().copied().chain([bytes.len()]).collect();
        for cut in 0..bytes.len() {
            let (read, end) = read_all(&bytes[..cut]);
            let whole = ends.iter().filter(|&&end| end <= cut).count();
            assert_eq!(read, records[..whole], "cut at {cut}");
            let expected = if cut == 0 || ends.contains(&cut) {
                ScanEnd::Clean
            } else {
                ScanEnd::Torn {
                    offset: starts[whole] as u64,
                    reason: "an incomplete record",
                }
            };
            assert_eq!(end, expected, "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_byte_before_the_last_record_is_corruption_at_its_record() {
        let records = sample();
        let (bytes, starts) = encode_all(&records);
        let last = *starts.last().unwrap();
        for position in 0..last {
            for bit in [0x01u8, 0x80] {
                let mut damaged = bytes.clone();
                damaged[position] ^= bit;
                let (read, end) = read_all(&damaged);
                let record = starts.iter().rposition(|&start| start <= position).unwrap();
                assert_eq!(read, records[..record], "flip at {position}");
                assert!(
                    matches!(end, ScanEnd::Corrupt { offset, .. } if offset == starts[record] as u64),
                    "flip at {position}: {end:?}"
                );
            }
        }
    }

    #[test]
    fn a_zeroed_tail_is_a_tear() {
        let (mut bytes, starts) = encode_all(&sample());
        let end = bytes.len();
        bytes.resize(end + 4096, 0);
        let (read, scan_end) = read_all(&bytes);
        assert_eq!(read.len(), starts.len());
        assert!(
            matches!(scan_end, ScanEnd::Torn { offset, .. } if offset == end as u64),
            "{scan_end:?}"
        );
    }

    #[test]
    fn a_flipped_bit_anywhere_in_the_last_record_is_corruption_not_a_tear() {
        // A whole record that was acknowledged must not be cut off as if a crash tore it.
        let records = sample();
        let (bytes, starts) = encode_all(&records);
        let last = *starts.last().unwrap();
        for position in last..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[position] ^= 1 << bit;
                let (read, end) = read_all(&damaged);
                assert_eq!(read, records[..records.len() - 1], "flip at {position}");
                assert!(
                    matches!(end, ScanEnd::Corrupt { offset, .. } if offset == last as u64),
                    "flip of bit {bit} at {position}: {end:?}"
                );
            }
        }
    }

    #[test]
    fn garbage_after_the_last_record_is_a_tear_and_a_record_with_no_checksum_too() {
        let (bytes, starts) = encode_all(&sample());
        let mut state = 0x9e37_79b9_u32;
        let garbage = (0..40).map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        });
        let mut with_garbage = bytes.clone();
        with_garbage.extend(garbage);
        let (read, end) = read_all(&with_garbage);
        assert_eq!(read.len(), starts.len());
        assert_eq!(
            end,
            ScanEnd::Torn {
                offset: bytes.len() as u64,
                reason: "bytes that hold no whole record",
            }
        );

        // The last frame whole in length, its end never written: zeros.
        let mut unwritten = bytes.clone();
        let last = *starts.last().unwrap();
        let end_of_payload = unwritten.len() - TRAILER_LEN;
        unwritten[last + HEADER_LEN + 1..].fill(0);
        assert!(end_of_payload > last + HEADER_LEN + 1);
        let (read, end) = read_all(&unwritten);
        assert_eq!(read.len(), starts.len() - 1);
        assert_eq!(
            end,
            ScanEnd::Torn {
                offset: last as u64,
                reason: "a record whose checksum was never written",
            }
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = read_all(&bytes);
        }
    }
}
