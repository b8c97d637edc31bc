//! `INFO`: the counters, the registry's state, memory, the log and (in a cluster) each shard's
//! Raft state, as `name:value` lines.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::Dispatcher;

/// `INFO`'s sections, in order, as Redis names them (`Cluster` holds the shards' Raft state).
const SECTIONS: [&str; 7] = [
    "server",
    "clients",
    "memory",
    "persistence",
    "stats",
    "keyspace",
    "cluster",
];

/// The Redis version whose protocol and `INFO` fields kv follows. Tools read `redis_version`
/// to decide which commands to send (redis-cli, exporters); kv's own is `kv_version`.
const REDIS_COMPATIBLE_VERSION: &str = "7.0.0";

impl Dispatcher {
    /// The text of `INFO`: the sections `asked` names (every one if none, or `all`,
    /// `everything` or `default`), each under its `# Name` header and followed by an empty
    /// line, as Redis gives them.
    pub(super) fn info(&self, asked: &[&[u8]]) -> String {
        let everything = asked.is_empty()
            || asked.iter().any(|section| {
                [&b"all"[..], b"everything", b"default"]
                    .iter()
                    .any(|all| section.eq_ignore_ascii_case(all))
            });
        let mut text = String::with_capacity(1024);
        for section in SECTIONS {
            if everything
                || asked
                    .iter()
                    .any(|name| name.eq_ignore_ascii_case(section.as_bytes()))
            {
                self.info_section(section, &mut text);
            }
        }
        text
    }

    fn info_section(&self, section: &str, text: &mut String) {
        let stats = &self.stats;
        // In a cluster, what this node's replicas hold; on a single node, its registry's.
        let (buckets, memory) = match &self.router {
            Some(router) => router.holdings(),
            None => (self.registry().view().len(), self.registry().memory()),
        };
        let gauge = |value: &AtomicUsize| value.load(Ordering::Relaxed) as u64;
        let count = |value: &AtomicU64| value.load(Ordering::Relaxed);
        let mut header = section.to_owned();
        header[..1].make_ascii_uppercase();
        let _ = write!(text, "# {header}\r\n");
        // Lines end in CRLF, as Redis's do: tools that read INFO (redis-cli --stat) look for
        // the CR. The line protocol sends each line as a line either way.
        let mut line = |name: &str, value: &dyn std::fmt::Display| {
            let _ = write!(text, "{name}:{value}\r\n");
        };
        match section {
            "server" => {
                line("redis_version", &REDIS_COMPATIBLE_VERSION);
                line("kv_version", &env!("CARGO_PKG_VERSION"));
                line("version", &env!("CARGO_PKG_VERSION"));
                line("redis_mode", &self.sessions.mode);
                line("process_id", &std::process::id());
                let uptime = self.sessions.started.elapsed().as_secs();
                line("uptime_in_seconds", &uptime);
                line("uptime_in_days", &(uptime / 86_400));
                if let Some(port) = self.sessions.setting("port") {
                    line("tcp_port", &port);
                }
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    line("worker_threads", &runtime.metrics().num_workers());
                }
                if let Some(window) = self.sessions.setting("busy-poll-us") {
                    line("busy_poll_us", &window);
                }
            }
            "clients" => {
                line("connected_clients", &gauge(&stats.connections_open));
                line("connections_open", &gauge(&stats.connections_open));
                if let Some(limit) = self.sessions.setting("maxclients") {
                    line("maxclients", &limit);
                }
                line("blocked_clients", &0);
                line("input_buffer_bytes", &gauge(&stats.input_buffer_bytes));
                line("output_buffer_bytes", &gauge(&stats.output_buffer_bytes));
            }
            "memory" => {
                let resident = resident_bytes().unwrap_or(0);
                line("used_memory", &memory.used());
                line("used_memory_human", &human(memory.used() as u64));
                line("used_memory_rss", &resident);
                line("maxmemory", &memory.limit());
                line("maxmemory_human", &human(memory.limit() as u64));
                line("memory_used_bytes", &memory.used());
                line("memory_limit_bytes", &memory.limit());
                line("resident_bytes", &resident);
            }
            "persistence" => {
                line("loading", &0);
                let log = self.shard.log_status();
                line(
                    "aof_enabled",
                    &u8::from(log.is_some() || self.router.is_some()),
                );
                if let Some(log) = log {
                    line("fsync", &log.fsync);
                    line("log_bytes", &log.bytes);
                    line("log_syncs", &log.syncs);
                    line("log_failed", &u8::from(log.failed));
                }
            }
            "stats" => {
                let status = *self.registry().status().borrow();
                line(
                    "total_connections_received",
                    &count(&stats.connections_accepted),
                );
                line("total_commands_processed", &count(&stats.commands));
                line("total_error_replies", &count(&stats.errors));
                line("rejected_connections", &count(&stats.connections_refused));
                line("total_net_input_bytes", &count(&stats.net_input_bytes));
                line("connections_accepted", &count(&stats.connections_accepted));
                line("connections_refused", &count(&stats.connections_refused));
                line("commands", &count(&stats.commands));
                line("errors", &count(&stats.errors));
                line("net_input_bytes", &count(&stats.net_input_bytes));
                line("buffer_refusals", &count(&stats.buffer_refusals));
                line("request_timeouts", &count(&stats.request_timeouts));
                line("busy_poll_pauses", &count(&stats.busy_poll_pauses));
                line("registry_starts", &status.starts);
            }
            "keyspace" => {
                line("buckets", &buckets);
                line("keys", &memory.keys());
                line(
                    "db0",
                    &format_args!("keys={},expires=0,avg_ttl=0", memory.keys()),
                );
            }
            "cluster" => {
                line("cluster_enabled", &u8::from(self.router.is_some()));
                if let Some(router) = &self.router {
                    router.info(text);
                }
            }
            _ => {}
        }
        text.push_str("\r\n");
    }
}

/// `bytes` as Redis's `_human` fields show it: `1.50M`.
fn human(bytes: u64) -> String {
    let mut value = bytes as f64;
    let mut unit = "B";
    for larger in ["K", "M", "G", "T"] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = larger;
    }
    format!("{value:.2}{unit}")
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
