//! Watching a running kv, off the request path: one HTTP listener (`--http-bind`) with
//! `/metrics` for Prometheus, `/` a live page of the supervision tree, the buckets, throughput
//! and latency (served from the binary, nothing fetched at run time), `/health` and `/ready`
//! for orchestrators, and the JSON the page reads. Read-only: nothing here changes data.

mod metrics;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router as Routes;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster::router::Router;
use crate::shard::LocalShard;
use crate::stats::Stats;

pub use state::{BucketPage, BucketRow};

/// What the HTTP listener reads: the same counters and state `INFO` reads.
pub struct Observed {
    /// The request counters.
    pub stats: Arc<Stats>,
    /// The node's buckets (on a single node; in a cluster, what is not routed).
    pub shard: Arc<LocalShard>,
    /// In a cluster, where the shards' replicas and Raft state are.
    pub router: Option<Arc<Router>>,
    /// When the server started.
    pub started: std::time::Instant,
}

/// The page, served as it is.
const PAGE: &str = include_str!("page.html");

/// Binds the listener; serve it with [`serve`].
///
/// # Errors
/// If the address cannot be bound.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Answers HTTP on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, observed: Arc<Observed>, shutdown: CancellationToken) {
    let routes = Routes::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/metrics", get(metrics_text))
        .route("/health", get(|| async { "serving\n" }))
        .route("/ready", get(ready))
        .route("/api/state", get(state_json))
        .route("/api/buckets", get(buckets_json))
        .with_state(observed);
    let served = axum::serve(listener, routes)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "the HTTP listener failed");
    }
}

async fn metrics_text(State(observed): State<Arc<Observed>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(&observed),
    )
        .into_response()
}

/// Ready once recovered (the registry runs) and, in a cluster, every local shard has a leader.
async fn ready(State(observed): State<Arc<Observed>>) -> Response {
    let registry_running = observed.shard.registry().status().borrow().running;
    let leaderless: Vec<u16> = observed
        .router
        .as_ref()
        .map(|router| {
            router
                .shard_states()
                .into_iter()
                .filter(|state| state.leader.is_none())
                .map(|state| state.shard)
                .collect()
        })
        .unwrap_or_default();
    if !registry_running {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the registry is restarting\n",
        )
            .into_response();
    }
    if !leaderless.is_empty() {
        let message = format!("shards without a leader: {leaderless:?}\n");
        return (StatusCode::SERVICE_UNAVAILABLE, message).into_response();
    }
    "ready\n".into_response()
}

async fn state_json(State(observed): State<Arc<Observed>>) -> Response {
    axum::Json(state::snapshot(&observed)).into_response()
}

async fn buckets_json(
    State(observed): State<Arc<Observed>>,
    Query(query): Query<state::BucketQuery>,
) -> Response {
    // Walking every bucket is a blocking pass over the registry's names: off the workers'
    // async loop.
    let page = tokio::task::spawn_blocking(move || state::buckets(&observed, &query)).await;
    match page {
        Ok(page) => axum::Json(page).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
