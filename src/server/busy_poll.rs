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
//! Polling pays only while the poller has a core to itself. When other threads want the core
//! (a load generator on the same machine, other workers, other processes) every spin is time
//! taken from them, and they are what sends the requests. So the poller watches how long its
//! thread waits for a CPU (the kernel's run delay) and, when that passes a tenth of the time
//! it polled, stops polling for a while (a quarter of a second, doubling to four while the
//! contention lasts) before it tries again.
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

/// How often a polling task asks the kernel how long its thread waited for a CPU.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// The share of a probe interval spent waiting for a CPU above which polling stops.
const CONTENDED_SHARE: u32 = 10;
/// How long polling stops when contended: the first pause, and the longest.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const LONGEST_PAUSE: Duration = Duration::from_secs(4);

/// Why a stretch of polling ended.
#[derive(Debug, PartialEq)]
enum Polled {
    /// A whole window passed without a request; the activity count then.
    Quiet(u64),
    /// The thread spent more than its share waiting for a CPU.
    Contended,
}

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
        let mut pause = FIRST_PAUSE;
        while !stop.is_cancelled() {
            let seen = match self.poll_while_busy(&stop).await {
                Polled::Quiet(seen) => {
                    pause = FIRST_PAUSE;
                    seen
                }
                Polled::Contended => {
                    self.stats.busy_poll_pauses.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(LONGEST_PAUSE);
                    continue;
                }
            };
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

    /// Yields until a whole window passes with no request answered, or until the thread is
    /// found waiting for a CPU.
    async fn poll_while_busy(&self, stop: &CancellationToken) -> Polled {
        let mut seen = self.activity(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        let mut probe = RunDelay::sample();
        while !stop.is_cancelled() {
            tokio::task::yield_now().await;
            let count = self.activity(Ordering::Relaxed);
            // One clock read a turn: the poller turns between every other task's polls.
            let now = Instant::now();
            if count != seen {
                seen = count;
                quiet_since = now;
            } else if now.duration_since(quiet_since) >= self.window {
                break;
            }
            if now.duration_since(probe.at) >= PROBE_INTERVAL {
                let next = RunDelay::sample();
                if next.contended_since(&probe) {
                    return Polled::Contended;
                }
                probe = next;
            }
        }
        Polled::Quiet(seen)
    }

    #[cfg(test)]
    fn is_asleep(&self) -> bool {
        self.asleep.load(Ordering::Acquire)
    }
}

/// What the kernel says of the current thread's waits for a CPU at one moment.
struct RunDelay {
    at: Instant,
    thread: std::thread::ThreadId,
    /// Nanoseconds the thread has spent runnable but not running, if the kernel tells
    /// (`/proc/thread-self/schedstat`, its second field; kernels built without scheduler
    /// statistics leave the file out, and polling then never stops for contention).
    waited: Option<u64>,
}

impl RunDelay {
    fn sample() -> Self {
        let waited = Self::read_waited();
        Self {
            at: Instant::now(),
            thread: std::thread::current().id(),
            waited,
        }
    }

    /// The file is three numbers: one read into a small buffer (no size query, no second read
    /// for the end, as `read_to_string` would make) on the polling thread. Each thread opens
    /// its own file once and reads it again from the start: a stretch of polling begins with
    /// a sample, and stretches can begin thousands of times a second.
    fn read_waited() -> Option<u64> {
        use std::os::unix::fs::FileExt;
        thread_local! {
            static SCHEDSTAT: Option<std::fs::File> =
                std::fs::File::open("/proc/thread-self/schedstat").ok();
        }
        let mut buffer = [0u8; 96];
        let length = SCHEDSTAT.with(|file| file.as_ref()?.read_at(&mut buffer, 0).ok())?;
        let text = std::str::from_utf8(&buffer[..length]).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    }

    /// Whether the thread waited for a CPU more than its share of the time since `earlier`.
    /// A task can move between worker threads: samples of two threads say nothing.
    fn contended_since(&self, earlier: &Self) -> bool {
        let (Some(now), Some(then)) = (self.waited, earlier.waited) else {
            return false;
        };
        let elapsed = self.at.duration_since(earlier.at);
        self.thread == earlier.thread
            && Duration::from_nanos(now.saturating_sub(then)) > elapsed / CONTENDED_SHARE
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

    /// Pins the calling thread to CPU 0 (with `taskset`, by its thread id).
    fn pin_to_first_cpu() {
        let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
        let thread = link
            .file_name()
            .expect("a thread id")
            .to_string_lossy()
            .into_owned();
        let status = std::process::Command::new("taskset")
            .args(["-pc", "0", &thread])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("taskset runs");
        assert!(status.success());
    }

    /// Two threads that spin on one CPU each wait for it about half the time: the probe says
    /// so within a few intervals.
    #[test]
    fn a_thread_sharing_its_core_with_a_spinner_is_found_contended() {
        let stop = Arc::new(AtomicBool::new(false));
        let spinner = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                pin_to_first_cpu();
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            }
        });
        pin_to_first_cpu();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut probe = RunDelay::sample();
        let found = loop {
            if Instant::now() > deadline {
                break false;
            }
            if probe.at.elapsed() >= PROBE_INTERVAL {
                let next = RunDelay::sample();
                assert!(next.waited.is_some(), "this kernel reports run delays");
                if next.contended_since(&probe) {
                    break true;
                }
                probe = next;
            }
        };
        stop.store(true, Ordering::Relaxed);
        spinner.join().expect("the spinner ends");
        assert!(found, "a shared core was never seen");
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
