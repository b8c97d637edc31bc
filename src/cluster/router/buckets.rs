//! `BUCKETS` in a cluster: every shard's page of names, each read where the shard is led
//! (after a ReadIndex round: listings are rare, so they take the simplest path), merged in byte order into the page a single node
//! would give.

use bytes::BytesMut;
use openraft::ReadPolicy;
use openraft::error::LinearizableReadError;
use tokio::time::{Instant, timeout_at};

use super::{Led, NotLed, Router, Seeking, UNAVAILABLE_AFTER};
use crate::cluster::peer::{PeerRequest, PeerResponse};
use crate::protocol::{Dialect, ErrorReply, Reply, encode};

impl Router {
    /// Appends one page of `BUCKETS`: up to a page of names after `after`, in byte order, from
    /// every shard; or unavailable if some shard has no reachable leader in time.
    pub async fn buckets(&self, after: Option<&[u8]>, dialect: Dialect, out: &mut BytesMut) {
        let Some(names) = self.bucket_names(after, self.page_size).await else {
            encode(&Reply::Error(ErrorReply::unavailable()), dialect, out);
            return;
        };
        let names: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
        encode(&Reply::List(&names), dialect, out);
    }

    /// Up to `limit` bucket names after `after`, in byte order, from every shard; `None` if
    /// some shard has no reachable leader in time.
    pub async fn bucket_names(&self, after: Option<&[u8]>, limit: usize) -> Option<Vec<Vec<u8>>> {
        let pages = futures::future::join_all(
            (0..self.node.shards()).map(|shard| self.shard_buckets(shard, after, limit)),
        )
        .await;
        let mut names: Vec<Vec<u8>> = pages
            .into_iter()
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        names.sort_unstable();
        names.truncate(limit);
        Some(names)
    }

    /// One shard's share of a page: read here if this node leads it, else asked of the leader;
    /// `None` if no leader answered in time.
    async fn shard_buckets(
        &self,
        shard: u16,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Option<Vec<Vec<u8>>> {
        let deadline = Instant::now() + UNAVAILABLE_AFTER;
        let mut hint = None;
        let mut seeking = Seeking::default();
        for attempt in 0usize.. {
            let led = self.where_led(shard, hint.take(), attempt).await;
            let target = match led {
                Led::Here => match self.list_led(shard, after, limit).await {
                    Ok(names) => return Some(names),
                    Err(NotLed(leader)) => {
                        hint = leader;
                        None
                    }
                },
                Led::Elsewhere(target) => Some(target),
                Led::Unknown => None,
            };
            if let Some(client) = target.and_then(|target| self.node.peers().get(target)) {
                let asked = PeerRequest::ListBuckets {
                    shard,
                    after: after.map(<[u8]>::to_vec),
                    limit: u32::try_from(limit).unwrap_or(u32::MAX),
                };
                let answered = timeout_at(deadline, client.call(asked)).await;
                let listed = matches!(answered, Ok(Ok(PeerResponse::Buckets(Ok(_)))));
                self.learn_leader(shard, target.filter(|_| listed));
                match answered {
                    Ok(Ok(PeerResponse::Buckets(Ok(names)))) => return Some(names),
                    Ok(Ok(PeerResponse::Buckets(Err(leader)))) => hint = leader,
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            seeking.pause(self.asked(&led), hint).await;
        }
        None
    }

    /// Up to `limit` names after `after` in `shard`, if this node leads it, read after a
    /// ReadIndex round.
    pub(super) async fn list_led(
        &self,
        shard: u16,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, NotLed> {
        let group = self.node.group(shard).ok_or(NotLed(None))?;
        let deadline = Instant::now() + UNAVAILABLE_AFTER;
        match timeout_at(deadline, group.ensure_linearizable(ReadPolicy::ReadIndex)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                return Err(NotLed(match error.api_error() {
                    Some(LinearizableReadError::ForwardToLeader(forward)) => forward.leader_id,
                    _ => None,
                }));
            }
            Err(_) => return Err(NotLed(None)),
        }
        let machine = self.node.state(shard).ok_or(NotLed(None))?;
        Ok(machine
            .registry()
            .view()
            .names(after, limit)
            .iter()
            .map(|name| name.as_bytes().to_vec())
            .collect())
    }
}
