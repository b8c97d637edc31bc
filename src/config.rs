//! Every limit and knob of kv, with its default and the reason for it.
//!
//! Each bound here protects the server from a client: anything a client can make kv allocate
//! (buckets, keys, bytes, connections, line length) is capped, and reaching the cap gives that
//! client an error reply instead of growing memory.

use std::time::Duration;

/// Limits of the core: the registry and its buckets.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Most buckets alive at once. Each bucket costs a task and a table even when empty, so an
    /// unbounded count would let one client exhaust memory with `CREATE` alone.
    pub max_buckets: usize,
    /// Longest bucket name, in bytes.
    pub max_name_len: usize,
    /// Bytes that keys and values (plus a per-entry overhead estimate) may take in all buckets
    /// together. A `PUT` that would pass it is refused.
    pub max_memory: usize,
    /// Capacity of the registry's mailbox. A full mailbox makes `create` and `drop` wait: that
    /// wait is the back-pressure the guide's synchronous calls give.
    pub registry_mailbox: usize,
    /// How often the registry may fail before its supervisor gives up (OTP's restart intensity:
    /// at most `max_restarts` within `restart_period`).
    pub restart_intensity: RestartIntensity,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            max_buckets: 1_000_000,
            max_name_len: 1024,
            max_memory: 4 << 30,
            registry_mailbox: 1024,
            restart_intensity: RestartIntensity::default(),
        }
    }
}

/// At most `max_restarts` restarts within `period`; one more and the supervisor gives up.
#[derive(Debug, Clone, Copy)]
pub struct RestartIntensity {
    /// Restarts allowed within `period`.
    pub max_restarts: usize,
    /// The sliding window over which restarts are counted.
    pub period: Duration,
}

impl Default for RestartIntensity {
    /// OTP's supervisor default: three restarts in five seconds.
    fn default() -> Self {
        Self {
            max_restarts: 3,
            period: Duration::from_secs(5),
        }
    }
}
