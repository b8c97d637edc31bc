//! The journal: records appended in memory under the lock of what they change, written to the
//! log by whoever commits first, and synced to disk per the fsync policy.
//!
//! Under `always`, commits form rounds, as one pass of Redis's event loop does: the first
//! committer leads, lets every ready connection append its changes, writes them all, and syncs
//! them with one `fdatasync` on its own thread. Syncing on a separate thread was measured
//! slower here: each of its syncs covered only the ~20 changes that arrived during the previous
//! one (against ~95 per round), and the wake-ups to and from it cost more than they saved. The
//! price is Redis's too: while a round syncs, other connections on that worker thread wait.
//! Under `everysec` a background thread syncs once a second.
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

use super::error::LogFailed;
use super::record;
use crate::change::{Change, ChangeLog, Refusal};
use crate::config::FsyncPolicy;

/// Most yields a round leader makes to gather changes before it writes and syncs.
const MAX_ROUND_PASSES: usize = 16;

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
    /// The buffer last written, emptied, to become the next pending buffer: commits swap two
    /// buffers instead of allocating one each time.
    spare: Vec<u8>,
}

/// A spare buffer larger than this (after a burst) is dropped rather than kept.
const MAX_SPARE: usize = 1 << 20;

/// The append-only log of every change, shared by the registry and every table.
pub struct Journal {
    pending: Mutex<Pending>,
    /// Sequence number of the last record appended; read without the lock by committers.
    appended: AtomicU64,
    writer: Mutex<Writer>,
    written: AtomicU64,
    synced: watch::Sender<u64>,
    /// Shared with the `everysec` sync thread, which holds the journal itself only weakly:
    /// dropping the journal stops the thread.
    signal: Arc<SyncSignal>,
    /// Under `always`, a committer is gathering a round of changes to write and sync.
    round_leader: AtomicBool,
    policy: FsyncPolicy,
    /// Off while the log is replayed at start: replayed changes are already in it.
    recording: AtomicBool,
    failure: Mutex<Option<LogFailed>>,
    failed: AtomicBool,
    /// Bytes in the current log file, for deciding when to compact.
    log_bytes: AtomicU64,
    /// Syncs done since start, for `INFO`.
    syncs: AtomicU64,
    /// Microseconds those syncs took, for metrics.
    sync_micros: AtomicU64,
    /// Fault injection: the next write fails as a full disk would make it.
    fail_next_write: AtomicBool,
}

/// Stops the `everysec` sync thread early instead of at its next tick.
#[derive(Default)]
struct SyncSignal {
    stopping: Mutex<bool>,
    wake: Condvar,
}

impl SyncSignal {
    fn stop(&self) {
        *self.stopping.lock() = true;
        self.wake.notify_all();
    }
}

impl Journal {
    /// A journal with no log file yet (and, under `everysec`, its sync thread). Records are
    /// not kept until [`attach`](Self::attach) has given it a file and
    /// [`start_recording`](Self::start_recording) has been called: replaying the log at start
    /// must not log again.
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
            round_leader: AtomicBool::new(false),
            policy,
            recording: AtomicBool::new(false),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            log_bytes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            sync_micros: AtomicU64::new(0),
            fail_next_write: AtomicBool::new(false),
        });
        if policy == FsyncPolicy::EverySecond {
            let signal = Arc::clone(&journal.signal);
            let weak = Arc::downgrade(&journal);
            std::thread::Builder::new()
                .name("kv-log-sync".into())
                .spawn(move || sync_loop(&signal, &weak))?;
        }
        Ok(journal)
    }

    /// Appends from now on go to `file` (open for appending, `length` bytes long).
    ///
    /// # Errors
    /// If the file cannot be duplicated for syncing.
    pub fn attach(&self, file: File, length: u64) -> std::io::Result<()> {
        let sync_handle = Arc::new(file.try_clone()?);
        let mut writer = self.writer.lock();
        writer.file = Some(file);
        writer.sync_handle = Some(sync_handle);
        self.log_bytes.store(length, Ordering::Relaxed);
        Ok(())
    }

    /// Makes the next write of the log fail as a full disk would make it: for fault tests of
    /// what the server does when it cannot log (the journal fails for good).
    pub fn inject_write_failure(&self) {
        self.fail_next_write.store(true, Ordering::Release);
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

    /// Syncs of the log to disk since start.
    #[must_use]
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Time those syncs took, in all.
    pub fn sync_time(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.sync_micros.load(Ordering::Relaxed))
    }

    /// Bytes in the current log file.
    #[must_use]
    pub fn log_bytes(&self) -> u64 {
        self.log_bytes.load(Ordering::Relaxed)
    }

    /// Adds `change` to the log. Call it while holding the lock that orders the change.
    pub fn append(&self, change: &Change<'_>) {
        if !self.recording.load(Ordering::Acquire) {
            return;
        }
        let mut pending = self.pending.lock();
        record::encode(change, &mut pending.buffer);
        pending.last += 1;
        self.appended.store(pending.last, Ordering::Release);
    }

    /// Waits until every record appended so far is written (and, under `always`, synced).
    ///
    /// # Errors
    /// If the log cannot be written.
    pub async fn commit(&self) -> Result<(), LogFailed> {
        let target = self.appended.load(Ordering::Acquire);
        if self.policy != FsyncPolicy::Always {
            return self.write_through(target);
        }
        let mut synced = self.synced.subscribe();
        loop {
            if self.is_failed() {
                return Err(self.failure());
            }
            if *synced.borrow_and_update() >= target {
                return Ok(());
            }
            if self
                .round_leader
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // Released however the round ends, dropped at a yield included: a flag left
                // set would leave every later commit waiting for a round nobody leads.
                let _leading = Leadership(&self.round_leader);
                self.lead_round().await?;
            }
            // Woken by the sync that covers this round; a change appended after the round
            // closed finds the leadership free on the next pass and leads a round of its own.
            if synced.changed().await.is_err() {
                return Err(self.failure());
            }
        }
    }

    /// Under `always`: lets every connection that is ready append its changes first, yielding
    /// until a pass adds nothing (each yield lets the runtime poll for newly readable clients,
    /// as one pass of Redis's event loop takes in every ready client), then writes them all and
    /// syncs them. Syncing as soon as the first change arrives would cover only the few that
    /// came in during the previous sync, and every sync costs far more than a write.
    async fn lead_round(&self) -> Result<(), LogFailed> {
        // Bounded: under a constant stream of changes a round must still close.
        for _ in 0..MAX_ROUND_PASSES {
            let before = self.appended.load(Ordering::Acquire);
            tokio::task::yield_now().await;
            if self.appended.load(Ordering::Acquire) == before {
                break;
            }
        }
        self.write_through(self.appended.load(Ordering::Acquire))?;
        self.sync_written();
        if self.is_failed() {
            return Err(self.failure());
        }
        Ok(())
    }

    /// Hands every record appended so far to the kernel, without waiting for a sync: what
    /// is then read back from the files includes them.
    ///
    /// # Errors
    /// If the log cannot be written.
    pub fn flush(&self) -> Result<(), LogFailed> {
        self.write_through(self.appended.load(Ordering::Acquire))
    }

    /// Hands every pending record up to at least `target` to the kernel. Whoever holds the
    /// writer writes for everyone waiting: concurrent committers share one `write`.
    fn write_through(&self, target: u64) -> Result<(), LogFailed> {
        // Checked before the failure: after a failure, what was written stays written (and
        // once the unwritten is discarded, reads find nothing unlogged to wait for).
        if self.written.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        if self.is_failed() {
            return Err(self.failure());
        }
        let mut writer = self.writer.lock();
        if self.written.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        self.write_pending(&mut writer)
    }

    /// Writes everything pending to the current file. The caller holds the writer.
    fn write_pending(&self, writer: &mut Writer) -> Result<(), LogFailed> {
        let (mut buffer, last) = {
            let mut pending = self.pending.lock();
            let spare = std::mem::take(&mut writer.spare);
            (std::mem::replace(&mut pending.buffer, spare), pending.last)
        };
        if !buffer.is_empty() {
            let Some(file) = writer.file.as_mut() else {
                return Err(self.fail(std::io::Error::other("no log file attached")));
            };
            if self.fail_next_write.swap(false, Ordering::AcqRel) {
                return Err(self.fail(std::io::Error::from(std::io::ErrorKind::StorageFull)));
            }
            if let Err(error) = file.write_all(&buffer) {
                return Err(self.fail(error));
            }
            self.log_bytes
                .fetch_add(buffer.len() as u64, Ordering::Relaxed);
        }
        self.written.store(last, Ordering::Release);
        if buffer.capacity() <= MAX_SPARE {
            buffer.clear();
            writer.spare = buffer;
        }
        Ok(())
    }

    fn fail(&self, error: std::io::Error) -> LogFailed {
        let failure = LogFailed::new(error);
        tracing::error!(error = %failure, "writing the log failed; refusing all writes from now on");
        *self.failure.lock() = Some(failure.clone());
        self.failed.store(true, Ordering::Release);
        // Wake committers waiting for a sync that will not come.
        self.synced.send_modify(|_| {});
        failure
    }

    fn failure(&self) -> LogFailed {
        self.failure
            .lock()
            .clone()
            .unwrap_or_else(|| LogFailed::new(std::io::Error::other("the log has failed")))
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
        let started = std::time::Instant::now();
        match handle.sync_data() {
            Ok(()) => {
                self.syncs.fetch_add(1, Ordering::Relaxed);
                let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                self.sync_micros.fetch_add(took, Ordering::Relaxed);
                self.synced
                    .send_modify(|synced| *synced = (*synced).max(target));
            }
            Err(error) => {
                self.fail(error);
            }
        }
    }

    /// After a failed write, once the store has been rebuilt from the files: forgets the
    /// records that never reached them. From then on everything appended is written, so
    /// [`flush`](Self::flush) (what a reply that read the store waits for) succeeds again;
    /// changes stay refused.
    pub fn discard_unwritten(&self) {
        let _no_write_in_flight = self.writer.lock();
        let mut pending = self.pending.lock();
        let written = self.written.load(Ordering::Acquire);
        pending.buffer.clear();
        pending.last = written;
        self.appended.store(written, Ordering::Release);
    }

    /// Waits until a write of the log has failed.
    pub async fn failed(&self) {
        let mut synced = self.synced.subscribe();
        while !self.is_failed() {
            if synced.changed().await.is_err() {
                return;
            }
        }
    }

    /// Makes the current log `file` (empty, already created and its directory synced) the one
    /// appended to, after writing and syncing everything pending into the old one. Blocks.
    ///
    /// # Errors
    /// If writing or syncing the old log fails.
    pub fn rotate(&self, file: File) -> Result<(), LogFailed> {
        let sync_handle = Arc::new(file.try_clone().map_err(|error| self.fail(error))?);
        let mut writer = self.writer.lock();
        self.write_pending(&mut writer)?;
        if let Some(old) = writer.file.as_ref() {
            old.sync_data().map_err(|error| self.fail(error))?;
        }
        let last = self.written.load(Ordering::Acquire);
        self.synced
            .send_modify(|synced| *synced = (*synced).max(last));
        writer.file = Some(file);
        writer.sync_handle = Some(sync_handle);
        self.log_bytes.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Writes and syncs everything, then stops the sync thread, if any. For a clean shutdown.
    ///
    /// # Errors
    /// If the last write or sync fails, or a write failed earlier: then changes were refused
    /// while the server ran, and the stop is not a clean one.
    pub fn close(&self) -> Result<(), LogFailed> {
        let target = self.appended.load(Ordering::Acquire);
        let result = self.write_through(target).and_then(|()| {
            match self.writer.lock().sync_handle.clone() {
                Some(handle) => handle.sync_data().map_err(|error| self.fail(error)),
                None => Ok(()),
            }
        });
        self.signal.stop();
        match result {
            Ok(()) if self.is_failed() => Err(self.failure()),
            result => result,
        }
    }
}

impl ChangeLog for Journal {
    fn admit(&self, change: &Change<'_>) -> Result<(), Refusal> {
        if self.is_failed() {
            return Err(Refusal::LogFailed);
        }
        let size = record::size(change);
        if size > record::MAX_CHANGE_LEN {
            return Err(Refusal::TooLarge {
                size,
                limit: record::MAX_CHANGE_LEN,
            });
        }
        Ok(())
    }

    fn record(&self, change: &Change<'_>) {
        self.append(change);
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.signal.stop();
    }
}

/// Holds the round leadership under `always`; gives it up when dropped.
struct Leadership<'a>(&'a AtomicBool);

impl Drop for Leadership<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The `everysec` sync thread: syncs what has been written once a second, until stopped or
/// the journal is gone.
fn sync_loop(signal: &SyncSignal, journal: &Weak<Journal>) {
    loop {
        {
            let mut stopping = signal.stopping.lock();
            if !*stopping {
                signal.wake.wait_for(&mut stopping, Duration::from_secs(1));
            }
            if *stopping {
                return;
            }
        }
        let Some(journal) = journal.upgrade() else {
            return;
        };
        journal.sync_written();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn journal(policy: FsyncPolicy) -> (Arc<Journal>, tempfile::TempDir) {
        let directory = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(directory.path().join("log"))
            .unwrap();
        let journal = Journal::new(policy).unwrap();
        journal.attach(file, 0).unwrap();
        journal.start_recording();
        (journal, directory)
    }

    #[tokio::test]
    async fn a_round_leader_dropped_mid_round_leaves_no_one_waiting_for_it() {
        let (journal, _directory) = journal(FsyncPolicy::Always);
        journal.append(&Change::Create { bucket: b"a" });
        // Polled once: it takes the leadership and yields to gather the round; then dropped.
        let mut abandoned = Box::pin(journal.commit());
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(
            std::future::Future::poll(abandoned.as_mut(), &mut context).is_pending(),
            "the round had not closed yet"
        );
        assert!(
            journal.round_leader.load(Ordering::Acquire),
            "it was leading"
        );
        drop(abandoned);

        journal.append(&Change::Create { bucket: b"b" });
        tokio::time::timeout(Duration::from_secs(10), journal.commit())
            .await
            .expect("a later commit leads its own round")
            .unwrap();
        assert_eq!(*journal.synced.borrow(), 2);
    }

    #[tokio::test]
    async fn commits_write_everything_appended_and_reuse_their_buffer() {
        let (journal, directory) = journal(FsyncPolicy::No);
        for round in 0..3u8 {
            journal.append(&Change::Put {
                bucket: b"b",
                key: &[round],
                value: b"v",
            });
            journal.commit().await.unwrap();
        }
        let written = std::fs::read(directory.path().join("log")).unwrap();
        let mut records = 0;
        record::scan(&written, |_, _| {
            records += 1;
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(records, 3);
        assert_eq!(journal.log_bytes(), written.len() as u64);
        assert!(
            journal.writer.lock().spare.capacity() > 0,
            "the written buffer came back"
        );
    }
}
