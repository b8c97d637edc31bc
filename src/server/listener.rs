//! Accepting clients within the connection limit, and stopping gracefully.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::busy_poll::BusyPoll;
use super::connection::{self, Stop};
use crate::cluster::node::{Node, NodeConfig, NodeError};
use crate::cluster::peer::PeerGate;
use crate::cluster::router::Router;
use crate::config::{ClusterConfig, DurabilityConfig, ServerConfig};
use crate::dispatch::{Dispatcher, Sessions};
use crate::protocol::{Dialect, ErrorReply};
use crate::registry::Registry;
use crate::shard::LocalShard;
use crate::shard::wal::{LogFailed, WalError};
use crate::stats::Stats;

/// Clients being refused at once; past this, excess clients are closed without a reply so
/// that a flood of connections cannot pile up refusal tasks either.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;
/// How long a refused client has to send its first byte, which tells the reply's dialect.
const REFUSAL_DIALECT_WAIT: Duration = Duration::from_millis(200);

/// A bound kv server, ready to run.
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> Result<(), kv::server::StartError> {
/// use kv::config::ServerConfig;
/// use kv::server::Server;
/// use tokio_util::sync::CancellationToken;
///
/// let server = Server::bind(ServerConfig::default()).await?;
/// println!("listening on {}", server.local_addr());
/// let shutdown = CancellationToken::new();
/// server.run(shutdown).await;
/// # Ok(())
/// # }
/// ```
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    dispatcher: Dispatcher,
    config: Arc<ServerConfig>,
    /// In a cluster, this node's Raft groups.
    node: Option<Arc<Node>>,
    /// The HTTP listener of metrics and the status page, if one is asked for.
    http: Option<TcpListener>,
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The address could not be bound.
    #[error("binding {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The data directory could not be used.
    #[error(transparent)]
    Storage(#[from] WalError),
    /// The cluster could not be joined.
    #[error(transparent)]
    Cluster(#[from] NodeError),
    /// A cluster node needs a data directory.
    #[error("--peers needs --data-dir: a replica's log must outlive the process")]
    ClusterWithoutDataDir,
}

impl Server {
    /// Binds the listening socket and opens the shard: recovered from the data directory
    /// when the server is durable, empty otherwise.
    ///
    /// # Errors
    /// If the address cannot be bound, or the data directory is locked, damaged or does not
    /// fit the limits.
    pub async fn bind(config: ServerConfig) -> Result<Self, StartError> {
        let bind_error = |source| StartError::Bind {
            address: config.bind,
            source,
        };
        let listener = TcpListener::bind(config.bind).await.map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        // In a cluster the data directory holds the shards' Raft logs; the local shard (INFO,
        // what is not routed) stays in memory.
        let local_durability = if config.cluster.is_some() {
            None
        } else {
            config.durability.clone()
        };
        let (shard, recovered) = LocalShard::open(config.core.clone(), local_durability).await?;
        if let (Some(report), Some(durability)) = (recovered, &config.durability) {
            tracing::info!(
                data_dir = %durability.data_dir.display(),
                fsync = %durability.fsync,
                records = report.records,
                buckets = report.buckets,
                keys = report.keys,
                elapsed_ms = report.elapsed.as_millis() as u64,
                "recovered the data directory"
            );
        }
        let sessions = Sessions {
            clients: Arc::default(),
            password: config.requirepass.clone().map(String::into_bytes),
            settings: config.settings(),
            mode: if config.cluster.is_some() {
                "cluster"
            } else {
                "standalone"
            },
            started: std::time::Instant::now(),
        };
        let mut dispatcher = Dispatcher::new(
            Arc::new(shard),
            Arc::new(Stats::default()),
            config.page_size,
            config.enable_debug_commands,
        )
        .with_sessions(Arc::new(sessions));
        let node = match &config.cluster {
            None => None,
            Some(cluster) => {
                let durability = config
                    .durability
                    .as_ref()
                    .ok_or(StartError::ClusterWithoutDataDir)?;
                let (node, router) = join_cluster(cluster, durability, &config, local_addr).await?;
                dispatcher = dispatcher.with_router(router);
                Some(node)
            }
        };
        let http = match config.http_bind {
            Some(address) => match crate::observe::bind(address).await {
                Ok(listener) => Some(listener),
                Err(error) if config.http_bind_optional => {
                    tracing::warn!(
                        %address,
                        %error,
                        "no metrics or status page: the default HTTP address is not free \
                         (--http-bind sets another)"
                    );
                    None
                }
                Err(source) => return Err(StartError::Bind { address, source }),
            },
            None => None,
        };
        Ok(Self {
            listener,
            local_addr,
            dispatcher,
            config: Arc::new(config),
            node,
            http,
        })
    }

    /// Where the HTTP listener (metrics, the status page) listens, if there is one.
    #[must_use]
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|http| http.local_addr().ok())
    }

    /// The address the server listens on (with the real port when bound to port 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's shard: its buckets, and their log when durable.
    #[must_use]
    pub fn shard(&self) -> &Arc<LocalShard> {
        self.dispatcher.shard()
    }

    /// The server's registry, for tests and embedding.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        self.dispatcher.registry()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets every connection
    /// answer what it has already read, and returns once they have closed (or after the grace
    /// period, closing the rest).
    ///
    /// # Errors
    /// If the log could not be written and synced at the end: changes acknowledged under a
    /// relaxed fsync policy may then be lost on a power cut, and the caller should say so
    /// (`kv serve` exits non-zero).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), LogFailed> {
        let Self {
            listener,
            dispatcher,
            config,
            node,
            http,
            ..
        } = self;
        let shard = Arc::clone(dispatcher.shard());
        if let Some(http) = http {
            let observed = crate::observe::Observed {
                stats: Arc::clone(dispatcher.stats()),
                shard: Arc::clone(&shard),
                router: dispatcher.router().cloned(),
                started: std::time::Instant::now(),
            };
            tokio::spawn(crate::observe::serve(
                http,
                Arc::new(observed),
                shutdown.child_token(),
            ));
        }
        tokio::spawn(Arc::clone(&shard).maintain(shutdown.child_token()));
        let stats = Arc::clone(dispatcher.stats());
        let busy_poll = (!config.busy_poll.is_zero()).then(|| {
            let busy_poll = Arc::new(BusyPoll::new(config.busy_poll, Arc::clone(&stats)));
            tokio::spawn(Arc::clone(&busy_poll).run(shutdown.child_token()));
            busy_poll
        });
        let tracker = TaskTracker::new();
        let connections = Arc::new(Semaphore::new(config.max_connections));
        let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
        let stop = Stop {
            finish: shutdown.child_token(),
            abort: CancellationToken::new(),
        };
        loop {
            let accepted = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors and the like: back off instead of spinning; the
                    // clients already connected keep being served.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
            if let Ok(permit) = Arc::clone(&connections).try_acquire_owned() {
                let dispatcher = dispatcher.clone();
                let config = Arc::clone(&config);
                let stop = stop.clone();
                let busy_poll = busy_poll.clone();
                tracker.spawn(async move {
                    connection::serve(stream, dispatcher, config, stop, busy_poll).await;
                    drop(permit);
                });
            } else {
                stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                super::client_log::client_event!(
                    %peer,
                    limit = config.max_connections,
                    "refusing a connection: max number of clients reached"
                );
                if let Ok(permit) = Arc::clone(&refusals).try_acquire_owned() {
                    tracker.spawn(refuse(stream, permit, config.max_connections));
                }
            }
        }
        drop(listener);
        tracing::info!("shutting down: answering what was read, then closing connections");
        tracker.close();
        if tokio::time::timeout(config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = stats.connections_open.load(Ordering::Relaxed),
                "connections still open after the grace period; closing them"
            );
            stop.abort.cancel();
            tracker.wait().await;
        }
        if let Some(node) = node {
            node.stop().await;
        }
        shard.close()?;
        if shard.is_durable() {
            tracing::info!("the log is written and synced");
        }
        Ok(())
    }
}

/// Opens this node's shards, answers the other nodes on the cluster address, and returns the
/// router that requests on buckets go through.
async fn join_cluster(
    cluster: &ClusterConfig,
    durability: &DurabilityConfig,
    config: &ServerConfig,
    client_address: SocketAddr,
) -> Result<(Arc<Node>, Arc<Router>), StartError> {
    let listener = TcpListener::bind(cluster.bind)
        .await
        .map_err(|source| StartError::Bind {
            address: cluster.bind,
            source,
        })?;
    let gate = PeerGate::new();
    let node = Arc::new(
        Node::open(
            NodeConfig {
                id: cluster.node_id,
                members: cluster.peers.clone(),
                join: cluster.join.clone(),
                address: cluster.bind,
                shards: cluster.shards,
                replicas: cluster.replicas,
                data_dir: durability.data_dir.clone(),
                fsync: durability.fsync,
                heartbeat: cluster.heartbeat,
                election_timeout: cluster.election_timeout,
                core: config.core.clone(),
                snapshot_every: cluster.snapshot_every,
                log_memory: cluster.log_memory,
                snapshot_piece: cluster.snapshot_piece,
            },
            listener,
            Arc::clone(&gate),
        )
        .await?,
    );
    let router = Arc::new(Router::new(
        Arc::clone(&node),
        client_address,
        config.page_size,
    ));
    gate.open(Arc::clone(&router));
    node.start_maintenance();
    tracing::info!(
        node = cluster.node_id,
        cluster_bind = %cluster.bind,
        shards = node.shards(),
        "joined the cluster"
    );
    Ok((node, router))
}

/// Tells a client over the limit why it is being closed, in its own dialect if it speaks
/// first.
async fn refuse(mut stream: TcpStream, _permit: OwnedSemaphorePermit, limit: usize) {
    let mut first = [0u8; 1];
    let dialect = match tokio::time::timeout(REFUSAL_DIALECT_WAIT, stream.read(&mut first)).await {
        Ok(Ok(1)) => Dialect::of(first[0]),
        _ => Dialect::Line,
    };
    let error = ErrorReply::new(format!("max number of clients reached ({limit})"));
    // Refused either way; an error here only means the client did not hear why.
    let _ = connection::tell_and_close(&mut stream, error, dialect).await;
}
