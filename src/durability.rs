//! Durable operation: a registry recovered from a data directory, its journal, and the
//! background compaction that keeps the log near the size of the live data.
//!
//! Start-up replays the newest snapshot and the logs after it into a fresh registry with the
//! journal not yet recording, then attaches the current log and starts recording. Compaction
//! follows the order that [`DataDir`] documents: new log first, then the snapshot, then removal
//! of the old generation, so that no crash between steps loses an acknowledged write.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::bucket::{BucketHandle, BucketName};
use crate::config::CoreConfig;
use crate::registry::{DurableState, Entries, Registry};
use crate::storage::{DataDir, FsyncPolicy, Journal, Record, StorageError};

/// How a durable server keeps its data.
#[derive(Debug, Clone)]
pub struct DurabilityConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// When the log is synced.
    pub fsync: FsyncPolicy,
    /// Cut a corrupt log at the first bad record instead of refusing to start.
    pub truncate_corrupt_log: bool,
    /// Compact once the log is larger than this many bytes and ...
    pub compact_min_bytes: u64,
    /// ... larger than this many times the live data.
    pub compact_ratio: u64,
}

impl DurabilityConfig {
    /// Defaults for `data_dir`: fsync every second (Redis's default), compaction once the
    /// log passes 64 MiB and twice the live data.
    #[must_use]
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            fsync: FsyncPolicy::EverySecond,
            truncate_corrupt_log: false,
            compact_min_bytes: 64 << 20,
            compact_ratio: 2,
        }
    }
}

/// A durable store: its directory, journal and compaction state.
pub struct Durable {
    directory: Arc<DataDir>,
    journal: Arc<Journal>,
    registry: Registry,
    generation: AtomicU64,
    /// One compaction at a time; also held while a bucket is read back, so that no file it
    /// reads is removed under it.
    compacting: Arc<tokio::sync::Mutex<()>>,
    config: DurabilityConfig,
}

/// What the registry restarts failed buckets from: the files, read under the compaction lock
/// after everything appended has been written.
struct DiskState {
    /// Weak: the directory's lock belongs to the [`Durable`], and goes when it does, not when
    /// the registry loop (which holds this) finally ends.
    directory: Weak<DataDir>,
    journal: Arc<Journal>,
    compacting: Arc<tokio::sync::Mutex<()>>,
}

impl DiskState {
    /// The buckets on disk (only `only`, if given) with their contents. Called on a
    /// blocking thread.
    fn read(&self, only: Option<&[u8]>) -> Result<Vec<(BucketName, Entries)>, String> {
        let directory = self
            .directory
            .upgrade()
            .ok_or_else(|| "the data directory is closed".to_owned())?;
        let _files_stay = self.compacting.blocking_lock();
        // After a failed write the files are the truth: nothing more can be written to them.
        if !self.journal.is_failed() {
            self.journal.flush().map_err(|error| error.to_string())?;
        }
        let buckets = fold(&directory, None, &|bucket| {
            only.is_none_or(|only| only == bucket)
        })
        .map_err(|error| error.to_string())?;
        Ok(buckets
            .into_iter()
            .map(|(name, table)| (BucketName::from(name), table.into_iter().collect()))
            .collect())
    }
}

type Folded = BTreeMap<Vec<u8>, HashMap<Vec<u8>, Vec<u8>>>;

/// The buckets for which `wanted` holds, with their contents, as the files say (those before
/// generation `before`, if given).
fn fold(
    directory: &DataDir,
    before: Option<u64>,
    wanted: &dyn Fn(&[u8]) -> bool,
) -> Result<Folded, StorageError> {
    let mut buckets = Folded::new();
    directory.read_state(before, &mut |record| {
        if !wanted(record.bucket()) {
            return;
        }
        match record {
            Record::Create { bucket } => {
                buckets.entry(bucket.to_vec()).or_default();
            }
            Record::Drop { bucket } => {
                buckets.remove(bucket);
            }
            Record::Put { bucket, key, value } => {
                if let Some(table) = buckets.get_mut(bucket) {
                    table.insert(key.to_vec(), value.to_vec());
                }
            }
            Record::Delete { bucket, key } => {
                if let Some(table) = buckets.get_mut(bucket) {
                    table.remove(key);
                }
            }
        }
    })?;
    Ok(buckets)
}

/// The names of the buckets the files hold (those before generation `before`).
fn durable_names(directory: &DataDir, before: u64) -> Result<BTreeSet<Vec<u8>>, StorageError> {
    let mut names = BTreeSet::new();
    directory.read_state(Some(before), &mut |record| match record {
        Record::Create { bucket } => {
            names.insert(bucket.to_vec());
        }
        Record::Drop { bucket } => {
            names.remove(bucket);
        }
        Record::Put { .. } | Record::Delete { .. } => {}
    })?;
    Ok(names)
}

impl DurableState for DiskState {
    fn bucket(&self, name: &[u8]) -> Result<Option<Entries>, String> {
        Ok(self
            .read(Some(name))?
            .into_iter()
            .next()
            .map(|(_, entries)| entries))
    }

    fn buckets(&self) -> Result<Vec<(BucketName, Entries)>, String> {
        self.read(None)
    }
}

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

impl Durable {
    /// Locks the directory, replays it into a new registry, and starts logging.
    ///
    /// # Errors
    /// If the directory is locked or damaged, or the data does not fit the limits.
    pub async fn open(
        config: DurabilityConfig,
        core: CoreConfig,
    ) -> Result<(Arc<Self>, RecoveryReport), StorageError> {
        let started = Instant::now();
        let directory = Arc::new(DataDir::open(&config.data_dir)?);
        let journal = Journal::new(config.fsync).map_err(|source| StorageError::Io {
            path: config.data_dir.clone(),
            source,
        })?;
        let registry = Registry::start_durable(core, Some(Arc::clone(&journal)));
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
                directory.recover(truncate, &mut |record| replayer.apply(record))
            })
            .await?
        };
        let log_path = config.data_dir.clone();
        journal
            .attach(recovered.log, recovered.log_len)
            .map_err(|source| StorageError::Io {
                path: log_path,
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
        let durable = Arc::new(Self {
            directory,
            journal,
            registry,
            generation: AtomicU64::new(recovered.generation),
            compacting,
            config,
        });
        Ok((durable, report))
    }

    /// The registry recovered into.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The journal.
    #[must_use]
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// The current generation (how many compactions the directory has seen).
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Until `shutdown`: compacts whenever the log has grown well past the live data, and once
    /// a write of the log fails, rebuilds the store from the files (see
    /// [`Registry::reload_from_disk`]).
    pub async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut log_failed = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.journal.failed(), if !log_failed => {
                    log_failed = true;
                    if let Err(error) = self.registry.reload_from_disk().await {
                        tracing::error!(%error, "could not rebuild the store after the log failed");
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            if log_failed {
                continue;
            }
            let live = self.registry.memory().used() as u64;
            let threshold = self
                .config
                .compact_min_bytes
                .max(live.saturating_mul(self.config.compact_ratio));
            if self.journal.log_bytes() > threshold
                && let Err(error) = self.compact().await
            {
                tracing::error!(%error, "compaction failed; the old files stay in use");
            }
        }
    }

    /// Rewrites the state as a snapshot and starts a new log, without stopping writers.
    ///
    /// # Errors
    /// If a file cannot be written; the previous files then stay in use.
    pub async fn compact(&self) -> Result<(), StorageError> {
        let _one_at_a_time = self.compacting.lock().await;
        let started = Instant::now();
        let generation = self.generation() + 1;
        let before = self.journal.log_bytes();
        // 1. New changes go to the new log from here on.
        {
            let directory = Arc::clone(&self.directory);
            let journal = Arc::clone(&self.journal);
            blocking(&self.config.data_dir, move || {
                let file = directory.create_log(generation)?;
                journal.rotate(file).map_err(|error| StorageError::Io {
                    path: directory.path().to_owned(),
                    source: std::io::Error::other(error),
                })
            })
            .await?;
        }
        self.generation.store(generation, Ordering::Relaxed);
        // 2. The state as of the rotation, bucket by bucket: every bucket the old files hold,
        //    copied from memory under its read lock where it is live, and folded from those
        //    files where it is not (crashed and restarting, or down after too many failures):
        //    its data must not go with the old files. A change made after the rotation is in
        //    the new log too; replaying it after the snapshot gives the same result whether or
        //    not the snapshot saw it.
        let directory = Arc::clone(&self.directory);
        let registry = self.registry.clone();
        let written = blocking(&self.config.data_dir, move || {
            let names = durable_names(&directory, generation)?;
            let mut keys = 0usize;
            directory.write_snapshot(generation, |out| {
                write_snapshot(out, &directory, generation, &registry, &names, &mut keys)
            })?;
            directory.remove_before(generation)?;
            Ok(keys)
        })
        .await?;
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
    /// If the last write or sync fails.
    pub fn close(&self) -> Result<(), crate::storage::JournalError> {
        self.journal.close()
    }
}

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
        Record::Create { bucket: name }.encode(&mut buffer);
        match registry.lookup(name) {
            Some(bucket) if bucket.export(&mut buffer).is_ok() => {
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
    let folded = fold(directory, Some(generation), &|bucket| down.contains(bucket))
        .map_err(std::io::Error::other)?;
    for (name, table) in folded {
        buffer.clear();
        Record::Create { bucket: &name }.encode(&mut buffer);
        for (key, value) in &table {
            Record::Put {
                bucket: &name,
                key,
                value,
            }
            .encode(&mut buffer);
        }
        *keys += table.len();
        out.write_all(&buffer)?;
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    path: &std::path::Path,
    work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| StorageError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(error),
        })?
}

/// Applies replayed records to the registry.
struct Replayer<'a> {
    registry: &'a Registry,
    runtime: &'a tokio::runtime::Handle,
    /// The bucket of the previous record: logs come in runs of one bucket.
    last: Option<BucketHandle>,
}

impl Replayer<'_> {
    fn bucket(&mut self, name: &[u8]) -> Result<&BucketHandle, String> {
        let fresh = self
            .last
            .as_ref()
            .is_some_and(|bucket| bucket.name().as_bytes() == name && !bucket.is_stopped());
        if !fresh {
            self.last = Some(self.registry.lookup(name).ok_or_else(|| {
                format!(
                    "a change to bucket {}, which does not exist there",
                    BucketName::from(name)
                )
            })?);
        }
        Ok(self.last.as_ref().expect("just set"))
    }

    fn apply(&mut self, record: Record<'_>) -> Result<(), String> {
        match record {
            Record::Create { bucket } => {
                self.runtime
                    .block_on(self.registry.create_from_log(bucket))
                    .map_err(|error| error.to_string())?;
            }
            Record::Drop { bucket } => {
                self.runtime
                    .block_on(self.registry.drop_bucket(bucket))
                    .map_err(|error| error.to_string())?;
            }
            Record::Put { bucket, key, value } => {
                self.bucket(bucket)?
                    .restore(key, value)
                    .map_err(|error| error.to_string())?;
            }
            Record::Delete { bucket, key } => {
                self.bucket(bucket)?
                    .delete(key)
                    .map_err(|error| error.to_string())?;
            }
        }
        Ok(())
    }
}
