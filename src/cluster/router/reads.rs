//! ReadIndex rounds shared by every read that waits for one: per shard, one round runs at a
//! time, for all the reads that arrived before it began; reads that arrive meanwhile wait for
//! the next. A round costs a message to each follower and back, so under load many
//! connections' reads share one instead of each paying for its own.
//!
//! Sharing is safe because a round that begins after a read arrived confirms leadership (and
//! finds the commit index) at a moment after that read was sent: what ReadIndex asks of a
//! round for that read.

use std::sync::Arc;

use openraft::ReadPolicy;
use openraft::error::LinearizableReadError;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::UNAVAILABLE_AFTER;
use crate::cluster::peer::ShardGroup;
use crate::cluster::placement::NodeId;

/// What a round says to the reads that waited for it: `Err(leader)` if this node does not
/// lead the shard (or could not confirm it in time), with the leader it knows of.
pub(super) type Confirmed = Result<(), Option<NodeId>>;

/// The read rounds of every shard of a node.
pub(super) struct ReadRounds {
    shards: Vec<Arc<Mutex<Round>>>,
}

#[derive(Default)]
struct Round {
    /// Whether a round is running (and so will start the next one for `waiting`).
    running: bool,
    /// The reads that arrived since the running round began.
    waiting: Vec<oneshot::Sender<Confirmed>>,
}

impl ReadRounds {
    pub(super) fn new(shards: u16) -> Self {
        Self {
            shards: (0..shards).map(|_| Arc::default()).collect(),
        }
    }

    /// Waits for a ReadIndex round of `shard`'s `group` that began after this call: then this
    /// node led the shard and has applied everything committed before the call.
    pub(super) async fn confirm(&self, shard: u16, group: &ShardGroup) -> Confirmed {
        let Some(round) = self.shards.get(usize::from(shard)) else {
            return Err(None);
        };
        let (sender, receiver) = oneshot::channel();
        let start = {
            let mut round = round.lock();
            round.waiting.push(sender);
            !std::mem::replace(&mut round.running, true)
        };
        if start {
            tokio::spawn(run_rounds(Arc::clone(round), group.clone()));
        }
        receiver.await.unwrap_or(Err(None))
    }
}

/// Runs rounds while reads wait for one.
async fn run_rounds(round: Arc<Mutex<Round>>, group: ShardGroup) {
    loop {
        let waiting = {
            let mut round = round.lock();
            if round.waiting.is_empty() {
                round.running = false;
                return;
            }
            std::mem::take(&mut round.waiting)
        };
        let confirmed = match tokio::time::timeout(
            UNAVAILABLE_AFTER,
            group.ensure_linearizable(ReadPolicy::ReadIndex),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(match error.api_error() {
                Some(LinearizableReadError::ForwardToLeader(forward)) => forward.leader_id,
                _ => None,
            }),
            Err(_) => Err(None),
        };
        for read in waiting {
            let _ = read.send(confirmed);
        }
    }
}
