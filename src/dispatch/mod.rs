//! From a parsed request to its encoded reply: the one bridge between the network and the
//! shard. The batch path for requests on keys is in [`keyed`](self) (`keyed.rs`), `INFO` and
//! `DEBUG` apart, and what each error becomes on the wire in `errors.rs`.

pub mod clients;
mod debug;
pub(crate) mod errors;
mod info;
mod keyed;
mod session;

use std::sync::Arc;

use bytes::BytesMut;
use smallvec::SmallVec;

use crate::bucket::{BucketError, BucketHandle, BucketName};
use crate::cluster::router::Router;
use crate::cluster::slot::slot_of;
use crate::protocol::{
    ClientRequest, Dialect, ErrorReply, ProtocolError, Reply, ReplyValue, Request,
    describe_commands, encode, encode_page,
};
use crate::registry::Registry;
use crate::shard::LocalShard;
use crate::stats::Stats;

use clients::{Clients, Registration};
use errors::{bucket_error, debug_disabled, missing, registry_error};
use keyed::answer;

/// What the connection does after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Go on reading requests.
    Continue,
    /// Flush the replies and close (`QUIT`).
    Close,
    /// Flush the replies and stream what the server receives (`MONITOR`).
    Monitor,
}

/// What every connection of a server shares about sessions: the connections, the password,
/// and the settings `CONFIG GET` shows.
pub struct Sessions {
    /// The server's connections.
    pub clients: Arc<Clients>,
    /// What `AUTH` must give, if anything.
    pub password: Option<Vec<u8>>,
    /// Each setting's name, as Redis names its own where they mean the same, and its value.
    pub settings: Vec<(&'static str, String)>,
    /// `cluster` or `standalone`, as `HELLO` says.
    pub mode: &'static str,
    /// When the server started.
    pub started: std::time::Instant,
}

impl Sessions {
    /// The value of the setting `name`.
    #[must_use]
    pub fn setting(&self, name: &str) -> Option<&str> {
        self.settings
            .iter()
            .find(|(setting, _)| *setting == name)
            .map(|(_, value)| value.as_str())
    }
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            clients: Arc::default(),
            password: None,
            settings: Vec::new(),
            mode: "standalone",
            started: std::time::Instant::now(),
        }
    }
}

/// What one connection has chosen and opened.
#[derive(Default)]
struct Session {
    /// Its entry among the server's connections (none for a dispatcher used without one).
    registration: Option<Registration>,
    /// Replies to RESP requests in RESP3 (`HELLO 3`).
    resp3: bool,
    /// Whether it has given the password (or none is needed).
    authenticated: bool,
}

impl Clone for Session {
    /// A new connection's session, as this one started: a dispatcher is cloned for each
    /// connection, and what a connection chose is its own.
    fn clone(&self) -> Self {
        Self {
            registration: None,
            resp3: false,
            authenticated: self.authenticated && self.registration.is_none(),
        }
    }
}

/// Executes requests against a shard. Each connection holds its own clone.
#[derive(Clone)]
pub struct Dispatcher {
    shard: Arc<LocalShard>,
    /// In a cluster, where requests on buckets go instead of the local shard.
    router: Option<Arc<Router>>,
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
    /// The name the client gave this connection (`CLIENT SETNAME`).
    client_name: Option<Vec<u8>>,
    sessions: Arc<Sessions>,
    session: Session,
}

impl Dispatcher {
    /// A dispatcher over `shard` that counts into `stats`.
    #[must_use]
    pub fn new(
        shard: Arc<LocalShard>,
        stats: Arc<Stats>,
        page_size: usize,
        enable_debug_commands: bool,
    ) -> Self {
        Self {
            shard,
            router: None,
            stats,
            page_size,
            enable_debug_commands,
            last_bucket: None,
            last_looked_up: None,
            changed: false,
            client_name: None,
            sessions: Arc::default(),
            session: Session {
                authenticated: true,
                ..Session::default()
            },
        }
    }

    /// Shares `sessions` among the connections of this dispatcher's clones.
    #[must_use]
    pub fn with_sessions(mut self, sessions: Arc<Sessions>) -> Self {
        self.session.authenticated = sessions.password.is_none();
        self.sessions = sessions;
        self
    }

    /// Makes this dispatcher the one of a connection from `peer` to `local`, which `kill`
    /// closes; its entry among the server's connections lasts as long as the dispatcher.
    pub fn attach(
        &mut self,
        peer: std::net::SocketAddr,
        local: std::net::SocketAddr,
        kill: tokio_util::sync::CancellationToken,
    ) {
        self.session.registration = Some(self.sessions.clients.register(peer, local, kill));
    }

    /// The connection's entry among the server's connections.
    #[must_use]
    pub fn client(&self) -> Option<&Arc<clients::ClientInfo>> {
        self.session.registration.as_ref().map(Registration::info)
    }

    /// The server's connections.
    #[must_use]
    pub fn clients(&self) -> &Arc<Clients> {
        &self.sessions.clients
    }

    /// The dialect a request parsed as `dialect` is answered in on this connection.
    #[must_use]
    pub fn reply_dialect(&self, dialect: Dialect) -> Dialect {
        dialect.with_version(self.session.resp3)
    }

    /// Whether `request` may run before the connection has authenticated.
    #[must_use]
    pub fn admits(&self, request: &Request<'_>) -> bool {
        self.session.authenticated
            || matches!(
                request,
                Request::Auth { .. } | Request::Hello { .. } | Request::Quit
            )
    }

    /// The error for a request that needs authentication first.
    #[must_use]
    pub fn no_auth(&self, request: &Request<'_>) -> ErrorReply {
        self.stats.count_error(request.command_slot());
        let message = if matches!(request, Request::Hello { .. }) {
            "HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time"
        } else {
            "Authentication required."
        };
        ErrorReply {
            code: "NOAUTH",
            message: message.to_owned(),
        }
    }

    /// Whether every request of this connection is to be looked at alone (it must
    /// authenticate first), rather than run in batches.
    #[must_use]
    pub fn needs_auth(&self) -> bool {
        !self.session.authenticated
    }

    /// Sends requests on buckets to `router` (a cluster's) instead of the local shard.
    #[must_use]
    pub fn with_router(mut self, router: Arc<Router>) -> Self {
        self.router = Some(router);
        self
    }

    /// The cluster's router, in a cluster.
    #[must_use]
    pub fn router(&self) -> Option<&Arc<Router>> {
        self.router.as_ref()
    }

    /// Whether requests on buckets go to a cluster's router (in batches by shard), not the
    /// local batch path.
    #[must_use]
    pub fn is_clustered(&self) -> bool {
        self.router.is_some()
    }

    /// Whether requests since the last call changed the store, resetting it.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The counters this dispatcher reports.
    #[must_use]
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The shard requests go to.
    #[must_use]
    pub fn shard(&self) -> &Arc<LocalShard> {
        &self.shard
    }

    /// The registry of the shard requests go to.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        self.shard.registry()
    }

    /// In a cluster, runs `requests` (consecutive requests on buckets, in one dialect) where
    /// their shards are led and appends their replies to `out`, in order. On a single node
    /// there is no router, and nothing is run.
    pub async fn run_routed(
        &mut self,
        requests: &[Request<'_>],
        dialect: Dialect,
        out: &mut BytesMut,
    ) {
        if let Some(router) = &self.router {
            let mut errors = router.run(requests, dialect, out).await;
            while errors != 0 {
                let index = errors.trailing_zeros() as usize;
                if let Some(request) = requests.get(index) {
                    self.stats.count_error(request.command_slot());
                }
                errors &= errors - 1;
            }
        }
    }

    /// Executes `request` and appends its reply to `out`. Only `CREATE`, `DROP` and `DEBUG`
    /// wait (for the registry); reads and writes of keys never do.
    pub async fn execute(
        &mut self,
        request: Request<'_>,
        dialect: Dialect,
        out: &mut BytesMut,
    ) -> Next {
        if self.router.is_some() && Router::routes(&request) {
            self.run_routed(&[request], dialect, out).await;
            return Next::Continue;
        }
        let slot = request.command_slot();
        // DEBUG logs nothing: a bucket restarted from disk is restored, not changed.
        let may_change = matches!(request, Request::Create { .. } | Request::Drop { .. });
        let reply = match request {
            // Requests on keys take the one path they take in batches.
            Request::Key(keyed) => {
                self.run_keyed(&[(keyed, dialect)], out, usize::MAX);
                return Next::Continue;
            }
            Request::Create { bucket } => match self.registry().create(bucket).await {
                Ok(_) => Reply::Ok,
                Err(error) => Reply::Error(registry_error(&error)),
            },
            Request::Drop { bucket } => match self.registry().drop_bucket(bucket).await {
                Ok(true) => Reply::Ok,
                Ok(false) => Reply::NotFound(bucket),
                Err(error) => Reply::Error(registry_error(&error)),
            },
            Request::Ping { message } => Reply::Pong(message),
            Request::Echo { message } => Reply::Pong(Some(message)),
            Request::ClusterKeySlot { name } => Reply::Integer(i64::from(slot_of(name))),
            Request::Cluster(query) => match &self.router {
                Some(router) => {
                    router.query(query, dialect, out).await;
                    return Next::Continue;
                }
                None => Reply::Error(ErrorReply::new(
                    "This instance has cluster support disabled; start it with --peers",
                )),
            },
            Request::Command(query) => {
                encode(&Reply::Tree(&describe_commands(&query)), dialect, out);
                return Next::Continue;
            }
            Request::Client(request) => {
                if let Some(reply) = self.client_request(request) {
                    if matches!(reply, ReplyValue::Error(_)) {
                        self.stats.count_error(slot);
                    }
                    encode(&Reply::Tree(&reply), dialect, out);
                    return Next::Continue;
                }
                let reply = client(&mut self.client_name, request);
                let named = matches!((request, &reply), (ClientRequest::SetName(_), Reply::Ok));
                if matches!(reply, Reply::Error(_)) {
                    self.stats.count_error(slot);
                }
                encode(&reply, dialect, out);
                if let (true, Some(info)) = (named, self.client()) {
                    info.set_name(self.client_name.clone());
                }
                return Next::Continue;
            }
            Request::Select { index } => {
                if index == b"0" {
                    Reply::Ok
                } else {
                    Reply::Error(ErrorReply::new(
                        "DB index is out of range: kv has one database, 0",
                    ))
                }
            }
            Request::Quit => {
                encode(&Reply::Ok, dialect, out);
                return Next::Close;
            }
            Request::DbSize => {
                let keys = match &self.router {
                    Some(router) => router.holdings().1.keys(),
                    None => self.registry().memory().keys(),
                };
                Reply::Integer(i64::try_from(keys).unwrap_or(i64::MAX))
            }
            Request::Info { sections } => {
                let asked: SmallVec<[&[u8]; 8]> = sections.iter().flatten().copied().collect();
                let text = self.info(&asked);
                encode(&Reply::Text(&text), dialect, out);
                return Next::Continue;
            }
            Request::Buckets { after } => {
                if let Some(router) = &self.router {
                    router.buckets(after, dialect, out).await;
                    return Next::Continue;
                }
                let names = self.registry().view().names(after, self.page_size);
                let names: Vec<&[u8]> = names.iter().map(BucketName::as_bytes).collect();
                encode(&Reply::List(&names), dialect, out);
                return Next::Continue;
            }
            Request::Keys { bucket, cursor } => {
                let page_size = self.page_size;
                let page = self
                    .registry()
                    .lookup(bucket)
                    .map(|handle| handle.scan(cursor, page_size));
                match page {
                    Some(Ok((next, keys))) => {
                        encode_page(next, &keys, dialect, out);
                        return Next::Continue;
                    }
                    None | Some(Err(BucketError::Stopped)) => missing(
                        bucket,
                        self.registry()
                            .view()
                            .why_missing(bucket, self.registry().is_durable()),
                    ),
                    Some(Err(error)) => Reply::Error(bucket_error(error)),
                }
            }
            Request::Hello {
                version,
                auth,
                name,
            } => match self.hello(version, auth, name) {
                Ok(answer) => {
                    let dialect = self.reply_dialect(dialect);
                    encode(&Reply::Tree(&answer), dialect, out);
                    return Next::Continue;
                }
                Err(error) => Reply::Error(error),
            },
            Request::Auth { username, password } => match self.authenticate(username, password) {
                Ok(()) => Reply::Ok,
                Err(error) => Reply::Error(error),
            },
            // A transaction is the connection's to keep: these come here only outside one.
            Request::Multi => Reply::Error(ErrorReply::new(
                "MULTI is run by the connection; this dispatcher has none",
            )),
            Request::Exec => Reply::Error(ErrorReply::new("EXEC without MULTI")),
            Request::Discard => Reply::Error(ErrorReply::new("DISCARD without MULTI")),
            Request::Monitor => {
                if let Some(client) = self.client() {
                    client.set_monitor();
                }
                encode(&Reply::Ok, dialect, out);
                return Next::Monitor;
            }
            Request::ConfigGet { pattern } => {
                let matching = self.config_get(pattern);
                encode(&Reply::Tree(&matching), dialect, out);
                return Next::Continue;
            }
            Request::ConfigChange => Reply::Error(ErrorReply::new(
                "kv's settings are fixed when it starts: see `kv serve --help`",
            )),
            Request::Scan {
                cursor,
                pattern,
                count,
            } => {
                self.scan(cursor, pattern, count, dialect, out).await;
                return Next::Continue;
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
            (&reply, slot),
            may_change,
            dialect,
            out,
        );
        Next::Continue
    }

    /// Appends the reply to a request that could not be parsed.
    pub fn reject(&self, error: &ProtocolError, dialect: Dialect, out: &mut BytesMut) {
        self.stats.count_error(crate::protocol::NOT_A_COMMAND);
        // The guide's `UNKNOWN COMMAND` stays as it is in the line protocol; RESP says which
        // command and why, as Redis does.
        let reply = match (error, dialect) {
            (error, Dialect::Line) if error.is_unknown_command() => Reply::UnknownCommand,
            (other, _) => Reply::Error(ErrorReply::from(other)),
        };
        encode(&reply, dialect, out);
    }
}

/// The longest connection name kept: every connection may hold one, outside the buffers'
/// bound.
const MAX_CLIENT_NAME: usize = 256;

/// `CLIENT SETNAME|GETNAME`, for the connection named `name`.
fn client<'n>(name: &'n mut Option<Vec<u8>>, request: ClientRequest<'_>) -> Reply<'n> {
    match request {
        ClientRequest::SetName(new) if new.len() > MAX_CLIENT_NAME => Reply::Error(
            ErrorReply::new(format!("Client names are at most {MAX_CLIENT_NAME} bytes")),
        ),
        ClientRequest::SetName(new) => {
            // As Redis: a name is printable ASCII without spaces (it shows in listings).
            if new.iter().all(|&byte| (b'!'..=b'~').contains(&byte)) {
                *name = (!new.is_empty()).then(|| new.to_vec());
                Reply::Ok
            } else {
                Reply::Error(ErrorReply::new(
                    "Client names cannot contain spaces, newlines or special characters.",
                ))
            }
        }
        ClientRequest::GetName => Reply::Value(name.as_deref()),
        // The rest are about more than the name (see `Dispatcher::client_request`).
        _ => Reply::UnknownCommand,
    }
}
