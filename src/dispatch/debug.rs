//! `DEBUG CRASH|STOP bucket`: faults injected into a bucket, when the server allows them.

use super::Dispatcher;
use super::errors::{debug_disabled, registry_error};
use crate::bucket::BucketFault;
use crate::protocol::{DebugAction, ErrorReply, Reply};

impl Dispatcher {
    /// Crashes or stops `bucket`'s task, and answers once the registry has taken its exit in.
    /// In a cluster, the bucket is this node's replica of it: the guide's supervision restarts
    /// it there from what every replica has.
    pub(super) async fn debug<'b>(&self, action: DebugAction, bucket: &'b [u8]) -> Reply<'b> {
        if !self.enable_debug_commands {
            return Reply::Error(debug_disabled());
        }
        let registry = match &self.router {
            None => self.registry().clone(),
            Some(router) => match router.replica_registry(bucket).await {
                Some(registry) => registry,
                None => {
                    return Reply::Error(ErrorReply::new(
                        "this node holds no replica of the bucket's shard",
                    ));
                }
            },
        };
        let Some(handle) = registry.lookup(bucket) else {
            return Reply::NotFound(bucket);
        };
        let fault = match action {
            DebugAction::Crash => BucketFault::Panic,
            DebugAction::Stop => BucketFault::Stop,
        };
        if handle.inject_fault(fault).is_err() {
            return Reply::NotFound(bucket);
        }
        // Answer once the bucket has ended and the registry has taken its exit in (and, with
        // durability on, restarted it from disk), so the next request sees the outcome.
        handle.stopped().await;
        match registry.settle().await {
            Ok(_) => Reply::Ok,
            Err(error) => Reply::Error(registry_error(&error)),
        }
    }
}
