//! The registry loop: its messages, its state, and how it handles each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::Id;

use super::handle::RegistryCounts;
use super::view::ViewWriter;
use super::{BUCKET_RESTARTS, DurableState, Entries, RegistryError};
use crate::bucket::{self, BucketHandle, BucketId, BucketName, MemoryBudget};
use crate::config::{CoreConfig, RestartIntensity};
use crate::storage::{Journal, Record};
use crate::supervisor::{BucketSupervisor, ChildExit, ExitReason, RestartWindow};

/// What callers ask of the loop. Every request carries its reply slot: these are calls.
pub(super) enum Request {
    Create {
        name: BucketName,
        /// Replayed from the log: the limits the running server kept are not checked again.
        from_log: bool,
        reply: oneshot::Sender<Result<BucketHandle, RegistryError>>,
    },
    Drop {
        name: BucketName,
        reply: oneshot::Sender<Result<bool, RegistryError>>,
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

/// Reads durable state on a blocking thread (it reads files); a panic there is an error too.
async fn read_back<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|error| error.to_string())?
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
    /// What buckets that end on their own are restarted from, once the durability layer has
    /// set it.
    durable_state: Arc<OnceLock<Arc<dyn DurableState>>>,
    /// Recent restarts of each durable bucket that ended on its own.
    restarts: HashMap<BucketName, RestartWindow>,
    /// This loop replaces one that failed: reload every bucket from disk before serving.
    reload_on_start: bool,
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
        durable_state: Arc<OnceLock<Arc<dyn DurableState>>>,
        reload_on_start: bool,
    ) -> Self {
        Self {
            config,
            view,
            budget,
            next_bucket_id,
            journal,
            durable_state,
            restarts: HashMap::new(),
            reload_on_start,
            buckets: BucketSupervisor::default(),
            monitors: HashMap::new(),
        }
    }
}

/// Runs until every sender of `mailbox` is gone. Bucket exits are taken before requests, so a
/// request never sees an entry whose exit is already waiting.
pub(super) async fn run(mut mailbox: mpsc::Receiver<Request>, mut state: State) {
    if state.reload_on_start {
        state.reload_all().await;
    }
    loop {
        tokio::select! {
            biased;
            Some(exit) = state.buckets.next_exit() => state.on_exit(exit).await,
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
            Request::Create {
                name,
                from_log,
                reply,
            } => {
                let _ = reply.send(self.create(name, from_log).await);
            }
            Request::Drop { name, reply } => {
                let _ = reply.send(self.drop_bucket(&name).await);
            }
            Request::Settle { reply } => {
                let counts = self.settle().await;
                let _ = reply.send(counts);
            }
            Request::Panic => panic!("fault injected into the registry"),
        }
    }

    async fn create(
        &mut self,
        name: BucketName,
        from_log: bool,
    ) -> Result<BucketHandle, RegistryError> {
        if !from_log && name.len() > self.config.max_name_len {
            return Err(RegistryError::NameTooLong {
                length: name.len(),
                limit: self.config.max_name_len,
            });
        }
        if let Some(existing) = self.named(name.as_bytes()).await {
            return Ok(existing);
        }
        if self.view.is_failed(name.as_bytes()) {
            return Err(RegistryError::BucketFailed(name));
        }
        // Count every task still running, ended-but-unreported ones too: they still hold
        // memory. A bucket dropped a moment ago is one of those until its exit is taken in, so
        // at the limit those exits are taken in before refusing.
        if !from_log && self.buckets.len() >= self.config.max_buckets {
            self.settle().await;
            if self.buckets.len() >= self.config.max_buckets {
                return Err(RegistryError::TooManyBuckets {
                    limit: self.config.max_buckets,
                });
            }
        }
        self.check_writable()?;
        // Logged before the bucket is visible, so every change to it comes after in the log.
        if let Some(journal) = &self.journal {
            journal.append(&Record::Create {
                bucket: name.as_bytes(),
            });
        }
        let bucket = self.start_bucket(name);
        self.view.insert(bucket.clone());
        tracing::debug!(bucket = %bucket.name(), "bucket created");
        Ok(bucket)
    }

    /// The live bucket called `name`, after taking in the exit of one that ended there and is
    /// not yet reported: a durable one is restarted from disk by that (so it is not replaced
    /// by an empty bucket, nor dropped unseen); any other is forgotten.
    async fn named(&mut self, name: &[u8]) -> Option<BucketHandle> {
        let existing = self.view.get(name)?;
        if !existing.is_stopped() {
            return Some(existing);
        }
        if self.durable_state.get().is_some() {
            Box::pin(self.settle()).await;
            return self.view.get(name).filter(|bucket| !bucket.is_stopped());
        }
        // The exit will find no entry.
        self.view.remove(name, existing.id());
        None
    }

    /// Refuses changes once the log has failed: nothing may be acknowledged that the log
    /// does not hold.
    fn check_writable(&self) -> Result<(), RegistryError> {
        match &self.journal {
            Some(journal) if journal.is_failed() => Err(RegistryError::Unwritable),
            _ => Ok(()),
        }
    }

    /// Starts a bucket task under the bucket supervisor and monitors it; the caller makes it
    /// visible.
    fn start_bucket(&mut self, name: BucketName) -> BucketHandle {
        let id = BucketId(self.next_bucket_id.fetch_add(1, Ordering::Relaxed));
        let (bucket, task) =
            bucket::start(id, name, Arc::clone(&self.budget), self.journal.clone());
        let task_id = self.buckets.start_child(task);
        self.monitors.insert(
            task_id,
            Monitored {
                bucket: bucket.clone(),
            },
        );
        bucket
    }

    /// Starts `name` again with `entries`, not logged (they are on disk already), and makes it
    /// visible.
    fn restore_bucket(
        &mut self,
        name: BucketName,
        entries: &Entries,
    ) -> Result<BucketHandle, String> {
        let bucket = self.start_bucket(name);
        for (key, value) in entries {
            if let Err(error) = bucket.restore(key, value) {
                bucket.close();
                return Err(error.to_string());
            }
        }
        self.view.insert(bucket.clone());
        Ok(bucket)
    }

    /// After bucket `name` ended on its own with durability on: its data is on disk, so it
    /// starts again from there, unless it has failed too often lately.
    async fn restart(&mut self, name: BucketName, durable: Arc<dyn DurableState>) {
        let window = self.restarts.entry(name.clone()).or_insert_with(|| {
            RestartWindow::new(RestartIntensity {
                max_restarts: BUCKET_RESTARTS,
                period: Duration::from_secs(60),
            })
        });
        if !window.allow(tokio::time::Instant::now()) {
            tracing::error!(
                bucket = %name,
                restarts = BUCKET_RESTARTS,
                "bucket failed too often within a minute; it stays down until dropped"
            );
            self.view.set_failed(&name, true);
            return;
        }
        let lookup = name.clone();
        match read_back(move || durable.bucket(lookup.as_bytes())).await {
            Ok(Some(entries)) => match self.restore_bucket(name.clone(), &entries) {
                Ok(_) => {
                    tracing::warn!(bucket = %name, keys = entries.len(), "bucket restarted from its durable state");
                }
                Err(error) => {
                    tracing::error!(bucket = %name, %error, "could not restart the bucket; it stays down");
                    self.view.set_failed(&name, true);
                }
            },
            Ok(None) => {
                tracing::debug!(bucket = %name, "the bucket is not on disk; not restarted");
            }
            Err(error) => {
                tracing::error!(bucket = %name, %error, "could not read the bucket back; it stays down");
                self.view.set_failed(&name, true);
            }
        }
    }

    /// A new loop after the old one failed, with durability on: every bucket comes back from
    /// disk (the old loop's buckets ended with it).
    async fn reload_all(&mut self) {
        let Some(durable) = self.durable_state.get().cloned() else {
            return;
        };
        match read_back(move || durable.buckets()).await {
            Ok(buckets) => {
                let count = buckets.len();
                for (name, entries) in buckets {
                    if let Err(error) = self.restore_bucket(name.clone(), &entries) {
                        tracing::error!(bucket = %name, %error, "could not reload the bucket; it stays down");
                        self.view.set_failed(&name, true);
                    }
                }
                tracing::warn!(
                    buckets = count,
                    "registry restarted; buckets reloaded from disk"
                );
            }
            Err(error) => {
                tracing::error!(%error, "registry restarted but could not reload the buckets from disk");
            }
        }
    }

    /// Forgets the name and closes the table at once; the task's exit follows. Returns
    /// whether there was a bucket to drop.
    async fn drop_bucket(&mut self, name: &BucketName) -> Result<bool, RegistryError> {
        self.check_writable()?;
        self.restarts.remove(name);
        let dropped = if self.view.is_failed(name.as_bytes()) {
            // Down after too many failures, its data still on disk: dropping discards that.
            self.view.set_failed(name, false);
            true
        } else if let Some(bucket) = self.named(name.as_bytes()).await {
            self.view.remove(name.as_bytes(), bucket.id());
            // Closed before the drop is logged: every change the table accepted comes first.
            bucket.close();
            true
        } else {
            false
        };
        if dropped && let Some(journal) = &self.journal {
            journal.append(&Record::Drop {
                bucket: name.as_bytes(),
            });
        }
        Ok(dropped)
    }

    /// The guide's `handle_info({:DOWN, ...})`, with its catch-all: an exit of a task this loop
    /// does not monitor is logged and ignored, never a crash.
    async fn on_exit(&mut self, ChildExit { task, reason }: ChildExit) {
        let Some(Monitored { bucket }) = self.monitors.remove(&task) else {
            tracing::warn!(%task, %reason, "exit of an unknown task ignored");
            return;
        };
        shrink_if_sparse(&mut self.monitors);
        bucket.close();
        let forgotten = self.view.remove(bucket.name().as_bytes(), bucket.id());
        // Still named when it ended: it crashed or stopped on its own; it was not dropped.
        let ended_on_its_own = forgotten.is_some() && reason != ExitReason::Aborted;
        if ended_on_its_own && let Some(durable) = self.durable_state.get().cloned() {
            tracing::warn!(bucket = %bucket.name(), %reason, "durable bucket ended; restarting it from disk");
            Box::pin(self.restart(bucket.name().clone(), durable)).await;
            return;
        }
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
                Some(exit) => self.on_exit(exit).await,
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
