//! A bucket: one table of byte-string keys to byte-string values, owned by a supervised task.
//!
//! # Shape: a task that owns a table, read and written in place
//!
//! In the guide a bucket is an Agent: every `get` and `put` is a message to the bucket's
//! process and a reply back. kv keeps the process — each bucket is a tokio task, started by the
//! registry's bucket supervisor and monitored by the registry — but the task *owns the lifetime*
//! of its table rather than serialising every access to it, the way one Erlang process owns an
//! ETS table that many processes read and write. Handles reach the table directly under a
//! read-write lock; the task's only work is to live, to be stopped, and (for fault tests) to
//! fail. When the task ends, for whatever reason, a guard in it closes the table: the entries are
//! freed and every later operation through any handle returns [`BucketError::Stopped`] at once.
//!
//! The choice was made with `benches/bucket_shapes.rs`, which runs the same `GET` and `PUT`
//! through both shapes (a mailbox plus a oneshot reply per operation, against a locked table):
//!
//! | operation (one caller, release build) | mailbox round trip | table in place |
//! |---|---:|---:|
//! | `GET` 16-byte key, 32-byte value | see `docs/bucket-shapes.md` | |
//!
//! The in-place table removes two channel operations, a task wake-up and an allocation for the
//! reply from every request.
//!
//! # Guarantees kept by this shape
//! - A bucket's state dies with it: the exit guard runs on a normal return, on a panic (during
//!   unwinding) and on abort (when the future is dropped).
//! - Operations on a handle of an ended bucket fail at once, never hang and never panic.
//! - A panic in a bucket's task is caught by the runtime and reported to its supervisor; it never
//!   reaches the registry, other buckets or a caller.

mod handle;
mod name;
mod table;

pub(crate) use handle::start;
pub use handle::{BucketFault, BucketHandle, BucketId};
pub use name::BucketName;
pub use table::MemoryBudget;

/// Why an operation on a bucket failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BucketError {
    /// The bucket has ended (dropped, stopped or crashed); its data is gone.
    #[error("bucket has stopped")]
    Stopped,
    /// Storing this would pass the configured memory limit.
    #[error("memory limit of {limit} bytes reached")]
    OutOfMemory {
        /// The configured limit, in bytes.
        limit: usize,
    },
}
