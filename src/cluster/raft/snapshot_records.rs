//! Where a snapshot build puts the records it copies: in memory on a machine without a
//! directory, else in a file as they are made, so that building a shard's snapshot does not
//! hold a second copy of the shard in memory (it doubled what a node held at its peak).
//!
//! A snapshot's records, once received or read from its file, are `Bytes` mapped from the file
//! rather than read into memory: a snapshot may be gigabytes, and what reads it (a replica
//! sent it a piece at a time, a crashed bucket restarted from it) needs a page at a time,
//! which the page cache holds and gives back under memory pressure.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use super::ShardCommand;
use super::state_machine::SnapshotBytes;
use crate::bucket::{BucketError, BucketHandle};
use crate::change::Change;
use crate::shard::wal::record;

/// The records a build gathers before writing them out to its file.
const WRITE_AT: usize = 1 << 20;

/// A snapshot's records as a build copies them.
pub(super) struct Records {
    /// What was copied and is not yet in `file` (everything, without one).
    buffer: Vec<u8>,
    file: Option<RecordsFile>,
}

/// The file a build's records are written to.
struct RecordsFile {
    file: File,
    /// The bytes of records in `file`; past them, what a rewind left, written over next.
    written: u64,
}

impl Records {
    /// Records gathered in memory, starting with room for `expected` bytes.
    pub(super) fn in_memory(expected: usize) -> Self {
        Self {
            buffer: Vec::with_capacity(expected),
            file: None,
        }
    }

    /// Records written to a file in `directory` that has no name there (`O_TMPFILE`, or
    /// removed at once where the system lacks it), so that a crash or a failed build leaves
    /// nothing behind.
    ///
    /// # Errors
    /// If the file cannot be made.
    pub(super) fn in_file(directory: &Path) -> io::Result<Self> {
        Ok(Self {
            buffer: Vec::with_capacity(WRITE_AT + (64 << 10)),
            file: Some(RecordsFile {
                file: tempfile::tempfile_in(directory)?,
                written: 0,
            }),
        })
    }

    /// Where the records end so far, to [`rewind`](Self::rewind) to.
    pub(super) fn len(&self) -> u64 {
        self.file.as_ref().map_or(0, |file| file.written) + self.buffer.len() as u64
    }

    /// Drops the records after `mark` (a [`len`](Self::len) taken earlier).
    pub(super) fn rewind(&mut self, mark: u64) {
        match &mut self.file {
            Some(file) if mark < file.written => {
                file.written = mark;
                self.buffer.clear();
            }
            file => {
                let in_file = file.as_ref().map_or(0, |file| file.written);
                self.buffer.truncate((mark - in_file) as usize);
            }
        }
    }

    /// Appends `bucket`'s `Create` and `Put` records, a page at a time; how many.
    ///
    /// # Errors
    /// [`CopyError::Ended`] if the bucket ended while it was copied (what it added stays, to
    /// be rewound); [`CopyError::Io`] if the records could not be written.
    pub(super) fn append_bucket(&mut self, bucket: &BucketHandle) -> Result<u64, CopyError> {
        record::encode(
            &Change::Create {
                bucket: bucket.name().as_bytes(),
            },
            &mut self.buffer,
        );
        let file = &mut self.file;
        let puts = crate::shard::export(bucket, &mut self.buffer, |buffer| {
            write_out_if_full(file, buffer).map_err(CopyError::Io)
        })?;
        Ok(1 + puts)
    }

    /// Appends the changes of `entries` as records; how many.
    ///
    /// # Errors
    /// If the records cannot be written to their file.
    pub(super) fn append_changes(&mut self, entries: &[ShardCommand]) -> io::Result<u64> {
        let mut records = 0;
        for command in entries {
            for change in command.changes().flatten() {
                record::encode(&change, &mut self.buffer);
                records += 1;
            }
            write_out_if_full(&mut self.file, &mut self.buffer)?;
        }
        Ok(records)
    }

    /// The records, whole: in memory, or in the file once everything is written.
    ///
    /// # Errors
    /// If writing fails.
    pub(super) fn finish(self) -> io::Result<Made> {
        let Some(mut file) = self.file else {
            return Ok(Made::Bytes(SnapshotBytes::from(self.buffer)));
        };
        file.write(&self.buffer)?;
        file.file.set_len(file.written)?;
        Ok(Made::File(file.file, file.written))
    }
}

/// A snapshot's records as they are made: built or received.
pub(super) enum Made {
    /// In memory, or mapped from a file.
    Bytes(SnapshotBytes),
    /// In a build's records file (which has no name), this many bytes from its start. Never
    /// mapped: the last hold on a file without a name frees its blocks when it goes, which
    /// must happen on a blocking thread (see [`release`]).
    File(File, u64),
}

impl Made {
    /// How many bytes the records take.
    pub(super) fn len(&self) -> u64 {
        match self {
            Self::Bytes(bytes) => bytes.len() as u64,
            Self::File(_, len) => *len,
        }
    }
}

/// Why copying a bucket stopped.
pub(super) enum CopyError {
    /// The bucket ended while it was copied.
    Ended,
    /// The records could not be written.
    Io(io::Error),
}

impl From<BucketError> for CopyError {
    fn from(_: BucketError) -> Self {
        Self::Ended
    }
}

/// Writes out what `buffer` holds to `file`, if there is one, once it is large enough.
fn write_out_if_full(file: &mut Option<RecordsFile>, buffer: &mut Vec<u8>) -> io::Result<()> {
    match file {
        Some(file) if buffer.len() >= WRITE_AT => {
            file.write(buffer)?;
            buffer.clear();
            Ok(())
        }
        _ => Ok(()),
    }
}

impl RecordsFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, self.written)?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Lets go of `held` on a blocking thread when there is a runtime. It may be the last hold on
/// a file that has no name any more (a build's records, a received snapshot, a snapshot file
/// replaced since it was mapped), and letting go then frees the file's blocks: for a large
/// file, tens to hundreds of milliseconds in the system (more with online discard), during
/// which a runtime worker would serve no client and send no heartbeat.
pub fn release<T: Send + 'static>(held: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(held))),
        Err(_) => drop(held),
    }
}

/// The whole of `file`, mapped.
///
/// # Errors
/// If its length cannot be had or the mapping fails.
pub fn map(file: &File) -> io::Result<SnapshotBytes> {
    if file.metadata()?.len() == 0 {
        // An empty mapping is refused by the system.
        return Ok(SnapshotBytes::new());
    }
    // SAFETY: a mapped file must not change while it is mapped. Snapshot files are written
    // whole and then only read: a received snapshot's file is mapped once its last piece is
    // written, with no write of it under way and none to come (`SnapshotInbox::complete`);
    // `snapshot.kv` is written under a temporary name and renamed into place, so a newer
    // snapshot replaces the name, never the bytes of a file someone maps (a mapping keeps the
    // file it was made of). A build's records file is never mapped. Nothing else writes to a
    // node's data directory.
    #[allow(unsafe_code)]
    let mapped = unsafe { memmap2::Mmap::map(file)? };
    Ok(SnapshotBytes::from_owner(mapped))
}

#[cfg(test)]
mod tests {
    use super::release;

    /// Noted where it is let go of.
    struct Noted(std::sync::mpsc::Sender<std::thread::ThreadId>);

    impl Drop for Noted {
        fn drop(&mut self) {
            let _ = self.0.send(std::thread::current().id());
        }
    }

    #[tokio::test]
    async fn what_is_released_on_a_runtime_is_let_go_of_on_another_thread() {
        let (noted, dropped_on) = std::sync::mpsc::channel();
        release(Noted(noted));
        let dropped_on = tokio::task::spawn_blocking(move || dropped_on.recv().unwrap())
            .await
            .unwrap();
        assert_ne!(dropped_on, std::thread::current().id());
    }

    #[test]
    fn what_is_released_without_a_runtime_is_let_go_of_at_once() {
        let (noted, dropped_on) = std::sync::mpsc::channel();
        release(Noted(noted));
        assert_eq!(dropped_on.try_recv(), Ok(std::thread::current().id()));
    }
}
