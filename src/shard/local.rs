//! A local shard: the registry of this node's buckets and, when durable, the log that keeps
//! them. The commit barrier, recovery, compaction and restarting buckets from disk all live
//! here; the connection and the listener only ask.
//!
//! Start-up replays the newest snapshot and the logs after it into a fresh registry with the
//! journal not yet recording, then attaches the current log and starts recording. Compaction
//! follows the order that [`DataDir`] documents: new log first, then the snapshot, then removal
//! of the old generation, so that no crash between steps loses an acknowledged write.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::bucket::{BucketError, BucketHandle, BucketName};
use crate::change::{Change, ChangeLog};
use crate::config::{CoreConfig, DurabilityConfig, FsyncPolicy};
use crate::registry::{DurableState, Entries, ReadBackError, Registry, RegistryError};

use super::wal::{self, DataDir, FileState, Journal, LogFailed, ReplayError, WalError};

/// What start-up recovered.
#[derive(Debug, Clone, Copy)]
pub struct RecoveryReport {
    /// Records replayed.
    pub records: u64,
    /// Buckets afterwards.
    pub buckets: usize,
    /// Keys afterwards.
    pub keys: usize,
    /// How long it took.
    pub elapsed: Duration,
}

/// The state of the log, for `INFO`.
#[derive(Debug, Clone, Copy)]
pub struct LogStatus {
    /// When the log is synced.
    pub fsync: FsyncPolicy,
    /// Bytes in the current log file.
    pub bytes: u64,
    /// Syncs since start.
    pub syncs: u64,
    /// Whether a write has failed (changes are refused from then on).
    pub failed: bool,
    /// Compactions since start.
    pub compactions: u64,
    /// Seconds the syncs took, in all.
    pub sync_seconds: f64,
}

/// The buckets of this node: a registry, and (durable) the log that keeps it.
pub struct LocalShard {
    registry: Registry,
    log: Option<Log>,
}

/// A durable shard's files and what writes them.
struct Log {
    directory: Arc<DataDir>,
    journal: Arc<Journal>,
    generation: AtomicU64,
    /// Compactions since start.
    compactions: AtomicU64,
    /// One compaction at a time; also held while a bucket is read back, so that no file it
    /// reads is removed under it.
    compacting: Arc<tokio::sync::Mutex<()>>,
    config: DurabilityConfig,
}

impl LocalShard {
    /// A shard of `core`'s limits, in memory only (`durability` `None`) or recovered from its
    /// data directory: the directory is locked, replayed into a new registry, and logged to
    /// from then on.
    ///
    /// # Errors
    /// If the directory is locked or damaged.
    pub async fn open(
        core: CoreConfig,
        durability: Option<DurabilityConfig>,
    ) -> Result<(Self, Option<RecoveryReport>), WalError> {
        let Some(config) = durability else {
            let shard = Self {
                registry: Registry::start(core),
                log: None,
            };
            return Ok((shard, None));
        };
        let started = Instant::now();
        let directory = Arc::new(DataDir::open(&config.data_dir)?);
        let journal = Journal::new(config.fsync).map_err(|source| WalError::Io {
            path: config.data_dir.clone(),
            source,
        })?;
        let registry =
            Registry::start_logged(core, Some(Arc::clone(&journal) as Arc<dyn ChangeLog>));
        let recovered = {
            let directory = Arc::clone(&directory);
            let registry = registry.clone();
            let truncate = config.truncate_corrupt_log;
            let runtime = tokio::runtime::Handle::current();
            blocking(&config.data_dir, move || {
                let mut replayer = Replayer {
                    registry: &registry,
                    runtime: &runtime,
                    last: None,
                };
                directory.recover(truncate, &mut |change| replayer.apply(change))
            })
            .await?
        };
        journal
            .attach(recovered.log, recovered.log_len)
            .map_err(|source| WalError::Io {
                path: config.data_dir.clone(),
                source,
            })?;
        journal.start_recording();
        let compacting = Arc::new(tokio::sync::Mutex::new(()));
        registry.set_durable_state(Arc::new(DiskState {
            directory: Arc::downgrade(&directory),
            journal: Arc::clone(&journal),
            compacting: Arc::clone(&compacting),
        }));
        let report = RecoveryReport {
            records: recovered.records,
            buckets: registry.view().len(),
            keys: registry.memory().keys(),
            elapsed: started.elapsed(),
        };
        let shard = Self {
            registry,
            log: Some(Log {
                directory,
                journal,
                generation: AtomicU64::new(recovered.generation),
                compactions: AtomicU64::new(0),
                compacting,
                config,
            }),
        };
        Ok((shard, Some(report)))
    }

    /// The registry of the shard's buckets.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Whether the shard keeps a log.
    #[must_use]
    pub fn is_durable(&self) -> bool {
        self.log.is_some()
    }

    /// The barrier replies wait at: with `changed`, until the changes made so far are in the
    /// log (and on disk, under `always`); otherwise until every change a read could have seen
    /// is written (a table logs under its write lock, so whatever a read saw was appended
    /// before it; usually there is nothing to wait for). Immediate without a log.
    ///
    /// # Errors
    /// If the log cannot be written: the replies must not be sent.
    pub async fn commit(&self, changed: bool) -> Result<(), LogFailed> {
        match &self.log {
            None => Ok(()),
            Some(log) if changed => log.journal.commit().await,
            Some(log) => log.journal.flush(),
        }
    }

    /// The state of the log, when the shard keeps one.
    #[must_use]
    pub fn log_status(&self) -> Option<LogStatus> {
        self.log.as_ref().map(|log| LogStatus {
            fsync: log.journal.policy(),
            bytes: log.journal.log_bytes(),
            syncs: log.journal.syncs(),
            failed: log.journal.is_failed(),
            compactions: log.compactions.load(Ordering::Relaxed),
            sync_seconds: log.journal.sync_time().as_secs_f64(),
        })
    }

    /// The current generation of the log (how many compactions the directory has seen).
    #[must_use]
    pub fn generation(&self) -> Option<u64> {
        self.log
            .as_ref()
            .map(|log| log.generation.load(Ordering::Relaxed))
    }

    /// Makes the next write of the log fail as a full disk would make it: for fault tests of
    /// what the server does when it cannot log.
    #[doc(hidden)]
    pub fn inject_log_write_failure(&self) {
        if let Some(log) = &self.log {
            log.journal.inject_write_failure();
        }
    }

    /// Until `shutdown`: compacts whenever the log has grown well past the live data, and once
    /// a write of the log fails, rebuilds every bucket from the files and has the journal
    /// forget what never reached them (see [`Registry::reload_from_disk`]). Returns at once
    /// without a log.
    pub async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(log) = &self.log else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut log_failed = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = log.journal.failed(), if !log_failed => {
                    log_failed = true;
                    tracing::warn!("the log failed; rebuilding every bucket from what it holds");
                    match self.registry.reload_from_disk().await {
                        Ok(()) => log.journal.discard_unwritten(),
                        Err(error) => tracing::error!(%error, "could not rebuild the store after the log failed"),
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            if log_failed {
                continue;
            }
            let live = self.registry.memory().used() as u64;
            let threshold = log
                .config
                .compact_min_bytes
                .max(live.saturating_mul(log.config.compact_ratio));
            if log.journal.log_bytes() > threshold
                && let Err(error) = self.compact().await
            {
                tracing::error!(%error, "compaction failed; the old files stay in use");
            }
        }
    }

    /// Rewrites the state as a snapshot and starts a new log, without stopping writers. Does
    /// nothing without a log.
    ///
    /// # Errors
    /// If a file cannot be written; the previous files then stay in use.
    pub async fn compact(&self) -> Result<(), WalError> {
        let Some(log) = &self.log else {
            return Ok(());
        };
        let _one_at_a_time = log.compacting.lock().await;
        let started = Instant::now();
        let generation = log.generation.load(Ordering::Relaxed) + 1;
        let before = log.journal.log_bytes();
        // 1. New changes go to the new log from here on.
        {
            let directory = Arc::clone(&log.directory);
            let journal = Arc::clone(&log.journal);
            blocking(&log.config.data_dir, move || {
                let file = directory.create_log(generation)?;
                journal.rotate(file).map_err(WalError::from)
            })
            .await?;
        }
        log.generation.store(generation, Ordering::Relaxed);
        // 2. The state as of the rotation, bucket by bucket: every bucket the old files hold,
        //    copied from memory a page at a time where it is live, and read from those
        //    files where it is not (crashed and restarting, or down after too many failures):
        //    its data must not go with the old files. A change made after the rotation is in
        //    the new log too; replaying it after the snapshot gives the same result whether or
        //    not the snapshot saw it.
        let directory = Arc::clone(&log.directory);
        let registry = self.registry.clone();
        let written = blocking(&log.config.data_dir, move || {
            let names = FileState::read(&directory, Some(generation), true, &|_| true)?
                .buckets
                .into_keys()
                .collect();
            let mut keys = 0usize;
            directory.write_snapshot(generation, |out| {
                write_snapshot(out, &directory, generation, &registry, &names, &mut keys)
            })?;
            directory.remove_before(generation)?;
            Ok(keys)
        })
        .await?;
        log.compactions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            generation,
            log_bytes_before = before,
            keys = written,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compacted the log"
        );
        Ok(())
    }

    /// Writes and syncs everything. For a clean shutdown.
    ///
    /// # Errors
    /// If the last write or sync fails, or the log failed while the shard ran.
    pub fn close(&self) -> Result<(), LogFailed> {
        self.log.as_ref().map_or(Ok(()), |log| log.journal.close())
    }
}

/// Writes the snapshot of every bucket in `names`: from memory where it is live, from the
/// files before `generation` where it is not.
fn write_snapshot(
    out: &mut dyn std::io::Write,
    directory: &DataDir,
    generation: u64,
    registry: &Registry,
    names: &BTreeSet<Vec<u8>>,
    keys: &mut usize,
) -> std::io::Result<()> {
    let mut buffer = Vec::with_capacity(1 << 20);
    let mut down = BTreeSet::new();
    for name in names {
        buffer.clear();
        wal::record::encode(&Change::Create { bucket: name }, &mut buffer);
        match registry.lookup(name) {
            Some(bucket) if export(&bucket, &mut buffer, |_| Ok::<_, BucketError>(())).is_ok() => {
                *keys += bucket.len().unwrap_or(0);
                out.write_all(&buffer)?;
            }
            _ => {
                down.insert(name.as_slice());
            }
        }
    }
    if down.is_empty() {
        return Ok(());
    }
    let state = FileState::read(directory, Some(generation), false, &|bucket| {
        down.contains(bucket)
    })
    .map_err(std::io::Error::other)?;
    for (name, table) in state.buckets {
        buffer.clear();
        wal::record::encode(&Change::Create { bucket: &name }, &mut buffer);
        for (key, value) in &table {
            let put = Change::Put {
                bucket: &name,
                key,
                value,
            };
            wal::record::encode(&put, &mut buffer);
        }
        *keys += table.len();
        out.write_all(&buffer)?;
    }
    Ok(())
}

/// How many bytes of keys and values a snapshot copies of a bucket under its lock at a time:
/// the bucket's writers wait for one page at most, not for the whole bucket.
const EXPORT_PAGE_BYTES: usize = 64 << 10;

/// Appends a `Put` record of every entry of `bucket` to `out`, a page at a time, handing `out`
/// to `page_done` after each page (which may write it out and empty it); how many records.
/// An entry changed meanwhile may be copied as it was or as it is (or not at all): a snapshot
/// copied this way is made whole by the changes made during the copy, replayed after it (the
/// new log here, see `LocalShard::compact`; the entries applied meanwhile in a cluster's shard).
pub(crate) fn export<E: From<BucketError>>(
    bucket: &BucketHandle,
    out: &mut Vec<u8>,
    mut page_done: impl FnMut(&mut Vec<u8>) -> Result<(), E>,
) -> Result<u64, E> {
    let name = bucket.name().as_bytes();
    let mut records = 0;
    let mut cursor = 0;
    loop {
        cursor = bucket.scan_entries(cursor, EXPORT_PAGE_BYTES, |key, value| {
            let put = Change::Put {
                bucket: name,
                key,
                value,
            };
            wal::record::encode(&put, out);
            records += 1;
        })?;
        page_done(out)?;
        if cursor == 0 {
            return Ok(records);
        }
    }
}

/// Runs file work on a blocking thread; a panic there is an I/O error of `path`.
async fn blocking<T: Send + 'static>(
    path: &std::path::Path,
    work: impl FnOnce() -> Result<T, WalError> + Send + 'static,
) -> Result<T, WalError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| WalError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(error),
        })?
}

/// What the registry restarts failed buckets from: the files, read under the compaction lock
/// after everything appended has been written.
struct DiskState {
    /// Weak: the directory's lock belongs to the shard, and goes when it does, not when the
    /// registry loop (which holds this) finally ends.
    directory: Weak<DataDir>,
    journal: Arc<Journal>,
    compacting: Arc<tokio::sync::Mutex<()>>,
}

impl DiskState {
    /// The buckets on disk (only `only`, if given) with their contents. Called on a
    /// blocking thread.
    fn read(&self, only: Option<&[u8]>) -> Result<Vec<(BucketName, Entries)>, ReadBackError> {
        let directory = self
            .directory
            .upgrade()
            .ok_or_else(|| ReadBackError::from("the data directory is closed"))?;
        let _files_stay = self.compacting.blocking_lock();
        // After a failed write the files are the truth: nothing more can be written to them.
        if !self.journal.is_failed() {
            self.journal.flush()?;
        }
        let state = FileState::read(&directory, None, false, &|bucket| {
            only.is_none_or(|only| only == bucket)
        })?;
        Ok(state
            .buckets
            .into_iter()
            .map(|(name, table)| (BucketName::from(name), table.into_iter().collect()))
            .collect())
    }
}

impl DurableState for DiskState {
    fn bucket(&self, name: &[u8]) -> Result<Option<Entries>, ReadBackError> {
        Ok(self
            .read(Some(name))?
            .into_iter()
            .next()
            .map(|(_, entries)| entries))
    }

    fn buckets(&self) -> Result<Vec<(BucketName, Entries)>, ReadBackError> {
        self.read(None)
    }
}

/// Why a replayed change could not be applied.
#[derive(Debug, thiserror::Error)]
enum ReplayFailure {
    #[error("a change to bucket {0}, which does not exist there")]
    NoSuchBucket(BucketName),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Bucket(#[from] BucketError),
}

/// Applies replayed changes to the registry.
struct Replayer<'a> {
    registry: &'a Registry,
    runtime: &'a tokio::runtime::Handle,
    /// The bucket of the previous change: logs come in runs of one bucket.
    last: Option<BucketHandle>,
}

impl Replayer<'_> {
    fn bucket(&mut self, name: &[u8]) -> Result<&BucketHandle, ReplayFailure> {
        let fresh = self
            .last
            .as_ref()
            .is_some_and(|bucket| bucket.name().as_bytes() == name && !bucket.is_stopped());
        if !fresh {
            self.last = Some(
                self.registry
                    .lookup(name)
                    .ok_or_else(|| ReplayFailure::NoSuchBucket(BucketName::from(name)))?,
            );
        }
        Ok(self.last.as_ref().expect("just set"))
    }

    fn apply(&mut self, change: Change<'_>) -> Result<(), ReplayError> {
        let applied: Result<(), ReplayFailure> = match change {
            Change::Create { bucket } => self
                .runtime
                .block_on(self.registry.create_from_log(bucket))
                .map(drop)
                .map_err(ReplayFailure::from),
            Change::Drop { bucket } => self
                .runtime
                .block_on(self.registry.drop_bucket(bucket))
                .map(drop)
                .map_err(ReplayFailure::from),
            Change::Put { bucket, key, value } => self
                .bucket(bucket)
                .and_then(|bucket| Ok(bucket.restore(key, value)?)),
            Change::Delete { bucket, key } => self
                .bucket(bucket)
                .and_then(|bucket| Ok(bucket.delete(key).map(drop)?)),
        };
        applied.map_err(ReplayError::from)
    }
}
