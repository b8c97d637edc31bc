//! `kv bench` against a real server: it runs in both protocols, and it catches wrong replies.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::TestServer;
use kv::bench::{BenchConfig, run};
use kv::protocol::Dialect;

fn config(server: &TestServer, dialect: Dialect) -> BenchConfig {
    BenchConfig {
        addresses: vec![server.address.to_string()],
        connections: 4,
        pipeline: 8,
        requests: 2000,
        duration: None,
        keys: 50,
        value_size: 32,
        buckets: 3,
        mix: "get=0.7,put=0.3".parse().unwrap(),
        dialect,
        preload: true,
        progress: false,
        keep: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_in_both_protocols_with_every_reply_checked() {
    let server = TestServer::default().await;
    for dialect in [Dialect::Resp, Dialect::Line] {
        let report = run(config(&server, dialect)).await.unwrap();
        assert_eq!(report.requests, 2000);
        assert_eq!(report.errors, 0, "{:?}", report.first_error);
        let latency = report.latency;
        assert!(latency.p50_us <= latency.p90_us && latency.p90_us <= latency.p99_us);
        assert!(latency.p99_us <= latency.max_us);
        let operations: Vec<(&str, u64)> = report
            .operations
            .iter()
            .map(|row| (row.operation, row.requests))
            .collect();
        assert_eq!(operations.len(), 2, "{operations:?}");
        assert_eq!(operations[0].0, "GET");
        assert_eq!(operations[1].0, "PUT");
        assert_eq!(operations[0].1 + operations[1].1, 2000);
    }
    let mut client = server.client().await;
    assert_eq!(client.info_field("keys").await.unwrap(), 50);
    // Unless asked to keep them, what a run created is gone after it.
    let report = run(BenchConfig {
        keep: false,
        ..config(&server, Dialect::Resp)
    })
    .await
    .unwrap();
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    assert_eq!(client.info_field("keys").await.unwrap(), 0);
    assert_eq!(client.info_field("buckets").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_a_wrong_value_as_an_error() {
    let server = TestServer::default().await;
    run(BenchConfig {
        requests: 1,
        ..config(&server, Dialect::Resp)
    })
    .await
    .unwrap();
    // Key 7 lives in bucket 7 % 3 = 1; give it a value the benchmark never writes.
    let mut client = server.client().await;
    client
        .put(b"bench-1", b"key:000000000007", b"not what bench expects")
        .await
        .unwrap();
    let report = run(BenchConfig {
        mix: "get=1".parse().unwrap(),
        preload: false,
        ..config(&server, Dialect::Resp)
    })
    .await
    .unwrap();
    assert!(report.errors > 0);
    assert!(
        report.first_error.unwrap().contains("GET key 7"),
        "the error names the key"
    );
}
