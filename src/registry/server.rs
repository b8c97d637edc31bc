//! The registry loop: its messages, its state, and how it handles each.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};
use tokio::task::Id;

use super::RegistryError;
use super::handle::RegistryCounts;
use super::view::ViewWriter;
use crate::bucket::{self, BucketHandle, BucketId, BucketName, MemoryBudget};
use crate::config::CoreConfig;
use crate::storage::{Journal, Record};
use crate::supervisor::{BucketSupervisor, ChildExit, ExitReason};

/// What callers ask of the loop. Every request carries its reply slot: these are calls.
pub(super) enum Request {
    Create {
        name: BucketName,
        reply: oneshot::Sender<Result<BucketHandle, RegistryError>>,
    },
    Drop {
        name: BucketName,
        reply: oneshot::Sender<bool>,
    },
    Settle {
        reply: oneshot::Sender<RegistryCounts>,
    },
    /// Fault injection: the loop panics, as a bug in it would make it.
    Panic,
}

/// Gives back the room of a map that has fallen to a quarter of its capacity, so that creating
/// and dropping many buckets leaves memory where it started.
fn shrink_if_sparse<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, V, S>,
) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

/// A bucket this loop started and is watching.
struct Monitored {
    bucket: BucketHandle,
}

/// The loop's state. Everything here is owned by one task; the view is its only shared part.
pub(super) struct State {
    pub(super) config: CoreConfig,
    pub(super) view: ViewWriter,
    pub(super) budget: Arc<MemoryBudget>,
    /// Shared across restarts so a bucket id is never reused within one registry.
    pub(super) next_bucket_id: Arc<AtomicU64>,
    /// Where creates and drops are logged, when the server is durable.
    pub(super) journal: Option<Arc<Journal>>,
    pub(super) buckets: BucketSupervisor,
    monitors: HashMap<Id, Monitored>,
}

impl State {
    pub(super) fn new(
        config: CoreConfig,
        view: ViewWriter,
        budget: Arc<MemoryBudget>,
        next_bucket_id: Arc<AtomicU64>,
        journal: Option<Arc<Journal>>,
    ) -> Self {
        Self {
            config,
            view,
            budget,
            next_bucket_id,
            journal,
            buckets: BucketSupervisor::default(),
            monitors: HashMap::new(),
        }
    }
}

/// Runs until every sender of `mailbox` is gone. Bucket exits are taken before requests, so a
/// request never sees an entry whose exit is already waiting.
pub(super) async fn run(mut mailbox: mpsc::Receiver<Request>, mut state: State) {
    loop {
        tokio::select! {
            biased;
            Some(exit) = state.buckets.next_exit() => state.on_exit(exit),
            request = mailbox.recv() => match request {
                Some(request) => state.on_request(request).await,
                None => break,
            },
        }
    }
}

impl State {
    async fn on_request(&mut self, request: Request) {
        // A caller that gave up before its reply came is not an error of the loop's: the reply
        // is dropped and the loop goes on.
        match request {
            Request::Create { name, reply } => {
                let _ = reply.send(self.create(name));
            }
            Request::Drop { name, reply } => {
                let _ = reply.send(self.drop_bucket(&name));
            }
            Request::Settle { reply } => {
                let counts = self.settle().await;
                let _ = reply.send(counts);
            }
            Request::Panic => panic!("fault injected into the registry"),
        }
    }

    fn create(&mut self, name: BucketName) -> Result<BucketHandle, RegistryError> {
        if name.len() > self.config.max_name_len {
            return Err(RegistryError::NameTooLong {
                length: name.len(),
                limit: self.config.max_name_len,
            });
        }
        if let Some(existing) = self.view.get(name.as_bytes()) {
            if !existing.is_stopped() {
                return Ok(existing);
            }
            // Ended, its exit not yet here: forget it now; the exit will find no entry.
            self.view.remove(name.as_bytes(), existing.id());
        }
        // Count every task still running, ended-but-unreported ones too: they still hold memory.
        if self.buckets.len() >= self.config.max_buckets {
            return Err(RegistryError::TooManyBuckets {
                limit: self.config.max_buckets,
            });
        }
        if self
            .journal
            .as_ref()
            .is_some_and(|journal| journal.is_failed())
        {
            return Err(RegistryError::Unwritable);
        }
        let id = BucketId(self.next_bucket_id.fetch_add(1, Ordering::Relaxed));
        // Logged before the bucket is visible, so every change to it comes after in the log.
        if let Some(journal) = &self.journal {
            journal.append(&Record::Create {
                bucket: name.as_bytes(),
            });
        }
        let (bucket, task) =
            bucket::start(id, name, Arc::clone(&self.budget), self.journal.clone());
        let task_id = self.buckets.start_child(task);
        self.monitors.insert(
            task_id,
            Monitored {
                bucket: bucket.clone(),
            },
        );
        self.view.insert(bucket.clone());
        tracing::debug!(bucket = %bucket.name(), "bucket created");
        Ok(bucket)
    }

    /// Forgets the name and closes the table at once; the task's exit follows.
    fn drop_bucket(&mut self, name: &BucketName) -> bool {
        let Some(bucket) = self.view.get(name.as_bytes()) else {
            return false;
        };
        self.view.remove(name.as_bytes(), bucket.id());
        let was_live = !bucket.is_stopped();
        // Logged after the table is closed: every change the table accepted is before it.
        bucket.close();
        if let Some(journal) = &self.journal {
            journal.append(&Record::Drop {
                bucket: name.as_bytes(),
            });
        }
        was_live
    }

    /// The guide's `handle_info({:DOWN, ...})`, with its catch-all: an exit of a task this loop
    /// does not monitor is logged and ignored, never a crash.
    fn on_exit(&mut self, ChildExit { task, reason }: ChildExit) {
        let Some(Monitored { bucket }) = self.monitors.remove(&task) else {
            tracing::warn!(%task, %reason, "exit of an unknown task ignored");
            return;
        };
        shrink_if_sparse(&mut self.monitors);
        bucket.close();
        let forgotten = self.view.remove(bucket.name().as_bytes(), bucket.id());
        match &reason {
            ExitReason::Panicked(message) => {
                tracing::warn!(bucket = %bucket.name(), %message, "bucket crashed; its data is lost");
            }
            reason => {
                tracing::debug!(bucket = %bucket.name(), %reason, forgotten = forgotten.is_some(), "bucket ended");
            }
        }
    }

    /// Takes in the exit of every bucket whose table is already closed (each of those tasks is
    /// ending), so that afterwards names and running buckets agree.
    async fn settle(&mut self) -> RegistryCounts {
        while self
            .monitors
            .values()
            .any(|monitored| monitored.bucket.is_stopped())
        {
            match self.buckets.next_exit().await {
                Some(exit) => self.on_exit(exit),
                None => break,
            }
        }
        RegistryCounts {
            names: self.view.len(),
            running_buckets: self.buckets.len(),
            named_running_buckets: self.named_running_buckets(),
        }
    }

    fn named_running_buckets(&self) -> usize {
        self.monitors
            .values()
            .filter(|monitored| {
                self.view
                    .get(monitored.bucket.name().as_bytes())
                    .is_some_and(|named| named.id() == monitored.bucket.id())
            })
            .count()
    }
}
