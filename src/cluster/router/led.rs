//! Running a shard's requests on the node that leads it: a batch's consecutive writes become
//! one proposal, a batch's consecutive reads share one check of the leader's lease.

use std::time::Duration;

use openraft::ReadPolicy;
use openraft::error::{ClientWriteError, LinearizableReadError};
use openraft::raft::linearizable_read::LinearizerOption;
use tokio::time::{Instant, timeout_at};

use super::{NotLed, Router, bucket_of, change_of};
use crate::cluster::peer::ShardGroup;
use crate::cluster::raft::{MAX_BATCH_BYTES, Outcome, ShardCommand};
use crate::dispatch::errors::registry_error;
use crate::protocol::{Dialect, ErrorReply, KeyRequest, Reply, Request, encode_page, encode_value};
use crate::shard::wal::record;

use super::replies::Replies;

impl Router {
    /// Runs `requests`, all on buckets of `shard`, in order, if this node leads the shard, and
    /// answers them in `replies`.
    ///
    /// - Consecutive writes are proposed together, as one entry, and answered once committed
    ///   (on a majority of the shard's logs) and applied here.
    /// - Consecutive reads check the leader's lease (renewing it with a round to the followers
    ///   if it has lapsed) and that everything committed before the reads came is applied,
    ///   read the shard's buckets, and check the lease again: if it lapsed meanwhile (this
    ///   node was paused, say), the reads are run again. Reads right after this batch's own
    ///   writes need no check: those writes committed in this leader's term after the reads
    ///   arrived, which is the confirmation the lease stands for, and they are applied.
    ///
    /// `Err(NotLed)` when this node does not lead the shard: the requests after those answered
    /// were neither proposed nor read, and may be run elsewhere. Past `deadline`, requests are
    /// answered unavailable, and so are writes whose fate cannot be known (leadership lost
    /// after they were proposed): they may yet commit, so they are never proposed again.
    pub(super) async fn run_led(
        &self,
        shard: u16,
        requests: &[Request<'_>],
        dialect: Dialect,
        deadline: Instant,
        replies: &mut Replies,
    ) -> Result<(), NotLed> {
        let replica = self.node.replica(shard).ok_or(NotLed(None))?;
        let group = &replica.group;
        let registry = replica.machine.registry();
        let buckets = || self.node.buckets();
        let first = replies.len();
        let unanswered = |replies: &Replies| requests.len() - (replies.len() - first);
        let mut writes_committed = false;
        let mut changes = Vec::with_capacity(requests.len());
        while replies.len() - first < requests.len() {
            let rest = &requests[replies.len() - first..];
            // Consecutive writes within the limits, as one entry of at most MAX_BATCH_BYTES
            // (a single larger change alone). A write past a limit is refused here, as a
            // single node refuses it, and never proposed: replicas apply whatever is committed.
            changes.clear();
            let mut bytes = 0;
            let mut refused = None;
            for change in rest.iter().map_while(change_of) {
                let size = record::size(&change);
                if !changes.is_empty() && bytes + size > MAX_BATCH_BYTES {
                    break;
                }
                if let Err(error) = registry.check_limits(&change, buckets) {
                    refused = Some(error);
                    break;
                }
                bytes += size;
                changes.push(change);
            }
            if changes.is_empty()
                && let Some(refused) = refused
            {
                replies.push(&Reply::Error(registry_error(&refused)), dialect);
                continue;
            }
            if !changes.is_empty() {
                let command = ShardCommand::batch(&changes);
                let outcomes = match timeout_at(deadline, group.client_write(command)).await {
                    Ok(Ok(written)) => written.data,
                    Ok(Err(error)) => match error.api_error() {
                        // Refused before it was appended: it may be proposed elsewhere.
                        Some(ClientWriteError::ForwardToLeader(forward)) => {
                            return Err(NotLed(forward.leader_id));
                        }
                        // Leadership lost after proposing, or the group stopped: these
                        // writes may or may not be made.
                        _ => {
                            replies.push_unavailable(unanswered(replies), dialect);
                            return Ok(());
                        }
                    },
                    // Not committed in time: it may still be.
                    Err(_) => {
                        replies.push_unavailable(unanswered(replies), dialect);
                        return Ok(());
                    }
                };
                writes_committed = true;
                for (index, change) in changes.iter().enumerate() {
                    let reply = match outcomes.get(index).unwrap_or(&Outcome::NotAChange) {
                        Outcome::Done => Reply::Ok,
                        Outcome::NoSuchBucket | Outcome::NothingToDrop => {
                            Reply::NotFound(change.bucket())
                        }
                        Outcome::NotAChange => Reply::Error(ErrorReply::new("not a change")),
                    };
                    replies.push(&reply, dialect);
                }
                continue;
            }
            if !writes_committed {
                match timeout_at(deadline, group.ensure_linearizable(ReadPolicy::LeaseRead)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return Err(NotLed(forward_to(&error))),
                    Err(_) => {
                        replies.push_unavailable(unanswered(replies), dialect);
                        return Ok(());
                    }
                }
            }
            let before = replies.mark();
            let reads = rest
                .iter()
                .take_while(|request| change_of(request).is_none())
                .count();
            self.read(registry, &rest[..reads], dialect, replies);
            if !writes_committed && !lease_still_held(group).await {
                // This node may have been paused between the check and the reads: what it
                // read may be stale, so the reads are run again (elsewhere, if another node
                // leads now).
                replies.roll_back(before);
                return Err(NotLed(None));
            }
        }
        Ok(())
    }

    /// Answers the reads `requests` from `registry`. A run of reads on one bucket looks it up
    /// once and asks for all its keys before reading the first, so that their cache misses
    /// overlap.
    fn read(
        &self,
        registry: &crate::registry::Registry,
        requests: &[Request<'_>],
        dialect: Dialect,
        replies: &mut Replies,
    ) {
        let mut rest = requests;
        while let Some(first) = rest.first() {
            let name = bucket_of(first).unwrap_or_default();
            let on_bucket = rest
                .iter()
                .take_while(|request| bucket_of(request).unwrap_or_default() == name)
                .count();
            let (run, after) = rest.split_at(on_bucket);
            rest = after;
            let Some(bucket) = registry.lookup(name) else {
                for _ in run {
                    replies.push(&Reply::NotFound(name), dialect);
                }
                continue;
            };
            bucket.prefetch_entries(run.iter().filter_map(|request| match *request {
                Request::Key(KeyRequest { key, .. }) => Some(key),
                _ => None,
            }));
            for request in run {
                match *request {
                    Request::Key(KeyRequest { key, .. }) => {
                        let read = replies.try_push_with(|out| {
                            bucket.get_with(key, |found| encode_value(found, dialect, out))
                        });
                        if read.is_err() {
                            replies.push(&Reply::NotFound(name), dialect);
                        }
                    }
                    Request::Keys { cursor, .. } => match bucket.scan(cursor, self.page_size) {
                        Ok((next, keys)) => {
                            replies.push_with(|out| encode_page(next, &keys, dialect, out));
                        }
                        Err(_) => replies.push(&Reply::NotFound(name), dialect),
                    },
                    _ => replies.push(&Reply::UnknownCommand, dialect),
                }
            }
        }
    }
}

/// Whether this node still holds its leader lease now, found without sending anything.
async fn lease_still_held(group: &ShardGroup) -> bool {
    let now_or_never = LinearizerOption::new(None, false).with_wait_timeout(Duration::ZERO);
    group.get_read_linearizer(now_or_never).await.is_ok()
}

/// The leader a failed read confirmation names, if any.
fn forward_to(
    error: &openraft::error::RaftError<
        crate::cluster::raft::ShardRaft,
        LinearizableReadError<crate::cluster::raft::ShardRaft>,
    >,
) -> Option<u64> {
    match error.api_error() {
        Some(LinearizableReadError::ForwardToLeader(forward)) => forward.leader_id,
        _ => None,
    }
}
