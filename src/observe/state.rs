//! The JSON the page reads: the supervision tree as the guide draws it, the counters, the
//! cluster; and pages of buckets, largest first or by name, filtered by a name's part.

use serde::{Deserialize, Serialize};

use super::Observed;
use crate::registry::{Down, Registry};

/// Buckets on one page of the listing.
const PAGE_SIZE: usize = 50;

/// What `/api/buckets` is asked.
#[derive(Debug, Default, Deserialize)]
pub struct BucketQuery {
    /// Only buckets whose name contains this.
    #[serde(default)]
    pub q: String,
    /// `keys` (the default), `bytes` or `name`.
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

/// A page of buckets for `query`.
#[must_use]
pub fn buckets(observed: &Observed, query: &BucketQuery) -> BucketPage {
    let mut rows: Vec<BucketRow> = Vec::new();
    for (shard, registry) in registries(observed) {
        let view = registry.view();
        for bucket in view.buckets() {
            let name = String::from_utf8_lossy(bucket.name().as_bytes()).into_owned();
            if !query.q.is_empty() && !name.contains(&query.q) {
                continue;
            }
            let (keys, bytes) = bucket.size().unwrap_or((0, 0));
            rows.push(BucketRow {
                name,
                shard,
                keys,
                bytes,
                state: "running",
            });
        }
        for (name, down) in view.down_buckets() {
            let name = String::from_utf8_lossy(name.as_bytes()).into_owned();
            if !query.q.is_empty() && !name.contains(&query.q) {
                continue;
            }
            let state = match down {
                Down::Restarting => "restarting",
                Down::Failed => "failed",
            };
            rows.push(BucketRow {
                name,
                shard,
                keys: 0,
                bytes: 0,
                state,
            });
        }
    }
    let total = rows.len();
    match query.sort.as_str() {
        "name" => rows.sort_unstable_by(|a, b| a.name.cmp(&b.name)),
        "bytes" => rows.sort_unstable_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name))),
        _ => rows.sort_unstable_by(|a, b| b.keys.cmp(&a.keys).then(a.name.cmp(&b.name))),
    }
    let start = query.page.saturating_mul(PAGE_SIZE).min(total);
    let buckets = rows.drain(start..(start + PAGE_SIZE).min(total)).collect();
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
