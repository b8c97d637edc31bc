//! Busy polling: while requests keep coming, the worker checks for I/O without going to sleep.
//!
//! At pipeline depth 1 a worker that has answered everything blocks in `epoll_wait`, and the
//! next request must wake it: on a virtual machine that is an interrupt to another CPU, paid
//! by the client that sent the request. Go's scheduler and Seastar avoid it the same way, by
//! spinning briefly before they sleep. A task here yields in a loop for as long as requests
//! arrived within the last `window`; a yielded task makes the runtime poll for I/O with a zero
//! timeout instead of blocking. Once a whole window passes with no request, it sleeps until
//! the next one: an idle server uses no CPU for it.
//!
//! Measured with `redis-benchmark -c 50 -P 1` on the 2-core machine (six and eight interleaved
//! rounds, two sessions): 6–10% more requests per second at depth 1 for about 1 µs more server
//! CPU per request; no change at depth 16 (docs/performance.md). Only timing depends on it,
//! never an answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

/// What connections and the polling task share.
#[derive(Debug)]
pub(super) struct BusyPoll {
    window: Duration,
    /// Activity is the server's count of answered requests (`Stats::commands`), which every
    /// connection adds to after each batch anyway.
    stats: Arc<Stats>,
    /// Whether the polling task sleeps; a connection that finds it set wakes it.
    asleep: AtomicBool,
    wake: Notify,
}

impl BusyPoll {
    pub(super) fn new(window: Duration, stats: Arc<Stats>) -> Self {
        Self {
            window,
            stats,
            asleep: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// Called by a connection after it has added its answered requests to `Stats::commands`
    /// (with `SeqCst`, as this loads `asleep`, and `run` stores `asleep` then loads the count:
    /// at least one side sees the other, so the task never sleeps through a request).
    pub(super) fn answered(&self) {
        if self.asleep.load(Ordering::SeqCst) && self.asleep.swap(false, Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    fn activity(&self, order: Ordering) -> u64 {
        self.stats.commands.load(order)
    }

    /// Polls while requests arrive, sleeps while they do not, until `stop`.
    pub(super) async fn run(self: Arc<Self>, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let seen = self.poll_while_busy(&stop).await;
            self.asleep.store(true, Ordering::SeqCst);
            if self.activity(Ordering::SeqCst) != seen {
                // A request came in between: it may have found the flag still clear.
                self.asleep.store(false, Ordering::SeqCst);
                continue;
            }
            // A wake that came before this wait is kept by `Notify` as a permit.
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
            }
        }
    }

    /// Yields until a whole window passes with no request answered; returns the count then.
    async fn poll_while_busy(&self, stop: &CancellationToken) -> u64 {
        let mut seen = self.activity(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        while !stop.is_cancelled() {
            tokio::task::yield_now().await;
            let now = self.activity(Ordering::Relaxed);
            if now != seen {
                seen = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= self.window {
                break;
            }
        }
        seen
    }

    #[cfg(test)]
    fn is_asleep(&self) -> bool {
        self.asleep.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits, yielding, until `condition` holds; fails after a bound instead of hanging.
    async fn until(condition: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !condition() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("condition reached in time");
    }

    #[tokio::test]
    async fn sleeps_when_requests_stop_wakes_on_the_next_and_ends_on_stop() {
        let stats = Arc::new(Stats::default());
        let poll = Arc::new(BusyPoll::new(Duration::from_millis(5), Arc::clone(&stats)));
        let stop = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&poll).run(stop.clone()));
        // No requests: asleep once the first window has passed.
        until(|| poll.is_asleep()).await;
        // A request clears the flag and wakes it; had the wake been lost, the flag would stay
        // clear for ever, since only the task sets it, after a new window of polling.
        stats.commands.fetch_add(1, Ordering::SeqCst);
        poll.answered();
        assert!(!poll.is_asleep());
        until(|| poll.is_asleep()).await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the task ends on stop")
            .expect("no panic");
    }
}
