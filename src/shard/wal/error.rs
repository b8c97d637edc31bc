//! Why the log could not be opened, recovered or written.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Why a change read back from the log could not be applied.
pub type ReplayError = Box<dyn std::error::Error + Send + Sync>;

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// Another server holds the directory's lock.
    #[error("data directory {0} is in use by another kv server (its LOCK file is held)")]
    Locked(PathBuf),
    /// A file is damaged in a way a crash cannot explain.
    #[error(
        "{file}: corrupt record at byte offset {offset} ({reason}); to start anyway, run with \
         --truncate-corrupt-log, which cuts the log there and loses everything after it"
    )]
    Corrupt {
        /// The damaged file.
        file: PathBuf,
        /// Where its first bad record starts.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A record could not be applied.
    #[error("{file} at byte offset {offset}: {source}")]
    Replay {
        /// The file.
        file: PathBuf,
        /// The record's offset.
        offset: u64,
        /// Why it could not be applied.
        source: ReplayError,
    },
    /// The log failed while the server ran.
    #[error(transparent)]
    Failed(#[from] LogFailed),
}

/// The log could not be written (or synced): from then on it takes no more changes. Shared by
/// every commit that was waiting, hence the `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the log cannot be written: {0}")]
pub struct LogFailed(pub Arc<io::Error>);

impl LogFailed {
    pub(crate) fn new(error: io::Error) -> Self {
        Self(Arc::new(error))
    }
}
