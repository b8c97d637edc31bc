//! The one vocabulary of changes to the store: what dispatch makes of a request that changes
//! something, what the log encodes and replays, and what replication will carry. Imports
//! nothing of ours.

/// A change to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// A bucket was created.
    Create {
        /// Its name.
        bucket: &'a [u8],
    },
    /// A bucket was dropped, with all its keys.
    Drop {
        /// Its name.
        bucket: &'a [u8],
    },
    /// A key was set.
    Put {
        /// The bucket.
        bucket: &'a [u8],
        /// The key.
        key: &'a [u8],
        /// The value.
        value: &'a [u8],
    },
    /// A key was removed.
    Delete {
        /// The bucket.
        bucket: &'a [u8],
        /// The key.
        key: &'a [u8],
    },
}

impl Change<'_> {
    /// The bucket the change is about.
    #[must_use]
    pub fn bucket(&self) -> &[u8] {
        match self {
            Self::Create { bucket }
            | Self::Drop { bucket }
            | Self::Put { bucket, .. }
            | Self::Delete { bucket, .. } => bucket,
        }
    }
}

/// Why a change may not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The log has failed: nothing may be acknowledged that it does not hold.
    #[error("the log cannot be written; changes are refused")]
    LogFailed,
    /// The change is larger than one record of the log.
    #[error("a change of {size} bytes is over the log's limit of {limit} bytes")]
    TooLarge {
        /// The bytes of the change's fields.
        size: usize,
        /// The most a record holds.
        limit: usize,
    },
}

/// Where a durable store's changes go, in the order they are made: the log of a shard.
///
/// The registry and the buckets call it; they hold state only and know nothing of files.
pub trait ChangeLog: Send + Sync {
    /// Whether `change` may be made: not once the log has failed, nor if the log cannot hold
    /// it. Asked before the change is made.
    ///
    /// # Errors
    /// Why the change is refused.
    fn admit(&self, change: &Change<'_>) -> Result<(), Refusal>;

    /// Records `change`. Called while the lock that orders the change is held (a bucket's
    /// write lock, or the registry's loop), so the log's order is the order of the changes.
    fn record(&self, change: &Change<'_>);
}
