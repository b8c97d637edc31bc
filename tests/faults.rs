//! Fault injection through the server: a crashed bucket answers NOT FOUND, its neighbours keep
//! their data, and the client that crashed it keeps its connection.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::TestServer;
use kv::config::ServerConfig;

async fn debug_server() -> TestServer {
    TestServer::start(ServerConfig {
        enable_debug_commands: true,
        ..ServerConfig::default()
    })
    .await
}

#[tokio::test]
async fn a_crashed_bucket_answers_not_found_and_its_neighbours_keep_their_data() {
    let server = debug_server().await;
    let mut client = server.connect().await;
    client
        .send(b"CREATE doomed\nCREATE neighbour\nPUT doomed k 1\nPUT neighbour k 2\n")
        .await;
    client.expect(b"OK\r\nOK\r\nOK\r\nOK\r\n").await;
    client.send(b"DEBUG CRASH doomed\n").await;
    client.expect(b"OK\r\n").await;
    client
        .send(b"GET doomed k\nPUT doomed k 3\nGET neighbour k\nBUCKETS\n")
        .await;
    client
        .expect(b"NOT FOUND\r\nNOT FOUND\r\n2\r\nOK\r\nneighbour\r\nOK\r\n")
        .await;
    // Creating it again gives a new, empty bucket.
    client.send(b"CREATE doomed\nGET doomed k\n").await;
    client.expect(b"OK\r\n\r\nOK\r\n").await;
}

#[tokio::test]
async fn a_stopped_bucket_is_forgotten_too() {
    let server = debug_server().await;
    let mut client = server.connect().await;
    client
        .send(b"CREATE b\nDEBUG STOP b\nGET b k\nDEBUG CRASH b\n")
        .await;
    client
        .expect(b"OK\r\nOK\r\nNOT FOUND\r\nNOT FOUND\r\n")
        .await;
}

#[tokio::test]
async fn debug_commands_are_off_by_default() {
    let server = TestServer::default().await;
    let mut client = server.connect().await;
    client
        .send(b"CREATE b\nDEBUG CRASH b\nDEBUG PANIC\nPUT b k v\n")
        .await;
    let disabled: &[u8] =
        b"ERROR debug commands are disabled; start the server with --enable-debug-commands\r\n";
    client
        .expect(&[&b"OK\r\n"[..], disabled, disabled, b"OK\r\n"].concat())
        .await;
}

#[tokio::test]
async fn a_panic_while_serving_one_client_closes_that_client_only() {
    let server = debug_server().await;
    let mut bystander = server.client().await;
    bystander.create(b"kept").await.unwrap();
    bystander.put(b"kept", b"k", b"v").await.unwrap();

    let mut victim = server.connect().await;
    victim.send(b"PING\n").await;
    victim.expect(b"+PONG\r\n").await;
    victim.send(b"DEBUG PANIC\nPING\n").await;
    assert_eq!(victim.until_closed().await, b"");

    assert_eq!(
        bystander.get(b"kept", b"k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    // The panicked connection gave back its place and its gauges.
    common::within(async {
        while bystander.info_field("connections_open").await.unwrap() != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    server.still_serves().await;
}
