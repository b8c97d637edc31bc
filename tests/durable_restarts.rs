//! With durability on, a bucket that crashes (or a registry that fails) comes back from disk;
//! a bucket that crashes too often stays down with a clear error until it is dropped.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::sync::Arc;

use common::{TestServer, within};
use kv::config::{CoreConfig, ServerConfig};
use kv::durability::{DurabilityConfig, Durable};
use kv::registry::BUCKET_RESTARTS;
use kv::{BucketError, BucketFault, RegistryError};

async fn open(directory: &std::path::Path) -> Arc<Durable> {
    Durable::open(
        DurabilityConfig::new(directory.to_owned()),
        CoreConfig::default(),
    )
    .await
    .unwrap()
    .0
}

/// Crashes `bucket` and waits until the registry has taken its exit in (and restarted it, if
/// it may).
async fn crash(registry: &kv::Registry, bucket: &kv::BucketHandle) {
    bucket.inject_fault(BucketFault::Panic).unwrap();
    within(bucket.stopped()).await;
    within(registry.settle()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_durable_bucket_restarts_with_its_data() {
    let directory = tempfile::tempdir().unwrap();
    let durable = open(directory.path()).await;
    let registry = durable.registry();
    let bucket = registry.create("shopping").await.unwrap();
    bucket.put(b"milk", b"1").unwrap();
    bucket.put(b"eggs", b"3").unwrap();
    // Not even committed yet: the crash must not lose what the table accepted.
    bucket.delete(b"eggs").unwrap();
    let neighbour = registry.create("neighbour").await.unwrap();
    neighbour.put(b"k", b"v").unwrap();

    crash(registry, &bucket).await;

    assert_eq!(
        bucket.get(b"milk"),
        Err(BucketError::Stopped),
        "the old handle is dead"
    );
    let restarted = registry.lookup(b"shopping").expect("restarted");
    assert_ne!(restarted.id(), bucket.id());
    assert_eq!(restarted.get(b"milk").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(restarted.get(b"eggs").unwrap(), None);
    assert_eq!(neighbour.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
    // It goes on logging: a change after the restart survives a restart of the store.
    restarted.put(b"bread", b"2").unwrap();
    durable.journal().commit().await.unwrap();
    drop(durable);
    let durable = open(directory.path()).await;
    let reopened = durable.registry().lookup(b"shopping").unwrap();
    assert_eq!(reopened.get(b"milk").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(reopened.get(b"bread").unwrap().as_deref(), Some(&b"2"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_crashes_too_often_stays_down_until_dropped() {
    let directory = tempfile::tempdir().unwrap();
    let durable = open(directory.path()).await;
    let registry = durable.registry();
    registry
        .create("flaky")
        .await
        .unwrap()
        .put(b"k", b"v")
        .unwrap();
    for round in 0..=BUCKET_RESTARTS {
        let bucket = registry.lookup(b"flaky").expect("up before each crash");
        assert_eq!(
            bucket.get(b"k").unwrap().as_deref(),
            Some(&b"v"[..]),
            "crash {round}"
        );
        crash(registry, &bucket).await;
    }
    assert!(registry.lookup(b"flaky").is_none());
    assert!(registry.view().is_failed(b"flaky"));
    assert!(matches!(
        registry.create("flaky").await,
        Err(RegistryError::BucketFailed(_))
    ));

    // Dropping it discards the data for good, and the name is free again.
    assert!(registry.drop_bucket(b"flaky").await.unwrap());
    assert!(!registry.view().is_failed(b"flaky"));
    let fresh = registry.create("flaky").await.unwrap();
    assert_eq!(fresh.get(b"k").unwrap(), None);
    durable.journal().commit().await.unwrap();
    drop(durable);
    let durable = open(directory.path()).await;
    assert_eq!(
        durable
            .registry()
            .lookup(b"flaky")
            .unwrap()
            .get(b"k")
            .unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_durable_registry_reloads_every_bucket() {
    let directory = tempfile::tempdir().unwrap();
    let durable = open(directory.path()).await;
    let registry = durable.registry();
    for name in ["a", "b", "c"] {
        let bucket = registry.create(name).await.unwrap();
        bucket.put(b"key", name.as_bytes()).unwrap();
    }
    let mut status = registry.status();
    registry.inject_fault().await.unwrap();
    within(status.wait_for(|status| status.starts == 2 && status.running))
        .await
        .unwrap();
    // The new loop reloads before it serves: a call through it proves the reload is done.
    within(registry.settle()).await.unwrap();
    for name in ["a", "b", "c"] {
        let bucket = registry.lookup(name.as_bytes()).expect("reloaded");
        assert_eq!(
            bucket.get(b"key").unwrap().as_deref(),
            Some(name.as_bytes())
        );
    }
}

#[tokio::test]
async fn through_the_server_a_crashed_durable_bucket_keeps_answering_with_its_data() {
    let directory = tempfile::tempdir().unwrap();
    let server = TestServer::start(ServerConfig {
        enable_debug_commands: true,
        durability: Some(DurabilityConfig::new(directory.path().to_owned())),
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.connect().await;
    client
        .send(b"CREATE s\nPUT s milk 1\nDEBUG CRASH s\nGET s milk\n")
        .await;
    client.expect(b"OK\r\nOK\r\nOK\r\n1\r\nOK\r\n").await;
    for _ in 0..BUCKET_RESTARTS {
        client.send(b"DEBUG CRASH s\n").await;
        client.expect(b"OK\r\n").await;
    }
    client.send(b"GET s milk\nPUT s milk 2\nCREATE s\n").await;
    let down: &[u8] =
        b"ERROR bucket s failed repeatedly and stays down; DROP it to discard its data\r\n";
    client.expect(&[down, down, down].concat()).await;
    client.send(b"DROP s\nGET s milk\n").await;
    client.expect(b"OK\r\nNOT FOUND\r\n").await;
    let mut info = server.client().await.info().await.unwrap();
    info.retain(|character| character != '\r');
    assert!(info.contains("\nfsync:everysec\n"), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_the_data_of_a_bucket_that_is_down() {
    let directory = tempfile::tempdir().unwrap();
    let durable = open(directory.path()).await;
    let registry = durable.registry();
    registry
        .create("flaky")
        .await
        .unwrap()
        .put(b"k", b"kept on disk")
        .unwrap();
    registry
        .create("steady")
        .await
        .unwrap()
        .put(b"k", b"v")
        .unwrap();
    for _ in 0..=BUCKET_RESTARTS {
        let bucket = registry.lookup(b"flaky").unwrap();
        crash(registry, &bucket).await;
    }
    assert!(registry.view().is_failed(b"flaky"));

    // The snapshot is written while the bucket is down; the old log goes afterwards.
    durable.compact().await.unwrap();
    durable.journal().commit().await.unwrap();
    drop(durable);

    let durable = open(directory.path()).await;
    assert_eq!(durable.generation(), 1);
    let flaky = durable.registry().lookup(b"flaky").expect("still on disk");
    assert_eq!(
        flaky.get(b"k").unwrap().as_deref(),
        Some(&b"kept on disk"[..])
    );
    let steady = durable.registry().lookup(b"steady").unwrap();
    assert_eq!(steady.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_log_cannot_be_written_nothing_more_is_acknowledged() {
    let directory = tempfile::tempdir().unwrap();
    let server = TestServer::start(ServerConfig {
        durability: Some(DurabilityConfig::new(directory.path().to_owned())),
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.connect().await;
    client.send(b"CREATE s\nPUT s milk 1\n").await;
    client.expect(b"OK\r\nOK\r\n").await;

    // The disk fills up: the change whose write fails is never acknowledged.
    server.registry.journal().unwrap().inject_write_failure();
    client.send(b"PUT s milk 2\n").await;
    assert_eq!(
        client.until_closed().await,
        b"",
        "no reply to an unlogged change"
    );

    // From then on changes are refused with a clear error; reads go on.
    let mut next = server.connect().await;
    next.send(b"PUT s eggs 3\nCREATE t\nDROP s\nGET s eggs\n")
        .await;
    for _refused in 0..3 {
        next.expect(b"ERROR the log cannot be written; changes are refused\r\n")
            .await;
    }
    next.expect(b"\r\nOK\r\n").await;
    let mut observer = server.client().await;
    assert_eq!(observer.info_field("log_failed").await.unwrap(), 1);

    // What was acknowledged is what a restart finds.
    server.shutdown.cancel();
    within(server.task).await.unwrap();
    let durable = open(directory.path()).await;
    let bucket = durable.registry().lookup(b"s").unwrap();
    assert_eq!(bucket.get(b"milk").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(bucket.get(b"eggs").unwrap(), None);
}
