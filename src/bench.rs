//! `kv bench`: a load generator like `redis-benchmark`, built on kv's own protocols.
//!
//! Every reply is checked: each key has one deterministic value, so a `GET` must return exactly
//! that value (or nothing, when keys were not preloaded or deletes are in the mix) and a `PUT`
//! must answer `OK`. A wrong reply counts as an error. Latency is measured per request, from
//! the write of its batch to the arrival of its reply, into an HDR histogram.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::client::{Client, ClientError};
use crate::protocol::{Dialect, ReplyValue};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// Setting up buckets or keys failed.
    #[error("setup: {0}")]
    Setup(String),
    /// A reply could not be read.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The operation mix is not `name=weight,…` with known names.
    #[error("bad operation mix {0:?}: expected e.g. get=0.9,put=0.1")]
    Mix(String),
}

/// The share of each operation in the load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    /// Share of `GET`.
    pub get: f64,
    /// Share of `PUT`.
    pub put: f64,
    /// Share of `DELETE`.
    pub delete: f64,
}

impl std::str::FromStr for Mix {
    type Err = BenchError;

    /// Parses `get=0.9,put=0.1` (weights are normalised; absent operations weigh 0).
    fn from_str(text: &str) -> Result<Self, BenchError> {
        let mut mix = Mix {
            get: 0.0,
            put: 0.0,
            delete: 0.0,
        };
        for part in text.split(',') {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| BenchError::Mix(text.to_owned()))?;
            let weight: f64 = weight
                .trim()
                .parse()
                .map_err(|_| BenchError::Mix(text.to_owned()))?;
            if !(weight >= 0.0 && weight.is_finite()) {
                return Err(BenchError::Mix(text.to_owned()));
            }
            match name.trim().to_ascii_lowercase().as_str() {
                "get" => mix.get = weight,
                "put" => mix.put = weight,
                "delete" => mix.delete = weight,
                _ => return Err(BenchError::Mix(text.to_owned())),
            }
        }
        let total = mix.get + mix.put + mix.delete;
        if total <= 0.0 {
            return Err(BenchError::Mix(text.to_owned()));
        }
        Ok(Mix {
            get: mix.get / total,
            put: mix.put / total,
            delete: mix.delete / total,
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// `host:port` of the server; several for a cluster, connections spread over them in
    /// turn (set-up goes to the first).
    pub addresses: Vec<String>,
    /// Connections, each sending batches of `pipeline` requests.
    pub connections: usize,
    /// Requests per batch (pipeline depth).
    pub pipeline: usize,
    /// Stop after this many requests (if `duration` is not set).
    pub requests: u64,
    /// Stop after this long instead of a request count.
    pub duration: Option<Duration>,
    /// Distinct keys (`key:000000000000` …, 16 bytes each).
    pub keys: u64,
    /// Bytes per value.
    pub value_size: usize,
    /// Buckets the keys are spread over (`bench-0` …); key `i` lives in bucket `i % buckets`.
    pub buckets: u64,
    /// The operation mix.
    pub mix: Mix,
    /// The protocol to speak.
    pub dialect: Dialect,
    /// Create the buckets and put every key before measuring.
    pub preload: bool,
    /// Print progress to stderr once a second.
    pub progress: bool,
    /// Leave the buckets (and their keys) behind; otherwise they are dropped at the end.
    pub keep: bool,
}

impl BenchConfig {
    /// The address connection `index` uses: the addresses in turn.
    #[must_use]
    pub fn address(&self, index: usize) -> &str {
        if self.addresses.is_empty() {
            return "127.0.0.1:4040";
        }
        &self.addresses[index % self.addresses.len()]
    }
}

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Requests answered.
    pub requests: u64,
    /// Replies that were not what they should have been.
    pub errors: u64,
    /// Requests answered `TRYAGAIN` (their shard had no leader in time, as during a failover):
    /// not errors, and not sent again; a write so answered may or may not have been made.
    pub unavailable: u64,
    /// Wall-clock time of the measured part.
    pub seconds: f64,
    /// Requests answered per second.
    pub ops_per_second: f64,
    /// The latency of every request.
    #[serde(flatten)]
    pub latency: Latency,
    /// The first wrong reply seen, to say what went wrong.
    pub first_error: Option<String>,
    /// The same, for each operation of the mix that ran.
    pub operations: Vec<OperationReport>,
}

/// What a run measured of one operation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OperationReport {
    /// `GET`, `PUT` or `DELETE`.
    pub operation: &'static str,
    /// Requests answered.
    pub requests: u64,
    /// Requests answered per second of the run.
    pub ops_per_second: f64,
    /// Their latency.
    #[serde(flatten)]
    pub latency: Latency,
}

/// Latency percentiles, from a request's batch written to its reply read, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl Latency {
    /// p50, p90, p99, p99.9 and max, in that order.
    #[must_use]
    pub fn columns(&self) -> [u64; 5] {
        [
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
        ]
    }

    fn of(histogram: &Histogram<u64>) -> Self {
        Self {
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        }
    }
}

impl OperationReport {
    fn of(operation: &'static str, histogram: &Histogram<u64>, seconds: f64) -> Self {
        Self {
            operation,
            requests: histogram.len(),
            ops_per_second: histogram.len() as f64 / seconds,
            latency: Latency::of(histogram),
        }
    }
}

#[derive(Clone, Copy)]
enum Operation {
    Get,
    Put,
    Delete,
}

impl Operation {
    const ALL: [Self; 3] = [Self::Get, Self::Put, Self::Delete];

    fn name(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
        }
    }
}

/// A latency histogram per operation, in [`Operation::ALL`]'s order.
type Histograms = [Histogram<u64>; 3];

/// The fixed data of a run: keys, values and bucket names, made once.
struct Keyspace {
    keys: u64,
    value_size: usize,
    buckets: u64,
}

/// A bucket name, `bench-<n>`, formatted on the stack.
struct BucketLabel {
    bytes: [u8; 26],
    len: usize,
}

impl std::ops::Deref for BucketLabel {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Keyspace {
    fn key(index: u64) -> [u8; 16] {
        let mut key = *b"key:000000000000";
        let mut digits = itoa::Buffer::new();
        let text = digits.format(index % 1_000_000_000_000);
        key[16 - text.len()..].copy_from_slice(text.as_bytes());
        key
    }

    /// The one value key `index` ever has: its digits repeated to the value size.
    fn value(&self, index: u64, out: &mut Vec<u8>) {
        let mut digits = itoa::Buffer::new();
        let text = digits.format(index).as_bytes();
        out.clear();
        out.extend(text.iter().copied().cycle().take(self.value_size));
    }

    fn new(keys: u64, value_size: usize, buckets: u64) -> Self {
        let buckets = buckets.max(1);
        Self {
            keys: keys.max(1),
            value_size,
            buckets,
        }
    }

    /// The name of the bucket of key `index`, formatted for each request: a table of 10,000
    /// names would cost the client a cache miss per request that a run on one bucket does not
    /// pay, and the client shares the machine with the server it measures.
    fn bucket(&self, index: u64) -> BucketLabel {
        const PREFIX: &[u8] = b"bench-";
        let mut digits = itoa::Buffer::new();
        let number = digits.format(index % self.buckets).as_bytes();
        let mut label = BucketLabel {
            bytes: [0; 26],
            len: PREFIX.len() + number.len(),
        };
        label.bytes[..PREFIX.len()].copy_from_slice(PREFIX);
        label.bytes[PREFIX.len()..label.len].copy_from_slice(number);
        label
    }
}

/// A reply reduced to what the checks need.
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok,
    Value(Vec<u8>),
    Missing,
    /// `TRYAGAIN`: the request may be sent again.
    Unavailable,
    Failure(String),
}

/// What the checks need of a reply.
fn outcome(reply: ReplyValue) -> Outcome {
    match reply {
        reply if is_ok(&reply) => Outcome::Ok,
        ReplyValue::Bulk(Some(value)) => Outcome::Value(value.to_vec()),
        ReplyValue::Bulk(None) => Outcome::Missing,
        reply if is_unavailable(&reply) => Outcome::Unavailable,
        other => Outcome::Failure(format!("{other:?}")),
    }
}

fn is_ok(reply: &ReplyValue) -> bool {
    matches!(reply, ReplyValue::Simple(text) if text == "OK")
}

/// Whether `reply` is `TRYAGAIN` (in the line protocol, the message the client reads as it).
fn is_unavailable(reply: &ReplyValue) -> bool {
    matches!(reply, ReplyValue::Error(error) if error.starts_with("TRYAGAIN "))
}

struct Shared {
    config: BenchConfig,
    keyspace: Keyspace,
    /// Requests handed out to connections so far (a batch takes `pipeline` at once).
    claimed: AtomicU64,
    completed: AtomicU64,
    errors: AtomicU64,
    unavailable: AtomicU64,
    stop: AtomicBool,
    first_error: parking_lot::Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock();
        if first.is_none() {
            *first = Some(message);
        }
    }
}

/// Runs the benchmark: setup (and preload, if asked), then the measured load.
///
/// # Errors
/// If a connection cannot be made or fails, or setup is refused.
pub async fn run(config: BenchConfig) -> Result<BenchReport, BenchError> {
    let keyspace = Keyspace::new(config.keys, config.value_size, config.buckets);
    setup(&config, &keyspace).await?;
    let shared = Arc::new(Shared {
        config: config.clone(),
        keyspace,
        claimed: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        unavailable: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        first_error: parking_lot::Mutex::new(None),
    });
    let started = Instant::now();
    let progress = config
        .progress
        .then(|| tokio::spawn(report_progress(Arc::clone(&shared))));
    let workers: Vec<_> = (0..config.connections.max(1))
        .map(|index| tokio::spawn(connection(Arc::clone(&shared), index as u64)))
        .collect();
    if let Some(duration) = config.duration {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            shared.stop.store(true, Ordering::Relaxed);
        });
    }
    let mut histograms: Histograms = [new_histogram(), new_histogram(), new_histogram()];
    let mut failure = None;
    for worker in workers {
        match worker.await {
            Ok(Ok(worker_histograms)) => {
                for (histogram, worker_histogram) in histograms.iter_mut().zip(&worker_histograms) {
                    histogram
                        .add(worker_histogram)
                        .map_err(|error| BenchError::Setup(error.to_string()))?;
                }
            }
            Ok(Err(error)) => failure = Some(error),
            Err(error) => failure = Some(BenchError::Setup(format!("worker failed: {error}"))),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Relaxed);
    if let Some(progress) = progress {
        progress.abort();
    }
    // What the run created goes, whether or not it went well.
    let cleaned = if config.keep {
        Ok(())
    } else {
        clean_up(&config, &shared.keyspace).await
    };
    if let Some(error) = failure {
        return Err(error);
    }
    cleaned?;
    let mut all = new_histogram();
    for histogram in &histograms {
        all.add(histogram)
            .map_err(|error| BenchError::Setup(error.to_string()))?;
    }
    let requests = shared.completed.load(Ordering::Relaxed);
    Ok(BenchReport {
        requests,
        errors: shared.errors.load(Ordering::Relaxed),
        unavailable: shared.unavailable.load(Ordering::Relaxed),
        seconds,
        ops_per_second: requests as f64 / seconds,
        latency: Latency::of(&all),
        first_error: shared.first_error.lock().clone(),
        operations: Operation::ALL
            .iter()
            .zip(&histograms)
            .filter(|(_, histogram)| !histogram.is_empty())
            .map(|(operation, histogram)| OperationReport::of(operation.name(), histogram, seconds))
            .collect(),
    })
}

/// Drops the buckets the run used.
async fn clean_up(config: &BenchConfig, keyspace: &Keyspace) -> Result<(), BenchError> {
    let mut drops = Batches::connect(config, "dropping the buckets", |reply| {
        is_ok(reply) || matches!(reply, ReplyValue::Error(error) if error.starts_with("NOTFOUND"))
    })
    .await?;
    for bucket in 0..keyspace.buckets {
        drops.request(&[b"DROP", &keyspace.bucket(bucket)]).await?;
    }
    drops.flush().await
}

fn new_histogram() -> Histogram<u64> {
    // One microsecond to one minute, three significant figures.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

async fn report_progress(shared: Arc<Shared>) {
    let started = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.tick().await;
    loop {
        interval.tick().await;
        let done = shared.completed.load(Ordering::Relaxed);
        eprintln!(
            "{:>6.1}s  {done:>12} requests  {:>12.0} req/s  {} errors  {} TRYAGAIN",
            started.elapsed().as_secs_f64(),
            done as f64 / started.elapsed().as_secs_f64(),
            shared.errors.load(Ordering::Relaxed),
            shared.unavailable.load(Ordering::Relaxed)
        );
    }
}

/// Creates the buckets and, if asked, puts every key, pipelined on one connection.
async fn setup(config: &BenchConfig, keyspace: &Keyspace) -> Result<(), BenchError> {
    let mut setup = Batches::connect(config, "creating the buckets", is_ok).await?;
    for bucket in 0..keyspace.buckets {
        setup
            .request(&[b"CREATE", &keyspace.bucket(bucket)])
            .await?;
    }
    // Every bucket is there before a key is put in it, whatever was sent again.
    setup.flush().await?;
    setup.what = "putting the keys";
    if config.preload {
        let mut value = Vec::with_capacity(keyspace.value_size);
        for index in 0..keyspace.keys {
            keyspace.value(index, &mut value);
            let key = Keyspace::key(index);
            setup
                .request(&[b"PUT", &keyspace.bucket(index), &key, &value])
                .await?;
        }
    }
    setup.flush().await
}

/// Setup and clean-up requests, sent in batches on one connection. Each is one that may be
/// made twice (`CREATE`, a `PUT` of the key's one value, `DROP`), so those answered `TRYAGAIN`
/// (their shard had no leader in time, as in a cluster's first seconds) are sent again, after
/// a pause, for up to [`Batches::RETRY_FOR`]; any other answer than an expected one fails the
/// run.
struct Batches {
    client: Client,
    /// The words of the requests queued and not yet answered.
    queued: Vec<Vec<Vec<u8>>>,
    expected: fn(&ReplyValue) -> bool,
    /// What the requests are for, to say what failed.
    what: &'static str,
}

impl Batches {
    /// Requests per batch.
    const BATCH: usize = 512;
    /// How long requests answered `TRYAGAIN` are sent again before the run gives up.
    const RETRY_FOR: Duration = Duration::from_secs(30);

    async fn connect(
        config: &BenchConfig,
        what: &'static str,
        expected: fn(&ReplyValue) -> bool,
    ) -> Result<Self, BenchError> {
        Ok(Self {
            client: Client::connect_with(config.address(0), config.dialect).await?,
            queued: Vec::new(),
            expected,
            what,
        })
    }

    async fn request(&mut self, words: &[&[u8]]) -> Result<(), BenchError> {
        self.queued
            .push(words.iter().map(|word| word.to_vec()).collect());
        if self.queued.len() == Self::BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends what is queued, and again what is answered `TRYAGAIN`, until every request has
    /// an expected answer.
    async fn flush(&mut self) -> Result<(), BenchError> {
        let give_up = Instant::now() + Self::RETRY_FOR;
        let mut pause = Duration::from_millis(20);
        while !self.queued.is_empty() {
            for words in &self.queued {
                let words: Vec<&[u8]> = words.iter().map(Vec::as_slice).collect();
                self.client.queue(&words);
            }
            let replies = self.client.flush().await?;
            let mut again = Vec::new();
            for (words, reply) in self.queued.drain(..).zip(replies) {
                if is_unavailable(&reply) {
                    again.push(words);
                } else if !(self.expected)(&reply) {
                    return Err(BenchError::Setup(format!("{}: {reply:?}", self.what)));
                }
            }
            if !again.is_empty() {
                if Instant::now() >= give_up {
                    return Err(BenchError::Setup(format!(
                        "{}: {} requests still answered TRYAGAIN after {:?}",
                        self.what,
                        again.len(),
                        Self::RETRY_FOR
                    )));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            self.queued = again;
        }
        Ok(())
    }
}

/// One connection: batches of `pipeline` requests until the budget or the time runs out.
async fn connection(shared: Arc<Shared>, seed: u64) -> Result<Histograms, BenchError> {
    let config = &shared.config;
    let keyspace = &shared.keyspace;
    let index = usize::try_from(seed).unwrap_or_default();
    let mut client = Client::connect_with(config.address(index), config.dialect).await?;
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED);
    let mut histograms: Histograms = [new_histogram(), new_histogram(), new_histogram()];
    let mut batch: Vec<(Operation, u64)> = Vec::with_capacity(config.pipeline);
    let mut value = Vec::with_capacity(keyspace.value_size);
    let may_be_missing = !config.preload || config.mix.delete > 0.0;
    let pipeline = config.pipeline.max(1) as u64;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let size = if config.duration.is_some() {
            pipeline
        } else {
            let first = shared.claimed.fetch_add(pipeline, Ordering::Relaxed);
            if first >= config.requests {
                break;
            }
            pipeline.min(config.requests - first)
        };
        batch.clear();
        for _ in 0..size {
            let index = rng.u64(..keyspace.keys);
            let roll = rng.f64();
            let operation = if roll < config.mix.get {
                Operation::Get
            } else if roll < config.mix.get + config.mix.put {
                Operation::Put
            } else {
                Operation::Delete
            };
            let bucket = keyspace.bucket(index);
            let key = Keyspace::key(index);
            match operation {
                Operation::Get => client.queue(&[b"GET", &bucket, &key]),
                Operation::Put => {
                    keyspace.value(index, &mut value);
                    client.queue(&[b"PUT", &bucket, &key, &value]);
                }
                Operation::Delete => client.queue(&[b"DELETE", &bucket, &key]),
            }
            batch.push((operation, index));
        }
        let sent = Instant::now();
        client.send().await?;
        for &(operation, index) in &batch {
            let outcome = outcome(client.read_reply().await?);
            let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
            histograms[operation as usize].saturating_record(micros.max(1));
            check(
                &shared,
                operation,
                index,
                outcome,
                may_be_missing,
                &mut value,
            );
        }
        shared.completed.fetch_add(size, Ordering::Relaxed);
    }
    Ok(histograms)
}

fn check(
    shared: &Shared,
    operation: Operation,
    index: u64,
    outcome: Outcome,
    may_be_missing: bool,
    scratch: &mut Vec<u8>,
) {
    match (operation, outcome) {
        (Operation::Put | Operation::Delete, Outcome::Ok) => {}
        (_, Outcome::Unavailable) => {
            shared.unavailable.fetch_add(1, Ordering::Relaxed);
        }
        (Operation::Get, Outcome::Missing) if may_be_missing => {}
        (Operation::Get, Outcome::Value(got)) => {
            shared.keyspace.value(index, scratch);
            if got != *scratch {
                shared.fail(format!(
                    "GET key {index}: got {:?}",
                    String::from_utf8_lossy(&got)
                ));
            }
        }
        (_, outcome) => shared.fail(format!("key {index}: {outcome:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse_and_normalise() {
        let mix: Mix = "get=9,put=1".parse().unwrap();
        assert!((mix.get - 0.9).abs() < 1e-9 && (mix.put - 0.1).abs() < 1e-9);
        assert!("get=x".parse::<Mix>().is_err());
        assert!("fly=1".parse::<Mix>().is_err());
        assert!("get=0".parse::<Mix>().is_err());
    }

    #[test]
    fn keys_are_sixteen_bytes_and_values_deterministic() {
        assert_eq!(&Keyspace::key(42), b"key:000000000042");
        let keyspace = Keyspace::new(10, 5, 1);
        let mut value = Vec::new();
        keyspace.value(12, &mut value);
        assert_eq!(value, b"12121");
    }

    /// A server on loopback that answers each request with `answer(first_try, index)` (index
    /// in the order requests came, retries included) and, once the client hangs up, gives the
    /// words of every request it got.
    async fn fake_server(
        answer: fn(bool, usize) -> &'static [u8],
    ) -> (String, tokio::task::JoinHandle<Vec<Vec<Vec<u8>>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        use crate::protocol::{ParseLimits, Parsed, parse, request_words};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let limits = ParseLimits::default();
            let (mut seen, mut input, mut chunk) = (Vec::new(), Vec::new(), [0; 4096]);
            loop {
                let read = socket.read(&mut chunk).await.unwrap();
                if read == 0 {
                    return seen;
                }
                input.extend_from_slice(&chunk[..read]);
                let mut out = Vec::new();
                while let Parsed::Request { consumed, .. } = parse(&input, &limits) {
                    let (words, _) = request_words(&input[..consumed], &limits).unwrap();
                    let words: Vec<Vec<u8>> = words.iter().map(|word| word.to_vec()).collect();
                    out.extend_from_slice(answer(!seen.contains(&words), seen.len()));
                    seen.push(words);
                    input.drain(..consumed);
                }
                socket.write_all(&out).await.unwrap();
            }
        });
        (address, server)
    }

    fn setup_config(address: String) -> BenchConfig {
        BenchConfig {
            addresses: vec![address],
            connections: 1,
            pipeline: 1,
            requests: 0,
            duration: None,
            keys: 10,
            value_size: 4,
            buckets: 3,
            mix: "get=1".parse().unwrap(),
            dialect: Dialect::Resp,
            preload: true,
            progress: false,
            keep: false,
        }
    }

    #[tokio::test]
    async fn setup_sends_again_what_is_answered_tryagain_and_creates_before_it_puts() {
        // Every other request is answered TRYAGAIN the first time it comes.
        let (address, server) = fake_server(|first_try, index| {
            if first_try && index % 2 == 0 {
                b"-TRYAGAIN cluster unavailable, try again\r\n"
            } else {
                b"+OK\r\n"
            }
        })
        .await;
        let config = setup_config(address);
        let keyspace = Keyspace::new(config.keys, config.value_size, config.buckets);
        setup(&config, &keyspace).await.unwrap();
        let seen = server.await.unwrap();
        let mut made = seen.clone();
        made.sort();
        made.dedup();
        assert_eq!(made.len(), 3 + 10, "every CREATE and PUT: {made:?}");
        // Refused once each: the first and third CREATE (requests 0 and 2), then five PUTs
        // (requests 6, 8, … 14, after the two CREATEs sent again).
        assert_eq!(seen.len(), 13 + 7, "{seen:?}");
        let last_create = seen
            .iter()
            .rposition(|words| words[0] == b"CREATE")
            .unwrap();
        let first_put = seen.iter().position(|words| words[0] == b"PUT").unwrap();
        assert!(last_create < first_put, "{seen:?}");
    }

    #[tokio::test]
    async fn setup_fails_on_an_answer_other_than_ok_or_tryagain() {
        let (address, server) = fake_server(|_, index| {
            if index == 1 {
                b"-ERR bucket limit of 1 reached\r\n"
            } else {
                b"+OK\r\n"
            }
        })
        .await;
        let config = setup_config(address);
        let keyspace = Keyspace::new(config.keys, config.value_size, config.buckets);
        let error = setup(&config, &keyspace).await.unwrap_err();
        let error = error.to_string();
        assert!(
            error.contains("creating the buckets") && error.contains("bucket limit"),
            "{error}"
        );
        assert_eq!(server.await.unwrap().len(), 3, "one batch of three CREATEs");
    }

    #[test]
    fn line_replies_are_read_whole() {
        use crate::protocol::{LineReplyShape, parse_line_reply};
        let parse = |input: &[u8]| {
            parse_line_reply(input, LineReplyShape::Value, 1024)
                .unwrap()
                .map(|(reply, used)| (outcome(reply), used))
        };
        assert_eq!(
            parse(b"12\r\nOK\r\n"),
            Some((Outcome::Value(b"12".to_vec()), 8))
        );
        assert_eq!(parse(b"\r\nOK\r\n"), Some((Outcome::Missing, 6)));
        assert_eq!(parse(b"12\r\nO"), None);
        assert!(matches!(
            parse(b"NOT FOUND\r\n"),
            Some((Outcome::Failure(_), 11))
        ));
    }
}
