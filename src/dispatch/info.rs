//! `INFO`: the counters, the registry's state, memory, the log and (in a cluster) each shard's
//! Raft state, as `name:value` lines.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::Dispatcher;

impl Dispatcher {
    /// The text of `INFO`.
    pub(super) fn info(&self) -> String {
        let stats = &self.stats;
        // In a cluster, what this node's replicas hold; on a single node, its registry's.
        let (buckets, memory) = match &self.router {
            Some(router) => router.holdings(),
            None => (self.registry().view().len(), self.registry().memory()),
        };
        let status = *self.registry().status().borrow();
        let mut text = String::with_capacity(512);
        // Lines end in CRLF, as Redis's do: tools that read INFO (redis-cli --stat) look for
        // the CR. The line protocol sends each line as a line either way.
        let mut line = |name: &str, value: &dyn std::fmt::Display| {
            let _ = write!(text, "{name}:{value}\r\n");
        };
        line("version", &env!("CARGO_PKG_VERSION"));
        let gauge = |value: &AtomicUsize| value.load(Ordering::Relaxed) as u64;
        let count = |value: &AtomicU64| value.load(Ordering::Relaxed);
        let counters = [
            ("connections_open", gauge(&stats.connections_open)),
            ("connections_accepted", count(&stats.connections_accepted)),
            ("connections_refused", count(&stats.connections_refused)),
            ("commands", count(&stats.commands)),
            ("errors", count(&stats.errors)),
            ("buckets", buckets as u64),
            ("keys", memory.keys() as u64),
            ("memory_used_bytes", memory.used() as u64),
            ("memory_limit_bytes", memory.limit() as u64),
            ("net_input_bytes", count(&stats.net_input_bytes)),
            ("input_buffer_bytes", gauge(&stats.input_buffer_bytes)),
            ("output_buffer_bytes", gauge(&stats.output_buffer_bytes)),
            ("buffer_refusals", count(&stats.buffer_refusals)),
            ("request_timeouts", count(&stats.request_timeouts)),
        ];
        for (name, value) in counters {
            line(name, &value);
        }
        line("resident_bytes", &resident_bytes().unwrap_or(0));
        // The same counts under the names Redis gives them, for tools that read those
        // (`redis-cli --stat`, exporters).
        let redis_names = [
            ("connected_clients", gauge(&stats.connections_open)),
            ("blocked_clients", 0),
            (
                "total_connections_received",
                count(&stats.connections_accepted),
            ),
            ("total_commands_processed", count(&stats.commands)),
            ("used_memory", memory.used() as u64),
            ("maxmemory", memory.limit() as u64),
        ];
        for (name, value) in redis_names {
            line(name, &value);
        }
        line(
            "db0",
            &format_args!("keys={},expires=0,avg_ttl=0", memory.keys()),
        );
        line("registry_starts", &status.starts);
        if let Some(log) = self.shard.log_status() {
            line("fsync", &log.fsync);
            line("log_bytes", &log.bytes);
            line("log_syncs", &log.syncs);
            line("log_failed", &u8::from(log.failed));
        }
        if let Some(router) = &self.router {
            router.info(&mut text);
        }
        text
    }
}

/// The process's resident memory, from `VmRSS` in `/proc/self/status` (Linux only), which
/// states it in kB whatever the page size.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kilobytes: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kilobytes * 1024)
}
