//! The JSON the page reads: the supervision tree as the guide draws it, the counters, the
//! cluster; and pages of buckets, largest first or by name, filtered by a name's part.

use serde::{Deserialize, Serialize};

use super::Observed;
use crate::bucket::BucketName;
use crate::registry::{Down, Registry};

/// Buckets on one page of the listing.
const PAGE_SIZE: usize = 50;

/// What `/api/buckets` is asked.
#[derive(Debug, Default, Deserialize)]
pub struct BucketQuery {
    /// Only buckets whose name contains this.
    #[serde(default)]
    pub q: String,
    /// `keys` (the default), `bytes`, `operations` (busiest first) or `name`.
    #[serde(default)]
    pub sort: String,
    /// Which page, from 0.
    #[serde(default)]
    pub page: usize,
}

/// One page of buckets.
#[derive(Debug, Serialize)]
pub struct BucketPage {
    /// Buckets matching the query, on every page.
    pub total: usize,
    /// This page, from 0.
    pub page: usize,
    /// Buckets a page.
    pub per_page: usize,
    /// The page's buckets.
    pub buckets: Vec<BucketRow>,
}

/// A bucket as the page shows it.
#[derive(Debug, Serialize)]
pub struct BucketRow {
    /// Its name (lossily as UTF-8).
    pub name: String,
    /// In a cluster, its shard.
    pub shard: Option<u16>,
    /// Keys it holds.
    pub keys: usize,
    /// Bytes it takes of the memory budget.
    pub bytes: usize,
    /// Reads, writes and deletes since it (re)started, modulo 2^32.
    pub operations: u64,
    /// Times it has been restarted from disk after ending on its own.
    pub restarts: u32,
    /// `running`, `restarting` or `failed`.
    pub state: &'static str,
}

/// The registries whose buckets this node holds: its own, or its replicas' in a cluster.
fn registries(observed: &Observed) -> Vec<(Option<u16>, Registry)> {
    match &observed.router {
        Some(router) => router
            .replica_registries()
            .into_iter()
            .map(|(shard, registry)| (Some(shard), registry))
            .collect(),
        None => vec![(None, observed.shard.registry().clone())],
    }
}

/// A page of buckets for `query`. One pass over the buckets reads each one's size under its
/// lock, without copying names; only the page's names are copied, and only the buckets up to
/// the page's end are sorted: with a million buckets, a page costs a pass, not a full sort.
#[must_use]
pub fn buckets(observed: &Observed, query: &BucketQuery) -> BucketPage {
    struct Candidate {
        name: BucketName,
        shard: Option<u16>,
        keys: usize,
        bytes: usize,
        operations: u64,
        restarts: u32,
        state: &'static str,
    }
    let wanted = query.q.as_bytes();
    let matches = |name: &[u8]| wanted.is_empty() || memchr::memmem::find(name, wanted).is_some();
    let mut candidates: Vec<Candidate> = Vec::new();
    for (shard, registry) in registries(observed) {
        let view = registry.view();
        let restarts = view.events().restarts_by_bucket();
        let restarts_of = |name: &BucketName| restarts.get(name).copied().unwrap_or(0);
        for bucket in view.buckets() {
            if !matches(bucket.name().as_bytes()) {
                continue;
            }
            let (keys, bytes) = bucket.size().unwrap_or((0, 0));
            candidates.push(Candidate {
                name: bucket.name().clone(),
                shard,
                keys,
                bytes,
                operations: u64::from(bucket.operations()),
                restarts: restarts_of(bucket.name()),
                state: "running",
            });
        }
        for (name, down) in view.down_buckets() {
            if !matches(name.as_bytes()) {
                continue;
            }
            let state = match down {
                Down::Restarting => "restarting",
                Down::Failed => "failed",
            };
            candidates.push(Candidate {
                restarts: restarts_of(&name),
                name,
                shard,
                keys: 0,
                bytes: 0,
                operations: 0,
                state,
            });
        }
    }
    let total = candidates.len();
    let order = |a: &Candidate, b: &Candidate| match query.sort.as_str() {
        "name" => a.name.as_bytes().cmp(b.name.as_bytes()),
        "bytes" => b
            .bytes
            .cmp(&a.bytes)
            .then(a.name.as_bytes().cmp(b.name.as_bytes())),
        "operations" => b
            .operations
            .cmp(&a.operations)
            .then(a.name.as_bytes().cmp(b.name.as_bytes())),
        _ => b
            .keys
            .cmp(&a.keys)
            .then(a.name.as_bytes().cmp(b.name.as_bytes())),
    };
    let start = query.page.saturating_mul(PAGE_SIZE).min(total);
    let end = (start + PAGE_SIZE).min(total);
    if end < total {
        candidates.select_nth_unstable_by(end, order);
        candidates.truncate(end);
    }
    candidates.sort_unstable_by(order);
    let buckets = candidates
        .drain(start..)
        .map(|candidate| BucketRow {
            name: String::from_utf8_lossy(candidate.name.as_bytes()).into_owned(),
            shard: candidate.shard,
            keys: candidate.keys,
            bytes: candidate.bytes,
            operations: candidate.operations,
            restarts: candidate.restarts,
            state: candidate.state,
        })
        .collect();
    BucketPage {
        total,
        page: query.page,
        per_page: PAGE_SIZE,
        buckets,
    }
}

/// The state the page draws, once a second.
#[must_use]
pub fn snapshot(observed: &Observed) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = &observed.stats;
    let registry = observed.shard.registry();
    let (buckets, memory) = match &observed.router {
        Some(router) => router.holdings(),
        None => (registry.view().len(), registry.memory()),
    };
    let status = *registry.status().borrow();
    let (crashes, restarts) = registries(observed)
        .iter()
        .fold((0, 0), |(c, r), (_, registry)| {
            let view = registry.view();
            let events = view.events();
            (
                c + events.crashes.load(Relaxed),
                r + events.restarts.load(Relaxed),
            )
        });
    let requests: u64 = stats
        .by_command
        .iter()
        .map(|command| command.latency.count())
        .sum();
    let latency_micros: u64 = stats
        .by_command
        .iter()
        .map(|command| command.latency.sum_micros())
        .sum();
    let cluster = observed.router.as_ref().map(|router| {
        serde_json::json!({
            "node": router.node_id(),
            "members": router.members(),
            "shards": router.shard_states(),
            "forwarded": router.forwarded(),
        })
    });
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": observed.started.elapsed().as_secs(),
        "requests": requests,
        "latency_micros_total": latency_micros,
        "errors": stats.errors.load(Relaxed),
        "connections": stats.connections_open.load(Relaxed),
        "tree": {
            "supervisor": "KV.Supervisor",
            "registry": { "name": "KV.Registry", "starts": status.starts, "running": status.running },
            "bucket_supervisor": { "name": "KV.BucketSupervisor", "buckets": buckets, "crashes": crashes, "restarts": restarts },
        },
        "keys": memory.keys(),
        "memory_used_bytes": memory.used(),
        "memory_limit_bytes": memory.limit(),
        "log": observed.shard.log_status().map(|log| serde_json::json!({
            "bytes": log.bytes, "syncs": log.syncs, "failed": log.failed, "compactions": log.compactions,
        })),
        "cluster": cluster,
    })
}
