//! The replies to one shard's share of a connection's batch: encoded one after another, with
//! where each ends, so that the router can put every shard's replies back in the connection's
//! order. A leader sends them back to the node that forwarded the batch in this same form.

use bytes::BytesMut;
use serde::{Deserialize, Serialize};

use crate::protocol::{Dialect, ErrorReply, Reply, encode};

/// Replies to a run of requests, in the requests' order.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Replies {
    /// The replies, encoded for the client.
    bytes: BytesMut,
    /// Where each reply ends in `bytes`.
    ends: Vec<u64>,
    /// How many of the replies are errors (for `INFO`'s error count).
    errors: u32,
    /// Which of the first 64 replies are errors: bit `i` for reply `i` (for the counts by
    /// command).
    error_mask: u64,
    /// Set when the replies stop short of the requests: the rest were neither proposed nor
    /// read, because this node does not lead their shard (this is the node it believes does).
    not_led: Option<Option<u64>>,
}

impl Replies {
    /// How many requests are answered.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether no request is answered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// How many replies are errors.
    #[must_use]
    pub fn errors(&self) -> u32 {
        self.errors
    }

    /// Which replies are errors: bit `i` for reply `i`, of the first 64.
    #[must_use]
    pub fn error_mask(&self) -> u64 {
        self.error_mask
    }

    /// Whether reply `index` is an error (known of the first 64 only).
    #[must_use]
    pub fn is_error(&self, index: usize) -> bool {
        index < 64 && self.error_mask & (1 << index) != 0
    }

    /// Every reply, one after another.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The `index`th reply.
    #[must_use]
    pub fn get(&self, index: usize) -> &[u8] {
        let start = index.checked_sub(1).map_or(0, |before| self.ends[before]);
        // A reply's end lies within `bytes` (they grow together), so both fit in `usize`.
        #[allow(clippy::cast_possible_truncation)]
        &self.bytes[start as usize..self.ends[index] as usize]
    }

    /// Answers the next request with `reply`.
    pub fn push(&mut self, reply: &Reply<'_>, dialect: Dialect) {
        if matches!(reply, Reply::Error(_)) {
            self.errors += 1;
            if let Some(bit) = 1u64.checked_shl(self.ends.len() as u32) {
                self.error_mask |= bit;
            }
        }
        self.push_with(|out| encode(reply, dialect, out));
    }

    /// Answers the next request with what `write` appends (a value or a page of keys).
    pub fn push_with(&mut self, write: impl FnOnce(&mut BytesMut)) {
        write(&mut self.bytes);
        self.ends.push(self.bytes.len() as u64);
    }

    /// Answers the next request with what `write` appends, unless it fails: then nothing is
    /// answered and whatever it appended is taken back.
    ///
    /// # Errors
    /// What `write` returned.
    pub fn try_push_with<E>(
        &mut self,
        write: impl FnOnce(&mut BytesMut) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = self.bytes.len();
        match write(&mut self.bytes) {
            Ok(()) => {
                self.ends.push(self.bytes.len() as u64);
                Ok(())
            }
            Err(error) => {
                self.bytes.truncate(start);
                Err(error)
            }
        }
    }

    /// Where the replies stand now, to [`roll_back`](Self::roll_back) to.
    #[must_use]
    pub fn mark(&self) -> (usize, u32) {
        (self.ends.len(), self.errors)
    }

    /// Takes back every reply pushed since `mark`.
    pub fn roll_back(&mut self, (len, errors): (usize, u32)) {
        self.ends.truncate(len);
        let end = len.checked_sub(1).map_or(0, |last| self.ends[last]);
        // An end lies within `bytes`, so it fits in `usize`.
        #[allow(clippy::cast_possible_truncation)]
        self.bytes.truncate(end as usize);
        self.errors = errors;
        self.error_mask &= 1u64.checked_shl(len as u32).map_or(u64::MAX, |bit| bit - 1);
    }

    /// Answers the next `count` requests: the cluster could not run them in time, or cannot
    /// tell whether it did (a write among them may have been made: it is never made twice).
    pub fn push_unavailable(&mut self, count: usize, dialect: Dialect) {
        for _ in 0..count {
            self.push(&Reply::Error(ErrorReply::unavailable()), dialect);
        }
    }

    /// Marks these replies as stopping short: this node does not lead the shard of the
    /// requests after them (`leader` does, as far as it knows).
    pub fn stop_short(&mut self, leader: Option<u64>) {
        self.not_led = Some(leader);
    }

    /// Whether the replies stop short of the requests, and who leads the shard if so.
    #[must_use]
    pub fn not_led(&self) -> Option<Option<u64>> {
        self.not_led
    }

    /// Appends the replies another node gave for the next requests, and takes on whether they
    /// stop short. `None` if they are not well formed (ends out of order or past the bytes).
    pub fn append(&mut self, more: &Self) -> Option<()> {
        let mut previous = 0;
        for &end in &more.ends {
            if end < previous || end > more.bytes.len() as u64 {
                return None;
            }
            previous = end;
        }
        let offset = self.bytes.len() as u64;
        self.error_mask |= more
            .error_mask
            .checked_shl(self.ends.len() as u32)
            .unwrap_or(0);
        self.bytes.extend_from_slice(&more.bytes);
        self.ends.extend(more.ends.iter().map(|end| offset + end));
        self.errors += more.errors;
        self.not_led = more.not_led;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_appended_from_another_node_keep_their_boundaries() {
        let mut here = Replies::default();
        here.push(&Reply::Ok, Dialect::Resp);
        let mut there = Replies::default();
        there.push(&Reply::NotFound(b"b"), Dialect::Resp);
        there.push_unavailable(1, Dialect::Resp);
        there.stop_short(Some(3));
        here.append(&there).expect("well formed");
        assert_eq!(here.len(), 3);
        assert_eq!(here.get(0), b"+OK\r\n");
        assert_eq!(here.get(2), b"-TRYAGAIN cluster unavailable, try again\r\n");
        assert_eq!(here.errors(), 1);
        assert_eq!(here.error_mask(), 0b100);
        assert_eq!(here.not_led(), Some(Some(3)));
    }

    #[test]
    fn replies_with_ends_past_their_bytes_are_refused() {
        let mut forged = Replies::default();
        forged.push(&Reply::Ok, Dialect::Resp);
        forged.ends.push(1 << 40);
        assert!(Replies::default().append(&forged).is_none());
    }
}
