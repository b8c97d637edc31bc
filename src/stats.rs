//! The counters a user reads with `INFO`: kept by the server's connections and by dispatch,
//! read by `INFO`. Imports nothing of ours.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Room for each command's counts (kv has fewer commands; one more slot counts what was not a
/// command at all).
pub const COMMAND_SLOTS: usize = 32;

/// The upper bounds of the latency histograms' buckets, in microseconds (the last bucket,
/// `+Inf`, is implied): from what one request on a loaded machine takes to what a stalled one
/// does.
pub const LATENCY_BOUNDS_MICROS: [u64; 16] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000,
];

/// A histogram of latencies that connections add to once per batch (a batch's requests of one
/// command share one latency and one update), and `/metrics` reads whole.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Requests per bucket (not cumulative), the last one past every bound.
    buckets: [AtomicU64; LATENCY_BOUNDS_MICROS.len() + 1],
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    /// Records `requests` requests that each took `latency`.
    pub fn record(&self, latency: Duration, requests: u64) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_MICROS
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(LATENCY_BOUNDS_MICROS.len());
        self.buckets[bucket].fetch_add(requests, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(micros.saturating_mul(requests), Ordering::Relaxed);
    }

    /// Requests recorded: the buckets' sum, so no counter of its own is kept.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.buckets().iter().sum()
    }

    /// Their latencies added up, in microseconds.
    #[must_use]
    pub fn sum_micros(&self) -> u64 {
        self.sum_micros.load(Ordering::Relaxed)
    }

    /// Requests in each bucket (not cumulative), the last past every bound; read together,
    /// so that they add up to the count a scrape reports even while requests are recorded.
    #[must_use]
    pub fn buckets(&self) -> [u64; LATENCY_BOUNDS_MICROS.len() + 1] {
        std::array::from_fn(|index| self.buckets[index].load(Ordering::Relaxed))
    }
}

/// What one command has been asked and answered.
#[derive(Debug, Default)]
pub struct CommandStats {
    /// Latency from the request parsed to its reply written; its count is the requests.
    pub latency: LatencyHistogram,
    /// Requests answered with an error (as `errors` counts them).
    pub errors: AtomicU64,
}

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
    /// Times busy polling stopped because its thread was kept waiting for a CPU.
    pub busy_poll_pauses: AtomicU64,
    /// Per command, by its place in `protocol::COMMANDS`; the slot after the last command
    /// counts requests that were not one.
    pub by_command: [CommandStats; COMMAND_SLOTS],
}

impl Stats {
    /// Counts an error reply to a request of command `slot`.
    pub fn count_error(&self, slot: usize) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(command) = self.by_command.get(slot) {
            command.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_in_their_buckets_and_add_up() {
        let histogram = LatencyHistogram::default();
        histogram.record(Duration::from_micros(7), 3);
        histogram.record(Duration::from_micros(300), 1);
        histogram.record(Duration::from_secs(5), 2);
        assert_eq!(histogram.count(), 6);
        assert_eq!(histogram.sum_micros(), 21 + 300 + 10_000_000);
        let buckets = histogram.buckets();
        assert_eq!(buckets[0], 3);
        assert_eq!(buckets[5], 1);
        assert_eq!(buckets[LATENCY_BOUNDS_MICROS.len()], 2);
        assert_eq!(buckets.iter().sum::<u64>(), 6);
    }
}
