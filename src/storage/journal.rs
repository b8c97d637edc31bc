//! The journal: records appended in memory under the lock of what they change, written to the
//! log by whoever commits first, and synced to disk per the fsync policy.
//!
//! Invariants:
//! - Records enter `pending` in the order their changes were applied: a table appends while it
//!   holds its write lock, and the registry appends a `Drop` only after closing the table.
//! - `written` is the sequence number of the last record handed to the kernel; `synced` of
//!   the last on disk. `synced <= written <= appended` at all times.
//! - A commit returns only when its records are written (all policies: nothing acknowledged is
//!   lost if the process dies) and, under [`FsyncPolicy::Always`], synced.
//! - After a write error the journal is failed for good: commits fail, and tables refuse
//!   changes, so nothing more is acknowledged that the log does not hold.

use std::fs::File;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use super::record::Record;

/// When the log is synced to disk, with Redis's `appendfsync` meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// A write is acknowledged only once it is on disk. Writes that arrive while one sync runs
    /// share the next one (group commit).
    Always,
    /// The log is synced once a second: a power cut may lose about a second of writes, a
    /// process crash loses nothing (every acknowledged write has reached the kernel).
    EverySecond,
    /// The operating system syncs when it likes.
    No,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "always" => Ok(Self::Always),
            "everysec" => Ok(Self::EverySecond),
            "no" => Ok(Self::No),
            other => Err(format!("{other:?} is not always, everysec or no")),
        }
    }
}

/// Why the journal cannot take writes.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the log cannot be written: {0}")]
pub struct JournalError(pub String);

struct Pending {
    buffer: Vec<u8>,
    /// Sequence number of the last record in `buffer` (or written before it).
    last: u64,
}

/// The log file being appended to; `None` until recovery has settled which file that is.
#[derive(Default)]
struct Writer {
    file: Option<File>,
    /// A second handle on the same file, for syncing without holding the writer.
    sync_handle: Option<Arc<File>>,
}

/// The append-only log of every change, shared by the registry and every table.
pub struct Journal {
    pending: Mutex<Pending>,
    /// Sequence number of the last record appended; read without the lock by committers.
    appended: AtomicU64,
    writer: Mutex<Writer>,
    written: AtomicU64,
    synced: watch::Sender<u64>,
    /// Shared with the sync thread, which holds the journal itself only weakly: dropping the
    /// journal stops the thread.
    signal: Arc<SyncSignal>,
    policy: FsyncPolicy,
    /// Off while the log is replayed at start: replayed changes are already in it.
    recording: AtomicBool,
    failure: Mutex<Option<JournalError>>,
    failed: AtomicBool,
    /// Bytes in the current log file, for deciding when to compact.
    log_bytes: AtomicU64,
}

#[derive(Default)]
struct SyncState {
    wanted: bool,
    stopping: bool,
}

/// Wakes the sync thread: there is something to sync, or it should stop.
#[derive(Default)]
struct SyncSignal {
    state: Mutex<SyncState>,
    wake: Condvar,
}

impl SyncSignal {
    fn stop(&self) {
        self.state.lock().stopping = true;
        self.wake.notify_all();
    }
}

impl Journal {
    /// A journal with no log file yet, and its sync thread. Records are not kept until
    /// [`attach`](Self::attach) has given it a file and [`start_recording`](Self::start_recording)
    /// has been called: replaying the log at start must not log again.
    ///
    /// # Errors
    /// If the sync thread cannot start.
    pub fn new(policy: FsyncPolicy) -> std::io::Result<Arc<Self>> {
        let (synced, _) = watch::channel(0);
        let journal = Arc::new(Self {
            pending: Mutex::new(Pending {
                buffer: Vec::with_capacity(64 * 1024),
                last: 0,
            }),
            appended: AtomicU64::new(0),
            writer: Mutex::new(Writer::default()),
            written: AtomicU64::new(0),
            synced,
            signal: Arc::new(SyncSignal::default()),
            policy,
            recording: AtomicBool::new(false),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            log_bytes: AtomicU64::new(0),
        });
        let signal = Arc::clone(&journal.signal);
        let weak = Arc::downgrade(&journal);
        std::thread::Builder::new()
            .name("kv-log-sync".into())
            .spawn(move || sync_loop(&signal, &weak, policy))?;
        Ok(journal)
    }

    /// Appends from now on go to `file` (open for appending, `length` bytes long).
    ///
    /// # Errors
    /// If the file cannot be duplicated for syncing.
    pub fn attach(&self, file: File, length: u64) -> std::io::Result<()> {
        let sync_handle = Arc::new(file.try_clone()?);
        *self.writer.lock() = Writer {
            file: Some(file),
            sync_handle: Some(sync_handle),
        };
        self.log_bytes.store(length, Ordering::Relaxed);
        Ok(())
    }

    /// From now on, appended records are kept.
    pub fn start_recording(&self) {
        self.recording.store(true, Ordering::Release);
    }

    /// The fsync policy in force.
    #[must_use]
    pub fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    /// Whether a write has failed; then no change may be applied.
    #[must_use]
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Bytes in the current log file.
    #[must_use]
    pub fn log_bytes(&self) -> u64 {
        self.log_bytes.load(Ordering::Relaxed)
    }

    /// Adds `record` to the log. Call it while holding the lock that orders the change.
    pub fn append(&self, record: &Record<'_>) {
        if !self.recording.load(Ordering::Acquire) {
            return;
        }
        let mut pending = self.pending.lock();
        record.encode(&mut pending.buffer);
        pending.last += 1;
        self.appended.store(pending.last, Ordering::Release);
    }

    /// Waits until every record appended so far is written (and, under `always`, synced).
    ///
    /// # Errors
    /// If the log cannot be written.
    pub async fn commit(&self) -> Result<(), JournalError> {
        let target = self.appended.load(Ordering::Acquire);
        self.write_through(target)?;
        if self.policy == FsyncPolicy::Always {
            self.request_sync();
            let mut synced = self.synced.subscribe();
            let reached = synced.wait_for(|&synced| synced >= target || self.is_failed());
            if reached.await.is_err() || self.is_failed() {
                return Err(self.failure());
            }
        }
        Ok(())
    }

    /// Hands every record appended so far to the kernel, without waiting for a sync: what
    /// is then read back from the files includes them.
    ///
    /// # Errors
    /// If the log cannot be written.
    pub fn flush(&self) -> Result<(), JournalError> {
        self.write_through(self.appended.load(Ordering::Acquire))
    }

    /// Hands every pending record up to at least `target` to the kernel. Whoever holds the
    /// writer writes for everyone waiting: concurrent committers share one `write`.
    fn write_through(&self, target: u64) -> Result<(), JournalError> {
        if self.is_failed() {
            return Err(self.failure());
        }
        if self.written.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let mut writer = self.writer.lock();
        if self.written.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let (buffer, last) = {
            let mut pending = self.pending.lock();
            let buffer = std::mem::replace(&mut pending.buffer, Vec::with_capacity(64 * 1024));
            (buffer, pending.last)
        };
        let Some(file) = writer.file.as_mut() else {
            return Err(self.fail(&std::io::Error::other("no log file attached")));
        };
        if let Err(error) = file.write_all(&buffer) {
            return Err(self.fail(&error));
        }
        self.log_bytes
            .fetch_add(buffer.len() as u64, Ordering::Relaxed);
        self.written.store(last, Ordering::Release);
        Ok(())
    }

    fn request_sync(&self) {
        self.signal.state.lock().wanted = true;
        self.signal.wake.notify_one();
    }

    fn fail(&self, error: &std::io::Error) -> JournalError {
        let failure = JournalError(error.to_string());
        tracing::error!(%error, "writing the log failed; refusing all writes from now on");
        *self.failure.lock() = Some(failure.clone());
        self.failed.store(true, Ordering::Release);
        // Wake committers waiting for a sync that will not come.
        self.synced.send_modify(|_| {});
        failure
    }

    fn failure(&self) -> JournalError {
        self.failure
            .lock()
            .clone()
            .unwrap_or_else(|| JournalError("the log has failed".into()))
    }

    /// Syncs what has been written so far and publishes it.
    fn sync_written(&self) {
        let target = self.written.load(Ordering::Acquire);
        if target <= *self.synced.borrow() {
            return;
        }
        let Some(handle) = self.writer.lock().sync_handle.clone() else {
            return;
        };
        match handle.sync_data() {
            Ok(()) => {
                self.synced
                    .send_modify(|synced| *synced = (*synced).max(target));
            }
            Err(error) => {
                self.fail(&error);
            }
        }
    }

    /// Makes the current log `file` (empty, already created and its directory synced) the one
    /// appended to, after writing and syncing everything pending into the old one. Blocks.
    ///
    /// # Errors
    /// If writing or syncing the old log fails.
    pub fn rotate(&self, file: File) -> Result<(), JournalError> {
        let sync_handle = Arc::new(file.try_clone().map_err(|error| self.fail(&error))?);
        let mut writer = self.writer.lock();
        let (buffer, last) = {
            let mut pending = self.pending.lock();
            (std::mem::take(&mut pending.buffer), pending.last)
        };
        if let Some(old) = writer.file.as_mut() {
            old.write_all(&buffer)
                .and_then(|()| old.sync_data())
                .map_err(|error| self.fail(&error))?;
        }
        self.written.store(last, Ordering::Release);
        self.synced
            .send_modify(|synced| *synced = (*synced).max(last));
        *writer = Writer {
            file: Some(file),
            sync_handle: Some(sync_handle),
        };
        self.log_bytes.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Writes and syncs everything, then stops the sync thread. For a clean shutdown.
    ///
    /// # Errors
    /// If the last write or sync fails.
    pub fn close(&self) -> Result<(), JournalError> {
        let target = self.appended.load(Ordering::Acquire);
        let result = self.write_through(target).and_then(|()| {
            match self.writer.lock().sync_handle.clone() {
                Some(handle) => handle.sync_data().map_err(|error| self.fail(&error)),
                None => Ok(()),
            }
        });
        self.signal.stop();
        result
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.signal.stop();
    }
}

/// The sync thread: under `always`, syncs whenever asked (the requests that pile up during
/// one sync are served by the next); under `everysec`, once a second; under `no`, never.
fn sync_loop(signal: &SyncSignal, journal: &Weak<Journal>, policy: FsyncPolicy) {
    loop {
        {
            let mut state = signal.state.lock();
            match policy {
                FsyncPolicy::Always => {
                    while !state.wanted && !state.stopping {
                        signal.wake.wait(&mut state);
                    }
                }
                FsyncPolicy::EverySecond => {
                    if !state.stopping {
                        signal.wake.wait_for(&mut state, Duration::from_secs(1));
                    }
                }
                FsyncPolicy::No => {
                    while !state.stopping {
                        signal.wake.wait(&mut state);
                    }
                }
            }
            if state.stopping {
                return;
            }
            state.wanted = false;
        }
        let Some(journal) = journal.upgrade() else {
            return;
        };
        journal.sync_written();
    }
}
