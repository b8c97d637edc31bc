//! What Redis clients send around their requests: `HELLO` and RESP3, `AUTH`, `MULTI`/`EXEC`,
//! `CLIENT`, `MONITOR`, `CONFIG GET`, `SCAN`, `INFO` sections; and errors that name what went
//! wrong.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::{Raw, TestServer, within};
use kv::config::ServerConfig;

fn command(words: &[&[u8]]) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    kv::protocol::encode_request(words, &mut out);
    out.to_vec()
}

async fn call(raw: &mut Raw, words: &[&[u8]], expected: &[u8]) {
    raw.send(&command(words)).await;
    raw.expect(expected).await;
}

/// Reads the rest of a `HELLO` reply, whose last field is `modules`, an empty array.
async fn rest_of_hello(raw: &mut Raw) -> Vec<u8> {
    raw.lines_until(b"$7\r\nmodules\r\n*0\r\n").await
}

#[tokio::test]
async fn hello_3_switches_the_connection_to_resp3_and_hello_2_back() {
    let server = TestServer::default().await;
    let mut raw = server.connect().await;
    call(&mut raw, &[b"CREATE", b"b"], b"+OK\r\n").await;
    call(&mut raw, &[b"GET", b"b", b"k"], b"$-1\r\n").await;
    raw.send(&command(&[b"HELLO", b"3"])).await;
    let hello = raw.line().await;
    assert_eq!(hello, b"%7\r\n", "a map of seven fields");
    raw.expect(b"$6\r\nserver\r\n$2\r\nkv\r\n$7\r\nversion\r\n")
        .await;
    raw.line().await;
    raw.line().await;
    raw.expect(b"$5\r\nproto\r\n:3\r\n$2\r\nid\r\n").await;
    raw.line().await;
    raw.expect(
        b"$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n",
    )
    .await;
    // RESP3's null, in a pipeline with the HELLO that chose it.
    call(&mut raw, &[b"GET", b"b", b"k"], b"_\r\n").await;
    raw.send(&[command(&[b"HELLO", b"2"]), command(&[b"GET", b"b", b"k"])].concat())
        .await;
    assert_eq!(raw.line().await, b"*14\r\n", "RESP2 flattens the map");
    let rest = rest_of_hello(&mut raw).await;
    assert!(rest.windows(8).any(|window| window == b"proto\r\n:"));
    raw.expect(b"$-1\r\n").await;
    call(
        &mut raw,
        &[b"HELLO", b"4"],
        b"-NOPROTO unsupported protocol version\r\n",
    )
    .await;
    // A line is answered as a line, whatever RESP version the connection chose.
    call(&mut raw, &[b"HELLO", b"3"], b"%7\r\n").await;
    raw.send(b"GET b k\n").await;
    let rest = raw.lines_until(b"\r\nOK\r\n").await;
    assert!(
        rest.ends_with(b"*0\r\n\r\nOK\r\n"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test]
async fn a_password_is_asked_before_anything_else() {
    let server = TestServer::start(ServerConfig {
        requirepass: Some("sesame".to_owned()),
        ..ServerConfig::default()
    })
    .await;
    let mut raw = server.connect().await;
    call(
        &mut raw,
        &[b"PING"],
        b"-NOAUTH Authentication required.\r\n",
    )
    .await;
    call(
        &mut raw,
        &[b"CREATE", b"b"],
        b"-NOAUTH Authentication required.\r\n",
    )
    .await;
    raw.send(&command(&[b"HELLO", b"3"])).await;
    assert!(
        raw.line()
            .await
            .starts_with(b"-NOAUTH HELLO must be called")
    );
    call(
        &mut raw,
        &[b"AUTH", b"wrong"],
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
    )
    .await;
    call(
        &mut raw,
        &[b"AUTH", b"someone", b"sesame"],
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
    )
    .await;
    call(&mut raw, &[b"AUTH", b"sesame"], b"+OK\r\n").await;
    call(&mut raw, &[b"CREATE", b"b"], b"+OK\r\n").await;
    // HELLO with AUTH authenticates, names and switches in one request.
    let mut other = server.connect().await;
    other
        .send(&command(&[
            b"HELLO", b"3", b"AUTH", b"default", b"sesame", b"SETNAME", b"worker",
        ]))
        .await;
    assert_eq!(other.line().await, b"%7\r\n");
    rest_of_hello(&mut other).await;
    call(&mut other, &[b"CLIENT", b"GETNAME"], b"$6\r\nworker\r\n").await;
    // The line protocol asks too.
    let mut line = server.connect().await;
    line.send(b"GET b k\nAUTH sesame\nGET b k\n").await;
    line.expect(b"ERROR Authentication required.\r\nOK\r\n\r\nOK\r\n")
        .await;
}

#[tokio::test]
async fn auth_without_a_password_set_says_so() {
    let server = TestServer::default().await;
    let mut raw = server.connect().await;
    raw.send(&command(&[b"AUTH", b"x"])).await;
    assert!(
        raw.line()
            .await
            .starts_with(b"-ERR AUTH <password> called without any password configured")
    );
}

#[tokio::test]
async fn multi_queues_requests_and_exec_runs_them_in_order() {
    let server = TestServer::default().await;
    let mut raw = server.connect().await;
    raw.send(
        &[
            command(&[b"MULTI"]),
            command(&[b"CREATE", b"b"]),
            command(&[b"PUT", b"b", b"k", b"1"]),
            command(&[b"GET", b"b", b"k"]),
            command(&[b"GET", b"nowhere", b"k"]),
            command(&[b"EXEC"]),
        ]
        .concat(),
    )
    .await;
    raw.expect(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n")
        .await;
    raw.expect(b"*4\r\n+OK\r\n+OK\r\n$1\r\n1\r\n-NOTFOUND bucket 'nowhere' does not exist\r\n")
        .await;
    // Nothing runs before EXEC: another connection does not see the queued change.
    let mut other = server.connect().await;
    call(&mut raw, &[b"MULTI"], b"+OK\r\n").await;
    call(&mut raw, &[b"PUT", b"b", b"k", b"2"], b"+QUEUED\r\n").await;
    call(&mut other, &[b"GET", b"b", b"k"], b"$1\r\n1\r\n").await;
    call(
        &mut raw,
        &[b"MULTI"],
        b"-ERR MULTI calls can not be nested\r\n",
    )
    .await;
    call(&mut raw, &[b"DISCARD"], b"+OK\r\n").await;
    call(&mut other, &[b"GET", b"b", b"k"], b"$1\r\n1\r\n").await;
    call(&mut raw, &[b"EXEC"], b"-ERR EXEC without MULTI\r\n").await;
    call(&mut raw, &[b"DISCARD"], b"-ERR DISCARD without MULTI\r\n").await;
    // A request refused while queueing fails the transaction: nothing of it runs.
    call(&mut raw, &[b"MULTI"], b"+OK\r\n").await;
    call(&mut raw, &[b"PUT", b"b", b"k", b"3"], b"+QUEUED\r\n").await;
    raw.send(&command(&[b"PUT", b"b"])).await;
    raw.expect(b"-ERR wrong number of arguments for 'put' command\r\n")
        .await;
    call(
        &mut raw,
        &[b"EXEC"],
        b"-EXECABORT Transaction discarded because of previous errors.\r\n",
    )
    .await;
    call(&mut other, &[b"GET", b"b", b"k"], b"$1\r\n1\r\n").await;
}

#[tokio::test]
async fn client_list_shows_connections_and_kill_closes_one() {
    let server = TestServer::default().await;
    let mut first = server.connect().await;
    let mut second = server.connect().await;
    call(&mut first, &[b"CLIENT", b"SETNAME", b"first"], b"+OK\r\n").await;
    call(
        &mut first,
        &[b"CLIENT", b"SETINFO", b"LIB-NAME", b"tests"],
        b"+OK\r\n",
    )
    .await;
    second.send(&command(&[b"CLIENT", b"ID"])).await;
    let id = String::from_utf8(second.line().await).unwrap();
    let id = id.trim().trim_start_matches(':').to_owned();
    first.send(&command(&[b"CLIENT", b"LIST"])).await;
    let header = first.line().await;
    let length: usize = std::str::from_utf8(&header[1..header.len() - 2])
        .unwrap()
        .parse()
        .unwrap();
    let mut list = Vec::new();
    while list.len() < length + 2 {
        list.extend(first.line().await);
    }
    let list = String::from_utf8(list).unwrap();
    assert_eq!(
        list.lines().filter(|line| line.starts_with("id=")).count(),
        2,
        "{list}"
    );
    assert!(list.contains("name=first "), "{list}");
    assert!(list.contains("lib-name=tests "), "{list}");
    assert!(list.contains(&format!("id={id} ")), "{list}");
    call(
        &mut first,
        &[b"CLIENT", b"KILL", b"ID", id.as_bytes()],
        b":1\r\n",
    )
    .await;
    assert_eq!(within(second.until_closed()).await, b"");
    call(
        &mut first,
        &[b"CLIENT", b"KILL", b"127.0.0.1:1"],
        b"-ERR No such client\r\n",
    )
    .await;
}

#[tokio::test]
async fn monitor_streams_other_clients_requests() {
    let server = TestServer::default().await;
    let mut monitor = server.connect().await;
    call(&mut monitor, &[b"MONITOR"], b"+OK\r\n").await;
    let mut client = server.connect().await;
    call(&mut client, &[b"CREATE", b"b"], b"+OK\r\n").await;
    client.send(b"PUT b k \"v\"\n").await;
    client.expect(b"OK\r\n").await;
    let created = String::from_utf8(monitor.line().await).unwrap();
    assert!(created.starts_with('+'), "{created}");
    assert!(created.ends_with("] \"CREATE\" \"b\"\r\n"), "{created}");
    let put = String::from_utf8(monitor.line().await).unwrap();
    assert!(
        put.ends_with("] \"PUT\" \"b\" \"k\" \"\\\"v\\\"\"\r\n"),
        "{put}"
    );
    monitor.send(b"QUIT\r\n").await;
    assert_eq!(within(monitor.until_closed()).await, b"+OK\r\n");
}

#[tokio::test]
async fn a_monitor_that_does_not_read_is_dropped_and_others_go_on() {
    let server = TestServer::default().await;
    let mut monitor = server.connect().await;
    call(&mut monitor, &[b"MONITOR"], b"+OK\r\n").await;
    let mut client = server.connect().await;
    // Far more lines than the backlog and the socket buffers hold, never read.
    let burst = command(&[b"PING", &[b'x'; 200]]).repeat(1000);
    let echoes = [b"$200\r\n".as_slice(), &[b'x'; 200], b"\r\n"]
        .concat()
        .repeat(1000);
    for _ in 0..200 {
        client.send(&burst).await;
        client.expect(&echoes).await;
    }
    let streamed = within(monitor.until_closed()).await;
    assert!(
        streamed.ends_with(b"-ERR monitor fell too far behind; closing\r\n"),
        "{}",
        String::from_utf8_lossy(&streamed[streamed.len().saturating_sub(200)..])
    );
    server.still_serves().await;
}

#[tokio::test]
async fn config_get_scan_and_info_sections() {
    let server = TestServer::start(ServerConfig {
        page_size: 3,
        ..ServerConfig::default()
    })
    .await;
    let mut raw = server.connect().await;
    call(
        &mut raw,
        &[b"CONFIG", b"GET", b"maxmemory"],
        b"*2\r\n$9\r\nmaxmemory\r\n$10\r\n4294967296\r\n",
    )
    .await;
    call(&mut raw, &[b"CONFIG", b"GET", b"nothing*"], b"*0\r\n").await;
    call(
        &mut raw,
        &[b"SCAN", b"0", b"MATCH", &[b'*'; 513]],
        b"-ERR pattern longer than 512 bytes\r\n",
    )
    .await;
    raw.send(&command(&[b"CONFIG", b"SET", b"maxmemory", b"1"]))
        .await;
    assert!(
        raw.line()
            .await
            .starts_with(b"-ERR kv's settings are fixed")
    );
    let names: Vec<String> = (0..8).map(|index| format!("b{index}")).collect();
    for name in &names {
        call(&mut raw, &[b"CREATE", name.as_bytes()], b"+OK\r\n").await;
    }
    // Every name once, over pages, whatever the page size.
    let mut client = server.client().await;
    let mut seen = Vec::new();
    let mut cursor = b"0".to_vec();
    for _ in 0..10 {
        let page = client.call(&[b"SCAN", &cursor]).await.unwrap();
        let kv::protocol::ReplyValue::Array(Some(parts)) = page else {
            panic!("a page: {page:?}");
        };
        let [
            kv::protocol::ReplyValue::Bulk(Some(next)),
            kv::protocol::ReplyValue::Array(Some(items)),
        ] = &parts[..]
        else {
            panic!("cursor and items: {parts:?}");
        };
        for item in items {
            let kv::protocol::ReplyValue::Bulk(Some(name)) = item else {
                panic!("a name");
            };
            seen.push(String::from_utf8(name.to_vec()).unwrap());
        }
        cursor = next.to_vec();
        if cursor == b"0" {
            break;
        }
    }
    assert_eq!(seen, names);
    let matched = client
        .call(&[b"SCAN", b"0", b"MATCH", b"b[15]", b"COUNT", b"100"])
        .await
        .unwrap();
    assert_eq!(
        kv::client::render(&matched),
        "1) \"0\"\n2) 1) \"b1\"\n   2) \"b5\""
    );
    call(
        &mut raw,
        &[b"SCAN", b"12345"],
        b"-ERR invalid cursor: pass 0, or a cursor a recent SCAN gave (the server keeps the last 4096)\r\n",
    )
    .await;
    let info = client.call(&[b"INFO", b"server"]).await.unwrap();
    let kv::protocol::ReplyValue::Bulk(Some(text)) = info else {
        panic!("text");
    };
    let text = String::from_utf8(text.to_vec()).unwrap();
    assert!(text.starts_with("# Server\r\nredis_version:"), "{text}");
    assert!(!text.contains("# Clients"), "{text}");
    let info = client.call(&[b"INFO"]).await.unwrap();
    let kv::protocol::ReplyValue::Bulk(Some(text)) = info else {
        panic!("text");
    };
    let text = String::from_utf8(text.to_vec()).unwrap();
    for section in [
        "# Server",
        "# Clients",
        "# Memory",
        "# Persistence",
        "# Stats",
        "# Keyspace",
    ] {
        assert!(text.contains(section), "{section} in {text}");
    }
    assert!(text.contains("db0:keys=0,expires=0,avg_ttl=0\r\n"));
}

#[tokio::test]
async fn redis_commands_on_a_bare_key_say_what_kv_takes() {
    let server = TestServer::default().await;
    let mut raw = server.connect().await;
    call(
        &mut raw,
        &[b"SET", b"key", b"value"],
        b"-ERR kv keeps keys in buckets: 'set' needs one, as in PUT bucket key value\r\n",
    )
    .await;
    call(
        &mut raw,
        &[b"GET", b"key"],
        b"-ERR kv keeps keys in buckets: 'get' needs one, as in GET bucket key\r\n",
    )
    .await;
    // The guide's reply stays the guide's.
    raw.send(b"SET key value\n").await;
    raw.expect(b"UNKNOWN COMMAND\r\n").await;
    // redis-benchmark's inline PING gets a reply it can read.
    raw.send(b"PING\r\n").await;
    raw.expect(b"+PONG\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_crate_speaks_resp3_with_transactions() {
    let server = TestServer::start(ServerConfig {
        requirepass: Some("pw".to_owned()),
        ..ServerConfig::default()
    })
    .await;
    let url = format!("redis://:pw@{}/?protocol=resp3", server.address);
    tokio::task::spawn_blocking(move || {
        let client = redis::Client::open(url).unwrap();
        let mut connection = client.get_connection().unwrap();
        let _: () = redis::cmd("CREATE")
            .arg("b")
            .query(&mut connection)
            .unwrap();
        let missing: Option<Vec<u8>> = redis::cmd("GET")
            .arg("b")
            .arg("k")
            .query(&mut connection)
            .unwrap();
        assert_eq!(missing, None);
        let (put, got): (String, Vec<u8>) = redis::pipe()
            .atomic()
            .cmd("PUT")
            .arg("b")
            .arg("k")
            .arg("v")
            .cmd("GET")
            .arg("b")
            .arg("k")
            .query(&mut connection)
            .unwrap();
        assert_eq!((put.as_str(), got.as_slice()), ("OK", &b"v"[..]));
        let settings: std::collections::HashMap<String, String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxclients")
            .query(&mut connection)
            .unwrap();
        assert_eq!(
            settings.get("maxclients").map(String::as_str),
            Some("10000")
        );
    })
    .await
    .unwrap();
}
