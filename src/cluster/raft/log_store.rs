//! A shard's Raft log on disk: every entry, the vote, the committed index, truncations and
//! purges, as checksummed frames (the single-node log's framing) in one append-only file, with
//! the unpurged entries kept in memory for reading.
//!
//! Invariants:
//! - Replaying the file from the start rebuilds exactly the state the last write left: every
//!   operation is one frame, written before it is reported done.
//! - A vote is synced before `save_vote` returns; entries are synced before their append is
//!   reported flushed under `--fsync always` (otherwise written to the system, and synced once
//!   a second under `everysec`, as the single-node log does): a replica never acknowledges what
//!   a crash of its process loses.
//! - The file is rewritten (to a temporary file, synced, renamed) once purged entries make up
//!   most of it, by frames or by bytes, so it stays near the size of the unpurged log. The
//!   rewrite runs in the background: what is written meanwhile goes to the old file and is kept
//!   aside (`rewrite_tail`), then written after the live log in the new file before the rename,
//!   under the lock, so either file holds every operation.
//! - `held` is the sum of [`held_bytes`] over `entries`: every insertion and removal updates
//!   it, under the lock. It counts in the node's [`LogMemory`] too.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::ShardRaft;
use super::log_memory::{LogHeld, LogMemory};
use crate::config::FsyncPolicy;
use crate::shard::wal::record::{ScanEnd, scan_frames, try_encode_frame};

/// The log file's name in a shard's directory.
const FILE: &str = "raft-log.kv";

/// Rewrite the file once it holds this many frames and more than twice what is live.
const REWRITE_AT: usize = 4096;
/// Or once it holds this many bytes and more than twice the live entries': a few large entries
/// would not reach `REWRITE_AT` frames before taking gigabytes of disk.
const REWRITE_BYTES: u64 = 64 << 20;

/// One operation on the log, as the file keeps it.
#[derive(Clone, Serialize, Deserialize)]
enum Saved {
    Entry(EntryOf<ShardRaft>),
    TruncateAfter(Option<LogIdOf<ShardRaft>>),
    Purge(LogIdOf<ShardRaft>),
    Vote(VoteOf<ShardRaft>),
    Committed(Option<LogIdOf<ShardRaft>>),
}

/// A shard's Raft log. Cheap to clone: clones share one log (the reader openraft asks for is a
/// clone).
#[derive(Clone)]
pub struct ShardLog {
    inner: Arc<Mutex<Inner>>,
    /// The rewrite running in the background, if one is.
    rewrite: Arc<parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// What the entries held in memory take (see [`held_bytes`]): kept beside the lock, so that
    /// compaction and `INFO` read it without waiting for a write.
    held: Arc<LogHeld>,
}

/// What an entry held in memory is counted as: its changes' bytes and a fixed overhead (its log
/// id, its place in the map). An estimate for bounding the log, as the memory budget's is.
fn held_bytes(entry: &EntryOf<ShardRaft>) -> u64 {
    const OVERHEAD: u64 = 64;
    let payload = match &entry.payload {
        EntryPayload::Normal(command) => command.encoded_len(),
        EntryPayload::Blank | EntryPayload::Membership(_) => 0,
    };
    OVERHEAD + payload as u64
}

fn total_held<'e>(entries: impl IntoIterator<Item = &'e EntryOf<ShardRaft>>) -> u64 {
    entries.into_iter().map(held_bytes).sum()
}

struct Inner {
    directory: PathBuf,
    file: File,
    fsync: FsyncPolicy,
    frames: usize,
    /// The file's length.
    file_bytes: u64,
    /// Whether anything was written (to the operating system) since the last sync.
    unsynced: bool,
    vote: Option<VoteOf<ShardRaft>>,
    committed: Option<LogIdOf<ShardRaft>>,
    last_purged: Option<LogIdOf<ShardRaft>>,
    entries: BTreeMap<u64, EntryOf<ShardRaft>>,
    /// While the file is rewritten: what was written since the rewrite copied the live log.
    rewrite_tail: Option<Vec<Saved>>,
    /// The buffer the last write encoded its frames in, kept for the next (up to
    /// [`KEPT_BUFFER`]): a fresh one per write grew by doubling, and a follower's large
    /// appends faulted its pages in anew each time.
    encoded: Vec<u8>,
}

/// The largest encoding buffer a log keeps between writes.
const KEPT_BUFFER: usize = 1 << 20;

fn invalid(error: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}

impl ShardLog {
    /// Opens (or creates) the log in `directory`, replaying what it holds. A torn last frame
    /// (a crash mid-write) is cut off; damage elsewhere is an error.
    ///
    /// # Errors
    /// I/O errors, or a damaged file.
    pub fn open(directory: &Path, fsync: FsyncPolicy) -> io::Result<Self> {
        Self::open_counted(directory, fsync, &LogMemory::unbounded())
    }

    /// Opens the log in `directory`, as [`ShardLog::open`] does, counting what its entries hold
    /// in `memory`, the node's.
    ///
    /// # Errors
    /// I/O errors, or a damaged file.
    pub fn open_counted(
        directory: &Path,
        fsync: FsyncPolicy,
        memory: &Arc<LogMemory>,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(directory)?;
        let path = directory.join(FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(error) => return Err(error),
        };
        let mut state = Replayed::default();
        let end = scan_frames(
            &bytes,
            |payload| postcard::from_bytes::<Saved>(payload).ok(),
            |saved, _| {
                state.apply(saved);
                Ok::<(), ()>(())
            },
        )
        .unwrap_or(ScanEnd::Clean);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut file_bytes = bytes.len() as u64;
        match end {
            ScanEnd::Clean => {}
            ScanEnd::Torn { offset, reason } => {
                file_bytes = offset;
                tracing::warn!(file = %path.display(), offset, reason, "the Raft log ends in a torn write; cutting it off");
                file.set_len(offset)?;
                file.sync_all()?;
            }
            ScanEnd::Corrupt { offset, reason } => {
                return Err(invalid(format!(
                    "{}: corrupt frame at byte offset {offset} ({reason})",
                    path.display()
                )));
            }
        }
        let held = memory.counter();
        held.add(total_held(state.entries.values()));
        Ok(Self {
            held: Arc::new(held),
            rewrite: Arc::default(),
            inner: Arc::new(Mutex::new(Inner {
                directory: directory.to_owned(),
                file,
                fsync,
                frames: state.frames,
                file_bytes,
                unsynced: false,
                vote: state.vote,
                committed: state.committed,
                last_purged: state.last_purged,
                entries: state.entries,
                rewrite_tail: None,
                encoded: Vec::new(),
            })),
        })
    }
}

/// The state a replay of the file builds.
#[derive(Default)]
struct Replayed {
    frames: usize,
    vote: Option<VoteOf<ShardRaft>>,
    committed: Option<LogIdOf<ShardRaft>>,
    last_purged: Option<LogIdOf<ShardRaft>>,
    entries: BTreeMap<u64, EntryOf<ShardRaft>>,
}

impl Replayed {
    fn apply(&mut self, saved: Saved) {
        self.frames += 1;
        match saved {
            Saved::Entry(entry) => {
                self.entries.insert(entry.index(), entry);
            }
            Saved::TruncateAfter(last) => {
                let from = last.map_or(0, |last| last.index() + 1);
                self.entries.split_off(&from);
            }
            Saved::Purge(upto) => {
                self.entries = self.entries.split_off(&(upto.index() + 1));
                self.last_purged = Some(upto);
            }
            Saved::Vote(vote) => self.vote = Some(vote),
            Saved::Committed(committed) => self.committed = committed,
        }
    }
}

impl Inner {
    /// Writes `operations` as frames, in one write, and syncs them if `sync`. A sync (and the
    /// write before it) runs on a blocking thread, so that a slow disk never holds an async
    /// worker; the caller holds the log's lock meanwhile, which keeps the file's operations in
    /// order.
    async fn write(&mut self, operations: &[Saved], sync: bool) -> io::Result<()> {
        let mut buffer = std::mem::take(&mut self.encoded);
        buffer.clear();
        for saved in operations {
            encode_saved(&mut buffer, saved)?;
        }
        let written = buffer.len() as u64;
        if sync {
            let mut file = self.file.try_clone()?;
            buffer = blocking(move || {
                file.write_all(&buffer)?;
                file.sync_data()?;
                Ok(buffer)
            })
            .await?;
        } else {
            self.file.write_all(&buffer)?;
            self.unsynced = true;
        }
        if buffer.capacity() <= KEPT_BUFFER {
            self.encoded = buffer;
        }
        self.frames += operations.len();
        self.file_bytes += written;
        if let Some(tail) = &mut self.rewrite_tail {
            tail.extend_from_slice(operations);
        }
        Ok(())
    }

    /// What the file would be rewritten as, if purged entries make up most of it (by frames
    /// or by bytes; `live_bytes` is what the live entries take, the log's `held`) and no
    /// rewrite is running. The entries' clones share their payloads.
    fn due_rewrite(&self, live_bytes: u64) -> Option<Vec<Saved>> {
        let live = self.entries.len() + 3;
        let many_frames = self.frames >= REWRITE_AT && self.frames >= 2 * live;
        let many_bytes = self.file_bytes >= REWRITE_BYTES && self.file_bytes >= 2 * live_bytes;
        if self.rewrite_tail.is_some() || (!many_frames && !many_bytes) {
            return None;
        }
        let mut operations = Vec::with_capacity(live);
        operations.extend(self.vote.map(Saved::Vote));
        operations.push(Saved::Committed(self.committed));
        operations.extend(self.last_purged.map(Saved::Purge));
        operations.extend(self.entries.values().cloned().map(Saved::Entry));
        Some(operations)
    }
}

/// Rewrites the log's file as `live` (its operations when the rewrite started) followed by
/// what was written since. The live log, possibly hundreds of megabytes, is encoded, written
/// and synced on a blocking thread without the log's lock, so that appends (and the shard's
/// Raft core waiting on them) go on; only the tail and the rename happen under it. On failure
/// the old file stays, complete.
async fn rewrite_in_background(log: Arc<Mutex<Inner>>, directory: PathBuf, live: Vec<Saved>) {
    let temporary = directory.join(format!("{FILE}.tmp"));
    let frames = live.len();
    let written = {
        let temporary = temporary.clone();
        blocking(move || {
            let mut buffer = Vec::new();
            for saved in &live {
                encode_saved(&mut buffer, saved)?;
            }
            drop(live);
            let mut file = File::create(&temporary)?;
            file.write_all(&buffer)?;
            file.sync_all()?;
            Ok((file, buffer.len() as u64))
        })
        .await
    };
    let mut inner = log.lock().await;
    let tail = inner.rewrite_tail.take().unwrap_or_default();
    let tail_frames = tail.len();
    let swapped = match written {
        Ok((file, bytes)) => {
            blocking(move || finish_rewrite(file, bytes, &tail, &directory, &temporary)).await
        }
        Err(error) => Err(error),
    };
    match swapped {
        Ok((file, bytes)) => {
            inner.file = file;
            inner.frames = frames + tail_frames;
            inner.file_bytes = bytes;
            // Everything in the new file was synced before the rename.
            inner.unsynced = false;
        }
        Err(error) => {
            tracing::warn!(%error, "rewriting a shard's Raft log failed; it keeps its file as it is");
        }
    }
}

/// Writes `tail` after the `bytes` of the live log in `file` (the temporary file), syncs it and
/// renames it into place; the new file's handle for appending, and its length. The handle is
/// opened before the rename: once renamed, the log's file is this one, and appending to the
/// old one would lose what is appended.
fn finish_rewrite(
    mut file: File,
    bytes: u64,
    tail: &[Saved],
    directory: &Path,
    temporary: &Path,
) -> io::Result<(File, u64)> {
    let mut buffer = Vec::new();
    for saved in tail {
        encode_saved(&mut buffer, saved)?;
    }
    file.write_all(&buffer)?;
    file.sync_all()?;
    let appender = OpenOptions::new().append(true).open(temporary)?;
    std::fs::rename(temporary, directory.join(FILE))?;
    if let Err(error) = File::open(directory).and_then(|directory| directory.sync_all()) {
        tracing::warn!(%error, directory = %directory.display(), "could not sync the directory after rewriting a shard's Raft log");
    }
    Ok((appender, bytes + buffer.len() as u64))
}

/// Appends `saved` to `out` as one frame, serialized in place.
fn encode_saved(out: &mut Vec<u8>, saved: &Saved) -> io::Result<()> {
    try_encode_frame(out, |out| postcard::to_io(saved, out).map(drop)).map_err(invalid)
}

/// Runs file work that may wait on the disk on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

impl ShardLog {
    /// Waits for the file's rewrite, if one is running (a purge starts one when purged entries
    /// make up most of the file).
    pub async fn wait_for_rewrite(&self) {
        let rewrite = self.rewrite.lock().take();
        if let Some(rewrite) = rewrite {
            let _ = rewrite.await;
        }
    }

    /// What the unpurged entries held in memory take, in bytes (estimated as [`held_bytes`]
    /// counts them).
    #[must_use]
    pub fn held_bytes(&self) -> u64 {
        self.held.bytes()
    }

    /// Syncs what has been written to the file (`--fsync everysec` does once a second). The
    /// log's lock is held only to take a handle: appends go on while the sync runs.
    ///
    /// # Errors
    /// If the sync fails.
    pub async fn sync(&self) -> io::Result<()> {
        let file = {
            let mut inner = self.inner.lock().await;
            // An idle shard has nothing to sync: no syscall, no blocking thread woken.
            if !std::mem::take(&mut inner.unsynced) {
                return Ok(());
            }
            inner.file.try_clone()?
        };
        let synced = blocking(move || file.sync_data()).await;
        if synced.is_err() {
            self.inner.lock().await.unsynced = true;
        }
        synced
    }

    /// The entries at `indexes` that the log holds, for a caller on a blocking thread (it
    /// waits for the log's lock without yielding).
    pub fn entries_blocking(
        &self,
        indexes: std::ops::RangeInclusive<u64>,
    ) -> Vec<EntryOf<ShardRaft>> {
        self.inner
            .blocking_lock()
            .entries
            .range(indexes)
            .map(|(_, entry)| entry.clone())
            .collect()
    }
}

impl RaftLogReader<ShardRaft> for ShardLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<ShardRaft>>, io::Error> {
        let inner = self.inner.lock().await;
        Ok(inner
            .entries
            .range(range)
            .map(|(_, entry)| entry.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<ShardRaft>>, io::Error> {
        Ok(self.inner.lock().await.vote)
    }
}

impl RaftLogStorage<ShardRaft> for ShardLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<ShardRaft>, io::Error> {
        let inner = self.inner.lock().await;
        let last_purged_log_id = inner.last_purged;
        let last_log_id = inner
            .entries
            .values()
            .next_back()
            .map(RaftEntry::log_id)
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<ShardRaft>) -> Result<(), io::Error> {
        let mut inner = self.inner.lock().await;
        inner.write(&[Saved::Vote(*vote)], true).await?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogIdOf<ShardRaft>>,
    ) -> Result<(), io::Error> {
        // Written at once, not with the next write: openraft restores a restarted leader
        // (`enable_leader_restore`, on by default) with its state machine applied up to the
        // committed index read back here, and serves reads from it; an index behind what was
        // acknowledged would answer reads without those writes (a whole-cluster crash in
        // `tests/cluster_faults.rs` did, when this write was put off).
        let mut inner = self.inner.lock().await;
        inner.write(&[Saved::Committed(committed)], false).await?;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<ShardRaft>>, io::Error> {
        Ok(self.inner.lock().await.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<ShardRaft>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<ShardRaft>> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.inner.lock().await;
        let entries: Vec<_> = entries.into_iter().collect();
        let operations: Vec<Saved> = entries.iter().cloned().map(Saved::Entry).collect();
        let sync = inner.fsync == FsyncPolicy::Always;
        let written = inner.write(&operations, sync).await;
        if written.is_ok() {
            let (mut added, mut replaced) = (0, 0);
            for entry in entries {
                added += held_bytes(&entry);
                if let Some(old) = inner.entries.insert(entry.index(), entry) {
                    replaced += held_bytes(&old);
                }
            }
            if added >= replaced {
                self.held.add(added - replaced);
            } else {
                self.held.sub(replaced - added);
            }
        }
        // Both the callback and the caller are told of a failure; `io::Error` does not clone.
        let reported = match &written {
            Ok(()) => Ok(()),
            Err(error) => Err(io::Error::new(error.kind(), error.to_string())),
        };
        callback.io_completed(reported);
        written
    }

    async fn truncate_after(
        &mut self,
        last_log_id: Option<LogIdOf<ShardRaft>>,
    ) -> Result<(), io::Error> {
        let mut inner = self.inner.lock().await;
        inner
            .write(&[Saved::TruncateAfter(last_log_id)], false)
            .await?;
        let from = last_log_id.map_or(0, |last| last.index() + 1);
        let removed = inner.entries.split_off(&from);
        self.held.sub(total_held(removed.values()));
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<ShardRaft>) -> Result<(), io::Error> {
        let mut inner = self.inner.lock().await;
        inner.write(&[Saved::Purge(log_id)], false).await?;
        let kept = inner.entries.split_off(&(log_id.index() + 1));
        let purged = std::mem::replace(&mut inner.entries, kept);
        self.held.sub(total_held(purged.values()));
        inner.last_purged = Some(log_id);
        if let Some(live) = inner.due_rewrite(self.held_bytes()) {
            inner.rewrite_tail = Some(Vec::new());
            let directory = inner.directory.clone();
            let rewrite = tokio::spawn(rewrite_in_background(
                Arc::clone(&self.inner),
                directory,
                live,
            ));
            *self.rewrite.lock() = Some(rewrite);
        }
        Ok(())
    }
}
