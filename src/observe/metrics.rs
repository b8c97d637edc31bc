//! `/metrics`: everything kv counts, read at scrape time from the counters the request path
//! keeps anyway (connections add theirs once per batch), written in the Prometheus text
//! format by `prometheus-client`. Nothing here runs on the request path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry as MetricRegistry;

use super::Observed;
use crate::protocol::COMMANDS;
use crate::stats::LATENCY_BOUNDS_MICROS;

/// The metrics in the Prometheus text format.
#[must_use]
pub fn render(observed: &Arc<Observed>) -> String {
    let mut registry = MetricRegistry::default();
    registry.register_collector(Box::new(KvCollector(Arc::clone(observed))));
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    text
}

#[derive(Debug)]
struct KvCollector(Arc<Observed>);

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observed")
    }
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn load(value: &AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

fn level(value: &AtomicUsize) -> i64 {
    i64::try_from(value.load(Ordering::Relaxed)).unwrap_or(i64::MAX)
}

fn signed(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

impl Collector for KvCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let observed = &self.0;
        let stats = &observed.stats;
        let registry = observed.shard.registry();
        let (buckets, memory) = match &observed.router {
            Some(router) => router.holdings(),
            None => (registry.view().len(), registry.memory()),
        };

        // Requests by command and result, and their latency, from parsed to written.
        let names: Vec<&str> = COMMANDS
            .iter()
            .map(|spec| spec.name)
            .chain(["(not a command)"])
            .collect();
        {
            let mut family = encoder.encode_descriptor(
                "kv_requests",
                "Requests answered, by command and result (an error reply, or not)",
                None,
                MetricType::Counter,
            )?;
            for (name, command) in names.iter().zip(&stats.by_command) {
                let count = command.latency.count();
                let errors = load(&command.errors).min(count);
                for (result, value) in [("ok", count - errors), ("error", errors)] {
                    let labels = [("command", *name), ("result", result)];
                    ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "kv_request_duration_seconds",
                "Time from a request parsed to its reply written, by command",
                None,
                MetricType::Histogram,
            )?;
            for (name, command) in names.iter().zip(&stats.by_command) {
                let counts = command.latency.buckets();
                let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_MICROS
                    .iter()
                    .zip(counts)
                    .map(|(&bound, count)| (bound as f64 / 1e6, count))
                    .collect();
                let labels = [("command", *name)];
                family
                    .encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        command.latency.sum_micros() as f64 / 1e6,
                        counts.iter().sum(),
                        &buckets,
                        None,
                    )?;
            }
        }

        gauge(
            &mut encoder,
            "kv_connections_open",
            "Client connections open now",
            level(&stats.connections_open),
        )?;
        counter(
            &mut encoder,
            "kv_connections_accepted",
            "Client connections accepted",
            load(&stats.connections_accepted),
        )?;
        counter(
            &mut encoder,
            "kv_connections_refused",
            "Client connections refused at --max-connections",
            load(&stats.connections_refused),
        )?;
        counter(
            &mut encoder,
            "kv_buffer_refusals",
            "Connections closed for buffers over --max-connection-buffers",
            load(&stats.buffer_refusals),
        )?;
        counter(
            &mut encoder,
            "kv_request_timeouts",
            "Connections closed for a request not received whole within --request-timeout",
            load(&stats.request_timeouts),
        )?;
        counter(
            &mut encoder,
            "kv_busy_poll_pauses",
            "Times busy polling stopped because its thread was kept waiting for a CPU",
            load(&stats.busy_poll_pauses),
        )?;
        counter(
            &mut encoder,
            "kv_net_input_bytes",
            "Bytes read from clients",
            load(&stats.net_input_bytes),
        )?;
        gauge(
            &mut encoder,
            "kv_input_buffer_bytes",
            "Bytes held in connections' read buffers",
            level(&stats.input_buffer_bytes),
        )?;
        gauge(
            &mut encoder,
            "kv_output_buffer_bytes",
            "Bytes held in connections' reply buffers",
            level(&stats.output_buffer_bytes),
        )?;

        gauge(&mut encoder, "kv_buckets", "Buckets alive", signed(buckets))?;
        gauge(
            &mut encoder,
            "kv_keys",
            "Keys in all buckets",
            signed(memory.keys()),
        )?;
        gauge(
            &mut encoder,
            "kv_memory_used_bytes",
            "Bytes keys, values and buckets take against --max-memory",
            signed(memory.used()),
        )?;
        gauge(
            &mut encoder,
            "kv_memory_limit_bytes",
            "--max-memory",
            signed(memory.limit()),
        )?;
        let events = registry.view();
        let events = events.events();
        counter(
            &mut encoder,
            "kv_bucket_crashes",
            "Buckets that ended on their own (crashed or stopped), not dropped",
            load(&events.crashes),
        )?;
        counter(
            &mut encoder,
            "kv_bucket_restarts",
            "Durable buckets restarted from disk after ending on their own",
            load(&events.restarts),
        )?;
        let starts = registry.status().borrow().starts;
        counter(
            &mut encoder,
            "kv_registry_restarts",
            "Times the registry was restarted by its supervisor",
            starts.saturating_sub(1),
        )?;

        if let Some(log) = observed.shard.log_status() {
            gauge(
                &mut encoder,
                "kv_log_bytes",
                "Bytes in the current log file",
                signed(log.bytes),
            )?;
            counter(
                &mut encoder,
                "kv_log_syncs",
                "Syncs of the log to disk",
                log.syncs,
            )?;
            gauge(
                &mut encoder,
                "kv_log_failed",
                "1 once a write to the log has failed",
                i64::from(log.failed),
            )?;
            counter(
                &mut encoder,
                "kv_log_compactions",
                "Compactions of the log",
                log.compactions,
            )?;
            let metric = ConstCounter::new(log.sync_seconds);
            metric.encode(encoder.encode_descriptor(
                "kv_log_sync_seconds",
                "Time spent syncing the log (divided by kv_log_syncs_total: the mean sync latency)",
                None,
                metric.metric_type(),
            )?)?;
        }

        if let Some(router) = &observed.router {
            counter(
                &mut encoder,
                "kv_forwarded_requests",
                "Requests sent to the node that leads their shard",
                router.forwarded(),
            )?;
            let log_memory = router.node().log_memory();
            gauge(
                &mut encoder,
                "kv_cluster_log_memory_bytes",
                "What this node's shard logs hold together (entries not yet compacted, on disk; the newest also in memory)",
                signed(log_memory.held()),
            )?;
            gauge(
                &mut encoder,
                "kv_cluster_log_memory_budget_bytes",
                "--log-memory: past it the largest shard logs are compacted",
                signed(log_memory.budget()),
            )?;
            let states = router.shard_states();
            let shard_names: Vec<String> =
                states.iter().map(|state| state.shard.to_string()).collect();
            let mut family = encoder.encode_descriptor(
                "kv_shard_leader",
                "1 where this node leads the shard",
                None,
                MetricType::Gauge,
            )?;
            for (state, shard) in states.iter().zip(&shard_names) {
                ConstGauge::new(i64::from(state.leads))
                    .encode(family.encode_family(&[("shard", shard.as_str())])?)?;
            }
            for (name, help, value) in [
                (
                    "kv_shard_term",
                    "The shard's Raft term: it rises with each election",
                    0usize,
                ),
                (
                    "kv_shard_last_log_index",
                    "The last index in this replica's log",
                    1,
                ),
                ("kv_shard_commit_index", "The last index known committed", 2),
                (
                    "kv_shard_applied_index",
                    "The last index applied on this replica",
                    3,
                ),
            ] {
                let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                for (state, shard) in states.iter().zip(&shard_names) {
                    let number =
                        [state.term, state.last_log, state.committed, state.applied][value];
                    ConstGauge::new(signed(number))
                        .encode(family.encode_family(&[("shard", shard.as_str())])?)?;
                }
            }
            let mut family = encoder.encode_descriptor(
                "kv_shard_leader_changes",
                "Leader changes of the shard this node has seen since it started",
                None,
                MetricType::Counter,
            )?;
            for (state, shard) in states.iter().zip(&shard_names) {
                ConstCounter::new(state.leader_changes)
                    .encode(family.encode_family(&[("shard", shard.as_str())])?)?;
            }
            let mut family = encoder.encode_descriptor(
                "kv_shard_replication_lag_entries",
                "Where this node leads: entries each follower lacks of the leader's log",
                None,
                MetricType::Gauge,
            )?;
            for (state, shard) in states.iter().zip(&shard_names) {
                for follower in &state.followers {
                    let node = follower.node.to_string();
                    let labels = [("shard", shard.as_str()), ("follower", node.as_str())];
                    ConstGauge::new(signed(state.last_log.saturating_sub(follower.matched)))
                        .encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}
