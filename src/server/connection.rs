//! One client's connection: read, parse every complete request, dispatch, write the replies of
//! that read in one go.
//!
//! Invariants:
//! - The read buffer holds at most one request beyond the limits (a line of `max_line_len`, or a
//!   RESP request whose bulks total `max_bulk_len`) plus one read; nothing is reserved for a
//!   length a client merely announces.
//! - Unsent replies never pass `max_pending_output` plus one reply: past it, the connection
//!   writes before it parses (or reads) anything more, so a client that does not read its
//!   replies stops being read.
//! - While it waits for a read, a connection holds at most `4 * INITIAL_BUFFER` of reply buffer,
//!   and as much read buffer unless it holds part of a request: the room a large request or
//!   reply took is given back once it has passed.
//! - All connections' buffers together pass `max_connection_buffers` by at most one growth per
//!   worker: a connection whose read or reply buffer grows past its initial size and finds them
//!   over it is closed, which gives its buffers back.
//! - After an over-long line, bytes are discarded up to the next newline: no piece of that line
//!   ever runs as a request.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Buf, BytesMut};
use smallvec::SmallVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::busy_poll::BusyPoll;
use super::client_log::client_event;
use crate::cluster::router::Router;
use crate::config::ServerConfig;
use crate::dispatch::{Dispatcher, Next};
use crate::protocol::{
    Dialect, ErrorReply, NOT_A_COMMAND, ParseLimits, Parsed, Reply, Request, encode, parse,
    request_words,
};
use crate::stats::{COMMAND_SLOTS, Stats};

/// How many requests are parsed ahead of running them. Enough for a pipelining client's
/// usual depth; more would only hold more replies back from the output bound check.
const LOOKAHEAD: usize = 16;

/// Most requests one pass answers before its replies are written and the task yields: one
/// client with a long pipeline must not hold a worker while others wait. Each request costs at
/// most a page or one value, so this bounds the slice; passes of a usual pipeline (16 or so)
/// never reach it.
const MAX_ANSWERS_PER_PASS: u64 = 256;

/// How long a client being closed by the server has to take its last replies (or the error
/// that says why) and close its side, before the connection closes anyway.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What a read buffer starts with, and what it returns to after growing for a large request.
const INITIAL_BUFFER: usize = 16 * 1024;

/// Signals for a connection: `finish` asks it to answer what it has read and close; `abort`
/// closes it even while it waits to write (after the shutdown grace period).
#[derive(Clone)]
pub(super) struct Stop {
    pub(super) finish: CancellationToken,
    pub(super) abort: CancellationToken,
}

/// Keeps the open-connection gauge and the buffer gauges right however the task ends, a panic
/// included.
struct Gauges {
    stats: Arc<Stats>,
    input_capacity: usize,
    output_capacity: usize,
}

/// Moves `gauge` by the change from `*held` to `capacity`; returns whether it grew. The usual
/// case, a buffer that did not change size, makes no shared write.
fn track(gauge: &AtomicUsize, held: &mut usize, capacity: usize) -> bool {
    if capacity == *held {
        return false;
    }
    let grew = capacity > *held;
    if grew {
        gauge.fetch_add(capacity - *held, Ordering::Relaxed);
    } else {
        gauge.fetch_sub(*held - capacity, Ordering::Relaxed);
    }
    *held = capacity;
    grew
}

impl Gauges {
    /// Records the read buffer's capacity now; returns whether it grew.
    fn track_input(&mut self, capacity: usize) -> bool {
        track(
            &self.stats.input_buffer_bytes,
            &mut self.input_capacity,
            capacity,
        )
    }

    /// Records the reply buffer's capacity now; returns whether it grew.
    fn track_output(&mut self, capacity: usize) -> bool {
        track(
            &self.stats.output_buffer_bytes,
            &mut self.output_capacity,
            capacity,
        )
    }

    /// Whether the buffers of all connections together hold more than `limit` bytes.
    fn buffers_over(&self, limit: usize) -> bool {
        let input = self.stats.input_buffer_bytes.load(Ordering::Relaxed);
        let output = self.stats.output_buffer_bytes.load(Ordering::Relaxed);
        input + output > limit
    }

    /// Whether a buffer that just grew to `capacity` takes all buffers past `limit`. Growth
    /// within the initial size is never refused, so small requests and replies always pass.
    fn refuses(&self, grew: bool, capacity: usize, limit: usize) -> bool {
        grew && capacity > INITIAL_BUFFER && self.buffers_over(limit)
    }
}

impl Drop for Gauges {
    fn drop(&mut self) {
        self.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .input_buffer_bytes
            .fetch_sub(self.input_capacity, Ordering::Relaxed);
        self.stats
            .output_buffer_bytes
            .fetch_sub(self.output_capacity, Ordering::Relaxed);
    }
}

/// How processing the buffered input ended.
enum Progress {
    /// Everything complete was answered; read more.
    NeedInput,
    /// Replies reached the output bound; write them, then go on parsing.
    OutputFull,
    /// The pass answered its share; write the replies, let other tasks run, then go on.
    Yield,
    /// Write the replies, then close.
    Close,
    /// Write the replies, then stream what the server receives (`MONITOR`).
    Monitor,
}

/// How running a batch of requests ended.
enum Batch {
    /// The front of the buffer was not a complete, well-formed request; nothing ran.
    Empty,
    /// Some requests ran.
    Ran,
    /// A request asked to close the connection.
    Close,
    /// The connection became a monitor.
    Monitor,
}

/// Requests queued between `MULTI` and `EXEC`, as they were sent.
#[derive(Default)]
struct Transaction {
    queued: Vec<u8>,
    /// A request was refused while queueing: `EXEC` runs nothing.
    failed: bool,
}

struct Connection {
    stream: TcpStream,
    input: BytesMut,
    output: BytesMut,
    /// Set after an over-long line: drop bytes until the next newline.
    discarding: bool,
    dispatcher: Dispatcher,
    limits: ParseLimits,
    max_pending_output: usize,
    max_connection_buffers: usize,
    /// The dialect of the last request run: an error that is no request's reply uses it.
    dialect: Dialect,
    gauges: Gauges,
    busy_poll: Option<Arc<BusyPoll>>,
    /// When the request at the front of the buffer began to arrive, while it is incomplete.
    partial_since: Option<Instant>,
    /// Open between `MULTI` and `EXEC` or `DISCARD`.
    transaction: Option<Transaction>,
    /// The client's address, for logs and `MONITOR`.
    peer: std::net::SocketAddr,
    /// Requests answered in this pass, by command slot: counted here and added to the
    /// shared histograms once per pass, with the pass's latency, not once per request.
    pass: [u32; COMMAND_SLOTS],
}

/// How waiting for the client's next bytes ended.
enum Arrival {
    /// This many bytes came (0: the client closed).
    Bytes(usize),
    /// Nothing came within the idle timeout.
    Idle,
    /// The request begun earlier did not finish within the request timeout.
    RequestLate,
}

/// Serves one client until it closes, sends something that cannot be resynchronised, idles
/// past the timeout, or the server stops.
pub(super) async fn serve(
    stream: TcpStream,
    mut dispatcher: Dispatcher,
    config: Arc<ServerConfig>,
    stop: Stop,
    busy_poll: Option<Arc<BusyPoll>>,
) {
    // Replies of one read go out in one write; without NODELAY the second write of a
    // pipelined client waits for its delayed ACK (about 40 ms).
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY");
    }
    let unknown = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let peer = stream.peer_addr().unwrap_or(unknown);
    tracing::debug!(%peer, "connection opened");
    // `CLIENT KILL` finishes this connection alone, as a shutdown finishes them all.
    let stop = Stop {
        finish: stop.finish.child_token(),
        abort: stop.abort,
    };
    dispatcher.attach(
        peer,
        stream.local_addr().unwrap_or(unknown),
        stop.finish.clone(),
    );
    let stats = Arc::clone(dispatcher.stats());
    stats.connections_open.fetch_add(1, Ordering::Relaxed);
    let mut connection = Connection {
        stream,
        input: BytesMut::with_capacity(INITIAL_BUFFER),
        output: BytesMut::with_capacity(INITIAL_BUFFER),
        discarding: false,
        dispatcher,
        limits: ParseLimits {
            max_line_len: config.max_line_len,
            max_bulk_len: config.max_bulk_len,
            max_args: config.max_args,
        },
        max_pending_output: config.max_pending_output,
        max_connection_buffers: config.max_connection_buffers,
        dialect: Dialect::Line,
        gauges: Gauges {
            stats,
            input_capacity: 0,
            output_capacity: 0,
        },
        busy_poll,
        partial_since: None,
        transaction: None,
        peer,
        pass: [0; COMMAND_SLOTS],
    };
    connection.gauges.track_input(connection.input.capacity());
    connection.gauges.track_output(connection.output.capacity());
    if let Err(error) = connection.run(&config, &stop).await {
        tracing::debug!(%peer, %error, "connection closed by an I/O error");
    }
    tracing::debug!(%peer, "connection closed");
}

impl Connection {
    async fn run(&mut self, config: &ServerConfig, stop: &Stop) -> std::io::Result<()> {
        loop {
            let started = std::time::Instant::now();
            let (progress, answered) = self.process().await;
            self.time_partial_request(answered);
            let output_grew = self.gauges.track_output(self.output.capacity());
            let changed = self.dispatcher.take_changed();
            // No reply leaves before the log holds what it shows (see `LocalShard::commit`).
            // If the log fails, the replies are never sent: the client sees the connection
            // close, not an acknowledgement nor a value that the log does not hold.
            if (changed || !self.output.is_empty())
                && let Err(error) = self.dispatcher.shard().commit(changed).await
            {
                tracing::error!(%error, "closing a connection whose replies may show changes the log does not hold");
                return Ok(());
            }
            if self.gauges.refuses(
                output_grew,
                self.output.capacity(),
                self.max_connection_buffers,
            ) {
                // Replies this large cannot be held now: none of them is sent.
                return self.refuse(self.dialect).await;
            }
            if !self.output.is_empty() {
                tokio::select! {
                    biased;
                    () = stop.abort.cancelled() => return Ok(()),
                    written = self.stream.write_all(&self.output) => written?,
                }
                self.output.clear();
                self.record_pass(started.elapsed());
                if self.output.capacity() > 4 * self.max_pending_output {
                    self.output = BytesMut::with_capacity(INITIAL_BUFFER);
                    self.gauges.track_output(self.output.capacity());
                }
            }
            match progress {
                Progress::Close => return close_after_replies(&mut self.stream).await,
                Progress::Monitor => return self.monitor(stop).await,
                Progress::OutputFull => continue,
                Progress::Yield => {
                    tokio::task::yield_now().await;
                    continue;
                }
                Progress::NeedInput => {}
            }
            if stop.finish.is_cancelled() {
                return close_after_replies(&mut self.stream).await;
            }
            // Large requests and replies have passed: give their room back, and say so
            // before waiting for the next read, which may be long. Between reads a connection
            // keeps at most a few times its initial buffers, however large its last request
            // or reply was.
            if self.input.is_empty() && self.input.capacity() > 4 * INITIAL_BUFFER {
                self.input = BytesMut::with_capacity(INITIAL_BUFFER);
                self.gauges.track_input(self.input.capacity());
            }
            if self.output.capacity() > 4 * INITIAL_BUFFER {
                self.output = BytesMut::with_capacity(INITIAL_BUFFER);
                self.gauges.track_output(self.output.capacity());
            }
            let request_deadline = self
                .partial_since
                .map(|since| since + config.request_timeout);
            let read = tokio::select! {
                biased;
                () = stop.finish.cancelled() => return close_after_replies(&mut self.stream).await,
                read = read_within(&mut self.stream, &mut self.input, config.idle_timeout, request_deadline) => read,
            };
            let input_grew = self.gauges.track_input(self.input.capacity());
            if self.gauges.refuses(
                input_grew,
                self.input.capacity(),
                self.max_connection_buffers,
            ) {
                // The partial request's own dialect.
                let dialect = self
                    .input
                    .first()
                    .map_or(Dialect::Line, |&first| Dialect::of(first));
                return self.refuse(dialect).await;
            }
            match read? {
                Arrival::Bytes(0) => return Ok(()),
                Arrival::Bytes(count) => {
                    let stats = self.dispatcher.stats();
                    stats
                        .net_input_bytes
                        .fetch_add(count as u64, Ordering::Relaxed);
                }
                Arrival::Idle => {
                    client_event!(peer = %self.peer, timeout = ?config.idle_timeout, "closing an idle connection");
                    return Ok(());
                }
                Arrival::RequestLate => return self.close_late_request(config).await,
            }
        }
    }

    /// Adds this pass's requests, each taking `latency` from parsed to written, to the
    /// counts by command.
    fn record_pass(&mut self, latency: std::time::Duration) {
        let stats = self.dispatcher.stats();
        for (slot, requests) in self.pass.iter_mut().enumerate() {
            if *requests > 0 {
                stats.by_command[slot]
                    .latency
                    .record(latency, u64::from(std::mem::take(requests)));
            }
        }
    }

    /// Tells a client whose large request or reply would take all connections' buffers past
    /// their limit why it is being closed. The connection that grew is the one closed: its
    /// buffers, with any replies not yet sent, are given back first, since a client that sends
    /// such requests may not read this either; and that wait is bounded.
    async fn refuse(&mut self, dialect: Dialect) -> std::io::Result<()> {
        client_event!(
            peer = %self.peer,
            limit = self.max_connection_buffers,
            "closing a connection: connection buffers over their limit"
        );
        self.input = BytesMut::new();
        self.output = BytesMut::new();
        self.gauges.track_input(0);
        self.gauges.track_output(0);
        let error = ErrorReply::new(format!(
            "buffers of all connections over their limit ({} bytes); try again later",
            self.max_connection_buffers
        ));
        let stats = self.dispatcher.stats();
        stats.count_error(NOT_A_COMMAND);
        stats.buffer_refusals.fetch_add(1, Ordering::Relaxed);
        tell_and_close(&mut self.stream, error, dialect).await
    }

    /// Starts or stops timing the request at the front of the buffer, after a pass that
    /// answered `answered` requests: the request left incomplete (if any) began after the last
    /// of them; with none answered the timer runs on, so a trickle of bytes never resets it.
    fn time_partial_request(&mut self, answered: u64) {
        let incomplete = !self.input.is_empty() || self.discarding;
        self.partial_since = match self.partial_since {
            _ if !incomplete => None,
            Some(since) if answered == 0 => Some(since),
            _ => Some(Instant::now()),
        };
    }

    /// Closes a client whose request did not arrive whole within the request timeout, telling
    /// it why (in the partial request's dialect).
    async fn close_late_request(&mut self, config: &ServerConfig) -> std::io::Result<()> {
        client_event!(
            peer = %self.peer,
            timeout = ?config.request_timeout,
            buffered = self.input.len(),
            "closing a connection: a request did not arrive whole in time"
        );
        let stats = self.dispatcher.stats();
        stats.count_error(NOT_A_COMMAND);
        stats.request_timeouts.fetch_add(1, Ordering::Relaxed);
        let dialect = self
            .input
            .first()
            .map_or(Dialect::Line, |&first| Dialect::of(first));
        let error = ErrorReply::new(format!(
            "request not received whole within {:?}; closing",
            config.request_timeout
        ));
        tell_and_close(&mut self.stream, error, dialect).await
    }

    /// Answers every complete request in the buffer, until the output bound; says how it
    /// ended and how many requests it answered.
    async fn process(&mut self) -> (Progress, u64) {
        let mut answered = 0u64;
        let progress = loop {
            if self.output.len() >= self.max_pending_output {
                break Progress::OutputFull;
            }
            if self.discarding {
                let Some(end) = memchr::memchr(b'\n', &self.input) else {
                    self.input.clear();
                    break Progress::NeedInput;
                };
                self.input.advance(end + 1);
                self.discarding = false;
            }
            // A connection speaking RESP skips empty lines without a reply, as Redis skips an
            // empty inline request: `redis-cli --pipe` sends one before its closing ECHO and
            // could not read the line protocol's `UNKNOWN COMMAND`. The guide's clients never
            // speak RESP, so the line protocol still answers an empty line as the guide does.
            if self.dialect.is_resp() {
                self.input.advance(blank_lines(&self.input));
            }
            if answered >= MAX_ANSWERS_PER_PASS {
                break Progress::Yield;
            }
            match self.run_batch(&mut answered).await {
                Batch::Ran => continue,
                Batch::Close => break Progress::Close,
                Batch::Monitor => break Progress::Monitor,
                Batch::Empty => {}
            }
            // The front of the buffer is not a complete, well-formed request.
            match parse(&self.input, &self.limits) {
                Parsed::Incomplete => break Progress::NeedInput,
                Parsed::Request { .. } => unreachable!("a complete request would have run"),
                Parsed::Invalid {
                    error,
                    dialect,
                    consumed,
                } => {
                    let dialect = self.dispatcher.reply_dialect(dialect);
                    self.dispatcher.reject(&error, dialect, &mut self.output);
                    self.input.advance(consumed);
                    answered += 1;
                    self.pass[NOT_A_COMMAND] += 1;
                    // As Redis: a request refused while queueing fails the whole transaction.
                    if let Some(transaction) = &mut self.transaction {
                        transaction.failed = true;
                    }
                }
                Parsed::Overlong { error } => {
                    self.dispatcher
                        .reject(&error, Dialect::Line, &mut self.output);
                    self.discarding = true;
                    answered += 1;
                    self.pass[NOT_A_COMMAND] += 1;
                    if let Some(transaction) = &mut self.transaction {
                        transaction.failed = true;
                    }
                }
                Parsed::Fatal { error, dialect } => {
                    client_event!(peer = %self.peer, %error, "closing a connection: a protocol error it cannot recover from");
                    let dialect = self.dispatcher.reply_dialect(dialect);
                    self.dispatcher.reject(&error, dialect, &mut self.output);
                    answered += 1;
                    self.pass[NOT_A_COMMAND] += 1;
                    break Progress::Close;
                }
            }
        };
        if answered > 0 {
            if let Some(client) = self.dispatcher.client() {
                client.touch();
            }
            let stats = self.dispatcher.stats();
            // SeqCst: the busy poller reads this count as activity (see `BusyPoll::answered`).
            stats.commands.fetch_add(answered, Ordering::SeqCst);
            if let Some(busy_poll) = &self.busy_poll {
                busy_poll.answered();
            }
        }
        (progress, answered)
    }

    /// Runs the well-formed requests at the front of the buffer, up to [`LOOKAHEAD`] of them
    /// and while the output bound allows. They are all parsed first, so that the buckets they
    /// name are being fetched into cache together before the first one runs: with many
    /// buckets, each request would otherwise wait for its own cache miss in turn.
    async fn run_batch(&mut self, answered: &mut u64) -> Batch {
        let mut batch = SmallVec::<[_; LOOKAHEAD]>::new();
        let mut parsed_bytes = 0;
        while batch.len() < LOOKAHEAD {
            let Parsed::Request {
                request,
                dialect,
                consumed,
            } = parse(&self.input[parsed_bytes..], &self.limits)
            else {
                break;
            };
            batch.push((request, self.dispatcher.reply_dialect(dialect), consumed));
            parsed_bytes += consumed;
        }
        let Some(&(_, dialect, _)) = batch.last() else {
            return Batch::Empty;
        };
        self.dialect = dialect;
        let mut ran_bytes = 0;
        let mut outcome = Batch::Ran;
        let mut next = 0;
        while next < batch.len() {
            if self.output.len() >= self.max_pending_output {
                // The rest stays in the buffer until the replies are written.
                break;
            }
            // A connection that must authenticate, or that queues a transaction (or opens
            // one), looks at each request alone.
            if self.dispatcher.needs_auth()
                || self.transaction.is_some()
                || batch[next].0 == Request::Multi
            {
                let (request, dialect, consumed) = batch[next];
                let raw = &self.input[ran_bytes..ran_bytes + consumed];
                let step = run_alone(
                    &mut self.dispatcher,
                    &mut self.transaction,
                    &mut self.output,
                    &self.limits,
                    (request, dialect, raw),
                )
                .await;
                ran_bytes += consumed;
                *answered += 1;
                next += 1;
                match step {
                    Next::Continue => continue,
                    Next::Close => outcome = Batch::Close,
                    Next::Monitor => outcome = Batch::Monitor,
                }
                break;
            }
            // In a cluster, requests on buckets go to their shards' leaders together: each
            // shard's share in one proposal or one forwarded message.
            if self.dispatcher.is_clustered() {
                let dialect = batch[next].1;
                let routed: SmallVec<[_; LOOKAHEAD]> = batch[next..]
                    .iter()
                    .map_while(|&(request, same, consumed)| {
                        (same == dialect && Router::routes(&request)).then_some((request, consumed))
                    })
                    .collect();
                if !routed.is_empty() {
                    let requests: SmallVec<[_; LOOKAHEAD]> =
                        routed.iter().map(|&(request, _)| request).collect();
                    self.dispatcher
                        .run_routed(&requests, dialect, &mut self.output)
                        .await;
                    ran_bytes += routed.iter().map(|&(_, consumed)| consumed).sum::<usize>();
                    *answered += routed.len() as u64;
                    next += routed.len();
                    continue;
                }
            }
            // On a single node, requests on keys run together, their buckets found once for
            // all of them.
            let keyed: SmallVec<[_; LOOKAHEAD]> = batch[next..]
                .iter()
                .map_while(|&(request, dialect, _)| match request {
                    Request::Key(keyed) => Some((keyed, dialect)),
                    _ => None,
                })
                .collect();
            if !keyed.is_empty() {
                let ran =
                    self.dispatcher
                        .run_keyed(&keyed, &mut self.output, self.max_pending_output);
                ran_bytes += batch[next..next + ran]
                    .iter()
                    .map(|&(.., consumed)| consumed)
                    .sum::<usize>();
                *answered += ran as u64;
                next += ran;
                if ran < keyed.len() {
                    break;
                }
                continue;
            }
            let (request, dialect, consumed) = batch[next];
            let step = self
                .dispatcher
                .execute(request, dialect, &mut self.output)
                .await;
            ran_bytes += consumed;
            *answered += 1;
            next += 1;
            match step {
                // What follows a `HELLO` is answered in the version it chose: parsed again.
                Next::Continue if matches!(request, Request::Hello { .. }) => break,
                Next::Continue => {}
                Next::Close => {
                    outcome = Batch::Close;
                    break;
                }
                Next::Monitor => {
                    outcome = Batch::Monitor;
                    break;
                }
            }
        }
        for (request, ..) in &batch[..next] {
            self.pass[request.command_slot()] += 1;
        }
        if self.dispatcher.clients().monitored() {
            let mut start = 0;
            for &(.., consumed) in &batch[..next] {
                self.publish(&self.input[start..start + consumed]);
                start += consumed;
            }
        }
        drop(batch);
        self.input.advance(ran_bytes);
        outcome
    }

    /// Shows the request `raw` to the monitors.
    fn publish(&self, raw: &[u8]) {
        if let Some((words, more)) = request_words(raw, &self.limits) {
            self.dispatcher.clients().publish(self.peer, &words, more);
        }
    }

    /// Streams what the server receives, until the client closes or sends `QUIT`, the server
    /// stops, or the monitor falls too far behind (then it is told and closed: a slow monitor
    /// never slows the server, nor holds more than a bounded backlog).
    async fn monitor(&mut self, stop: &Stop) -> std::io::Result<()> {
        let mut feed = self.dispatcher.clients().monitor();
        self.input.clear();
        loop {
            tokio::select! {
                biased;
                () = stop.finish.cancelled() => return close_after_replies(&mut self.stream).await,
                line = feed.next() => {
                    let Some(line) = line else {
                        client_event!(peer = %self.peer, "closing a monitor that fell behind");
                        let error = ErrorReply::new("monitor fell too far behind; closing");
                        return tell_and_close(&mut self.stream, error, Dialect::Resp).await;
                    };
                    self.output.clear();
                    self.output.extend_from_slice(line.as_bytes());
                    // Whatever else is ready goes in the same write.
                    while self.output.len() < INITIAL_BUFFER && let Some(more) = feed.ready() {
                        self.output.extend_from_slice(more.as_bytes());
                    }
                    self.stream.write_all(&self.output).await?;
                    self.output.clear();
                }
                read = self.stream.read_buf(&mut self.input) => {
                    if read? == 0 {
                        return Ok(());
                    }
                    // A monitor only listens; `QUIT` ends it, anything else is dropped.
                    let quit = self.input.windows(4).any(|word| word.eq_ignore_ascii_case(b"QUIT"));
                    self.input.clear();
                    if quit {
                        self.stream.write_all(b"+OK\r\n").await?;
                        return close_after_replies(&mut self.stream).await;
                    }
                }
            }
        }
    }
}

/// How many bytes at the front of `input` are whole empty lines (`\n`, or `\r`s then `\n`):
/// all of them are skipped at once, however many a client sends.
fn blank_lines(input: &[u8]) -> usize {
    let run = input
        .iter()
        .take_while(|&&byte| byte == b'\r' || byte == b'\n')
        .count();
    input[..run]
        .iter()
        .rposition(|&byte| byte == b'\n')
        .map_or(0, |last| last + 1)
}

/// Runs one request of a connection that must authenticate first or that has a transaction
/// open: refuses it without the password, queues it in the transaction, or ends the
/// transaction.
async fn run_alone(
    dispatcher: &mut Dispatcher,
    transaction: &mut Option<Transaction>,
    output: &mut BytesMut,
    limits: &ParseLimits,
    (request, dialect, raw): (Request<'_>, Dialect, &[u8]),
) -> Next {
    if !dispatcher.admits(&request) {
        let error = dispatcher.no_auth(&request);
        encode(&Reply::Error(error), dialect, output);
        if let Some(transaction) = transaction {
            transaction.failed = true;
        }
        return Next::Continue;
    }
    let Some(open) = transaction else {
        if request == Request::Multi {
            *transaction = Some(Transaction::default());
            set_in_transaction(dispatcher, true);
            encode(&Reply::Ok, dialect, output);
            return Next::Continue;
        }
        return dispatcher.execute(request, dialect, output).await;
    };
    let refuse = |message: &str, output: &mut BytesMut| {
        encode(&Reply::Error(ErrorReply::new(message)), dialect, output);
    };
    match request {
        Request::Multi => refuse("MULTI calls can not be nested", output),
        Request::Quit => return dispatcher.execute(request, dialect, output).await,
        Request::Discard => {
            *transaction = None;
            set_in_transaction(dispatcher, false);
            encode(&Reply::Ok, dialect, output);
        }
        Request::Exec => {
            let ended = std::mem::take(open);
            *transaction = None;
            set_in_transaction(dispatcher, false);
            if ended.failed {
                let error = ErrorReply {
                    code: "EXECABORT",
                    message: "Transaction discarded because of previous errors.".to_owned(),
                };
                encode(&Reply::Error(error), dialect, output);
            } else {
                exec(dispatcher, &ended.queued, dialect, output, limits).await;
            }
        }
        Request::Monitor | Request::Hello { .. } | Request::Auth { .. } => {
            open.failed = true;
            refuse("Command not allowed inside a transaction", output);
        }
        _ if open.queued.len() + raw.len() > max_queued(limits) => {
            open.failed = true;
            refuse(
                &format!(
                    "transaction too large: more than {} bytes of requests queued",
                    max_queued(limits)
                ),
                output,
            );
        }
        _ => {
            open.queued.extend_from_slice(raw);
            encode(&Reply::Status("QUEUED"), dialect, output);
        }
    }
    Next::Continue
}

/// Most bytes of requests a transaction holds: twice the largest request, so that any request
/// fits in one, and a transaction never holds much more than the read buffer may.
fn max_queued(limits: &ParseLimits) -> usize {
    2 * limits.max_bulk_len.max(limits.max_line_len)
}

fn set_in_transaction(dispatcher: &Dispatcher, open: bool) {
    if let Some(client) = dispatcher.client() {
        client.set_in_transaction(open);
    }
}

/// `EXEC`: runs the requests `queued` in order, one after another, and answers with their
/// replies (a RESP array; in the line protocol, the replies one after another). Other
/// connections' requests may run between them: a transaction here is an ordered batch, not an
/// isolated one (docs/commands.md).
async fn exec(
    dispatcher: &mut Dispatcher,
    queued: &[u8],
    dialect: Dialect,
    output: &mut BytesMut,
    limits: &ParseLimits,
) {
    let mut replies = BytesMut::new();
    let mut count = 0usize;
    let mut at = 0;
    while at < queued.len() {
        // Each was parsed whole when it was queued.
        let Parsed::Request {
            request,
            dialect: asked,
            consumed,
        } = parse(&queued[at..], limits)
        else {
            break;
        };
        let asked = dispatcher.reply_dialect(asked);
        dispatcher.execute(request, asked, &mut replies).await;
        count += 1;
        at += consumed;
    }
    if dialect.is_resp() {
        output.extend_from_slice(format!("*{count}\r\n").as_bytes());
    }
    output.extend_from_slice(&replies);
}

/// Writes `error` to a client that is being closed, in `dialect`, and closes (see
/// [`close_after_replies`]); each step gives up after [`CLOSE_WAIT`] on a client that reads
/// nothing or keeps sending, so that a refusal never holds a task (or the server's shutdown)
/// for long.
pub(super) async fn tell_and_close(
    stream: &mut TcpStream,
    error: ErrorReply,
    dialect: Dialect,
) -> std::io::Result<()> {
    let mut reply = BytesMut::new();
    encode(&Reply::Error(error), dialect, &mut reply);
    match tokio::time::timeout(CLOSE_WAIT, stream.write_all(&reply)).await {
        Ok(written) => written?,
        // The client reads nothing: close without telling it.
        Err(_) => return Ok(()),
    }
    close_after_replies(stream).await
}

/// Closes a connection whose replies are written, so that the client gets them all: closing
/// with input unread makes the kernel reset the connection, and a reset can reach the client
/// before it has read the last replies. So the server ends its side first and takes what the
/// client still sends until it closes too, for at most [`CLOSE_WAIT`].
async fn close_after_replies(stream: &mut TcpStream) -> std::io::Result<()> {
    let drained = async {
        stream.shutdown().await?;
        let mut unread = [0u8; 4096];
        while stream.read(&mut unread).await? > 0 {}
        Ok(())
    };
    tokio::time::timeout(CLOSE_WAIT, drained)
        .await
        .unwrap_or(Ok(()))
}

/// Reads once, unless the idle timeout passes first or, with a request partly read, its
/// deadline does.
async fn read_within(
    stream: &mut TcpStream,
    input: &mut BytesMut,
    idle_timeout: Option<Duration>,
    request_deadline: Option<Instant>,
) -> std::io::Result<Arrival> {
    let idle_deadline = idle_timeout.map(|timeout| Instant::now() + timeout);
    let (deadline, late) = match (idle_deadline, request_deadline) {
        (None, None) => return stream.read_buf(input).await.map(Arrival::Bytes),
        (Some(idle), Some(request)) if idle < request => (idle, Arrival::Idle),
        (_, Some(request)) => (request, Arrival::RequestLate),
        (Some(idle), None) => (idle, Arrival::Idle),
    };
    match tokio::time::timeout_at(deadline, stream.read_buf(input)).await {
        Ok(read) => read.map(Arrival::Bytes),
        Err(_) => Ok(late),
    }
}

#[cfg(test)]
mod tests {
    use super::blank_lines;

    #[test]
    fn blank_lines_are_whole_lines_only() {
        assert_eq!(blank_lines(b"\r\n\n\r\r\n*1\r\n"), 6);
        assert_eq!(blank_lines(b"\r\n\r"), 2, "a lone \\r waits for its \\n");
        assert_eq!(blank_lines(b"*1\r\n"), 0);
        assert_eq!(blank_lines(b""), 0);
    }
}
