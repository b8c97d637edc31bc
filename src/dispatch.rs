//! The one bridge between the network and the core: a parsed request goes to the registry or
//! a bucket, and its reply is encoded into the connection's output buffer.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::BytesMut;
use smallvec::SmallVec;

use crate::bucket::{BucketError, BucketFault, BucketHandle, BucketName};
use crate::protocol::{
    DebugAction, Dialect, ErrorReply, ProtocolError, Reply, Request, encode, encode_value,
};
use crate::registry::{Down, Registry, RegistryError};

/// Counters a user reads with `INFO`. Connections add their command counts once per batch,
/// not per command, so the counters cost no shared write on the hot path.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections open now.
    pub connections_open: AtomicUsize,
    /// Connections accepted since start.
    pub connections_accepted: AtomicU64,
    /// Connections refused at the connection limit.
    pub connections_refused: AtomicU64,
    /// Requests answered.
    pub commands: AtomicU64,
    /// Requests answered with an error (bad input, limits).
    pub errors: AtomicU64,
    /// Bytes read from clients since start.
    pub net_input_bytes: AtomicU64,
    /// Bytes held in connections' read buffers now.
    pub input_buffer_bytes: AtomicUsize,
    /// Bytes held in connections' reply buffers now.
    pub output_buffer_bytes: AtomicUsize,
    /// Connections closed because their large request or reply found the buffers of all
    /// connections over `max_connection_buffers`.
    pub buffer_refusals: AtomicU64,
    /// Connections closed because a request did not arrive whole within `request_timeout`.
    pub request_timeouts: AtomicU64,
}

/// What the connection does after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Go on reading requests.
    Continue,
    /// Flush the replies and close (`QUIT`).
    Close,
}

/// Executes requests against a registry. Each connection holds its own clone.
#[derive(Clone)]
pub struct Dispatcher {
    registry: Registry,
    stats: Arc<Stats>,
    page_size: usize,
    enable_debug_commands: bool,
    /// The bucket this connection used for two requests in a row. Clients mostly talk to one
    /// bucket at a time, and reusing its handle skips the name's hash, the registry's probe and
    /// the prefetch of the bucket's block on every request. It is used only while it has not
    /// stopped, so it is never stale: a dropped or crashed bucket's handle is stopped, and the
    /// next request looks the name up.
    last_bucket: Option<BucketHandle>,
    /// The address of the bucket the last lookup found. A client that spreads its requests
    /// over many buckets uses each one under the view's lock without taking a reference; only
    /// a bucket found twice in a row is worth the reference count of caching it. An address,
    /// not the bucket's id, because it is known without reading the bucket; should an ended
    /// bucket's address be reused, a bucket found once is cached, which costs nothing else.
    last_looked_up: Option<usize>,
    /// Whether a request since the last [`take_changed`](Self::take_changed) changed the
    /// store: then the replies must wait for the journal.
    changed: bool,
}

impl Dispatcher {
    /// A dispatcher over `registry` that counts into `stats`.
    #[must_use]
    pub fn new(
        registry: Registry,
        stats: Arc<Stats>,
        page_size: usize,
        enable_debug_commands: bool,
    ) -> Self {
        Self {
            registry,
            stats,
            page_size,
            enable_debug_commands,
            last_bucket: None,
            last_looked_up: None,
            changed: false,
        }
    }

    /// Whether requests since the last call changed the store, resetting it.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Runs `requests`, all on keys, in order, appending their replies to `out` while it holds
    /// less than `output_limit` bytes; returns how many ran. Called with the requests a
    /// connection has parsed ahead: their buckets are found once, under one read lock of the
    /// registry's view held until they have run, and what they will read is asked for before
    /// the first one runs, so that the cache misses of the batch overlap (see
    /// `ReadNames::resolve` in the registry). The bucket this connection has cached needs no
    /// lookup at all.
    pub(crate) fn run_keyed(
        &mut self,
        requests: &[(KeyedRequest<'_>, Dialect)],
        out: &mut BytesMut,
        output_limit: usize,
    ) -> usize {
        let Self {
            registry,
            stats,
            last_bucket,
            last_looked_up,
            changed,
            ..
        } = self;
        let durable = registry.journal().is_some();
        let cached = last_bucket.as_ref().filter(|bucket| !bucket.is_stopped());
        // Which requests are for the cached bucket, decided once: the execution below
        // follows the same split as the prefetching.
        let mut on_cached = SmallVec::<[bool; 16]>::new();
        let mut cached_keys = SmallVec::<[&[u8]; 16]>::new();
        let mut elsewhere = SmallVec::<[(&[u8], &[u8]); 16]>::new();
        for (request, _) in requests {
            let is_cached = cached.is_some_and(|last| last.name().as_bytes() == request.bucket);
            if is_cached {
                cached_keys.push(request.key);
            } else {
                elsewhere.push((request.bucket, request.key));
            }
            on_cached.push(is_cached);
        }
        let (ran, to_cache) = {
            // Nothing in this block may lock the view again: `names` holds it.
            let names = registry.read_names();
            let mut found = SmallVec::new();
            names.resolve(
                &elsewhere,
                || {
                    if let Some(cached) = cached
                        && !cached_keys.is_empty()
                    {
                        cached.prefetch_entries(cached_keys);
                    }
                },
                &mut found,
            );
            let mut found = found.into_iter();
            let mut to_cache = None;
            let mut ran = 0;
            for (&(request, dialect), is_cached) in requests.iter().zip(on_cached) {
                if out.len() >= output_limit {
                    break;
                }
                let bucket = if is_cached {
                    cached
                } else {
                    let bucket = found.next().flatten().filter(|bucket| !bucket.is_stopped());
                    if let Some(bucket) = bucket {
                        // Only a bucket found twice in a row is worth a reference count.
                        if *last_looked_up == Some(bucket.address()) {
                            to_cache = Some(bucket);
                        } else {
                            *last_looked_up = Some(bucket.address());
                        }
                    }
                    bucket
                };
                let outcome = bucket.map(|bucket| request.run(bucket, dialect, out));
                if let Some(reply) = keyed_reply(outcome, request.bucket, || {
                    names.why_missing(request.bucket, durable)
                }) {
                    answer(stats, changed, &reply, request.changes(), dialect, out);
                }
                ran += 1;
            }
            (ran, to_cache.cloned())
        };
        if to_cache.is_some() {
            *last_bucket = to_cache;
        }
        ran
    }

    /// The counters this dispatcher reports.
    #[must_use]
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The registry requests go to.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Executes `request` and appends its reply to `out`. Only `CREATE`, `DROP` and `DEBUG`
    /// wait (for the registry); reads and writes of keys never do.
    pub async fn execute(
        &mut self,
        request: Request<'_>,
        dialect: Dialect,
        out: &mut BytesMut,
    ) -> Next {
        // Requests on keys take the one path they take in batches.
        if let Some(keyed) = KeyedRequest::of(&request) {
            self.run_keyed(&[(keyed, dialect)], out, usize::MAX);
            return Next::Continue;
        }
        // DEBUG logs nothing: a bucket restarted from disk is restored, not changed.
        let may_change = matches!(request, Request::Create { .. } | Request::Drop { .. });
        let reply = match request {
            Request::Get { .. } | Request::Put { .. } | Request::Delete { .. } => {
                unreachable!("requests on keys ran above")
            }
            Request::Create { bucket } => match self.registry.create(bucket).await {
                Ok(_) => Reply::Ok,
                Err(error) => Reply::Error(registry_error(&error)),
            },
            Request::Drop { bucket } => match self.registry.drop_bucket(bucket).await {
                Ok(true) => Reply::Ok,
                Ok(false) => Reply::NotFound,
                Err(error) => Reply::Error(registry_error(&error)),
            },
            Request::Ping { message } => Reply::Pong(message),
            Request::Quit => {
                encode(&Reply::Ok, dialect, out);
                return Next::Close;
            }
            Request::Info => {
                let text = self.info();
                encode(&Reply::Text(&text), dialect, out);
                return Next::Continue;
            }
            Request::Buckets { after } => {
                let names = self.registry.view().names(after, self.page_size);
                let names: Vec<&[u8]> = names.iter().map(BucketName::as_bytes).collect();
                encode(&Reply::List(&names), dialect, out);
                return Next::Continue;
            }
            Request::Keys { bucket, cursor } => {
                let page_size = self.page_size;
                let page = self
                    .registry
                    .lookup(bucket)
                    .map(|handle| handle.scan(cursor, page_size));
                match page {
                    Some(Ok((next, keys))) => {
                        let keys: Vec<&[u8]> = keys.iter().map(|key| &key[..]).collect();
                        encode(
                            &Reply::Page {
                                cursor: next,
                                items: &keys,
                            },
                            dialect,
                            out,
                        );
                        return Next::Continue;
                    }
                    None | Some(Err(BucketError::Stopped)) => missing(
                        bucket,
                        self.registry
                            .view()
                            .why_missing(bucket, self.registry.journal().is_some()),
                    ),
                    Some(Err(error)) => Reply::Error(bucket_error(error)),
                }
            }
            Request::Debug { action, bucket } => self.debug(action, bucket).await,
            Request::DebugPanic => {
                if self.enable_debug_commands {
                    panic!("DEBUG PANIC: a fault injected into a connection");
                }
                Reply::Error(debug_disabled())
            }
        };
        answer(
            &self.stats,
            &mut self.changed,
            &reply,
            may_change,
            dialect,
            out,
        );
        Next::Continue
    }

    /// Appends the reply to a request that could not be parsed.
    pub fn reject(&self, error: &ProtocolError, dialect: Dialect, out: &mut BytesMut) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let reply = match error {
            ProtocolError::UnknownCommand => Reply::UnknownCommand,
            other => Reply::Error(ErrorReply::from(other)),
        };
        encode(&reply, dialect, out);
    }

    async fn debug(&self, action: DebugAction, bucket: &[u8]) -> Reply<'static> {
        if !self.enable_debug_commands {
            return Reply::Error(debug_disabled());
        }
        let Some(handle) = self.registry.lookup(bucket) else {
            return Reply::NotFound;
        };
        let fault = match action {
            DebugAction::Crash => BucketFault::Panic,
            DebugAction::Stop => BucketFault::Stop,
        };
        if handle.inject_fault(fault).is_err() {
            return Reply::NotFound;
        }
        // Answer once the bucket has ended and the registry has taken its exit in (and, with
        // durability on, restarted it from disk), so the next request sees the outcome.
        handle.stopped().await;
        match self.registry.settle().await {
            Ok(_) => Reply::Ok,
            Err(error) => Reply::Error(registry_error(&error)),
        }
    }

    fn info(&self) -> String {
        let stats = &self.stats;
        let view = self.registry.view();
        let memory = self.registry.memory();
        let status = *self.registry.status().borrow();
        let mut text = String::with_capacity(512);
        let mut line = |name: &str, value: &dyn std::fmt::Display| {
            let _ = writeln!(text, "{name}:{value}");
        };
        line("version", &env!("CARGO_PKG_VERSION"));
        let gauge = |value: &AtomicUsize| value.load(Ordering::Relaxed) as u64;
        let count = |value: &AtomicU64| value.load(Ordering::Relaxed);
        let counters = [
            ("connections_open", gauge(&stats.connections_open)),
            ("connections_accepted", count(&stats.connections_accepted)),
            ("connections_refused", count(&stats.connections_refused)),
            ("commands", count(&stats.commands)),
            ("errors", count(&stats.errors)),
            ("buckets", view.len() as u64),
            ("keys", memory.keys() as u64),
            ("memory_used_bytes", memory.used() as u64),
            ("memory_limit_bytes", memory.limit() as u64),
            ("net_input_bytes", count(&stats.net_input_bytes)),
            ("input_buffer_bytes", gauge(&stats.input_buffer_bytes)),
            ("output_buffer_bytes", gauge(&stats.output_buffer_bytes)),
            ("buffer_refusals", count(&stats.buffer_refusals)),
            ("request_timeouts", count(&stats.request_timeouts)),
        ];
        for (name, value) in counters {
            line(name, &value);
        }
        line("resident_bytes", &resident_bytes().unwrap_or(0));
        line("registry_starts", &status.starts);
        if let Some(journal) = self.registry.journal() {
            line("fsync", &journal.policy());
            line("log_bytes", &journal.log_bytes());
            line("log_syncs", &journal.syncs());
            line("log_failed", &u8::from(journal.is_failed()));
        }
        text
    }
}

/// A request on one key of one bucket: what a batch runs under one lookup of its buckets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyedRequest<'a> {
    bucket: &'a [u8],
    key: &'a [u8],
    action: KeyAction<'a>,
}

#[derive(Debug, Clone, Copy)]
enum KeyAction<'a> {
    Get,
    Put { value: &'a [u8] },
    Delete,
}

impl<'a> KeyedRequest<'a> {
    /// `request` if it is a `GET`, `PUT` or `DELETE`.
    pub(crate) fn of(request: &Request<'a>) -> Option<Self> {
        let (bucket, key, action) = match *request {
            Request::Get { bucket, key } => (bucket, key, KeyAction::Get),
            Request::Put { bucket, key, value } => (bucket, key, KeyAction::Put { value }),
            Request::Delete { bucket, key } => (bucket, key, KeyAction::Delete),
            _ => return None,
        };
        Some(Self {
            bucket,
            key,
            action,
        })
    }

    /// Whether the request changes the store when it succeeds.
    fn changes(&self) -> bool {
        !matches!(self.action, KeyAction::Get)
    }

    /// Runs the request on `bucket`. A value read is encoded into `out` at once, while the
    /// table is locked for reading (`Ok(true)`: the reply is written); otherwise the reply is
    /// still to be written.
    fn run(
        &self,
        bucket: &BucketHandle,
        dialect: Dialect,
        out: &mut BytesMut,
    ) -> Result<bool, BucketError> {
        match self.action {
            KeyAction::Get => bucket
                .get_with(self.key, |value| encode_value(value, dialect, out))
                .map(|()| true),
            KeyAction::Put { value } => bucket.put(self.key, value).map(|()| false),
            KeyAction::Delete => bucket.delete(self.key).map(|_| false),
        }
    }
}

/// The reply to a request on a key, given what running it on its bucket gave (`None`: there
/// is no live bucket of that name); `None` when the reply is written already.
fn keyed_reply(
    outcome: Option<Result<bool, BucketError>>,
    bucket: &[u8],
    why_missing: impl FnOnce() -> Option<Down>,
) -> Option<Reply<'static>> {
    match outcome {
        Some(Ok(true)) => None,
        Some(Ok(false)) => Some(Reply::Ok),
        None | Some(Err(BucketError::Stopped)) => Some(missing(bucket, why_missing())),
        Some(Err(error)) => Some(Reply::Error(bucket_error(error))),
    }
}

/// The reply for a bucket that is not there: `NOT FOUND`, or, for a durable bucket that is
/// down with its data on disk, an error that says why ("try again" while it restarts).
fn missing(bucket: &[u8], down: Option<Down>) -> Reply<'static> {
    let error = match down {
        None => return Reply::NotFound,
        Some(Down::Restarting) => RegistryError::Restarting(BucketName::from(bucket)),
        Some(Down::Failed) => RegistryError::BucketFailed(BucketName::from(bucket)),
    };
    Reply::Error(registry_error(&error))
}

/// Counts `reply` and appends it to `out`. Only a change that was made must wait for the log
/// before its reply (`changed`): a refused one (log failed, limit reached, no such bucket)
/// answers at once.
fn answer(
    stats: &Stats,
    changed: &mut bool,
    reply: &Reply<'_>,
    may_change: bool,
    dialect: Dialect,
    out: &mut BytesMut,
) {
    match reply {
        Reply::Error(_) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        Reply::Ok if may_change => *changed = true,
        _ => {}
    }
    encode(reply, dialect, out);
}

fn debug_disabled() -> ErrorReply {
    ErrorReply::new("debug commands are disabled; start the server with --enable-debug-commands")
}

fn bucket_error(error: BucketError) -> ErrorReply {
    match error {
        BucketError::OutOfMemory { .. } => ErrorReply {
            code: "OOM",
            message: error.to_string(),
        },
        BucketError::Stopped | BucketError::Unwritable => ErrorReply::new(error),
    }
}

fn registry_error(error: &RegistryError) -> ErrorReply {
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

/// The process's resident memory, from `VmRSS` in `/proc/self/status` (Linux only), which
/// states it in kB whatever the page size.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kilobytes: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kilobytes * 1024)
}
