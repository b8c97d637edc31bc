//! The counters a user reads with `INFO`: kept by the server's connections and by dispatch,
//! read by `INFO`. Imports nothing of ours.

use std::sync::atomic::{AtomicU64, AtomicUsize};

/// Counters a user reads with `INFO`. Connections add their command counts once per batch,
/// not per command, so the counters cost no shared write on the hot path.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections open now.
    pub connections_open: AtomicUsize,
    /// Connections accepted since start.
    pub connections_accepted: AtomicU64,
    /// Connections refused at the connection limit.
    pub connections_refused: AtomicU64,
    /// Requests answered.
    pub commands: AtomicU64,
    /// Requests answered with an error (bad input, limits).
    pub errors: AtomicU64,
    /// Bytes read from clients since start.
    pub net_input_bytes: AtomicU64,
    /// Bytes held in connections' read buffers now.
    pub input_buffer_bytes: AtomicUsize,
    /// Bytes held in connections' reply buffers now.
    pub output_buffer_bytes: AtomicUsize,
    /// Connections closed because their large request or reply found the buffers of all
    /// connections over `max_connection_buffers`.
    pub buffer_refusals: AtomicU64,
    /// Connections closed because a request did not arrive whole within `request_timeout`.
    pub request_timeouts: AtomicU64,
}
