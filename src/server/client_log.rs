//! Log lines about clients (a refused connection, a protocol error that closes one, an idle
//! timeout): each names the peer, and together they are rate-limited, so that a flood of bad
//! clients cannot fill the disk with logs.

use std::num::NonZeroU32;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Lines a second, on average, with bursts of twice as many.
const LINES_PER_SECOND: u32 = 10;

static LIMITER: LazyLock<DefaultDirectRateLimiter> = LazyLock::new(|| {
    let rate = NonZeroU32::new(LINES_PER_SECOND).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(2 * LINES_PER_SECOND).unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
});

/// Lines left out since the last one written.
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Whether a line about a client may be written now; if so, how many were left out before
/// it (to be said on the line).
pub(super) fn admit() -> Option<u64> {
    if LIMITER.check().is_ok() {
        Some(SUPPRESSED.swap(0, Ordering::Relaxed))
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Logs, at info, a line about a client, unless too many have been logged lately.
macro_rules! client_event {
    ($($field:tt)+) => {
        if let Some(suppressed) = $crate::server::client_log::admit() {
            tracing::info!(suppressed_before = suppressed, $($field)+);
        }
    };
}

pub(super) use client_event;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_burst_and_counted() {
        let admitted = (0..1000).filter(|_| admit().is_some()).count();
        assert!(admitted <= 2 * LINES_PER_SECOND as usize + 1, "{admitted}");
        assert!(SUPPRESSED.load(Ordering::Relaxed) > 0);
    }
}
