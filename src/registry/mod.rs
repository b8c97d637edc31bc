//! The registry: the only writer of name → bucket, and the monitor of every bucket it starts.
//!
//! It is the guide's `KV.Registry`: a loop (a GenServer) that creates buckets on request,
//! monitors them, and forgets a name as soon as it learns its bucket has ended, whether the
//! bucket was dropped or crashed. Lookups do not queue behind that loop: like the guide's ETS
//! table, the names live in a [`RegistryView`] that any task reads concurrently while only the
//! loop writes it.
//!
//! Guarantees:
//! - `create` is a call: when it returns, every `lookup` finds the bucket.
//! - No stale entry is served: a lookup never returns a bucket whose table is closed, and the
//!   loop removes the name once the bucket's exit reaches it, checking the bucket's id so that
//!   the late exit of an old bucket never removes a newer one of the same name.
//! - If the loop itself fails, its buckets end with it and the top supervisor starts a fresh
//!   loop with none (`:one_for_all`; a durable one reloads them from disk); meanwhile calls
//!   return [`RegistryError::Unavailable`].
//! - Without durability a crashed bucket is gone with its data (the guide's `:temporary`).
//!   With durability its data is on disk, so the loop restarts it from its [`DurableState`]
//!   (at most [`BUCKET_RESTARTS`] times in a short period; then the name stays down with an
//!   error until dropped), and a restarted loop reloads every bucket from disk. While a
//!   bucket is read back its name is [`Down::Restarting`]: requests get "try again", never
//!   "not found", and the loop serves other calls meanwhile (the files are read off it).

mod event_loop;
mod handle;
mod view;

pub use handle::{Registry, RegistryCounts, RegistryStatus};
pub use view::{Down, RegistryView};

use crate::bucket::BucketName;

/// How often a durable bucket may crash within a minute and still be restarted.
pub const BUCKET_RESTARTS: usize = 3;

/// A bucket's contents as read back from disk: its keys and values.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Why durable state could not be read back: the files' own error, whatever they are.
pub type ReadBackError = Box<dyn std::error::Error + Send + Sync>;

/// What a durable registry reads back from disk to restart what failed: a crashed bucket, or
/// (after the registry loop itself failed) every bucket. Implemented by the durability layer.
pub trait DurableState: Send + Sync + 'static {
    /// The durable contents of bucket `name`; `None` if no such bucket is on disk.
    ///
    /// # Errors
    /// If the files cannot be read.
    fn bucket(&self, name: &[u8]) -> Result<Option<Entries>, ReadBackError>;

    /// Every bucket on disk, with its contents.
    ///
    /// # Errors
    /// If the files cannot be read.
    fn buckets(&self) -> Result<Vec<(BucketName, Entries)>, ReadBackError>;
}

/// Why a registry call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry loop is restarting after a failure, or has stopped for good.
    #[error("registry is unavailable")]
    Unavailable,
    /// Creating one more bucket would pass the configured bucket limit.
    #[error("bucket limit of {limit} reached")]
    TooManyBuckets {
        /// The configured limit.
        limit: usize,
    },
    /// The log refuses the change (it has failed).
    #[error(transparent)]
    Refused(#[from] crate::change::Refusal),
    /// The bucket is being read back from disk after a crash; it answers again shortly.
    #[error("bucket {0} is restarting from disk; try again")]
    Restarting(BucketName),
    /// The bucket failed too often in a short time and stays down until it is dropped.
    #[error("bucket {0} failed repeatedly and stays down; DROP it to discard its data")]
    BucketFailed(BucketName),
    /// One more bucket would pass the memory limit (a bucket costs memory before it holds a
    /// key).
    #[error("memory limit of {limit} bytes reached")]
    OutOfMemory {
        /// The configured limit, in bytes.
        limit: usize,
    },
    /// The bucket name is longer than the configured limit.
    #[error("bucket name is {length} bytes; the limit is {limit}")]
    NameTooLong {
        /// The name's length in bytes.
        length: usize,
        /// The configured limit.
        limit: usize,
    },
}
