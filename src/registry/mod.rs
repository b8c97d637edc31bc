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
//!   loop with none (`:one_for_all`); meanwhile calls return [`RegistryError::Unavailable`].

mod handle;
mod server;
mod view;

pub use handle::{Registry, RegistryCounts, RegistryStatus};
pub use view::RegistryView;

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
    /// The log cannot be written, so no bucket can be created.
    #[error("the log cannot be written; changes are refused")]
    Unwritable,
    /// The bucket name is longer than the configured limit.
    #[error("bucket name is {length} bytes; the limit is {limit}")]
    NameTooLong {
        /// The name's length in bytes.
        length: usize,
        /// The configured limit.
        limit: usize,
    },
}
