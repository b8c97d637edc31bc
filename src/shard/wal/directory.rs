//! The data directory: its lock, its files, recovery from them, and the file steps of
//! compaction.
//!
//! Files, with `G` a generation number:
//! - `LOCK`: held (`flock`) by the one server using the directory.
//! - `snapshot-G.kv`: the whole state when generation `G` began, as `Create` and `Put` records.
//!   Written to `snapshot-G.kv.tmp`, synced, then renamed: a snapshot file is always whole.
//! - `log-G.kv`: every change since generation `G` began.
//!
//! The state is the newest snapshot `S` (none: empty) replayed with every log of generation
//! `S` or later, in order. Compaction starts log `G+1` first, then writes snapshot `G+1`, and
//! only then removes generation `G`'s files; a crash at any point leaves a set of files that
//! replays to every acknowledged write.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use super::error::{ReplayError, WalError};
use super::record::{ScanEnd, scan};
use crate::change::Change;

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What recovery found and where appending goes on.
pub struct Recovered {
    /// The current generation.
    pub generation: u64,
    /// The current log, open for appending at its end.
    pub log: File,
    /// Its length.
    pub log_len: u64,
    /// Records replayed.
    pub records: u64,
}

/// A locked data directory.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Snapshot,
    Log,
}

/// A file of the directory: its kind and generation.
type FileId = (Kind, u64);

impl DataDir {
    /// Creates `path` if needed and takes its lock.
    ///
    /// # Errors
    /// [`WalError::Locked`] if another server uses it; I/O errors.
    pub fn open(path: &Path) -> Result<Self, WalError> {
        fs::create_dir_all(path).map_err(io_error(path))?;
        let lock_path = path.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(WalError::Locked(path.into())),
            Err(fs::TryLockError::Error(error)) => return Err(io_error(&lock_path)(error)),
        }
        Ok(Self {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self, kind: Kind, generation: u64) -> PathBuf {
        let prefix = match kind {
            Kind::Snapshot => "snapshot",
            Kind::Log => "log",
        };
        self.path.join(format!("{prefix}-{generation:020}.kv"))
    }

    /// Every snapshot and log, by kind and generation. Temporary files (a snapshot being
    /// written) are not listed.
    fn files(&self) -> Result<Vec<(Kind, u64)>, WalError> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(io_error(&self.path))? {
            let entry = entry.map_err(io_error(&self.path))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let parsed = name
                .strip_suffix(".kv")
                .and_then(|stem| stem.split_once('-'))
                .and_then(|(kind, generation)| {
                    let kind = match kind {
                        "snapshot" => Kind::Snapshot,
                        "log" => Kind::Log,
                        _ => return None,
                    };
                    Some((kind, generation.parse().ok()?))
                });
            if let Some(file) = parsed {
                files.push(file);
            }
        }
        Ok(files)
    }

    /// Removes snapshots whose writing a crash interrupted: never renamed, never used. Only at
    /// start, when no compaction can be writing one.
    fn remove_temporaries(&self) -> Result<(), WalError> {
        for entry in fs::read_dir(&self.path).map_err(io_error(&self.path))? {
            let path = entry.map_err(io_error(&self.path))?.path();
            if path.to_string_lossy().ends_with(".kv.tmp") {
                fs::remove_file(&path).map_err(io_error(&path))?;
            }
        }
        Ok(())
    }

    /// The files the state is made of, in replay order (the newest snapshot, then every log
    /// from its generation on), and the older files a finished compaction left behind.
    fn state_files(&self) -> Result<(Vec<FileId>, Vec<FileId>), WalError> {
        let files = self.files()?;
        let snapshot = files
            .iter()
            .filter(|(kind, _)| *kind == Kind::Snapshot)
            .map(|&(_, generation)| generation)
            .max();
        let base = snapshot.unwrap_or(0);
        let (mut replay, older): (Vec<_>, Vec<_>) = files
            .into_iter()
            .filter(|&(kind, generation)| {
                kind == Kind::Log || Some(generation) == snapshot || generation < base
            })
            .partition(|&(_, generation)| generation >= base);
        replay.sort_by_key(|&(kind, generation)| (generation, kind));
        Ok((replay, older))
    }

    /// Replays the directory's state through `apply`, cutting off a torn end of the last log
    /// (with a warning). With `truncate_corrupt`, a corrupt record is cut off too, with every
    /// later file; without it, corruption is an error naming the file and offset.
    ///
    /// # Errors
    /// [`WalError::Corrupt`], a failed `apply`, or I/O errors.
    pub fn recover(
        &self,
        truncate_corrupt: bool,
        apply: &mut dyn FnMut(Change<'_>) -> Result<(), ReplayError>,
    ) -> Result<Recovered, WalError> {
        self.remove_temporaries()?;
        let (mut replay, older) = self.state_files()?;
        // Files older than the newest snapshot belong to a compaction that finished.
        for (kind, generation) in older {
            let path = self.file(kind, generation);
            fs::remove_file(&path).map_err(io_error(&path))?;
        }
        let base = replay.first().map_or(0, |&(_, generation)| generation);
        let last_log = replay.iter().rposition(|&(kind, _)| kind == Kind::Log);
        let mut records = 0u64;
        let mut stop_after = None;
        for (position, &(kind, generation)) in replay.iter().enumerate() {
            let path = self.file(kind, generation);
            let bytes = fs::read(&path).map_err(io_error(&path))?;
            let mut failure = None;
            let end = scan(&bytes, |record, offset| {
                apply(record).map_err(|source| {
                    failure = Some(WalError::Replay {
                        file: path.clone(),
                        offset,
                        source,
                    });
                })?;
                records += 1;
                Ok::<(), ()>(())
            });
            if end.is_err() {
                return Err(failure.expect("a failed apply leaves its error"));
            }
            let (offset, reason) =
                match judge(end.unwrap_or(ScanEnd::Clean), Some(position) == last_log) {
                    Ok(None) => continue,
                    Ok(Some((offset, tail))) => {
                        tracing::warn!(
                            file = %path.display(),
                            offset,
                            cut = bytes.len() as u64 - offset,
                            tail,
                            "the log ends in a torn write (no whole record after this offset); \
                             cutting it off"
                        );
                        truncate(&path, offset)?;
                        continue;
                    }
                    Err(damage) => damage,
                };
            if !truncate_corrupt {
                return Err(WalError::Corrupt {
                    file: path,
                    offset,
                    reason,
                });
            }
            tracing::warn!(
                file = %path.display(),
                offset,
                reason,
                "corrupt record: cutting the log there as asked, losing what follows"
            );
            truncate(&path, offset)?;
            stop_after = Some(position);
            break;
        }
        if let Some(position) = stop_after {
            for &(kind, generation) in &replay[position + 1..] {
                let path = self.file(kind, generation);
                fs::remove_file(&path).map_err(io_error(&path))?;
            }
            replay.truncate(position + 1);
        }
        let generation = replay
            .iter()
            .filter(|(kind, _)| *kind == Kind::Log)
            .map(|&(_, generation)| generation)
            .max()
            .unwrap_or(base);
        let path = self.file(Kind::Log, generation);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        let log_len = log.metadata().map_err(io_error(&path))?.len();
        self.sync_directory()?;
        Ok(Recovered {
            generation,
            log,
            log_len,
            records,
        })
    }

    /// Calls `visit` with every record of the current state's files, in order, changing
    /// nothing: for reading buckets back while the server runs. With `before`, only the files
    /// of earlier generations (the state as it was when generation `before` began). A partial
    /// record at the very end (being appended right now) ends the read.
    ///
    /// # Errors
    /// [`WalError::Corrupt`] or I/O errors.
    pub fn read_state(
        &self,
        before: Option<u64>,
        visit: &mut dyn FnMut(Change<'_>),
    ) -> Result<(), WalError> {
        let (mut replay, _) = self.state_files()?;
        if let Some(before) = before {
            replay.retain(|&(_, generation)| generation < before);
        }
        let last = replay.len().saturating_sub(1);
        for (position, &(kind, generation)) in replay.iter().enumerate() {
            let path = self.file(kind, generation);
            let bytes = fs::read(&path).map_err(io_error(&path))?;
            let end = scan(&bytes, |record, _| {
                visit(record);
                Ok::<(), ()>(())
            })
            .unwrap_or(ScanEnd::Clean);
            // A torn end of the last file is a record being appended right now: the read
            // ends there.
            if let Err((offset, reason)) = judge(end, position == last) {
                return Err(WalError::Corrupt {
                    file: path,
                    offset,
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Creates the empty log of `generation` and makes its name durable.
    ///
    /// # Errors
    /// I/O errors, or if it exists already.
    pub fn create_log(&self, generation: u64) -> Result<File, WalError> {
        let path = self.file(Kind::Log, generation);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        self.sync_directory()?;
        Ok(file)
    }

    /// Writes the snapshot of `generation`: `write` fills it; it becomes visible only whole
    /// and synced.
    ///
    /// # Errors
    /// I/O errors, or whatever `write` returns.
    pub fn write_snapshot(
        &self,
        generation: u64,
        write: impl FnOnce(&mut dyn io::Write) -> io::Result<()>,
    ) -> Result<(), WalError> {
        let path = self.file(Kind::Snapshot, generation);
        let temporary = path.with_extension("kv.tmp");
        let file = File::create(&temporary).map_err(io_error(&temporary))?;
        let mut out = io::BufWriter::with_capacity(1 << 20, file);
        write(&mut out).map_err(io_error(&temporary))?;
        let file = out
            .into_inner()
            .map_err(|error| io_error(&temporary)(error.into_error()))?;
        file.sync_all().map_err(io_error(&temporary))?;
        fs::rename(&temporary, &path).map_err(io_error(&path))?;
        self.sync_directory()
    }

    /// Removes every file older than `generation`, once its snapshot is in place.
    ///
    /// # Errors
    /// I/O errors.
    pub fn remove_before(&self, generation: u64) -> Result<(), WalError> {
        for (kind, older) in self.files()? {
            if older < generation {
                let path = self.file(kind, older);
                fs::remove_file(&path).map_err(io_error(&path))?;
            }
        }
        self.sync_directory()
    }

    fn sync_directory(&self) -> Result<(), WalError> {
        File::open(&self.path)
            .and_then(|directory| directory.sync_all())
            .map_err(io_error(&self.path))
    }
}

/// Judges how a file ended: `Ok(None)` whole; `Ok(Some((offset, tail)))` torn at `offset`, which only
/// the last log may be (a crash mid-append; every earlier file was synced whole before the
/// next began); `Err((offset, reason))` damaged.
fn judge(end: ScanEnd, last_log: bool) -> Result<Option<(u64, &'static str)>, (u64, &'static str)> {
    match end {
        ScanEnd::Clean => Ok(None),
        ScanEnd::Torn { offset, reason } if last_log => Ok(Some((offset, reason))),
        ScanEnd::Torn { offset, .. } => Err((offset, "a file that was complete ends early")),
        ScanEnd::Corrupt { offset, reason } => Err((offset, reason)),
    }
}

fn truncate(path: &Path, length: u64) -> Result<(), WalError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error(path))?;
    file.set_len(length).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}
