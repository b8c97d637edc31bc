//! What each error becomes on the wire: the RESP code a client can match on, and the text.

use crate::bucket::{BucketError, BucketName};
use crate::protocol::{ErrorReply, Reply};
use crate::registry::{Down, RegistryError};

/// The reply for a bucket that is not there: `NOT FOUND`, or, for a durable bucket that is
/// down with its data on disk, an error that says why ("try again" while it restarts).
pub(super) fn missing(bucket: &[u8], down: Option<Down>) -> Reply<'_> {
    let error = match down {
        None => return Reply::NotFound(bucket),
        Some(Down::Restarting) => RegistryError::Restarting(BucketName::from(bucket)),
        Some(Down::Failed) => RegistryError::BucketFailed(BucketName::from(bucket)),
    };
    Reply::Error(registry_error(&error))
}

pub(super) fn debug_disabled() -> ErrorReply {
    ErrorReply::new("debug commands are disabled; start the server with --enable-debug-commands")
}

pub(super) fn bucket_error(error: BucketError) -> ErrorReply {
    match error {
        BucketError::OutOfMemory { .. } => ErrorReply {
            code: "OOM",
            message: error.to_string(),
        },
        BucketError::Stopped | BucketError::Refused(_) => ErrorReply::new(error),
    }
}

pub(crate) fn registry_error(error: &RegistryError) -> ErrorReply {
    match error {
        RegistryError::Restarting(_) => ErrorReply {
            code: "TRYAGAIN",
            message: error.to_string(),
        },
        RegistryError::OutOfMemory { .. } => ErrorReply {
            code: "OOM",
            message: error.to_string(),
        },
        _ => ErrorReply::new(error),
    }
}
