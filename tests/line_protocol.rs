//! The guide's line protocol, byte for byte, against a real server.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::{TestServer, within};

#[tokio::test]
async fn the_guides_session() {
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    for (request, reply) in [
        (&b"CREATE shopping\r\n"[..], &b"OK\r\n"[..]),
        (b"PUT shopping milk 1\r\n", b"OK\r\n"),
        (b"PUT shopping eggs 3\r\n", b"OK\r\n"),
        (b"GET shopping milk\r\n", b"1\r\nOK\r\n"),
        (b"DELETE shopping eggs\r\n", b"OK\r\n"),
    ] {
        client.send(request).await;
        client.expect(reply).await;
    }
}

#[tokio::test]
async fn missing_keys_unknown_buckets_and_bad_commands() {
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    client.send(b"CREATE shopping\n").await;
    client.expect(b"OK\r\n").await;
    // Also when it already exists.
    client.send(b"CREATE shopping\n").await;
    client.expect(b"OK\r\n").await;
    client.send(b"GET shopping bread\n").await;
    client.expect(b"\r\nOK\r\n").await;
    for request in [
        &b"GET nowhere milk\n"[..],
        b"PUT nowhere milk 1\n",
        b"DELETE nowhere milk\n",
        b"DROP nowhere\n",
        b"KEYS nowhere\n",
    ] {
        client.send(request).await;
        client.expect(b"NOT FOUND\r\n").await;
    }
    for request in [
        &b"FLY shopping\n"[..],
        b"GET shopping\n",
        b"PUT shopping milk\n",
        b"PUT shopping milk 1 2\n",
        b"CREATE\n",
        b"\n",
        b"   \t \r\n",
    ] {
        client.send(request).await;
        client.expect(b"UNKNOWN COMMAND\r\n").await;
    }
}

#[tokio::test]
async fn blanks_line_endings_and_case() {
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    client.send(b"  create \t shopping  \n").await;
    client.expect(b"OK\r\n").await;
    client.send(b"Put\tshopping\t\tmilk   1\r\n").await;
    client.expect(b"OK\r\n").await;
    client.send(b"gEt shopping milk\n").await;
    client.expect(b"1\r\nOK\r\n").await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    let mut requests = b"CREATE shopping\n".to_vec();
    let mut replies = b"OK\r\n".to_vec();
    for index in 0..1000 {
        requests.extend_from_slice(format!("PUT shopping k{index} v{index}\n").as_bytes());
        requests.extend_from_slice(format!("GET shopping k{index}\n").as_bytes());
        replies.extend_from_slice(format!("OK\r\nv{index}\r\nOK\r\n").as_bytes());
    }
    client.send(&requests).await;
    client.expect(&replies).await;
}

#[tokio::test]
async fn a_request_split_into_single_bytes_works() {
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    for byte in b"CREATE shopping\r\nPUT shopping milk 1\r\nGET shopping milk\r\n" {
        client.send(&[*byte]).await;
    }
    client.expect(b"OK\r\nOK\r\n1\r\nOK\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_on_their_own_buckets() {
    let server = TestServer::default().await;
    let clients: Vec<_> = (0..16)
        .map(|index| {
            let address = server.address;
            tokio::spawn(async move {
                let mut client = common::Raw::connect(address).await;
                let bucket = format!("bucket{index}");
                client.send(format!("CREATE {bucket}\n").as_bytes()).await;
                client.expect(b"OK\r\n").await;
                for round in 0..200 {
                    let put = format!("PUT {bucket} key{round} {index}-{round}\n");
                    client.send(put.as_bytes()).await;
                    client.expect(b"OK\r\n").await;
                }
                for round in 0..200 {
                    let get = format!("GET {bucket} key{round}\n");
                    client.send(get.as_bytes()).await;
                    client
                        .expect(format!("{index}-{round}\r\nOK\r\n").as_bytes())
                        .await;
                }
            })
        })
        .collect();
    for client in clients {
        common::within(client).await.unwrap();
    }
}

#[tokio::test]
async fn drop_ping_info_lists_and_quit() {
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    client
        .send(b"CREATE b\nCREATE a\nPUT a k2 v\nPUT a k1 v\nPING\nPING hello\nBUCKETS\nBUCKETS a\nKEYS a\nKEYS a k1\n")
        .await;
    // A page of keys opens with the cursor of the next page: 0, the listing is done.
    client
        .expect(b"OK\r\nOK\r\nOK\r\nOK\r\n+PONG\r\nhello\r\nOK\r\na\r\nb\r\nOK\r\nb\r\nOK\r\n0\r\nk1\r\nk2\r\nOK\r\nERROR invalid cursor: pass 0, or the cursor the previous page gave\r\n")
        .await;
    client.send(b"DROP a\nGET a k1\nINFO\n").await;
    client.expect(b"OK\r\nNOT FOUND\r\n").await;
    let mut info = Vec::new();
    loop {
        let line = client.line().await;
        if line == b"OK\r\n" {
            break;
        }
        info.extend_from_slice(&line);
    }
    let info = String::from_utf8(info).unwrap();
    assert!(info.contains("buckets:1\r\n"), "{info}");
    assert!(info.contains("connections_open:1\r\n"), "{info}");
    let resident: u64 = info
        .lines()
        .find_map(|line| line.strip_prefix("resident_bytes:"))
        .expect("INFO reports resident memory")
        .parse()
        .unwrap();
    assert!(
        resident > 1 << 20,
        "a running server holds more than 1 MiB: {resident}"
    );
    client.send(b"QUIT\nPING\n").await;
    assert_eq!(
        client.until_closed().await,
        b"OK\r\n",
        "nothing after QUIT runs"
    );
}

#[tokio::test]
async fn listings_are_bounded_by_the_page_size() {
    let server = TestServer::start(kv::config::ServerConfig {
        page_size: 3,
        ..Default::default()
    })
    .await;
    let mut client = server.connect().await;
    client.send(b"CREATE b\n").await;
    client.expect(b"OK\r\n").await;
    for index in 0..10 {
        client.send(format!("PUT b k{index} v\n").as_bytes()).await;
        client.expect(b"OK\r\n").await;
    }
    // Pages of three, each opening with the cursor of the next, until the cursor is 0: every
    // key once. Stored order: the last stored first.
    let mut cursor = b"0".to_vec();
    let mut pages = Vec::new();
    loop {
        client
            .send(&[&b"KEYS b "[..], &cursor, b"\n"].concat())
            .await;
        cursor = client.line().await;
        cursor.truncate(cursor.len() - 2);
        let mut page = Vec::new();
        loop {
            let line = client.line().await;
            if line == b"OK\r\n" {
                break;
            }
            page.push(String::from_utf8(line[..line.len() - 2].to_vec()).unwrap());
        }
        pages.push(page);
        if cursor == b"0" {
            break;
        }
    }
    assert_eq!(
        pages,
        [
            vec!["k9", "k8", "k7"],
            vec!["k6", "k5", "k4"],
            vec!["k3", "k2", "k1"],
            vec!["k0"]
        ]
    );
    client.send(b"BUCKETS\nBUCKETS b\n").await;
    client.expect(b"b\r\nOK\r\nOK\r\n").await;
}

#[tokio::test]
async fn pipelined_requests_over_many_buckets_are_answered_in_order() {
    // Requests are parsed ahead of running them in batches; buckets created, used and dropped
    // within one batch must behave exactly as one request at a time.
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    let mut requests = Vec::new();
    let mut replies = Vec::new();
    let mut exchange = |request: String, reply: &str| {
        requests.extend_from_slice(request.as_bytes());
        replies.extend_from_slice(reply.as_bytes());
    };
    for bucket in 0..50 {
        exchange(format!("GET b{bucket} k\n"), "NOT FOUND\r\n");
        exchange(format!("CREATE b{bucket}\n"), "OK\r\n");
        exchange(format!("PUT b{bucket} k v{bucket}\n"), "OK\r\n");
    }
    for bucket in (0..50).rev() {
        exchange(
            format!("GET b{bucket} k\n"),
            &format!("v{bucket}\r\nOK\r\n"),
        );
        if bucket % 2 == 0 {
            exchange(format!("DROP b{bucket}\n"), "OK\r\n");
        }
    }
    for bucket in 0..50 {
        let reply = if bucket % 2 == 0 {
            "NOT FOUND\r\n".to_string()
        } else {
            format!("v{bucket}\r\nOK\r\n")
        };
        exchange(format!("GET b{bucket} k\n"), &reply);
    }
    client.send(&requests).await;
    client.expect(&replies).await;
}

#[tokio::test]
async fn a_bucket_replaced_by_another_client_is_never_served_stale() {
    let server = TestServer::default().await;
    let mut reader = server.connect().await;
    let mut other = server.connect().await;
    // `cached` is used twice in a row, so the reader's connection keeps its handle; `looked_up`
    // once, so only its identity is remembered.
    reader
        .send(b"CREATE cached\nCREATE looked_up\nPUT cached k old\nGET cached k\nGET looked_up k\n")
        .await;
    reader
        .expect(b"OK\r\nOK\r\nOK\r\nold\r\nOK\r\n\r\nOK\r\n")
        .await;
    for bucket in ["cached", "looked_up"] {
        other
            .send(format!("DROP {bucket}\nCREATE {bucket}\nPUT {bucket} k new\n").as_bytes())
            .await;
        other.expect(b"OK\r\nOK\r\nOK\r\n").await;
    }
    reader.send(b"GET looked_up k\nGET cached k\n").await;
    reader.expect(b"new\r\nOK\r\nnew\r\nOK\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_many_buckets_and_another_clients_creates_and_drops_all_finish() {
    // A batch of requests on keys runs under one read lock of the registry's view, which a
    // CREATE or DROP needs for writing; on two workers they meet. Both must go on, and every
    // reply must stay right.
    let server = TestServer::default().await;
    let mut setup = server.connect().await;
    let mut reads = Vec::new();
    let mut read_replies = Vec::new();
    for bucket in 0..100 {
        setup
            .send(format!("CREATE b{bucket}\nPUT b{bucket} k v{bucket}\n").as_bytes())
            .await;
        setup.expect(b"OK\r\nOK\r\n").await;
        reads.extend_from_slice(format!("GET b{bucket} k\n").as_bytes());
        read_replies.extend_from_slice(format!("v{bucket}\r\nOK\r\n").as_bytes());
    }
    let mut reader = server.connect().await;
    let mut churner = server.connect().await;
    let reading = async {
        for _ in 0..50 {
            reader.send(&reads).await;
            reader.expect(&read_replies).await;
        }
    };
    let churning = async {
        for round in 0..300 {
            churner
                .send(format!("CREATE c{round}\nPUT c{round} k v\nDROP c{round}\n").as_bytes())
                .await;
            churner.expect(b"OK\r\nOK\r\nOK\r\n").await;
        }
    };
    within(async { tokio::join!(reading, churning) }).await;
}
