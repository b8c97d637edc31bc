//! The registry's event loop (the guide's GenServer): its messages, its state, and how it
//! handles each. The only writer of the names.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::{Id, JoinSet};

use super::handle::RegistryCounts;
use super::view::{Down, ViewWriter};
use super::{BUCKET_RESTARTS, DurableState, Entries, ReadBackError, RegistryError};
use crate::bucket::{self, BucketError, BucketHandle, BucketId, BucketName, MemoryBudget};
use crate::change::{Change, ChangeLog};
use crate::config::{CoreConfig, RestartIntensity};
use crate::encoding::shrunk_capacity;
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
    /// The log failed: what the tables hold may not all be in it, so every bucket is rebuilt
    /// from the files.
    ReloadFromDisk { reply: oneshot::Sender<()> },
    /// Fault injection: the loop panics, as a bug in it would make it.
    Panic,
}

/// Gives back the room of a map that has fallen to a quarter of its capacity, so that creating
/// and dropping many buckets leaves memory where it started.
fn shrink_if_sparse<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, V, S>,
) {
    if let Some(capacity) = shrunk_capacity(map.len(), map.capacity()) {
        map.shrink_to(capacity);
    }
}

/// Reads durable state on a blocking thread (it reads files); a panic there is an error too.
async fn read_back<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, ReadBackError> + Send + 'static,
) -> Result<T, ReadBackError> {
    tokio::task::spawn_blocking(read).await?
}

/// A bucket this loop started and is watching.
struct Monitored {
    bucket: BucketHandle,
}

/// A crashed durable bucket read back from disk, off the loop.
struct ReadBack {
    name: BucketName,
    /// Which restart this is: a bucket dropped and created again meanwhile has a newer one.
    restart: u64,
    entries: Result<Option<Entries>, ReadBackError>,
}

/// The loop's state. Everything here is owned by one task; the view is its only shared part.
pub(super) struct State {
    pub(super) config: CoreConfig,
    pub(super) view: ViewWriter,
    pub(super) budget: Arc<MemoryBudget>,
    /// Shared across restarts so a bucket id is never reused within one registry.
    pub(super) next_bucket_id: Arc<AtomicU64>,
    /// Where creates and drops are logged, when the shard is durable.
    pub(super) log: Option<Arc<dyn ChangeLog>>,
    /// What buckets that end on their own are restarted from, once the durability layer has
    /// set it.
    durable_state: Arc<OnceLock<Arc<dyn DurableState>>>,
    /// Recent restarts of each durable bucket that ended on its own.
    restarts: HashMap<BucketName, RestartWindow>,
    /// This loop replaces one that failed: reload every bucket from disk before serving.
    reload_on_start: bool,
    pub(super) buckets: BucketSupervisor,
    monitors: HashMap<Id, Monitored>,
    /// Crashed durable buckets being read back from disk, and the restart each name waits for.
    reading_back: JoinSet<ReadBack>,
    restarts_pending: HashMap<BucketName, u64>,
    next_restart: u64,
}

impl State {
    pub(super) fn new(
        config: CoreConfig,
        view: ViewWriter,
        budget: Arc<MemoryBudget>,
        next_bucket_id: Arc<AtomicU64>,
        log: Option<Arc<dyn ChangeLog>>,
        durable_state: Arc<OnceLock<Arc<dyn DurableState>>>,
        reload_on_start: bool,
    ) -> Self {
        Self {
            config,
            view,
            budget,
            next_bucket_id,
            log,
            durable_state,
            restarts: HashMap::new(),
            reload_on_start,
            buckets: BucketSupervisor::default(),
            monitors: HashMap::new(),
            reading_back: JoinSet::new(),
            restarts_pending: HashMap::new(),
            next_restart: 0,
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
            Some(exit) = state.buckets.next_exit() => state.on_exit(exit),
            Some(read_back) = state.reading_back.join_next(), if !state.reading_back.is_empty() => {
                match read_back {
                    Ok(read_back) => state.on_read_back(read_back),
                    Err(error) => tracing::error!(%error, "reading a bucket back failed"),
                }
            }
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
                let counts = self.settle_with_restarts().await;
                let _ = reply.send(counts);
            }
            Request::ReloadFromDisk { reply } => {
                self.reload_after_log_failure().await;
                let _ = reply.send(());
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
        match self.view.down(name.as_bytes()) {
            Some(Down::Failed) => return Err(RegistryError::BucketFailed(name)),
            Some(Down::Restarting) => return Err(RegistryError::Restarting(name)),
            None => {}
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
        self.admit(&Change::Create {
            bucket: name.as_bytes(),
        })?;
        let cost = self.reserve_bucket(&name, from_log)?;
        let bucket = self.start_bucket(name, cost);
        // Logged before the bucket is visible, so every change to it comes after in the log.
        self.record(&Change::Create {
            bucket: bucket.name().as_bytes(),
        });
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
            self.settle().await;
            return self.view.get(name).filter(|bucket| !bucket.is_stopped());
        }
        // The exit will find no entry.
        self.view.remove(name, existing.id());
        None
    }

    /// Asks the log whether `change` may be made: nothing may be acknowledged that the log
    /// does not hold.
    fn admit(&self, change: &Change<'_>) -> Result<(), RegistryError> {
        match &self.log {
            Some(log) => Ok(log.admit(change)?),
            None => Ok(()),
        }
    }

    fn record(&self, change: &Change<'_>) {
        if let Some(log) = &self.log {
            log.record(change);
        }
    }

    /// Reserves what a bucket called `name` costs from the memory budget, within the limit
    /// unless it comes `from_log` (what recovery and restarts bring back was accepted within
    /// the limits already); returns the cost, which the bucket gives back when it ends.
    fn reserve_bucket(&self, name: &BucketName, from_log: bool) -> Result<usize, RegistryError> {
        let cost = bucket::cost(name);
        if from_log {
            self.budget.reserve_unchecked(cost);
        } else {
            self.budget
                .reserve(cost)
                .map_err(|_| RegistryError::OutOfMemory {
                    limit: self.budget.limit(),
                })?;
        }
        Ok(cost)
    }

    /// Starts a bucket task under the bucket supervisor and monitors it; the caller has
    /// reserved its `cost` and makes it visible.
    fn start_bucket(&mut self, name: BucketName, cost: usize) -> BucketHandle {
        let id = BucketId(self.next_bucket_id.fetch_add(1, Ordering::Relaxed));
        let (bucket, task) =
            bucket::start(id, name, Arc::clone(&self.budget), cost, self.log.clone());
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
    ) -> Result<BucketHandle, BucketError> {
        let cost = bucket::cost(&name);
        self.budget.reserve_unchecked(cost);
        let bucket = self.start_bucket(name, cost);
        for (key, value) in entries {
            if let Err(error) = bucket.restore(key, value) {
                bucket.close();
                return Err(error);
            }
        }
        self.view.insert(bucket.clone());
        Ok(bucket)
    }

    /// After bucket `name` ended on its own with durability on: its data is on disk, so it
    /// starts again from there, unless it has failed too often lately. The name is marked
    /// restarting already; the files are read on a blocking thread, and the loop serves on
    /// meanwhile.
    fn restart(&mut self, name: BucketName, durable: Arc<dyn DurableState>) {
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
            self.view.set_down(&name, Some(Down::Failed));
            return;
        }
        self.next_restart += 1;
        let restart = self.next_restart;
        self.restarts_pending.insert(name.clone(), restart);
        self.reading_back.spawn(async move {
            let lookup = name.clone();
            let entries = read_back(move || durable.bucket(lookup.as_bytes())).await;
            ReadBack {
                name,
                restart,
                entries,
            }
        });
    }

    /// A crashed bucket has been read back: it starts again with its data, unless it was
    /// dropped (or dropped and restarted) meanwhile.
    fn on_read_back(
        &mut self,
        ReadBack {
            name,
            restart,
            entries,
        }: ReadBack,
    ) {
        if self.restarts_pending.get(&name) != Some(&restart) {
            return;
        }
        self.restarts_pending.remove(&name);
        shrink_if_sparse(&mut self.restarts_pending);
        match entries {
            Ok(Some(entries)) => match self.restore_bucket(name.clone(), &entries) {
                Ok(_) => {
                    self.view.set_down(&name, None);
                    self.view.events().restarted(&name);
                    tracing::warn!(bucket = %name, keys = entries.len(), "bucket restarted from its durable state");
                }
                Err(error) => {
                    tracing::error!(bucket = %name, %error, "could not restart the bucket; it stays down");
                    self.view.set_down(&name, Some(Down::Failed));
                }
            },
            Ok(None) => {
                tracing::debug!(bucket = %name, "the bucket is not on disk; not restarted");
                self.view.set_down(&name, None);
            }
            Err(error) => {
                tracing::error!(bucket = %name, %error, "could not read the bucket back; it stays down");
                self.view.set_down(&name, Some(Down::Failed));
            }
        }
    }

    /// A new loop after the old one failed, with durability on, or after the log failed:
    /// every bucket comes back from disk (the old buckets are closed, their names marked
    /// restarting). A name the files do not hold is forgotten.
    async fn reload_all(&mut self) {
        let Some(durable) = self.durable_state.get().cloned() else {
            return;
        };
        // Restarts of single buckets under way are covered by this one.
        self.reading_back.abort_all();
        self.restarts_pending.clear();
        match read_back(move || durable.buckets()).await {
            Ok(buckets) => {
                let count = buckets.len();
                for (name, entries) in buckets {
                    let down = match self.restore_bucket(name.clone(), &entries) {
                        Ok(_) => None,
                        Err(error) => {
                            tracing::error!(bucket = %name, %error, "could not reload the bucket; it stays down");
                            Some(Down::Failed)
                        }
                    };
                    self.view.set_down(&name, down);
                }
                for name in self.view.restarting() {
                    self.view.set_down(&name, None);
                }
                tracing::warn!(buckets = count, "buckets reloaded from disk");
            }
            Err(error) => {
                tracing::error!(%error, "could not reload the buckets from disk; they stay down");
                for name in self.view.restarting() {
                    self.view.set_down(&name, Some(Down::Failed));
                }
            }
        }
    }

    /// The log failed to take a write: the tables may hold changes it does not, which nobody
    /// may read. Every bucket is closed and rebuilt from the files.
    async fn reload_after_log_failure(&mut self) {
        self.view.close_all(true);
        self.reload_all().await;
    }

    /// Forgets the name and closes the table at once; the task's exit follows. Returns
    /// whether there was a bucket to drop.
    async fn drop_bucket(&mut self, name: &BucketName) -> Result<bool, RegistryError> {
        self.admit(&Change::Drop {
            bucket: name.as_bytes(),
        })?;
        self.restarts.remove(name);
        self.view.events().forget(name);
        let dropped = if let Some(bucket) = self.named(name.as_bytes()).await {
            self.view.remove(name.as_bytes(), bucket.id());
            // Closed before the drop is logged: every change the table accepted comes first.
            bucket.close();
            true
        } else if self.view.down(name.as_bytes()).is_some() {
            // Down (restarting, or failed too often), its data still on disk: dropping
            // discards that, and a restart under way is not installed.
            self.view.set_down(name, None);
            self.restarts_pending.remove(name);
            true
        } else {
            false
        };
        if dropped {
            self.record(&Change::Drop {
                bucket: name.as_bytes(),
            });
        }
        Ok(dropped)
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
        let durable = self
            .durable_state
            .get()
            .cloned()
            .filter(|_| reason != ExitReason::Aborted);
        let name = bucket.name().as_bytes();
        // Still named when it ended: it crashed or stopped on its own; it was not dropped. A
        // durable one is marked restarting as its name goes, so no request finds neither.
        let forgotten = match durable {
            Some(_) => self.view.remove_to_restart(name, bucket.id()),
            None => self.view.remove(name, bucket.id()),
        };
        if forgotten.is_some() && reason != ExitReason::Aborted {
            self.view
                .events()
                .crashes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if forgotten.is_some()
            && let Some(durable) = durable
        {
            tracing::warn!(bucket = %bucket.name(), %reason, "durable bucket ended; restarting it from disk");
            self.restart(bucket.name().clone(), durable);
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

    /// [`settle`](Self::settle), and also waits for every restart from disk under way, so that
    /// afterwards no name is restarting. For tests and diagnostics: the loop serves nothing
    /// else meanwhile.
    async fn settle_with_restarts(&mut self) -> RegistryCounts {
        loop {
            let counts = self.settle().await;
            match self.reading_back.join_next().await {
                None => return counts,
                Some(Ok(read_back)) => self.on_read_back(read_back),
                Some(Err(error)) => tracing::error!(%error, "reading a bucket back failed"),
            }
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
