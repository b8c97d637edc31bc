//! Every limit: a clear reply when it is hit, and the server serving on afterwards.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::time::Duration;

use common::{TestServer, within};
use kv::config::{CoreConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1 << 20;

#[tokio::test]
async fn clients_over_the_connection_limit_are_told_and_closed() {
    let server = TestServer::start(ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    })
    .await;
    let mut first = server.connect().await;
    first.send(b"PING\n").await;
    first.expect(b"+PONG\r\n").await;
    let mut second = server.connect().await;
    second.send(b"PING\n").await;
    second.expect(b"+PONG\r\n").await;

    // A line client that says nothing gets the line-protocol error.
    let mut silent = server.connect().await;
    assert_eq!(
        silent.until_closed().await,
        b"ERROR max number of clients reached (2)\r\n"
    );
    // A RESP client gets a RESP error.
    let mut resp = server.connect().await;
    resp.send(b"*1\r\n$4\r\nPING\r\n").await;
    assert_eq!(
        resp.until_closed().await,
        b"-ERR max number of clients reached (2)\r\n"
    );

    // When one leaves, its place is free again.
    drop(first);
    let mut observer = second;
    within(async {
        loop {
            observer.send(b"INFO\n").await;
            let mut open = None;
            loop {
                let line = observer.line().await;
                if line == b"OK\r\n" {
                    break;
                }
                if let Some(value) = line.strip_prefix(b"connections_open:") {
                    open = Some(String::from_utf8_lossy(value).trim().to_owned());
                }
            }
            if open.as_deref() == Some("1") {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    server.still_serves().await;
}

#[tokio::test]
async fn an_over_long_line_is_refused_whole_and_never_runs_in_pieces() {
    let server = TestServer::start(ServerConfig {
        max_line_len: 1024,
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.connect().await;
    // If the line were cut at the limit, "CREATE evil" would run as a request of its own.
    let mut line = b"PUT a k ".to_vec();
    line.resize(1030, b'x');
    line.extend_from_slice(b" CREATE evil");
    // The server sees 1030 bytes without a newline first, then the rest.
    let (head, tail) = line.split_at(1030);
    client.send(head).await;
    client
        .expect(b"ERROR line too long (limit 1024 bytes)\r\n")
        .await;
    client.send(tail).await;
    client.send(b"\nBUCKETS\nPING\n").await;
    client.expect(b"OK\r\n+PONG\r\n").await;
    // A line of exactly the limit is fine.
    let mut fits = b"CREATE ".to_vec();
    fits.resize(1024, b'y');
    fits.push(b'\n');
    client.send(&fits).await;
    client.expect(b"OK\r\n").await;
    let mut over = fits.clone();
    over.insert(0, b' ');
    client.send(&over).await;
    client
        .expect(b"ERROR line too long (limit 1024 bytes)\r\n")
        .await;
    client.send(b"PING\n").await;
    client.expect(b"+PONG\r\n").await;
}

#[tokio::test]
async fn bulks_past_the_limit_are_refused() {
    let server = TestServer::start(ServerConfig {
        max_bulk_len: 1000,
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.client().await;
    client.create(b"b").await.unwrap();
    // PUT, b and k take 5 of the 1000 bytes a request's bulks may hold.
    client.put(b"b", b"k", &[7u8; 995]).await.unwrap();
    let error = client.put(b"b", b"k", &[7u8; 996]).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("bulk length 1001 over the limit of 1000"),
        "{error}"
    );
    server.still_serves().await;
}

/// The header of a RESP `PUT b <key> <value>` whose value is `length` bytes.
fn put_header(key: &[u8], length: usize) -> Vec<u8> {
    let mut header = format!("*4\r\n$3\r\nPUT\r\n$1\r\nb\r\n${}\r\n", key.len()).into_bytes();
    header.extend_from_slice(key);
    header.extend_from_slice(format!("\r\n${length}\r\n").as_bytes());
    header
}

/// Waits until INFO's `field` satisfies `done`.
async fn until_info(client: &mut kv::client::Client, field: &str, done: impl Fn(u64) -> bool) {
    within(async {
        while !done(client.info_field(field).await.unwrap()) {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// The length of the value under `key`, if there is one: large values are compared by length.
async fn value_len(client: &mut kv::client::Client, bucket: &[u8], key: &[u8]) -> Option<usize> {
    client
        .get(bucket, key)
        .await
        .unwrap()
        .map(|value| value.len())
}

/// A server whose connection buffers together may hold `limit` bytes, and a client of it that
/// has created bucket `b`.
async fn buffer_limited_server(limit: usize) -> (TestServer, kv::client::Client) {
    let server = TestServer::start(ServerConfig {
        max_connection_buffers: limit,
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.client().await;
    client.create(b"b").await.unwrap();
    (server, client)
}

#[tokio::test]
async fn large_requests_past_the_read_buffer_limit_are_refused() {
    // Room for one connection partway through a 1.5 MiB value (its buffer doubles up to 2 MiB)
    // and the small buffers of the others, not for a second large request besides.
    let (server, mut observer) = buffer_limited_server(5 * MIB / 2).await;

    // The holder sends 1.25 MiB of a 1.5 MiB value and waits.
    let mut holder = server.connect().await;
    holder.send(&put_header(b"held", 3 * MIB / 2)).await;
    holder.send(&vec![b'h'; 5 * MIB / 4]).await;
    until_info(&mut observer, "input_buffer_bytes", |held| {
        held >= 2 * MIB as u64
    })
    .await;

    // A second large request finds the buffers over the limit as it grows: an error, closed.
    let greedy = server.connect().await;
    let (mut replies, mut requests) = greedy.stream.into_split();
    // The server stops reading this one, so the sender may block; it ends when the socket
    // closes.
    let sender = tokio::spawn(async move {
        let _ = requests.write_all(&put_header(b"greedy", 2 * MIB)).await;
        let _ = requests.write_all(&vec![b'g'; 2 * MIB]).await;
    });
    let mut reply = Vec::new();
    let _ = within(replies.read_to_end(&mut reply)).await;
    assert!(
        reply.starts_with(b"-ERR buffers of all connections over their limit"),
        "{:?}",
        reply.escape_ascii().to_string()
    );
    within(sender).await.unwrap();
    assert_eq!(observer.info_field("buffer_refusals").await.unwrap(), 1);

    // Small requests were never refused, and the holder's request completes.
    server.still_serves().await;
    holder.send(&vec![b'h'; MIB / 4]).await;
    holder.send(b"\r\n").await;
    holder.expect(b"+OK\r\n").await;
    assert_eq!(
        value_len(&mut observer, b"b", b"held").await,
        Some(3 * MIB / 2)
    );
    assert_eq!(observer.get(b"b", b"greedy").await.unwrap(), None);

    // Once the holder's room is given back, a large request fits again.
    until_info(&mut observer, "input_buffer_bytes", |held| {
        held < MIB as u64
    })
    .await;
    let mut later = server.client().await;
    later
        .put(b"b", b"later", &vec![b'l'; 3 * MIB / 2])
        .await
        .unwrap();
}

#[tokio::test]
async fn large_replies_past_the_buffer_limit_are_refused() {
    let (server, mut client) = buffer_limited_server(MIB).await;
    // Stored directly: a request this large would not pass the limit either.
    let bucket = server.registry.lookup(b"b").unwrap();
    bucket.put(b"large", &vec![b'l'; 2 * MIB]).unwrap();
    bucket.put(b"small", b"s").unwrap();

    // Its reply alone takes the buffers past the limit: an error instead, in the request's
    // dialect, and the connection closes. The small reply before it was sent.
    let mut raw = server.connect().await;
    raw.send(b"GET b small\n").await;
    raw.expect(b"s\r\nOK\r\n").await;
    raw.send(b"GET b large\n").await;
    let reply = raw.until_closed().await;
    assert!(
        reply.starts_with(b"ERROR buffers of all connections over their limit (1048576 bytes)"),
        "{:?}",
        reply.escape_ascii().to_string()
    );
    assert_eq!(client.info_field("buffer_refusals").await.unwrap(), 1);
    // Other clients go on, and small replies still pass.
    assert_eq!(
        client.get(b"b", b"small").await.unwrap().as_deref(),
        Some(&b"s"[..])
    );
    server.still_serves().await;
}

#[tokio::test]
async fn a_connection_gives_back_the_room_of_a_large_reply() {
    let server = TestServer::default().await;
    let mut reader = server.client().await;
    reader.create(b"b").await.unwrap();
    reader
        .put(b"b", b"large", &vec![b'l'; 2 * MIB])
        .await
        .unwrap();
    assert_eq!(value_len(&mut reader, b"b", b"large").await, Some(2 * MIB));
    // The reply buffer grew past 2 MiB for that reply; once the connection waits for its next
    // request, it holds no more than its small initial buffers (the observer's included).
    let mut observer = server.client().await;
    until_info(&mut observer, "output_buffer_bytes", |held| {
        held < MIB as u64 / 4
    })
    .await;
    until_info(&mut observer, "input_buffer_bytes", |held| {
        held < MIB as u64 / 4
    })
    .await;
    // The reader still works, and a second large reply is served the same way.
    assert_eq!(value_len(&mut reader, b"b", b"large").await, Some(2 * MIB));
}

#[tokio::test]
async fn the_bucket_limit_is_a_clear_error() {
    let server = TestServer::start(ServerConfig {
        core: CoreConfig {
            max_buckets: 2,
            ..CoreConfig::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.connect().await;
    client
        .send(b"CREATE a\nCREATE b\nCREATE c\nCREATE a\n")
        .await;
    client
        .expect(b"OK\r\nOK\r\nERROR bucket limit of 2 reached\r\nOK\r\n")
        .await;
}

#[tokio::test]
async fn the_memory_limit_is_a_clear_error() {
    let server = TestServer::start(ServerConfig {
        core: CoreConfig {
            max_memory: 10_000,
            ..CoreConfig::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.client().await;
    client.create(b"b").await.unwrap();
    let value = [1u8; 4000];
    client.put(b"b", b"one", &value).await.unwrap();
    client.put(b"b", b"two", &value).await.unwrap();
    let error = client.put(b"b", b"three", &value).await.unwrap_err();
    assert_eq!(error.to_string(), "OOM memory limit of 10000 bytes reached");
    client.delete(b"b", b"one").await.unwrap();
    client.put(b"b", b"three", &value).await.unwrap();
}

#[tokio::test]
async fn buckets_count_against_the_memory_limit_too() {
    // Empty buckets with long names cost memory: a client creating them must meet the limit
    // as one storing values does.
    let server = TestServer::start(ServerConfig {
        core: CoreConfig {
            max_memory: 100_000,
            ..CoreConfig::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.client().await;
    let name = |index: usize| format!("{index:04}{}", "n".repeat(996)).into_bytes();
    let mut created = 0;
    let error = loop {
        match client.create(&name(created)).await {
            Ok(()) => created += 1,
            Err(error) => break error,
        }
        assert!(
            created < 100,
            "a thousand-byte name costs more than a kilobyte"
        );
    };
    assert_eq!(
        error.to_string(),
        "OOM memory limit of 100000 bytes reached"
    );
    assert!(created >= 25, "only {created} buckets fit");
    // Dropping one makes room for another.
    client.drop_bucket(&name(0)).await.unwrap();
    client.create(&name(created)).await.unwrap();
}

#[tokio::test]
async fn idle_clients_are_closed() {
    let server = TestServer::start(ServerConfig {
        idle_timeout: Some(Duration::from_millis(200)),
        ..ServerConfig::default()
    })
    .await;
    let mut idle = server.connect().await;
    idle.send(b"PING\n").await;
    idle.expect(b"+PONG\r\n").await;
    assert_eq!(idle.until_closed().await, b"");
}

/// Sends `bytes` one at a time, `gap` apart, until they run out or the server closes; keeps
/// the connection open until aborted.
fn trickle(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    bytes: &'static [u8],
    gap: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for byte in bytes {
            tokio::time::sleep(gap).await;
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
        }
        std::future::pending::<()>().await;
        drop(writer);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_a_request_is_closed_at_the_request_timeout() {
    // A byte every 50 ms: the idle timeout never fires, and every connection slot would stay
    // held for as long as the tricklers like.
    let timeout = Duration::from_millis(600);
    let server = TestServer::start(ServerConfig {
        max_connections: 2,
        idle_timeout: Some(Duration::from_millis(300)),
        request_timeout: timeout,
        ..ServerConfig::default()
    })
    .await;
    let mut tricklers = Vec::new();
    for request in [
        &b"PUT b key a-value-that-never-ends"[..],
        b"*3\r\n$3\r\nPUT",
    ] {
        let stream = tokio::net::TcpStream::connect(server.address)
            .await
            .unwrap();
        let (reader, writer) = stream.into_split();
        let sending = trickle(writer, request, Duration::from_millis(50));
        tricklers.push((read_until_closed(reader), sending, request[0]));
    }
    for (closed, sending, first) in tricklers {
        let (told, lasted) = within(closed).await.unwrap();
        let expected: &[u8] = if first == b'*' {
            b"-ERR request not received whole within 600ms; closing\r\n"
        } else {
            b"ERROR request not received whole within 600ms; closing\r\n"
        };
        assert_eq!(
            told.escape_ascii().to_string(),
            expected.escape_ascii().to_string()
        );
        assert!(
            lasted >= timeout,
            "closed after {lasted:?}, before the timeout"
        );
        sending.abort();
    }
    // The slots are free again once the server has seen the tricklers go (it takes what a
    // closed client still sends, for a bounded time, so that the error reaches it).
    let mut probe = within(async {
        loop {
            let mut probe = server.connect().await;
            probe.send(b"PING\n").await;
            if probe.line().await == b"+PONG\r\n" {
                return probe;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    probe.send(b"INFO\n").await;
    loop {
        let line = probe.line().await;
        assert_ne!(line, b"OK\r\n", "INFO counts request timeouts");
        if line.starts_with(b"request_timeouts:") {
            assert_eq!(line, b"request_timeouts:2\r\n");
            break;
        }
    }
}

/// Reads until the server closes; gives what came and how long the connection lasted.
fn read_until_closed(
    mut reader: tokio::net::tcp::OwnedReadHalf,
) -> tokio::task::JoinHandle<(Vec<u8>, Duration)> {
    let started = tokio::time::Instant::now();
    tokio::spawn(async move {
        let mut told = Vec::new();
        let _ = reader.read_to_end(&mut told).await;
        (told, started.elapsed())
    })
}

#[tokio::test]
async fn a_client_sending_whole_requests_slowly_is_not_timed_out() {
    let server = TestServer::start(ServerConfig {
        request_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.connect().await;
    // Ten whole requests, each split over two writes, 100 ms apart: a second in all.
    for _ in 0..10 {
        client.send(b"PI").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.send(b"NG\n").await;
        client.expect(b"+PONG\r\n").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_stops_being_read() {
    let server = TestServer::default().await;
    let mut setup = server.client().await;
    setup.create(b"b").await.unwrap();
    let value = vec![b'v'; 64 * 1024];
    setup.put(b"b", b"k", &value).await.unwrap();
    let commands_before = setup.info_field("commands").await.unwrap();

    // 3,000 replies of 64 KiB: 196 MB if the server buffered them all.
    const REQUESTS: u64 = 3000;
    let mut greedy = server.connect().await;
    greedy.send(&b"GET b k\n".repeat(REQUESTS as usize)).await;

    // Wait until the server has stopped making progress on the greedy client: the command
    // count stays the same over many of the observer's own round trips.
    let last = within(async {
        let mut last = 0;
        let mut unchanged = 0;
        while unchanged < 50 {
            let now = setup.info_field("commands").await.unwrap();
            // Each INFO counts itself; subtract the observer's own.
            let now = now - commands_before;
            if now.abs_diff(last) <= 1 {
                unchanged += 1;
            } else {
                unchanged = 0;
            }
            last = now;
            tokio::task::yield_now().await;
        }
        last
    })
    .await;
    assert!(
        last < REQUESTS / 2,
        "the server answered {last} of {REQUESTS} requests to a client that reads nothing"
    );
    // Others are served meanwhile.
    assert_eq!(
        setup.get(b"b", b"k").await.unwrap().unwrap().len(),
        value.len()
    );
    server.still_serves().await;

    // When the client reads at last, every reply is there, whole and in order.
    let mut expected = Vec::with_capacity(value.len() + 8);
    expected.extend_from_slice(&value);
    expected.extend_from_slice(b"\r\nOK\r\n");
    for _ in 0..REQUESTS {
        greedy.expect(&expected).await;
    }
}
