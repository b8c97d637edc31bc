//! A shard's state machine: a registry holding the shard's buckets, changed only by applying
//! committed entries, the same way on every replica.
//!
//! Applying a change is what recovery's replay does on a single node: no limit is checked
//! again (the leader checked them before proposing; replicas must not decide differently), and
//! nothing is logged (the Raft log is the log). A snapshot is records of the single-node log:
//! a `Create` and the `Put`s of each bucket, copied while changes go on, then the changes
//! made during the copy (see [`Copying`]).
//!
//! With a directory, every snapshot built or installed is written there before it counts
//! (`snapshot.kv`: a frame with its metadata, then its records; written to a temporary file,
//! synced, renamed), and opening the state machine starts from it: the shard's log can then be
//! purged up to it without losing what it held.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::EntryPayload;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::{
    EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf,
};
use smallvec::SmallVec;
use tokio::sync::Mutex;

use super::applied::Applied;
use super::log_store::ShardLog;
use super::snapshot_records::{self, CopyError, Made, Records, release};
use super::{Outcome, ShardCommand, ShardRaft};
use crate::bucket::{BucketError, BucketHandle, BucketName, MemoryBudget};
use crate::change::Change;
use crate::config::CoreConfig;
use crate::registry::{Down, Registry, RegistryError};
use crate::shard::wal::record::{self, ScanEnd, scan};

/// What a snapshot's bytes are: records of the single-node log. `Bytes`, so that handing a
/// snapshot to openraft, to a peer or to the crash-restart path shares it rather than copying
/// a shard's worth of memory; mapped from its file where there is one (see
/// `snapshot_records.rs`).
pub type SnapshotBytes = bytes::Bytes;

/// A shard's state machine. Cheap to clone: clones share one state (the snapshot builder is a
/// clone).
#[derive(Clone)]
pub struct ShardStateMachine {
    inner: Arc<Mutex<Inner>>,
    /// Where snapshots are written. Taken after `inner` or alone, never the other way round.
    snapshot_file: Arc<Mutex<SnapshotFile>>,
    /// The registry of `inner`, for reads without its lock: it stays the same registry for
    /// the machine's life (a snapshot installed replaces its buckets, not it).
    registry: Registry,
    /// The entries applied since a snapshot build began copying the buckets, while it does.
    /// Set and taken with `inner` locked, so that it starts and ends at an applied state.
    copying: Arc<parking_lot::Mutex<Option<Copying>>>,
}

/// What applying keeps for a snapshot build while it copies the shard's buckets. The copy
/// does not hold applying (a large shard takes seconds to copy, and the shard's writes would
/// wait as long), so each bucket is copied a page at a time while changes go on: what it
/// read of an entry changed meanwhile may be older or newer than where the copy ends. The
/// changes applied meanwhile, made again after the copied records, make the snapshot exactly
/// the state after the last of them. Every change sets what it touches whatever was there
/// (a `Put` its value, a `Delete` and a `Drop` absence, a `Create` a bucket), so the state
/// after them depends only on what they left untouched, and an entry left untouched
/// throughout the copy is copied as it is (see [`BucketHandle::scan_entries`]).
struct Copying {
    /// Which build keeps them: a snapshot installed meanwhile ends the build's copy (it is of
    /// no state the replica will be in), and a later build starts its own.
    build: u64,
    /// The entries applied since the copy began, in order.
    since: Vec<ShardCommand>,
}

/// Stops keeping applied entries for a build that ends, however it ends.
struct StopKeeping {
    copying: Arc<parking_lot::Mutex<Option<Copying>>>,
    build: u64,
}

impl Drop for StopKeeping {
    fn drop(&mut self) {
        let mut copying = self.copying.lock();
        if copying
            .as_ref()
            .is_some_and(|kept| kept.build == self.build)
        {
            *copying = None;
        }
    }
}

/// A shard's snapshot file: written by one snapshot at a time, never an older over a newer
/// (a snapshot built while a newer one is installed is written after it, or not at all).
struct SnapshotFile {
    /// Where snapshots are kept; `None`: in memory only.
    directory: Option<PathBuf>,
    /// The last entry the snapshot on disk holds.
    written: Option<LogIdOf<ShardRaft>>,
}

struct Inner {
    registry: Registry,
    last_applied: Option<LogIdOf<ShardRaft>>,
    membership: StoredMembershipOf<ShardRaft>,
    /// The latest snapshot, and its size in bytes.
    snapshot: Option<(SnapshotMetaOf<ShardRaft>, SnapshotRecords, u64)>,
    /// The latest snapshot and how far this replica has applied, which a crashed bucket is
    /// restarted from; `None` in memory only (a crashed bucket is then lost).
    applied: Option<Applied>,
    /// How many records (buckets and keys) the latest snapshot holds.
    snapshot_records: u64,
    /// Snapshot builds begun, which numbers them.
    builds: u64,
}

impl ShardStateMachine {
    /// An empty state machine whose registry has `core`'s limits (for what a replica keeps in
    /// memory; the limits clients meet are checked before a change is proposed).
    #[must_use]
    pub fn new(core: CoreConfig) -> Self {
        let budget = Arc::new(MemoryBudget::new(core.max_memory));
        Self::sharing(core, budget)
    }

    /// An empty state machine whose buckets draw on `budget` (a node's, shared by its shards).
    #[must_use]
    pub fn sharing(core: CoreConfig, budget: Arc<MemoryBudget>) -> Self {
        let registry = Registry::start_sharing(core, budget);
        Self {
            registry: registry.clone(),
            snapshot_file: Arc::new(Mutex::new(SnapshotFile {
                directory: None,
                written: None,
            })),
            inner: Arc::new(Mutex::new(Inner {
                registry,
                last_applied: None,
                membership: StoredMembershipOf::<ShardRaft>::default(),
                snapshot: None,
                applied: None,
                snapshot_records: 0,
                builds: 0,
            })),
            copying: Arc::default(),
        }
    }

    /// A state machine that keeps its snapshots in `directory`, starting from the one there
    /// (if any), and restarts a crashed bucket from that snapshot and the entries of `log` it
    /// has applied since.
    ///
    /// # Errors
    /// If the snapshot there cannot be read.
    pub async fn open(
        directory: &Path,
        core: CoreConfig,
        budget: Arc<MemoryBudget>,
        log: ShardLog,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(directory)?;
        let machine = Self::sharing(core, budget);
        {
            let mut inner = machine.inner.lock().await;
            let mut snapshot_file = machine.snapshot_file.lock().await;
            snapshot_file.directory = Some(directory.to_owned());
            let applied = Applied::new(log);
            let path = directory.join(SNAPSHOT_FILE);
            if let Some((meta, data)) = read_snapshot_file(&path)? {
                inner.install(&data).await?;
                let records = SnapshotRecords::File(path.clone());
                applied.snapshot_taken(meta.last_log_id.map(|id| id.index), records.clone());
                inner.last_applied = meta.last_log_id;
                snapshot_file.written = meta.last_log_id;
                inner.membership = meta.last_membership.clone();
                inner.snapshot = Some((meta, records, data.len() as u64));
            }
            inner.registry.set_durable_state(Arc::new(applied.clone()));
            inner.applied = Some(applied);
        }
        Ok(machine)
    }

    /// How many records (buckets and keys) the latest snapshot holds, which is what building
    /// the next one costs, and its size in bytes (0 before the first).
    pub async fn snapshot_size(&self) -> (u64, u64) {
        let inner = self.inner.lock().await;
        let bytes = inner.snapshot.as_ref().map_or(0, |&(_, _, bytes)| bytes);
        (inner.snapshot_records, bytes)
    }

    /// The latest snapshot, read back from its file if it is kept there.
    async fn current_snapshot(&self) -> io::Result<Option<SnapshotOf<ShardRaft, SnapshotBytes>>> {
        let current = self.inner.lock().await.snapshot.clone();
        let Some((meta, records, _)) = current else {
            return Ok(None);
        };
        records.read(meta).await.map(Some)
    }

    /// The registry of the shard's buckets, for reads.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// The snapshot file's name in a shard's directory.
const SNAPSHOT_FILE: &str = "snapshot.kv";

/// Where a shard's latest snapshot's records are: in memory for a machine without a directory,
/// else in its file, read back when wanted (by a replica catching up, or to restart a crashed
/// bucket). Kept in memory beside the buckets, they doubled what a node held.
#[derive(Clone)]
pub(super) enum SnapshotRecords {
    /// The records themselves.
    Memory(SnapshotBytes),
    /// The snapshot file holding them (or a newer snapshot's: a file is never replaced by an
    /// older one).
    File(PathBuf),
}

impl SnapshotRecords {
    /// The snapshot of `meta` whose records these are: in memory, or read (mapped) from the
    /// file, which holds this snapshot or a newer one (a file is never replaced by an older
    /// snapshot), with the metadata that goes with it.
    async fn read(
        self,
        meta: SnapshotMetaOf<ShardRaft>,
    ) -> io::Result<SnapshotOf<ShardRaft, SnapshotBytes>> {
        let (meta, snapshot) = match self {
            Self::Memory(snapshot) => (meta, snapshot),
            Self::File(path) => tokio::task::spawn_blocking(move || read_snapshot_file(&path))
                .await
                .map_err(io::Error::other)??
                .ok_or_else(|| io::Error::other("the shard's snapshot file is gone"))?,
        };
        Ok(SnapshotOf::<ShardRaft, SnapshotBytes> { meta, snapshot })
    }
}

/// The snapshot in the file at `path`, its metadata and its records; `None` if there is none.
///
/// # Errors
/// If the file cannot be read or holds no metadata.
pub(super) fn read_snapshot_file(
    path: &Path,
) -> io::Result<Option<(SnapshotMetaOf<ShardRaft>, SnapshotBytes)>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => snapshot_records::map(&file)?,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let (meta, data) = split_snapshot(&file)?;
    let data = file.slice_ref(data);
    Ok(Some((meta, data)))
}

/// A snapshot file's metadata and its records.
fn split_snapshot(bytes: &[u8]) -> io::Result<(SnapshotMetaOf<ShardRaft>, &[u8])> {
    let mut first = None;
    let mut data_at = bytes.len();
    let _ = record::scan_frames(bytes, Some, |payload: &[u8], offset| {
        if first.is_none() {
            first = Some(payload);
            Ok(())
        } else {
            data_at = offset as usize;
            Err(())
        }
    });
    let meta = first
        .and_then(|payload| postcard::from_bytes(payload).ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a snapshot file without its metadata",
            )
        })?;
    Ok((meta, &bytes[data_at..]))
}

/// About what a record of the snapshot takes beyond its bucket's name, key and value.
const RECORD_OVERHEAD: usize = 16;

/// The buckets `names` of `registry` as snapshot records (a `Create` and the `Put`s of each),
/// and how many records they are. Copied a page at a time on blocking threads while the
/// shard's changes go on (see [`Copying`]). A bucket that crashes or is restarting is copied
/// once it is back; one dropped is left out (its `Drop` is among the changes made meanwhile).
///
/// # Errors
/// If a bucket failed for good: a snapshot without it would lose it.
async fn copy_buckets(
    registry: &Registry,
    names: Vec<BucketName>,
    mut copied: Records,
) -> io::Result<(Records, u64)> {
    let mut records = 0;
    let mut pending = names;
    loop {
        let shard = registry.clone();
        let (records_now, more, restarting) =
            tokio::task::spawn_blocking(move || copy_live(&shard, pending, copied))
                .await
                .map_err(io::Error::other)??;
        copied = records_now;
        records += more;
        if restarting.is_empty() {
            return Ok((copied, records));
        }
        for name in &restarting {
            live(registry, name.as_bytes()).await?;
        }
        pending = restarting;
    }
}

/// About the bytes a snapshot of `registry`'s live buckets takes (each record repeats its
/// bucket's name and a frame's header): a buffer of hundreds of megabytes grown by doubling
/// would be copied again and again. For records gathered in memory.
fn expected_size(registry: &Registry) -> usize {
    registry
        .view()
        .buckets()
        .iter()
        .filter_map(|bucket| {
            let (keys, bytes) = bucket.size().ok()?;
            Some(bytes + keys * (bucket.name().as_bytes().len() + RECORD_OVERHEAD))
        })
        .sum()
}

/// Copies the live buckets of `names` after `copied`; returns the records, how many were
/// added, and the buckets to copy once they are back (restarting, or crashed while being
/// copied).
///
/// # Errors
/// If the records cannot be written to their file.
fn copy_live(
    registry: &Registry,
    names: Vec<BucketName>,
    mut copied: Records,
) -> io::Result<(Records, u64, Vec<BucketName>)> {
    let mut records = 0;
    let mut restarting = Vec::new();
    for name in names {
        let Some(bucket) = registry.lookup(name.as_bytes()) else {
            let down = registry
                .view()
                .why_missing(name.as_bytes(), registry.restarts_crashed_buckets());
            if down.is_some() {
                restarting.push(name);
            }
            continue;
        };
        let start = copied.len();
        match copied.append_bucket(&bucket) {
            Ok(added) => records += added,
            Err(CopyError::Ended) => {
                // It ended while being copied: crashed (then copied again once restarted) or
                // dropped (then gone by then).
                copied.rewind(start);
                restarting.push(name);
            }
            Err(CopyError::Io(error)) => return Err(error),
        }
    }
    Ok((copied, records, restarting))
}

/// Writes a snapshot file into `directory`: a frame of its `encoded_meta`, then its records
/// (copied by the system from a build's file, page by page: not through this process's
/// memory); through a temporary file, synced and renamed, so that a crash leaves the old one
/// or the new.
fn write_snapshot(directory: &Path, encoded_meta: &[u8], records: Made) -> io::Result<()> {
    let mut header = Vec::with_capacity(encoded_meta.len() + 16);
    record::encode_frame(&mut header, |out| out.extend_from_slice(encoded_meta));
    let temporary = directory.join(format!("{SNAPSHOT_FILE}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(&header)?;
    match records {
        Made::File(records, len) => {
            if io::copy(&mut io::Read::take(records, len), &mut file)? != len {
                return Err(io::Error::other("a snapshot's records file ended early"));
            }
        }
        Made::Bytes(data) => file.write_all(&data)?,
    }
    file.sync_all()?;
    std::fs::rename(&temporary, directory.join(SNAPSHOT_FILE))?;
    std::fs::File::open(directory)?.sync_all()
}

impl SnapshotFile {
    /// Writes the snapshot to the directory, if there is one and no newer snapshot is there,
    /// before it counts; where its records are kept from then on (the file, which holds it or
    /// a newer one, or `data` itself without a directory). The writing and syncing run on a
    /// blocking thread: a large shard's snapshot takes seconds to reach the disk, and the
    /// runtime's threads serve the node's clients and heartbeats meanwhile, and the records
    /// are let go of there.
    async fn write(
        &mut self,
        meta: &SnapshotMetaOf<ShardRaft>,
        records: Made,
    ) -> io::Result<SnapshotRecords> {
        let Some(directory) = self.directory.clone() else {
            // A build puts its records in a file only where there is a directory.
            return match records {
                Made::Bytes(data) => Ok(SnapshotRecords::Memory(data)),
                Made::File(..) => Err(io::Error::other(
                    "a snapshot's records in a file, without a directory to keep it in",
                )),
            };
        };
        let kept = SnapshotRecords::File(directory.join(SNAPSHOT_FILE));
        if self.written > meta.last_log_id {
            release(records);
            return Ok(kept);
        }
        let encoded = postcard::to_stdvec(meta)
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
        tokio::task::spawn_blocking(move || write_snapshot(&directory, &encoded, records))
            .await
            .map_err(io::Error::other)??;
        self.written = meta.last_log_id;
        Ok(kept)
    }
}

impl Inner {
    /// Makes the entry's changes in order; what each did.
    async fn apply(&mut self, command: &ShardCommand) -> io::Result<Vec<Outcome>> {
        let mut outcomes = Vec::new();
        // A batch's changes are mostly to one bucket: its handle is looked up once.
        let mut bucket = None;
        for change in command.changes() {
            let Some(change) = change else {
                outcomes.push(Outcome::NotAChange);
                break;
            };
            outcomes.push(apply_change(&self.registry, change, &mut bucket).await?);
        }
        Ok(outcomes)
    }

    /// Replaces every bucket with those of `bytes`. The snapshot is read whole first (on a
    /// blocking thread: it may be hundreds of megabytes), so that a damaged one changes
    /// nothing; its records are then made a chunk at a time, never all held decoded at once.
    async fn install(&mut self, bytes: &SnapshotBytes) -> io::Result<()> {
        let whole = bytes.clone();
        let (end, records) = tokio::task::spawn_blocking(move || {
            let mut records = 0u64;
            let end = scan(&whole, |_, _| {
                records += 1;
                Ok::<(), ()>(())
            })
            .unwrap_or(ScanEnd::Clean);
            (end, records)
        })
        .await
        .map_err(io::Error::other)?;
        if end != ScanEnd::Clean {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a snapshot that does not read whole: {end:?}"),
            ));
        }
        for bucket in self.registry.view().buckets() {
            self.registry
                .drop_bucket(bucket.name().as_bytes())
                .await
                .map_err(io::Error::other)?;
        }
        self.snapshot_records = records;
        let mut bucket = None;
        let mut pace = Pace::default();
        let mut at = 0;
        let mut chunk = Vec::with_capacity(INSTALL_CHUNK);
        while at < bytes.len() {
            // Where each record starts, from `at`; the chunk's end is where the next begins.
            let mut end = bytes.len() - at;
            let _ = scan(&bytes[at..], |change, offset| {
                if chunk.len() == INSTALL_CHUNK {
                    end = offset as usize;
                    return Err(());
                }
                chunk.push((change, offset as usize));
                Ok(())
            });
            for index in 0..chunk.len() {
                let (change, start) = chunk[index];
                let next = chunk.get(index + 1).map_or(end, |&(_, next)| next);
                apply_change(&self.registry, change, &mut bucket).await?;
                pace.applied(next - start).await;
            }
            chunk.clear();
            at += end;
        }
        Ok(())
    }
}

/// How many records of a snapshot being installed are decoded at a time.
const INSTALL_CHUNK: usize = 4096;

/// How many bytes of changes are applied between two yields to the runtime.
const YIELD_EVERY: usize = 1 << 20;

/// Yields to the runtime every [`YIELD_EVERY`] bytes of changes applied. Applying a long
/// stretch (a large snapshot installed, a replica catching up on many entries) would otherwise
/// hold the runtime's worker thread, and with it the node's clients and heartbeats, to the end.
#[derive(Default)]
struct Pace {
    since_yield: usize,
}

impl Pace {
    async fn applied(&mut self, bytes: usize) {
        self.since_yield += bytes;
        if self.since_yield >= YIELD_EVERY {
            self.since_yield = 0;
            tokio::task::yield_now().await;
        }
    }
}

/// The bucket the last change of a batch went to, kept for the next: `None` when it was
/// not a write to a live bucket.
type LastBucket<'c> = Option<(&'c [u8], BucketHandle)>;

/// Applies one committed change to `registry`, as every replica does. A bucket that is
/// restarting (it crashed; it comes back from the replicated state) is waited for, so the
/// change is made on every replica alike. `last` is the bucket the previous change went to.
///
/// # Errors
/// If the change cannot be made here (the bucket failed for good, the registry stopped): the
/// replica stops applying rather than diverge from the others.
async fn apply_change<'c>(
    registry: &Registry,
    change: Change<'c>,
    last: &mut LastBucket<'c>,
) -> io::Result<Outcome> {
    loop {
        let made = match change {
            Change::Create { bucket } => {
                *last = None;
                registry
                    .create_from_log(bucket)
                    .await
                    .map(|_| Outcome::Done)
                    .map_err(Retry::from)
            }
            Change::Drop { bucket } => {
                *last = None;
                match registry.drop_bucket(bucket).await {
                    Ok(true) => Ok(Outcome::Done),
                    Ok(false) => Ok(Outcome::NothingToDrop),
                    Err(error) => Err(Retry::from(error)),
                }
            }
            Change::Put { bucket, key, value } => {
                match live_cached(registry, bucket, last).await? {
                    Some(handle) => handle
                        .restore(key, value)
                        .map(|()| Outcome::Done)
                        .map_err(Retry::from),
                    None => Ok(Outcome::NoSuchBucket),
                }
            }
            Change::Delete { bucket, key } => match live_cached(registry, bucket, last).await? {
                Some(handle) => handle
                    .delete(key)
                    .map(|_| Outcome::Done)
                    .map_err(Retry::from),
                None => Ok(Outcome::NoSuchBucket),
            },
        };
        match made {
            Ok(outcome) => return Ok(outcome),
            Err(Retry::Later) => {
                // The bucket stopped (it crashed): the handle of its restart is looked up.
                *last = None;
                tokio::time::sleep(RESTART_POLL).await;
            }
            Err(Retry::Never(error)) => {
                tracing::error!(%error, ?change, "a committed change could not be applied; the replica stops");
                return Err(error);
            }
        }
    }
}

/// How many entries ahead of the one being applied the keys are asked for.
const PREFETCH_AHEAD: usize = 2;

/// Starts loading into cache what applying `entry` will read: its keys' entries in their
/// buckets.
fn prefetch(registry: &Registry, entry: &EntryOf<ShardRaft>) {
    let EntryPayload::Normal(command) = &entry.payload else {
        return;
    };
    // A batch's changes are mostly to one bucket: it is looked up once per group of up to
    // `GROUP` keys of a run of changes to it, asked for together so that their misses overlap.
    const GROUP: usize = 16;
    let mut run: Option<&[u8]> = None;
    let mut keys = SmallVec::<[&[u8]; GROUP]>::new();
    let flush = |run: Option<&[u8]>, keys: &mut SmallVec<[&[u8]; GROUP]>| {
        if !keys.is_empty()
            && let Some(handle) = run.and_then(|bucket| registry.lookup(bucket))
        {
            handle.prefetch_entries(keys.iter().copied());
        }
        keys.clear();
    };
    for change in command.changes() {
        let Some(Change::Put { bucket, key, .. } | Change::Delete { bucket, key }) = change else {
            continue;
        };
        if run != Some(bucket) || keys.len() == GROUP {
            flush(run, &mut keys);
            run = Some(bucket);
        }
        keys.push(key);
    }
    flush(run, &mut keys);
}

/// How often applying waits to see whether a restarting bucket (or registry) is back.
const RESTART_POLL: std::time::Duration = std::time::Duration::from_millis(1);

/// Why a change was not made this time.
enum Retry {
    /// The bucket or the registry is restarting: try again shortly.
    Later,
    /// It cannot be made here.
    Never(io::Error),
}

impl From<RegistryError> for Retry {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::Unavailable | RegistryError::Restarting(_) => Self::Later,
            other => Self::Never(io::Error::other(other)),
        }
    }
}

impl From<BucketError> for Retry {
    fn from(error: BucketError) -> Self {
        match error {
            // It crashed or stopped just now: its restart is under way.
            BucketError::Stopped => Self::Later,
            other => Self::Never(io::Error::other(other)),
        }
    }
}

/// [`live`], from `last` when the previous change went to the same bucket. A handle kept
/// there stays good within a batch: only the batch's own changes create or drop buckets (they
/// clear it), and a bucket that crashed refuses changes through its old handle.
async fn live_cached<'l, 'c>(
    registry: &Registry,
    name: &'c [u8],
    last: &'l mut LastBucket<'c>,
) -> io::Result<Option<&'l BucketHandle>> {
    if last.as_ref().is_none_or(|(kept, _)| *kept != name) {
        *last = live(registry, name).await?.map(|handle| (name, handle));
    }
    Ok(last.as_ref().map(|(_, handle)| handle))
}

/// The live bucket `name`, once any restart of it is over; `None` if there is no such bucket.
///
/// # Errors
/// If the bucket failed too often to be restarted.
async fn live(registry: &Registry, name: &[u8]) -> io::Result<Option<BucketHandle>> {
    loop {
        if let Some(handle) = registry.lookup(name) {
            return Ok(Some(handle));
        }
        match registry
            .view()
            .why_missing(name, registry.restarts_crashed_buckets())
        {
            None => return Ok(None),
            Some(Down::Restarting) => tokio::time::sleep(RESTART_POLL).await,
            Some(Down::Failed) => {
                return Err(io::Error::other(format!(
                    "bucket {} failed and stays down",
                    String::from_utf8_lossy(name)
                )));
            }
        }
    }
}

impl RaftSnapshotBuilder<ShardRaft> for ShardStateMachine {
    type SnapshotData = SnapshotBytes;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<ShardRaft, SnapshotBytes>, io::Error> {
        let (build, names) = {
            let mut inner = self.inner.lock().await;
            inner.builds += 1;
            *self.copying.lock() = Some(Copying {
                build: inner.builds,
                since: Vec::new(),
            });
            (inner.builds, inner.registry.view().every_name())
        };
        let _stop_keeping = StopKeeping {
            copying: Arc::clone(&self.copying),
            build,
        };
        let directory = self.snapshot_file.lock().await.directory.clone();
        let copied = match &directory {
            Some(directory) => Records::in_file(directory),
            None => Ok(Records::in_memory(expected_size(&self.registry))),
        };
        let copied = match copied {
            Ok(records) => copy_buckets(&self.registry, names, records).await,
            Err(error) => Err(error),
        };
        let (meta, since) = {
            let inner = self.inner.lock().await;
            let kept = self.copying.lock().take_if(|kept| kept.build == build);
            let Some(kept) = kept else {
                // A snapshot was installed while the buckets were copied: the copy is of no
                // state this replica was in, and the installed snapshot, newer, stands.
                drop(inner);
                return self
                    .current_snapshot()
                    .await?
                    .ok_or_else(|| io::Error::other("a snapshot build ended without one"));
            };
            let meta = SnapshotMetaOf::<ShardRaft> {
                last_log_id: inner.last_applied,
                last_membership: inner.membership.clone(),
            };
            (meta, kept.since)
        };
        let (mut copied, copied_records) = copied?;
        let (made, records) = tokio::task::spawn_blocking(move || {
            let made_again = copied.append_changes(&since)?;
            io::Result::Ok((copied.finish()?, copied_records + made_again))
        })
        .await
        .map_err(io::Error::other)??;
        let size = made.len();
        // Written without the state machine's lock: applying goes on while it reaches the disk.
        let kept = self.snapshot_file.lock().await.write(&meta, made).await?;
        // What openraft is handed: the records from where they are kept now (never the build's
        // file, which has no name: openraft lets go of it on the runtime's thread).
        let built = kept.clone().read(meta.clone()).await?;
        let mut inner = self.inner.lock().await;
        // A newer snapshot installed meanwhile stays the current one.
        let newer = inner
            .snapshot
            .as_ref()
            .is_some_and(|(current, _, _)| current.last_log_id > meta.last_log_id);
        if !newer {
            inner.snapshot_records = records;
            if let Some(applied) = &inner.applied {
                applied.snapshot_taken(meta.last_log_id.map(|id| id.index), kept.clone());
            }
            inner.snapshot = Some((meta, kept, size));
        }
        Ok(built)
    }
}

impl RaftStateMachine<ShardRaft> for ShardStateMachine {
    type SnapshotData = SnapshotBytes;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<ShardRaft>>, StoredMembershipOf<ShardRaft>), io::Error> {
        let inner = self.inner.lock().await;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<ShardRaft>, io::Error>> + Unpin + Send,
    {
        let mut inner = self.inner.lock().await;
        let batch: Vec<EntryResponder<ShardRaft>> = entries.try_collect().await?;
        let (entries, responders): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        // The keys an entry's changes touch are asked for an entry or two ahead of applying
        // it, so that the cache misses of a batch overlap instead of following one another.
        for entry in entries.iter().take(PREFETCH_AHEAD) {
            prefetch(&inner.registry, entry);
        }
        let mut pace = Pace::default();
        for (index, (entry, responder)) in entries.iter().zip(responders).enumerate() {
            if let Some(ahead) = entries.get(index + PREFETCH_AHEAD) {
                prefetch(&inner.registry, ahead);
            }
            inner.last_applied = Some(entry.log_id);
            let outcome = match &entry.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Normal(command) => {
                    if let Some(copying) = self.copying.lock().as_mut() {
                        copying.since.push(command.clone());
                    }
                    let outcome = inner.apply(command).await?;
                    pace.applied(command.encoded_len()).await;
                    outcome
                }
                EntryPayload::Membership(membership) => {
                    inner.membership = StoredMembershipOf::<ShardRaft>::new(
                        Some(entry.log_id),
                        membership.clone(),
                    );
                    Vec::new()
                }
            };
            if let Some(applied) = &inner.applied {
                applied.applied(entry.log_id.index);
            }
            if let Some(responder) = responder {
                responder.send(outcome);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<ShardRaft>,
        snapshot: SnapshotBytes,
    ) -> Result<(), io::Error> {
        let mut inner = self.inner.lock().await;
        // A build copying the buckets now would copy them as the install leaves them, and
        // they are no state the changes it keeps apply to.
        *self.copying.lock() = None;
        let kept = self
            .snapshot_file
            .lock()
            .await
            .write(meta, Made::Bytes(snapshot.clone()))
            .await?;
        inner.install(&snapshot).await?;
        let size = snapshot.len() as u64;
        // A received snapshot is mapped from a file without a name.
        release(snapshot);
        if let Some(applied) = &inner.applied {
            applied.snapshot_taken(meta.last_log_id.map(|id| id.index), kept.clone());
        }
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), kept, size));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<ShardRaft, SnapshotBytes>>, io::Error> {
        self.current_snapshot().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_change_answers_what_it_did() {
        let registry = Registry::start(CoreConfig::default());
        let changes = [
            Change::Create { bucket: b"s" },
            Change::Create { bucket: b"s" },
            Change::Put {
                bucket: b"s",
                key: b"k",
                value: b"v",
            },
            Change::Delete {
                bucket: b"s",
                key: b"k",
            },
            Change::Put {
                bucket: b"nowhere",
                key: b"k",
                value: b"v",
            },
            Change::Delete {
                bucket: b"nowhere",
                key: b"k",
            },
            Change::Drop { bucket: b"s" },
            Change::Drop { bucket: b"s" },
            // The batch's own DROP forgets the handle kept for the bucket.
            Change::Put {
                bucket: b"s",
                key: b"k",
                value: b"v",
            },
        ];
        let mut outcomes = Vec::new();
        let mut last = None;
        for change in changes {
            outcomes.push(apply_change(&registry, change, &mut last).await.unwrap());
        }
        use Outcome::{Done, NoSuchBucket, NothingToDrop};
        assert_eq!(
            outcomes,
            [
                Done,
                Done,
                Done,
                Done,
                NoSuchBucket,
                NoSuchBucket,
                Done,
                NothingToDrop,
                NoSuchBucket
            ]
        );
    }

    /// A snapshot built before a newer one was installed, and written after it (a build writes
    /// without the state machine's lock), leaves the newer one on disk: the log may already be
    /// purged up to it.
    #[tokio::test]
    async fn an_older_snapshot_is_never_written_over_a_newer_one() {
        use openraft::testing::log_id;

        let directory = tempfile::tempdir().unwrap();
        let mut file = SnapshotFile {
            directory: Some(directory.path().to_owned()),
            written: None,
        };
        let meta = |index| SnapshotMetaOf::<ShardRaft> {
            last_log_id: Some(log_id::<ShardRaft>(1, 1, index)),
            last_membership: StoredMembershipOf::<ShardRaft>::default(),
        };
        // A snapshot's data: one bucket's record.
        let records = |bucket: &[u8]| {
            let mut data = Vec::new();
            record::encode(&Change::Create { bucket }, &mut data);
            SnapshotBytes::from(data)
        };
        let on_disk = || {
            let bytes = std::fs::read(directory.path().join(SNAPSHOT_FILE)).unwrap();
            let (meta, data) = split_snapshot(&bytes).unwrap();
            (meta.last_log_id.unwrap().index, data.to_vec())
        };
        file.write(&meta(5), Made::Bytes(records(b"five")))
            .await
            .unwrap();
        assert_eq!(on_disk(), (5, records(b"five").to_vec()));
        file.write(&meta(10), Made::Bytes(records(b"ten")))
            .await
            .unwrap();
        file.write(&meta(7), Made::Bytes(records(b"seven")))
            .await
            .unwrap();
        assert_eq!(on_disk(), (10, records(b"ten").to_vec()));
    }
}
