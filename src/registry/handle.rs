//! `Registry`: the handle callers hold, and the one-for-all group that (re)starts the loop.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot, watch};

use super::event_loop::{self, Request, State};
use super::view::{ReadNames, RegistryView};
use super::{DurableState, RegistryError};
use crate::bucket::{BucketHandle, BucketName, MemoryBudget};
use crate::change::ChangeLog;
use crate::config::CoreConfig;
use crate::supervisor::{self, ChildGroup};

/// Whether the registry loop is up, and how many times it has been started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryStatus {
    /// How many times the loop has been started: 1 until its first failure.
    pub starts: u64,
    /// Whether a loop is running now.
    pub running: bool,
}

/// What the registry holds once every ended bucket's exit has been taken in: after
/// [`Registry::settle`] all three agree unless there is a bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryCounts {
    /// Names in the read view.
    pub names: usize,
    /// Bucket tasks that the bucket supervisor still runs.
    pub running_buckets: usize,
    /// Running bucket tasks whose name in the view points at them.
    pub named_running_buckets: usize,
}

struct Shared {
    config: CoreConfig,
    view: RegistryView,
    budget: Arc<MemoryBudget>,
    next_bucket_id: Arc<AtomicU64>,
    log: Option<Arc<dyn ChangeLog>>,
    /// Set once by the durability layer, after recovery.
    durable_state: Arc<OnceLock<Arc<dyn DurableState>>>,
    /// The current loop's mailbox; `None` while it restarts or after it stopped for good.
    mailbox: RwLock<Option<mpsc::Sender<Request>>>,
    status: watch::Sender<RegistryStatus>,
}

/// The registry of named buckets. Cheap to clone; all clones share one registry.
///
/// Dropping the last clone stops the registry and every bucket in it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kv::RegistryError> {
/// use kv::Registry;
///
/// let registry = Registry::start(Default::default());
/// assert!(registry.lookup(b"shopping").is_none());
///
/// let bucket = registry.create("shopping").await?;
/// bucket.put(b"milk", b"1").expect("bucket is alive");
/// let found = registry.lookup(b"shopping").expect("create is visible at once");
/// assert_eq!(found.get(b"milk").unwrap().as_deref(), Some(&b"1"[..]));
///
/// assert!(registry.drop_bucket(b"shopping").await?);
/// assert!(registry.lookup(b"shopping").is_none());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

impl Registry {
    /// Starts a registry under its one-for-all supervisor, on the current tokio runtime.
    ///
    /// # Panics
    /// If called outside a tokio runtime.
    #[must_use]
    pub fn start(config: CoreConfig) -> Self {
        Self::start_logged(config, None)
    }

    /// Starts a registry whose creates and drops, and whose buckets' changes, are recorded in
    /// `log` (when there is one).
    ///
    /// # Panics
    /// If called outside a tokio runtime.
    #[must_use]
    pub fn start_logged(config: CoreConfig, log: Option<Arc<dyn ChangeLog>>) -> Self {
        let budget = Arc::new(MemoryBudget::new(config.max_memory));
        Self::start_with(config, log, budget)
    }

    /// Starts a registry whose buckets draw on `budget`, which other registries share (a
    /// cluster node's shards share the node's memory).
    ///
    /// # Panics
    /// If called outside a tokio runtime.
    #[must_use]
    pub fn start_sharing(config: CoreConfig, budget: Arc<MemoryBudget>) -> Self {
        Self::start_with(config, None, budget)
    }

    fn start_with(
        config: CoreConfig,
        log: Option<Arc<dyn ChangeLog>>,
        budget: Arc<MemoryBudget>,
    ) -> Self {
        let intensity = config.restart_intensity;
        let (status, _) = watch::channel(RegistryStatus {
            starts: 0,
            running: false,
        });
        let shared = Arc::new(Shared {
            budget,
            config,
            view: RegistryView::default(),
            next_bucket_id: Arc::new(AtomicU64::new(0)),
            log,
            durable_state: Arc::new(OnceLock::new()),
            mailbox: RwLock::new(None),
            status,
        });
        let mut group = RegistryGroup {
            shared: Arc::downgrade(&shared),
        };
        // The first loop starts here, not in the supervisor's task, so that the registry
        // answers calls as soon as `start` returns.
        let first = group.start();
        tokio::spawn(supervisor::supervise_one_for_all(group, first, intensity));
        Self { shared }
    }

    /// Creates the bucket `name`, or returns it if it exists. When this returns, every
    /// `lookup` of `name` finds the bucket.
    ///
    /// # Errors
    /// [`RegistryError::TooManyBuckets`] at the bucket limit, [`RegistryError::NameTooLong`],
    /// or [`RegistryError::Unavailable`] while the registry restarts.
    pub async fn create(&self, name: impl Into<BucketName>) -> Result<BucketHandle, RegistryError> {
        let name = name.into();
        self.call(|reply| Request::Create {
            name,
            from_log: false,
            reply,
        })
        .await?
    }

    /// Creates `name` as the log records it: at recovery, where the limits the running server
    /// kept are not checked again (recovery must never be refused by them).
    pub(crate) async fn create_from_log(
        &self,
        name: impl Into<BucketName>,
    ) -> Result<BucketHandle, RegistryError> {
        let name = name.into();
        self.call(|reply| Request::Create {
            name,
            from_log: true,
            reply,
        })
        .await?
    }

    /// The live bucket called `name`, if any. Never waits for the registry loop.
    #[must_use]
    pub fn lookup(&self, name: &[u8]) -> Option<BucketHandle> {
        self.shared.view.lookup(name)
    }

    /// The view's names under a read lock, for running a batch of requests (see
    /// [`RegistryView::read`]).
    pub(crate) fn read_names(&self) -> ReadNames<'_> {
        self.shared.view.read()
    }

    /// Stops the bucket `name` and forgets it; its data is freed (on disk too, when durable).
    /// Returns whether a bucket of that name existed. When this returns, no lookup finds it.
    ///
    /// # Errors
    /// [`RegistryError::Unavailable`] while the registry restarts;
    /// [`RegistryError::Unwritable`] once the log has failed.
    pub async fn drop_bucket(&self, name: &[u8]) -> Result<bool, RegistryError> {
        let name = BucketName::from(name);
        self.call(|reply| Request::Drop { name, reply }).await?
    }

    /// A read-only view of the names, to hand to code that must not create or drop buckets.
    #[must_use]
    pub fn view(&self) -> RegistryView {
        self.shared.view.clone()
    }

    /// The memory budget that every bucket of this registry draws on.
    #[must_use]
    pub fn memory(&self) -> &MemoryBudget {
        &self.shared.budget
    }

    /// After the log failed to take a write: closes every bucket and rebuilds it from the
    /// files, so that nothing the log does not hold can be read. Meanwhile the buckets answer
    /// "restarting, try again".
    ///
    /// # Errors
    /// [`RegistryError::Unavailable`] while the registry restarts (which reloads from disk
    /// too).
    pub async fn reload_from_disk(&self) -> Result<(), RegistryError> {
        self.call(|reply| Request::ReloadFromDisk { reply }).await
    }

    /// Gives a durable registry what it restarts failed buckets (and, after its own failure,
    /// every bucket) from. Set once, after recovery; later calls are ignored.
    pub fn set_durable_state(&self, state: Arc<dyn DurableState>) {
        let _ = self.shared.durable_state.set(state);
    }

    /// Whether a client's `change` passes this registry's limits now, without making it: what
    /// a cluster's leader asks before proposing a change, since every replica applies what is
    /// committed whatever its limits (so that none decides differently). Changes proposed
    /// together are checked against the same state, so they may pass the memory limit by what
    /// they add up to.
    ///
    /// # Errors
    /// The error the change would get on a single node: [`RegistryError::NameTooLong`],
    /// [`RegistryError::TooManyBuckets`], or [`RegistryError::OutOfMemory`].
    /// `buckets` counts the buckets that count against the bucket limit (a cluster node's,
    /// across its shards); it is asked only for a `CREATE` of a new bucket.
    pub fn check_limits(
        &self,
        change: &crate::change::Change<'_>,
        buckets: impl FnOnce() -> usize,
    ) -> Result<(), RegistryError> {
        use crate::change::Change;
        let config = &self.shared.config;
        let budget = &self.shared.budget;
        let fits = |bytes: usize| {
            if budget.used().saturating_add(bytes) > budget.limit() {
                Err(RegistryError::OutOfMemory {
                    limit: budget.limit(),
                })
            } else {
                Ok(())
            }
        };
        match *change {
            Change::Create { bucket } => {
                if bucket.len() > config.max_name_len {
                    return Err(RegistryError::NameTooLong {
                        length: bucket.len(),
                        limit: config.max_name_len,
                    });
                }
                if self.lookup(bucket).is_some() {
                    return Ok(());
                }
                if buckets() >= config.max_buckets {
                    return Err(RegistryError::TooManyBuckets {
                        limit: config.max_buckets,
                    });
                }
                fits(crate::bucket::cost(&BucketName::from(bucket)))
            }
            Change::Put { bucket, key, value } => {
                let charge = crate::bucket::charge(key, value);
                // Far from the limit, the key need not be looked up (a lookup is a cache miss).
                if fits(charge).is_ok() {
                    return Ok(());
                }
                let Some(handle) = self.lookup(bucket) else {
                    return Ok(());
                };
                let old = handle
                    .get_with(key, |old| {
                        old.map_or(0, |old| crate::bucket::charge(key, old))
                    })
                    .unwrap_or(0);
                fits(charge.saturating_sub(old))
            }
            Change::Drop { .. } | Change::Delete { .. } => Ok(()),
        }
    }

    /// Whether a bucket that crashes is restarted from durable state (see
    /// [`set_durable_state`](Self::set_durable_state)) rather than forgotten.
    #[must_use]
    pub fn restarts_crashed_buckets(&self) -> bool {
        self.shared.durable_state.get().is_some()
    }

    /// Whether changes are logged: then a bucket that crashes comes back from disk.
    #[must_use]
    pub fn is_durable(&self) -> bool {
        self.shared.log.is_some()
    }

    /// The limits this registry was started with.
    #[must_use]
    pub fn config(&self) -> &CoreConfig {
        &self.shared.config
    }

    /// Watches whether the loop is running and how often it has been started.
    #[must_use]
    pub fn status(&self) -> watch::Receiver<RegistryStatus> {
        self.shared.status.subscribe()
    }

    /// Waits for the exit of every bucket that has already ended (and, when durable, for its
    /// restart from disk), then counts names and running buckets. For tests and diagnostics.
    ///
    /// # Errors
    /// [`RegistryError::Unavailable`] while the registry restarts.
    pub async fn settle(&self) -> Result<RegistryCounts, RegistryError> {
        self.call(|reply| Request::Settle { reply }).await
    }

    /// Makes the registry loop panic, for fault tests: its buckets end with it and its
    /// supervisor starts a new loop (within the restart intensity), empty, or reloaded from
    /// disk when durable.
    ///
    /// # Errors
    /// [`RegistryError::Unavailable`] if no loop is running.
    pub async fn inject_fault(&self) -> Result<(), RegistryError> {
        let mailbox = self.mailbox()?;
        mailbox
            .send(Request::Panic)
            .await
            .map_err(|_| RegistryError::Unavailable)
    }

    fn mailbox(&self) -> Result<mpsc::Sender<Request>, RegistryError> {
        self.shared
            .mailbox
            .read()
            .clone()
            .ok_or(RegistryError::Unavailable)
    }

    /// Sends a request and waits for its reply. Every way the loop can be gone — no mailbox,
    /// a closed mailbox, a reply slot dropped by a dying loop — is an error, never a hang.
    async fn call<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, RegistryError> {
        let mailbox = self.mailbox()?;
        let (reply, answer) = oneshot::channel();
        mailbox
            .send(request(reply))
            .await
            .map_err(|_| RegistryError::Unavailable)?;
        answer.await.map_err(|_| RegistryError::Unavailable)
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("names", &self.shared.view.len())
            .field("status", &*self.shared.status.borrow())
            .finish_non_exhaustive()
    }
}

/// The registry loop and the buckets it owns, restarted together. Holds the shared state
/// weakly: once every `Registry` is dropped, there is nothing to restart for.
struct RegistryGroup {
    shared: Weak<Shared>,
}

impl ChildGroup for RegistryGroup {
    fn start(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let shared = self.shared.upgrade()?;
        let (sender, mailbox) = mpsc::channel(shared.config.registry_mailbox);
        let state = State::new(
            shared.config.clone(),
            shared.view.writer(),
            Arc::clone(&shared.budget),
            Arc::clone(&shared.next_bucket_id),
            shared.log.clone(),
            Arc::clone(&shared.durable_state),
            shared.status.borrow().starts > 0,
        );
        let main_task = tokio::spawn(event_loop::run(mailbox, state));
        *shared.mailbox.write() = Some(sender);
        shared.status.send_modify(|status| {
            status.starts += 1;
            status.running = true;
        });
        Some(main_task)
    }

    fn clean_up(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        *shared.mailbox.write() = None;
        // The dead loop's bucket supervisor aborted its buckets; closing their tables here
        // makes that visible to every handle at once, before a new loop starts. Durable ones
        // are marked restarting: the new loop reloads them from disk.
        shared
            .view
            .writer()
            .close_all(shared.durable_state.get().is_some());
        shared.status.send_modify(|status| status.running = false);
    }
}
