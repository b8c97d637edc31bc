//! Bad input of every kind gets an error reply, and the server serves on.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::TestServer;
use kv::config::ServerConfig;

#[tokio::test]
async fn non_utf8_lines_get_an_error_and_the_connection_goes_on() {
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    client.send(b"CREATE \xff\xfe\nPING\n").await;
    client
        .expect(b"ERROR request is not valid UTF-8\r\n+PONG\r\n")
        .await;
}

#[tokio::test]
async fn binary_garbage_never_takes_the_server_down() {
    let server = TestServer::default().await;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..50 {
        let mut client = server.connect().await;
        let mut garbage = Vec::with_capacity(4096);
        for _ in 0..4096 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            garbage.push(state as u8);
        }
        client.send(&garbage).await;
        client.send(b"\n").await;
        drop(client);
    }
    server.still_serves().await;
}

#[tokio::test]
async fn clients_that_vanish_mid_request_disturb_no_one() {
    let server = TestServer::default().await;
    let mut bystander = server.client().await;
    bystander.create(b"kept").await.unwrap();
    bystander.put(b"kept", b"k", b"v").await.unwrap();
    for partial in [
        &b"PUT kept k"[..],
        b"*4\r\n$3\r\nPUT\r\n$4\r\nkept\r\n$1\r\nk\r\n$100\r\nabc",
        b"*3\r\n$3\r\nGET",
    ] {
        let mut client = server.connect().await;
        client.send(partial).await;
        drop(client);
    }
    assert_eq!(
        bystander.get(b"kept", b"k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    server.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_that_connect_and_close_at_once() {
    let server = TestServer::start(ServerConfig {
        max_connections: 100,
        ..ServerConfig::default()
    })
    .await;
    let mut bystander = server.client().await;
    bystander.create(b"kept").await.unwrap();
    let storms: Vec<_> = (0..4)
        .map(|_| {
            let address = server.address;
            tokio::spawn(async move {
                for _ in 0..250 {
                    drop(tokio::net::TcpStream::connect(address).await.unwrap());
                }
            })
        })
        .collect();
    for storm in storms {
        common::within(storm).await.unwrap();
    }
    bystander.put(b"kept", b"k", b"v").await.unwrap();
    // Every one of them is accounted for and closed; the limit's permits all came back.
    common::within(async {
        loop {
            let accepted = bystander.info_field("connections_accepted").await.unwrap();
            let open = bystander.info_field("connections_open").await.unwrap();
            if accepted >= 1001 && open == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    server.still_serves().await;
}
