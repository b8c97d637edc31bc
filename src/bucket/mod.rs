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
//! The choice was made with `benches/bucket_shapes.rs` (`cargo bench --bench bucket_shapes`),
//! which runs the same operations through both shapes from a task on a two-worker runtime: a
//! mailbox with a oneshot reply per operation, against the table in place. On the 2-core
//! development machine (criterion's mean with its interval, two runs; each figure includes
//! criterion's own per-iteration async overhead):
//!
//! | operation, 16-byte key, 32-byte value, 10,000 keys | mailbox round trip | table in place |
//! |---|---:|---:|
//! | `GET` | 8.9 µs (8.3–9.6), 9.2 µs (8.2–10.6) | 236 ns (223–250), 227 ns (213–241) |
//! | `PUT` | 17.9 µs (15.2–21.0), 13.1 µs (11.5–15.4) | 167 ns (152–181), 200 ns (190–209) |
//!
//! The mailbox pays two channel operations, a cross-thread wake-up of the bucket task and of the
//! caller, and an allocation for the reply on every request: about forty times the cost of the
//! lookup itself, which would cap a server far below Redis's 0.9 M requests/s on two cores.
//!
//! # Guarantees kept by this shape
//! - A bucket's state dies with it: the exit guard runs on a normal return, on a panic (during
//!   unwinding) and on abort (when the future is dropped).
//! - Operations on a handle of an ended bucket fail at once, never hang and never panic.
//! - A panic in a bucket's task is caught by the runtime and reported to its supervisor; it never
//!   reaches the registry, other buckets or a caller.

mod handle;
mod index;
mod name;
mod slab;
mod table;

pub use handle::{BucketFault, BucketHandle, BucketId};
pub(crate) use handle::{cost, start};
pub use name::BucketName;
pub use table::MemoryBudget;
pub(crate) use table::charge;

/// Why an operation on a bucket failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BucketError {
    /// The bucket has ended (dropped, stopped or crashed); its data is gone.
    #[error("bucket has stopped")]
    Stopped,
    /// The log refuses the change: it has failed, or cannot hold a change this large.
    #[error(transparent)]
    Refused(#[from] crate::change::Refusal),
    /// Storing this would pass the configured memory limit.
    #[error("memory limit of {limit} bytes reached")]
    OutOfMemory {
        /// The configured limit, in bytes.
        limit: usize,
    },
}
