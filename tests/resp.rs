//! RESP2 on the same port: Redis clients work unchanged, values are binary-safe, and malformed
//! RESP closes only the connection that sent it.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::TestServer;
use kv::client::ClientError;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_crate_talks_to_kv() {
    let server = TestServer::default().await;
    let url = format!("redis://{}/", server.address);
    tokio::task::spawn_blocking(move || {
        let client = redis::Client::open(url).unwrap();
        let mut connection = client.get_connection().unwrap();
        let created: String = redis::cmd("CREATE")
            .arg("shopping")
            .query(&mut connection)
            .unwrap();
        assert_eq!(created, "OK");
        let value: &[u8] = b"\x00binary\r\nvalue\xff";
        let _: () = redis::cmd("PUT")
            .arg("shopping")
            .arg(b"k\x00ey")
            .arg(value)
            .query(&mut connection)
            .unwrap();
        let got: Vec<u8> = redis::cmd("GET")
            .arg("shopping")
            .arg(b"k\x00ey")
            .query(&mut connection)
            .unwrap();
        assert_eq!(got, value);
        let missing: Option<Vec<u8>> = redis::cmd("GET")
            .arg("shopping")
            .arg("nothing")
            .query(&mut connection)
            .unwrap();
        assert_eq!(missing, None);
        let error = redis::cmd("GET")
            .arg("nowhere")
            .arg("k")
            .query::<Option<Vec<u8>>>(&mut connection)
            .unwrap_err();
        assert_eq!(error.code(), Some("NOTFOUND"));
        let pong: String = redis::cmd("PING").query(&mut connection).unwrap();
        assert_eq!(pong, "PONG");
        // Pipelined through the client library.
        let (first, second): (String, Vec<u8>) = redis::pipe()
            .cmd("PUT")
            .arg("shopping")
            .arg("milk")
            .arg("1")
            .cmd("GET")
            .arg("shopping")
            .arg("milk")
            .query(&mut connection)
            .unwrap();
        assert_eq!((first.as_str(), second.as_slice()), ("OK", &b"1"[..]));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_kv_client_round_trips_binary_data() {
    let server = TestServer::default().await;
    let mut client = server.client().await;
    client.create(b"\x00bucket").await.unwrap();
    for length in [0usize, 1, 100, 70_000, 1 << 20] {
        let value: Vec<u8> = (0..length).map(|index| (index % 251) as u8).collect();
        client.put(b"\x00bucket", b"key", &value).await.unwrap();
        let got = client.get(b"\x00bucket", b"key").await.unwrap().unwrap();
        assert_eq!(got.len(), value.len());
        assert!(got == value);
    }
    assert!(matches!(
        client.get(b"nowhere", b"key").await,
        Err(ClientError::NotFound)
    ));
}

#[tokio::test]
async fn line_and_resp_requests_mix_on_one_connection() {
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    client
        .send(b"CREATE s\n*4\r\n$3\r\nPUT\r\n$1\r\ns\r\n$1\r\nk\r\n$1\r\nv\r\nGET s k\n*3\r\n$3\r\nget\r\n$1\r\ns\r\n$1\r\nk\r\n")
        .await;
    client.expect(b"OK\r\n+OK\r\nv\r\nOK\r\n$1\r\nv\r\n").await;
}

#[tokio::test]
async fn resp_errors_follow_redis_conventions() {
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    client
        .send(b"*2\r\n$6\r\nDELETE\r\n$1\r\nx\r\n*3\r\n$3\r\nGET\r\n$1\r\nx\r\n$1\r\nk\r\n*1\r\n$4\r\nINFO\r\n")
        .await;
    client
        .expect(b"-ERR wrong number of arguments for 'delete' command\r\n-NOTFOUND bucket 'x' does not exist\r\n$")
        .await;
}

#[tokio::test]
async fn resp_errors_name_the_command_and_the_line_protocol_keeps_the_guides() {
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    client
        .send(b"*2\r\n$3\r\nFLY\r\n$4\r\naway\r\n*2\r\n$7\r\nCLUSTER\r\n$4\r\nMEET\r\n")
        .await;
    client
        .expect(b"-ERR unknown command 'FLY', with args beginning with: 'away' \r\n-ERR unknown subcommand 'MEET' of 'cluster'\r\n")
        .await;
    client.send(b"FLY away\nGET onlybucket\n").await;
    client
        .expect(b"UNKNOWN COMMAND\r\nUNKNOWN COMMAND\r\n")
        .await;
}

/// `redis-cli --pipe` ends what it sends with an empty line and an ECHO of a random word, and
/// reads replies until its word comes back: the empty line must get no reply of its own.
#[tokio::test]
async fn echo_answers_and_a_resp_connection_skips_empty_lines_as_redis_does() {
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    client
        .send(b"*2\r\n$6\r\nCREATE\r\n$4\r\npipe\r\n\r\n\n*2\r\n$4\r\nECHO\r\n$4\r\nw\x00rd\r\n")
        .await;
    client.expect(b"+OK\r\n$4\r\nw\x00rd\r\n").await;
    // A line protocol connection answers an empty line as the guide does, and ECHO as PING.
    let mut line = server.connect().await;
    line.send(b"\nECHO word\n").await;
    line.expect(b"UNKNOWN COMMAND\r\nword\r\nOK\r\n").await;
}

#[tokio::test]
async fn malformed_resp_gets_an_error_and_closes_only_that_connection() {
    let server = TestServer::default().await;
    let mut bystander = server.client().await;
    bystander.create(b"kept").await.unwrap();
    bystander.put(b"kept", b"k", b"v").await.unwrap();
    for garbage in [
        &b"*2\r\n+GET\r\n"[..],
        b"*x\r\n",
        b"*1\r\n$3\r\nGETxx",
        b"*99999999\r\n",
        b"*1\r\n$-7\r\n",
    ] {
        let mut client = server.connect().await;
        client.send(garbage).await;
        let reply = client.until_closed().await;
        assert!(
            reply.starts_with(b"-ERR "),
            "{:?}",
            reply.escape_ascii().to_string()
        );
        assert!(reply.ends_with(b"\r\n"));
    }
    assert_eq!(
        bystander.get(b"kept", b"k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    server.still_serves().await;
}

#[tokio::test]
async fn an_announced_bulk_is_not_reserved_before_it_arrives() {
    let server = TestServer::default().await;
    let announcement: &[u8] = b"*4\r\n$3\r\nPUT\r\n$1\r\nb\r\n$1\r\nk\r\n$8388000\r\nabc";
    let mut announcers = Vec::new();
    for _ in 0..4 {
        let mut client = server.connect().await;
        // 8 MB announced (the limit), three bytes sent.
        client.send(announcement).await;
        announcers.push(client);
    }
    let mut observer = server.client().await;
    // Wait until the server has read every announcement: the bytes it read, less the
    // observer's own INFO requests (14 bytes each), cover all four.
    let info_request_len = b"*1\r\n$4\r\nINFO\r\n".len() as u64;
    common::within(async {
        let mut asked = 0u64;
        loop {
            let read = observer.info_field("net_input_bytes").await.unwrap();
            asked += 1;
            if read >= 4 * announcement.len() as u64 + asked * info_request_len {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let buffered = observer.info_field("input_buffer_bytes").await.unwrap();
    assert!(
        buffered < 1024 * 1024,
        "{buffered} bytes of read buffer for 4 announced 8 MB bulks"
    );
    // One byte over the limit is refused at once, before any data.
    let mut greedy = server.connect().await;
    greedy
        .send(b"*4\r\n$3\r\nPUT\r\n$1\r\nb\r\n$1\r\nk\r\n$536870912\r\n")
        .await;
    let reply = greedy.until_closed().await;
    assert!(
        reply.starts_with(b"-ERR bulk length"),
        "{:?}",
        reply.escape_ascii().to_string()
    );
    server.still_serves().await;
}

#[tokio::test]
async fn cluster_keyslot_gives_redis_clusters_slot_in_both_protocols() {
    let server = TestServer::default().await;
    let mut client = server.client().await;
    // The slots Redis 7 gives: hash tags route buckets as they route Redis keys.
    for (name, slot) in [
        (&b"somekey"[..], 11058),
        (b"foo", 12182),
        (b"{user1000}.following", 3443),
        (b"{user1000}.followers", 3443),
    ] {
        let reply = client.call(&[b"CLUSTER", b"KEYSLOT", name]).await.unwrap();
        assert_eq!(reply, kv::protocol::ReplyValue::Integer(slot), "{name:?}");
    }
    let mut line = server.connect().await;
    line.send(b"cluster keyslot foo\n").await;
    line.expect(b"12182\r\nOK\r\n").await;
    // A single node says it is not in a cluster, as Redis does.
    let error = client.call(&[b"CLUSTER", b"INFO"]).await.unwrap();
    assert_eq!(
        error,
        kv::protocol::ReplyValue::Error(
            "ERR This instance has cluster support disabled; start it with --peers".into()
        )
    );
}

/// What Redis clients send on connecting: a name for the connection, their library, the
/// database (kv has one, 0).
#[tokio::test]
async fn clients_name_their_connection_and_select_database_zero() {
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    client
        .send(
            b"*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$6\r\nworker\r\n\
              *2\r\n$6\r\nCLIENT\r\n$7\r\nGETNAME\r\n\
              *4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$8\r\nLIB-NAME\r\n$8\r\nredis-py\r\n\
              *4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$7\r\nLIB-VER\r\n$5\r\n8.0.0\r\n\
              *2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n\
              *2\r\n$6\r\nSELECT\r\n$1\r\n1\r\n\
              *3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$3\r\na b\r\n",
        )
        .await;
    client
        .expect(
            b"+OK\r\n$6\r\nworker\r\n+OK\r\n+OK\r\n+OK\r\n\
              -ERR DB index is out of range: kv has one database, 0\r\n\
              -ERR Client names cannot contain spaces, newlines or special characters.\r\n",
        )
        .await;
    let mut other = server.connect().await;
    other.send(b"*2\r\n$6\r\nCLIENT\r\n$7\r\nGETNAME\r\n").await;
    other.expect(b"$-1\r\n").await;
    // A name is bounded: every connection may keep one.
    let long = "n".repeat(257);
    other
        .send(format!("*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$257\r\n{long}\r\n").as_bytes())
        .await;
    other
        .expect(b"-ERR Client names are at most 256 bytes\r\n")
        .await;
}

/// What `redis-cli --stat`, `info server` and `dbsize` read: the key count, and `INFO`'s
/// counts under Redis's names too.
#[tokio::test]
async fn dbsize_and_info_answer_what_redis_tools_read() {
    let server = TestServer::default().await;
    let mut client = server.client().await;
    client.create(b"a").await.unwrap();
    client.put(b"a", b"k1", b"v").await.unwrap();
    client.put(b"a", b"k2", b"v").await.unwrap();
    assert_eq!(
        client.call(&[b"DBSIZE"]).await.unwrap(),
        kv::protocol::ReplyValue::Integer(2)
    );
    let kv::protocol::ReplyValue::Bulk(Some(info)) = client.call(&[b"INFO"]).await.unwrap() else {
        panic!("INFO is text");
    };
    let info = String::from_utf8(info.to_vec()).unwrap();
    for field in [
        "connected_clients:1",
        "blocked_clients:0",
        "db0:keys=2,",
        "total_commands_processed:",
        "total_connections_received:",
        "used_memory:",
    ] {
        assert!(info.contains(field), "{field} in {info}");
    }
}
