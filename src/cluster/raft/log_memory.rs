//! What a node's shard logs hold together (their unpurged entries), against one budget.
//!
//! A log keeps its unpurged entries on disk, and the newest of them in memory too; what it
//! holds bounds both. Entries batch changes (up to megabytes each), so neither a count of
//! entries nor a bound per shard bounds a node: a node may hold thousands of shards. Every log counts what it holds here as well as in its own
//! counter; an append that takes the node past its alarm wakes whoever waits on
//! [`LogMemory::exceeded`] (the node, which compacts the largest logs), at once rather than at
//! its next tick, so the logs overshoot the budget by what arrives while they are compacted.
//!
//! Invariants:
//! - `held` is the sum of the live [`LogHeld`] counters: each adds and subtracts its changes
//!   here too, and gives back what it still holds when dropped.
//! - The alarm is never below the budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// What a node's shard logs hold, against its budget.
#[derive(Debug)]
pub struct LogMemory {
    budget: u64,
    held: AtomicU64,
    /// Past this, an append wakes the waiter: the budget, or more while the logs hold what
    /// they may keep whatever the budget (see [`LogMemory::set_alarm`]).
    alarm: AtomicU64,
    exceeded: Notify,
}

impl LogMemory {
    /// Logs that may hold `budget` bytes together.
    #[must_use]
    pub fn new(budget: u64) -> Arc<Self> {
        Arc::new(Self {
            budget,
            held: AtomicU64::new(0),
            alarm: AtomicU64::new(budget),
            exceeded: Notify::new(),
        })
    }

    /// Logs with no budget, for a log used alone.
    #[must_use]
    pub fn unbounded() -> Arc<Self> {
        Self::new(u64::MAX)
    }

    /// The bytes the logs may hold together.
    #[must_use]
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The bytes the logs hold together.
    #[must_use]
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Raises the alarm to `floor` when that is above the budget: what the logs may hold
    /// whatever the budget (twice their snapshots: compacting below that would copy the data
    /// over and over), so that appends do not wake the node for nothing to compact.
    pub fn set_alarm(&self, floor: u64) {
        self.alarm.store(self.budget.max(floor), Ordering::Relaxed);
    }

    /// Waits until an append takes the logs past the alarm (at once if one did since the last
    /// wait).
    pub async fn exceeded(&self) {
        self.exceeded.notified().await;
    }

    /// A new counter for one log.
    #[must_use]
    pub fn counter(self: &Arc<Self>) -> LogHeld {
        LogHeld {
            bytes: AtomicU64::new(0),
            node: Arc::clone(self),
        }
    }
}

/// What one log holds, counted in its node's [`LogMemory`] too.
#[derive(Debug)]
pub struct LogHeld {
    bytes: AtomicU64,
    node: Arc<LogMemory>,
}

impl LogHeld {
    /// The bytes this log holds.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Counts `bytes` more, and wakes the node if its logs are past the alarm.
    pub fn add(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let held = self.node.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if held > self.node.alarm.load(Ordering::Relaxed) {
            self.node.exceeded.notify_one();
        }
    }

    /// Counts `bytes` fewer.
    pub fn sub(&self, bytes: u64) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.node.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl Drop for LogHeld {
    fn drop(&mut self) {
        self.node.held.fetch_sub(self.bytes(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_counts_what_its_logs_hold_until_they_are_dropped() {
        let memory = LogMemory::new(100);
        let first = memory.counter();
        let second = memory.counter();
        first.add(30);
        second.add(50);
        first.sub(10);
        assert_eq!((first.bytes(), second.bytes(), memory.held()), (20, 50, 70));
        drop(second);
        assert_eq!(memory.held(), 20);
    }

    #[tokio::test]
    async fn an_append_past_the_alarm_wakes_the_node_and_one_below_it_does_not() {
        let memory = LogMemory::new(100);
        let log = memory.counter();
        log.add(100);
        // A wake-up is a stored permit: ready at the first poll, or never.
        let woken = || {
            let memory = Arc::clone(&memory);
            async move {
                tokio::time::timeout(std::time::Duration::ZERO, memory.exceeded())
                    .await
                    .is_ok()
            }
        };
        assert!(!woken().await, "at the budget, not past it");
        log.add(1);
        assert!(woken().await);
        memory.set_alarm(1_000);
        log.add(500);
        assert!(!woken().await, "below a raised alarm");
        log.sub(501);
        memory.set_alarm(0);
        log.add(0);
        assert!(!woken().await, "the alarm never falls below the budget");
        log.add(1);
        assert!(woken().await);
    }
}
