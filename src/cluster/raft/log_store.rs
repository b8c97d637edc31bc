//! A shard's Raft log on disk: every entry, the vote, the committed index, truncations and
//! purges, as checksummed frames (the single-node log's framing) in one append-only file. The
//! newest entries (up to [`KEPT_IN_MEMORY`] bytes) are kept in memory too, for the reads that
//! follow an append (applying, replicating); an older one is read back from its frame, which
//! only a replica catching up asks for. Holding every unpurged entry, a node held up to twice
//! its data in logs beside the data.
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
//! - Every live entry's `place` is its frame in the current file (a rewrite moves them all at
//!   the rename); entries below `evicted_below` are not in memory, and `in_memory` is the sum
//!   of the frames of those that are.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::ShardRaft;
use super::log_memory::{LogHeld, LogMemory};
use super::snapshot_records::release;
use crate::config::FsyncPolicy;
use crate::shard::wal::record::{ScanEnd, scan_frames, try_encode_frame};

/// The log file's name in a shard's directory.
const FILE: &str = "raft-log.kv";

/// The bytes of a log's newest entries kept in memory (their frames' size); older ones are
/// read back from the file.
pub const KEPT_IN_MEMORY: u64 = 4 << 20;

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

/// What a live entry is counted as: its frame's bytes and a fixed overhead (its place in the
/// map). An estimate for bounding the log, as the budget's is.
fn held_bytes(stored: &Stored) -> u64 {
    const OVERHEAD: u64 = 64;
    OVERHEAD + u64::from(stored.place.len)
}

fn total_held<'e>(entries: impl IntoIterator<Item = &'e Stored>) -> u64 {
    entries.into_iter().map(held_bytes).sum()
}

/// Where a frame is in the log's file.
#[derive(Clone, Copy, Debug)]
struct Place {
    offset: u64,
    len: u32,
}

/// A live entry: its frame in the file, and the entry itself while it is among the newest.
struct Stored {
    log_id: LogIdOf<ShardRaft>,
    place: Place,
    entry: Option<EntryOf<ShardRaft>>,
}

impl Stored {
    fn in_memory(&self) -> u64 {
        if self.entry.is_some() {
            u64::from(self.place.len)
        } else {
            0
        }
    }
}

/// Entries as a read finds them under the log's lock: each in memory (`Ok`) or at its frame's
/// place (`Err`), with a handle of the file for those, to be read without the lock. The handle
/// is its own: a rewrite may replace the log's file meanwhile, and this one still reads the
/// frames found in the file it had.
struct Found {
    entries: Vec<Result<EntryOf<ShardRaft>, Place>>,
    file: Option<File>,
}

impl Found {
    /// Whether reading them waits on nothing but memory.
    fn in_memory(&self) -> bool {
        self.file.is_none()
    }

    /// The entries, those not in memory read back from the file.
    fn read(self) -> io::Result<Vec<EntryOf<ShardRaft>>> {
        let file = self.file;
        self.entries
            .into_iter()
            .map(|found| match (found, &file) {
                (Ok(entry), _) => Ok(entry),
                (Err(place), Some(file)) => read_entry(file, place),
                (Err(place), None) => Err(invalid(format!("no file to read {place:?} from"))),
            })
            .collect()
    }
}

/// Reads the entry whose frame is at `place` in `file`.
fn read_entry(file: &File, place: Place) -> io::Result<EntryOf<ShardRaft>> {
    let mut frame = vec![0; place.len as usize];
    file.read_exact_at(&mut frame, place.offset)?;
    let mut entry = None;
    let end = scan_frames(
        &frame,
        |payload| postcard::from_bytes::<Saved>(payload).ok(),
        |saved, _| {
            entry = Some(saved);
            Ok::<(), ()>(())
        },
    )
    .unwrap_or(ScanEnd::Clean);
    match (end, entry) {
        (ScanEnd::Clean, Some(Saved::Entry(entry))) => Ok(entry),
        _ => Err(invalid(format!(
            "the Raft log's frame at byte offset {} is not the entry it held",
            place.offset
        ))),
    }
}

struct Inner {
    directory: PathBuf,
    file: File,
    /// The same file, opened for reading entries back.
    reader: File,
    fsync: FsyncPolicy,
    frames: usize,
    /// The file's length.
    file_bytes: u64,
    /// Whether anything was written (to the operating system) since the last sync.
    unsynced: bool,
    vote: Option<VoteOf<ShardRaft>>,
    committed: Option<LogIdOf<ShardRaft>>,
    last_purged: Option<LogIdOf<ShardRaft>>,
    entries: BTreeMap<u64, Stored>,
    /// Entries below this index are not kept in memory.
    evicted_below: u64,
    /// The frame bytes of the entries kept in memory.
    in_memory: u64,
    /// How many of those bytes the log keeps ([`KEPT_IN_MEMORY`]).
    kept_in_memory: u64,
    /// While the file is rewritten: what was written since the rewrite copied the live log.
    rewrite_tail: Option<Vec<Saved>>,
    /// The buffer the last write encoded its frames in, kept for the next (up to
    /// [`KEPT_BUFFER`]): a fresh one per write grew by doubling, and a follower's large
    /// appends faulted its pages in anew each time.
    encoded: Vec<u8>,
}

/// The largest encoding buffer a log keeps between writes.
const KEPT_BUFFER: usize = 1 << 20;

/// The bytes a rewrite gathers before writing them to the new file: the live log is copied
/// through it, not gathered whole (hundreds of megabytes for a large shard).
const REWRITE_BUFFER: usize = 1 << 20;

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
            |saved, offset| {
                state.apply(saved, offset);
                Ok::<(), ()>(())
            },
        )
        .unwrap_or(ScanEnd::Clean);
        drop(bytes);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let reader = File::open(&path)?;
        let mut file_bytes = std::fs::metadata(&path)?.len();
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
        let entries = state.placed(file_bytes);
        let evicted_below = entries.keys().next_back().map_or(0, |last| last + 1);
        let held = memory.counter();
        held.add(total_held(entries.values()));
        Ok(Self {
            held: Arc::new(held),
            rewrite: Arc::default(),
            inner: Arc::new(Mutex::new(Inner {
                directory: directory.to_owned(),
                file,
                reader,
                fsync,
                frames: state.frames,
                file_bytes,
                unsynced: false,
                vote: state.vote,
                committed: state.committed,
                last_purged: state.last_purged,
                entries,
                evicted_below,
                in_memory: 0,
                kept_in_memory: KEPT_IN_MEMORY,
                rewrite_tail: None,
                encoded: Vec::new(),
            })),
        })
    }

    /// Keeps at most `bytes` of the newest entries in memory, reading the others back from the
    /// file (tests read every entry back with 0).
    pub async fn keep_in_memory(&self, bytes: u64) {
        let mut inner = self.inner.lock().await;
        inner.kept_in_memory = bytes;
        inner.evict();
    }
}

/// The state a replay of the file builds.
#[derive(Default)]
struct Replayed {
    frames: usize,
    vote: Option<VoteOf<ShardRaft>>,
    committed: Option<LogIdOf<ShardRaft>>,
    last_purged: Option<LogIdOf<ShardRaft>>,
    /// The live entries' log ids and the offsets of their frames.
    entries: BTreeMap<u64, (LogIdOf<ShardRaft>, u64)>,
    /// Every frame's offset, in order: a frame ends where the next begins.
    offsets: Vec<u64>,
}

impl Replayed {
    fn apply(&mut self, saved: Saved, offset: u64) {
        self.frames += 1;
        self.offsets.push(offset);
        match saved {
            Saved::Entry(entry) => {
                self.entries.insert(entry.index(), (entry.log_id, offset));
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

    /// The live entries, none in memory, their frames' places found from where the next
    /// frame (or the file's `end`) begins.
    fn placed(&self, end: u64) -> BTreeMap<u64, Stored> {
        self.entries
            .iter()
            .map(|(&index, &(log_id, offset))| {
                let next = self.offsets.partition_point(|&at| at <= offset);
                let until = self.offsets.get(next).copied().unwrap_or(end);
                let len = u32::try_from(until - offset).expect("a frame's length fits 32 bits");
                let stored = Stored {
                    log_id,
                    place: Place { offset, len },
                    entry: None,
                };
                (index, stored)
            })
            .collect()
    }
}

impl Inner {
    /// Writes `operations` as frames, in one write, and syncs them if `sync`. A sync (and the
    /// write before it) runs on a blocking thread, so that a slow disk never holds an async
    /// worker; the caller holds the log's lock meanwhile, which keeps the file's operations in
    /// order.
    async fn write(&mut self, operations: &[Saved], sync: bool) -> io::Result<Vec<Place>> {
        let mut buffer = std::mem::take(&mut self.encoded);
        buffer.clear();
        let places = encode_all(&mut buffer, operations, self.file_bytes)?;
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
        Ok(places)
    }

    /// Adds `entries`, written at `places`, as the newest, and lets go of the oldest kept in
    /// memory past [`Inner::kept_in_memory`]; what the live entries hold changes by the
    /// returned (added, removed).
    fn insert(&mut self, entries: Vec<EntryOf<ShardRaft>>, places: &[Place]) -> (u64, u64) {
        let (mut added, mut removed) = (0, 0);
        for (entry, &place) in entries.into_iter().zip(places) {
            let index = entry.index();
            let stored = Stored {
                log_id: entry.log_id,
                place,
                entry: Some(entry),
            };
            added += held_bytes(&stored);
            self.in_memory += stored.in_memory();
            if let Some(old) = self.entries.insert(index, stored) {
                removed += held_bytes(&old);
                self.in_memory -= old.in_memory();
            }
        }
        self.evict();
        (added, removed)
    }

    /// Lets go of the oldest entries kept in memory until the rest fit `kept_in_memory`.
    fn evict(&mut self) {
        let mut evicted_below = self.evicted_below;
        for (&index, stored) in self.entries.range_mut(self.evicted_below..) {
            if self.in_memory <= self.kept_in_memory {
                break;
            }
            self.in_memory -= stored.in_memory();
            stored.entry = None;
            evicted_below = index + 1;
        }
        self.evicted_below = evicted_below;
    }

    /// Removes the entries from index `from` on; what they held.
    fn remove_from(&mut self, from: u64) -> u64 {
        let removed = self.entries.split_off(&from);
        self.in_memory -= removed.values().map(Stored::in_memory).sum::<u64>();
        self.evicted_below = self.evicted_below.min(from);
        total_held(removed.values())
    }

    /// Removes the entries up to index `through`; what they held.
    fn remove_through(&mut self, through: u64) -> u64 {
        let kept = self.entries.split_off(&(through + 1));
        let removed = std::mem::replace(&mut self.entries, kept);
        self.in_memory -= removed.values().map(Stored::in_memory).sum::<u64>();
        total_held(removed.values())
    }

    /// The entries in `range`: those in memory, and the places of the others.
    fn find(&self, range: impl RangeBounds<u64>) -> io::Result<Found> {
        let entries: Vec<_> = self
            .entries
            .range(range)
            .map(|(_, stored)| stored.entry.clone().ok_or(stored.place))
            .collect();
        let filed = entries.iter().any(Result::is_err);
        let file = filed.then(|| self.reader.try_clone()).transpose()?;
        Ok(Found { entries, file })
    }

    /// What the file would be rewritten from, if purged entries make up most of it (by
    /// frames or by bytes; `live_bytes` is what the live entries take, the log's `held`) and
    /// no rewrite is running.
    fn due_rewrite(&self, live_bytes: u64) -> io::Result<Option<Live>> {
        let live = self.entries.len() + 3;
        let many_frames = self.frames >= REWRITE_AT && self.frames >= 2 * live;
        let many_bytes = self.file_bytes >= REWRITE_BYTES && self.file_bytes >= 2 * live_bytes;
        if self.rewrite_tail.is_some() || (!many_frames && !many_bytes) {
            return Ok(None);
        }
        let mut head = Vec::with_capacity(3);
        head.extend(self.vote.map(Saved::Vote));
        head.push(Saved::Committed(self.committed));
        head.extend(self.last_purged.map(Saved::Purge));
        let entries = self
            .entries
            .iter()
            .map(|(&index, stored)| (index, stored.log_id, stored.place))
            .collect();
        Ok(Some(Live {
            head,
            entries,
            reader: self.reader.try_clone()?,
        }))
    }
}

/// The live log when a rewrite starts: the vote, committed index and purge, and where each
/// live entry's frame is in `reader`, the file being replaced.
struct Live {
    head: Vec<Saved>,
    entries: Vec<(u64, LogIdOf<ShardRaft>, Place)>,
    reader: File,
}

/// Where each entry's frame is, by index, with the log id it holds.
type Moved = BTreeMap<u64, (LogIdOf<ShardRaft>, Place)>;

/// Rewrites the log's file as `live` (its operations when the rewrite started) followed by
/// what was written since. The live log, possibly hundreds of megabytes, is copied frame by
/// frame from the old file (no entry is decoded) through a buffer of [`REWRITE_BUFFER`]
/// bytes, written and synced on a blocking thread
/// without the log's lock, so that appends (and the shard's Raft core waiting on them) go on;
/// only the tail and the rename happen under it. On failure the old file stays, complete.
async fn rewrite_in_background(log: Arc<Mutex<Inner>>, directory: PathBuf, live: Live) {
    let temporary = directory.join(format!("{FILE}.tmp"));
    let frames = live.head.len() + live.entries.len();
    let written = {
        let temporary = temporary.clone();
        blocking(move || {
            let mut out = io::BufWriter::with_capacity(REWRITE_BUFFER, File::create(&temporary)?);
            let mut frame = Vec::new();
            encode_all(&mut frame, &live.head, 0)?;
            out.write_all(&frame)?;
            let mut written = frame.len() as u64;
            let mut moved = Moved::new();
            for (index, log_id, place) in live.entries {
                frame.resize(place.len as usize, 0);
                live.reader.read_exact_at(&mut frame, place.offset)?;
                out.write_all(&frame)?;
                let place = Place {
                    offset: written,
                    len: place.len,
                };
                written += u64::from(place.len);
                moved.insert(index, (log_id, place));
            }
            let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
            file.sync_all()?;
            Ok((file, written, moved))
        })
        .await
    };
    let mut inner = log.lock().await;
    let tail = inner.rewrite_tail.take().unwrap_or_default();
    let tail_frames = tail.len();
    let swapped = match written {
        Ok((file, bytes, mut moved)) => {
            let mut tail_bytes = Vec::new();
            match encode_all(&mut tail_bytes, &tail, bytes) {
                Ok(places) => {
                    for (saved, place) in tail.iter().zip(places) {
                        if let Saved::Entry(entry) = saved {
                            moved.insert(entry.index(), (entry.log_id, place));
                        }
                    }
                    match new_places(&inner.entries, &moved) {
                        Ok(places) => {
                            blocking(move || {
                                finish_rewrite(file, bytes, &tail_bytes, &directory, &temporary)
                                    .map(|finished| (finished, places))
                            })
                            .await
                        }
                        Err(error) => Err(error),
                    }
                }
                Err(error) => Err(error),
            }
        }
        Err(error) => Err(error),
    };
    match swapped {
        Ok(((file, reader, bytes), places)) => {
            let replaced = (
                std::mem::replace(&mut inner.file, file),
                std::mem::replace(&mut inner.reader, reader),
            );
            // The last holds on the old file, which the rename left without a name.
            release(replaced);
            inner.frames = frames + tail_frames;
            inner.file_bytes = bytes;
            // Everything in the new file was synced before the rename.
            inner.unsynced = false;
            for (stored, place) in inner.entries.values_mut().zip(places) {
                stored.place = place;
            }
        }
        Err(error) => {
            tracing::warn!(%error, "rewriting a shard's Raft log failed; it keeps its file as it is");
        }
    }
}

/// The places in the rewritten file of the live `entries`, in order: each must be in `moved`
/// with its log id, or the new file lacks it and must not replace the old.
fn new_places(entries: &BTreeMap<u64, Stored>, moved: &Moved) -> io::Result<Vec<Place>> {
    entries
        .iter()
        .map(|(index, stored)| match moved.get(index) {
            Some(&(log_id, place)) if log_id == stored.log_id => Ok(place),
            _ => Err(invalid(format!(
                "the rewritten log lacks entry {index}; keeping the old file"
            ))),
        })
        .collect()
}

/// Writes `tail` (frames) after the `bytes` of the live log in `file` (the temporary file),
/// syncs it and renames it into place; the new file's handles for appending and for reading,
/// and its length. The handles are opened before the rename: once renamed, the log's file is
/// this one, and appending to the old one would lose what is appended.
fn finish_rewrite(
    mut file: File,
    bytes: u64,
    tail: &[u8],
    directory: &Path,
    temporary: &Path,
) -> io::Result<(File, File, u64)> {
    file.write_all(tail)?;
    file.sync_all()?;
    let appender = OpenOptions::new().append(true).open(temporary)?;
    let reader = File::open(temporary)?;
    std::fs::rename(temporary, directory.join(FILE))?;
    if let Err(error) = File::open(directory).and_then(|directory| directory.sync_all()) {
        tracing::warn!(%error, directory = %directory.display(), "could not sync the directory after rewriting a shard's Raft log");
    }
    Ok((appender, reader, bytes + tail.len() as u64))
}

/// Appends `saved` to `out` as one frame, serialized in place.
fn encode_saved(out: &mut Vec<u8>, saved: &Saved) -> io::Result<()> {
    try_encode_frame(out, |out| postcard::to_io(saved, out).map(drop)).map_err(invalid)
}

/// Appends `operations` to `out` as frames; where each will be in a file that holds `at`
/// bytes before `out`.
fn encode_all(out: &mut Vec<u8>, operations: &[Saved], at: u64) -> io::Result<Vec<Place>> {
    let mut places = Vec::with_capacity(operations.len());
    for saved in operations {
        let start = out.len();
        encode_saved(out, saved)?;
        places.push(Place {
            offset: at + start as u64,
            len: u32::try_from(out.len() - start).map_err(invalid)?,
        });
    }
    Ok(places)
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
    ///
    /// # Errors
    /// If an entry not in memory cannot be read back.
    pub fn entries_blocking(
        &self,
        indexes: std::ops::RangeInclusive<u64>,
    ) -> io::Result<Vec<EntryOf<ShardRaft>>> {
        let found = self.inner.blocking_lock().find(indexes)?;
        found.read()
    }
}

impl RaftLogReader<ShardRaft> for ShardLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<ShardRaft>>, io::Error> {
        let found = self.inner.lock().await.find(range)?;
        if found.in_memory() {
            found.read()
        } else {
            // Frames no longer in memory may no longer be in the page cache either: read on a
            // blocking thread.
            blocking(move || found.read()).await
        }
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
            .map(|stored| stored.log_id)
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
        if let Ok(places) = &written {
            let (added, removed) = inner.insert(entries, places);
            if added >= removed {
                self.held.add(added - removed);
            } else {
                self.held.sub(removed - added);
            }
        }
        // Both the callback and the caller are told of a failure; `io::Error` does not clone.
        let reported = match &written {
            Ok(_) => Ok(()),
            Err(error) => Err(io::Error::new(error.kind(), error.to_string())),
        };
        callback.io_completed(reported);
        written.map(drop)
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
        let removed = inner.remove_from(from);
        self.held.sub(removed);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<ShardRaft>) -> Result<(), io::Error> {
        let mut inner = self.inner.lock().await;
        inner.write(&[Saved::Purge(log_id)], false).await?;
        let purged = inner.remove_through(log_id.index());
        self.held.sub(purged);
        inner.last_purged = Some(log_id);
        if let Some(live) = inner.due_rewrite(self.held_bytes())? {
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
