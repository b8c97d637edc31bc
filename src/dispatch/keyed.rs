//! Requests on keys (`GET`, `PUT`, `DELETE`), run in batches: a connection's parsed-ahead
//! requests find their buckets once, under one read lock of the registry's view.

use bytes::BytesMut;
use smallvec::SmallVec;

use super::Dispatcher;
use super::errors::{bucket_error, missing};
use crate::bucket::{BucketError, BucketHandle};
use crate::protocol::{Dialect, KeyAction, KeyRequest, Reply, Request, encode, encode_value};
use crate::registry::Down;
use crate::stats::Stats;

impl Dispatcher {
    /// Runs `requests`, all on keys, in order, appending their replies to `out` while it holds
    /// less than `output_limit` bytes; returns how many ran. Called with the requests a
    /// connection has parsed ahead: their buckets are found once, under one read lock of the
    /// registry's view held until they have run, and what they will read is asked for before
    /// the first one runs, so that the cache misses of the batch overlap (see
    /// `ReadNames::resolve` in the registry). The bucket this connection has cached needs no
    /// lookup at all.
    pub(crate) fn run_keyed(
        &mut self,
        requests: &[(KeyRequest<'_>, Dialect)],
        out: &mut BytesMut,
        output_limit: usize,
    ) -> usize {
        let Self {
            shard,
            stats,
            last_bucket,
            last_looked_up,
            changed,
            ..
        } = self;
        let registry = shard.registry();
        let durable = registry.is_durable();
        let cached = last_bucket.as_ref().filter(|bucket| !bucket.is_stopped());
        // Which requests are for the cached bucket, decided once: the execution below
        // follows the same split as the prefetching.
        let mut on_cached = SmallVec::<[bool; 16]>::new();
        let mut cached_keys = SmallVec::<[&[u8]; 16]>::new();
        let mut elsewhere = SmallVec::<[(&[u8], &[u8]); 16]>::new();
        for (request, _) in requests {
            let is_cached = cached.is_some_and(|last| last.name().as_bytes() == request.bucket);
            if is_cached {
                cached_keys.push(request.key);
            } else {
                elsewhere.push((request.bucket, request.key));
            }
            on_cached.push(is_cached);
        }
        let (ran, to_cache) = {
            // Nothing in this block may lock the view again: `names` holds it.
            let names = registry.read_names();
            let mut found = SmallVec::new();
            names.resolve(
                &elsewhere,
                || {
                    if let Some(cached) = cached
                        && !cached_keys.is_empty()
                    {
                        cached.prefetch_entries(cached_keys);
                    }
                },
                &mut found,
            );
            let mut found = found.into_iter();
            let mut to_cache = None;
            let mut ran = 0;
            for (&(request, dialect), is_cached) in requests.iter().zip(on_cached) {
                if out.len() >= output_limit {
                    break;
                }
                let bucket = if is_cached {
                    cached
                } else {
                    let bucket = found.next().flatten().filter(|bucket| !bucket.is_stopped());
                    if let Some(bucket) = bucket {
                        // Only a bucket found twice in a row is worth a reference count.
                        if *last_looked_up == Some(bucket.address()) {
                            to_cache = Some(bucket);
                        } else {
                            *last_looked_up = Some(bucket.address());
                        }
                    }
                    bucket
                };
                let outcome = bucket.map(|bucket| run(&request, bucket, dialect, out));
                if let Some(reply) = keyed_reply(outcome, request.bucket, || {
                    names.why_missing(request.bucket, durable)
                }) {
                    let slot = Request::Key(request).command_slot();
                    answer(
                        stats,
                        changed,
                        (&reply, slot),
                        changes(&request),
                        dialect,
                        out,
                    );
                }
                ran += 1;
            }
            (ran, to_cache.cloned())
        };
        if to_cache.is_some() {
            *last_bucket = to_cache;
        }
        ran
    }
}

/// Whether `request` changes the store when it succeeds.
fn changes(request: &KeyRequest<'_>) -> bool {
    !matches!(request.action, KeyAction::Get)
}

/// Runs `request` on `bucket`. A value read is encoded into `out` at once, while the table is
/// locked for reading (`Ok(true)`: the reply is written); otherwise the reply is still to be
/// written.
fn run(
    request: &KeyRequest<'_>,
    bucket: &BucketHandle,
    dialect: Dialect,
    out: &mut BytesMut,
) -> Result<bool, BucketError> {
    match request.action {
        KeyAction::Get => bucket
            .get_with(request.key, |value| encode_value(value, dialect, out))
            .map(|()| true),
        KeyAction::Put { value } => bucket.put(request.key, value).map(|()| false),
        KeyAction::Delete => bucket.delete(request.key).map(|_| false),
    }
}

/// The reply to a request on a key, given what running it on its bucket gave (`None`: there
/// is no live bucket of that name); `None` when the reply is written already.
fn keyed_reply<'b>(
    outcome: Option<Result<bool, BucketError>>,
    bucket: &'b [u8],
    why_missing: impl FnOnce() -> Option<Down>,
) -> Option<Reply<'b>> {
    match outcome {
        Some(Ok(true)) => None,
        Some(Ok(false)) => Some(Reply::Ok),
        None | Some(Err(BucketError::Stopped)) => Some(missing(bucket, why_missing())),
        Some(Err(error)) => Some(Reply::Error(bucket_error(error))),
    }
}

/// Counts `reply` and appends it to `out`. Only a change that was made must wait for the log
/// before its reply (`changed`): a refused one (log failed, limit reached, no such bucket)
/// answers at once.
pub(super) fn answer(
    stats: &Stats,
    changed: &mut bool,
    (reply, slot): (&Reply<'_>, usize),
    may_change: bool,
    dialect: Dialect,
    out: &mut BytesMut,
) {
    match reply {
        Reply::Error(_) => stats.count_error(slot),
        Reply::Ok if may_change => *changed = true,
        _ => {}
    }
    encode(reply, dialect, out);
}
