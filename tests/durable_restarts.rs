//! With durability on, a bucket that crashes (or a registry that fails) comes back from disk;
//! a bucket that crashes too often stays down with a clear error until it is dropped.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::sync::Arc;

use common::{TestServer, within};
use kv::config::DurabilityConfig;
use kv::config::{CoreConfig, ServerConfig};
use kv::registry::BUCKET_RESTARTS;
use kv::shard::LocalShard;
use kv::{BucketError, BucketFault, RegistryError};

async fn open(directory: &std::path::Path) -> Arc<LocalShard> {
    common::open_shard(
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
    durable.commit(true).await.unwrap();
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
    durable.commit(true).await.unwrap();
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
    durable.commit(true).await.unwrap();
    drop(durable);

    let durable = open(directory.path()).await;
    assert_eq!(durable.generation(), Some(1));
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
    server.shard().inject_log_write_failure();
    client.send(b"PUT s milk 2\n").await;
    assert_eq!(
        client.until_closed().await,
        b"",
        "no reply to an unlogged change"
    );

    // The store is rebuilt from the files; meanwhile a read is refused or told to try again.
    assert_eq!(
        read_until_answered(&server, b"GET s milk\n").await,
        b"1\r\nOK\r\n"
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

    // What was acknowledged is what a restart finds; the stop says the log failed.
    server.shutdown.cancel();
    assert!(within(server.task).await.unwrap().is_err());
    let durable = open(directory.path()).await;
    let bucket = durable.registry().lookup(b"s").unwrap();
    assert_eq!(bucket.get(b"milk").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(bucket.get(b"eggs").unwrap(), None);
}

/// Sends `request` on fresh connections until one is answered with something other than "try
/// again"; returns that answer. A connection closed without a reply is a refusal too.
async fn read_until_answered(server: &TestServer, request: &[u8]) -> Vec<u8> {
    within(async {
        loop {
            let mut client = server.connect().await;
            client.send(request).await;
            let mut reply = Vec::new();
            loop {
                let mut byte = [0u8; 1];
                match tokio::io::AsyncReadExt::read(&mut client.stream, &mut byte).await {
                    Ok(1) => reply.push(byte[0]),
                    _ => break,
                }
                if reply.ends_with(b"OK\r\n")
                    || (reply.starts_with(b"ERROR") && reply.ends_with(b"\n"))
                {
                    break;
                }
            }
            if !reply.is_empty() && !reply.starts_with(b"ERROR bucket s is restarting") {
                return reply;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_log_did_not_take_is_never_read_and_gone_after_a_restart_too() {
    let directory = tempfile::tempdir().unwrap();
    let server = TestServer::start(ServerConfig {
        durability: Some(DurabilityConfig::new(directory.path().to_owned())),
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.connect().await;
    let mut setup = b"CREATE s\n".to_vec();
    for key in 0..50 {
        setup.extend_from_slice(format!("PUT s k{key} logged\n").as_bytes());
    }
    client.send(&setup).await;
    for _ in 0..51 {
        client.expect(b"OK\r\n").await;
    }

    // A batch of changes whose write fails: applied in memory, never in the log.
    server.shard().inject_log_write_failure();
    let mut batch = Vec::new();
    for key in 0..50 {
        batch.extend_from_slice(
            format!("PUT s k{key} unlogged\nPUT s new{key} unlogged\n").as_bytes(),
        );
    }
    client.send(&batch).await;
    assert_eq!(client.until_closed().await, b"", "nothing acknowledged");

    // Readers never see a value the log does not hold: not while the store is rebuilt from
    // the files, and not after.
    for key in 0..50 {
        let old = read_until_answered(&server, format!("GET s k{key}\n").as_bytes()).await;
        assert_eq!(old, b"logged\r\nOK\r\n", "k{key}");
        let new = read_until_answered(&server, format!("GET s new{key}\n").as_bytes()).await;
        assert_eq!(new, b"\r\nOK\r\n", "new{key}");
    }
    server.shutdown.cancel();
    let _ = within(server.task).await.unwrap();

    let durable = open(directory.path()).await;
    let bucket = durable.registry().lookup(b"s").unwrap();
    assert_eq!(bucket.len().unwrap(), 50);
    for key in 0..50 {
        assert_eq!(
            bucket.get(format!("k{key}").as_bytes()).unwrap().as_deref(),
            Some(&b"logged"[..])
        );
    }
}

/// A durable state whose reads wait until the test lets them go: a restart from disk that
/// takes as long as the test likes.
struct SlowDisk {
    entries: kv::registry::Entries,
    release: tokio::sync::Semaphore,
}

impl kv::registry::DurableState for SlowDisk {
    fn bucket(
        &self,
        name: &[u8],
    ) -> Result<Option<kv::registry::Entries>, kv::registry::ReadBackError> {
        // On a blocking thread of the runtime: waiting here holds up only this read.
        let _permit = tokio::runtime::Handle::current().block_on(self.release.acquire());
        Ok((name == b"slow").then(|| self.entries.clone()))
    }

    fn buckets(
        &self,
    ) -> Result<Vec<(kv::BucketName, kv::registry::Entries)>, kv::registry::ReadBackError> {
        Ok(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_bucket_says_try_again_and_the_registry_serves_on_meanwhile() {
    let registry = kv::Registry::start(CoreConfig::default());
    let disk = Arc::new(SlowDisk {
        entries: vec![(b"milk".to_vec(), b"1".to_vec())],
        release: tokio::sync::Semaphore::new(0),
    });
    registry.set_durable_state(Arc::clone(&disk) as Arc<dyn kv::registry::DurableState>);
    let slow = registry.create("slow").await.unwrap();
    slow.put(b"milk", b"1").unwrap();

    slow.inject_fault(BucketFault::Panic).unwrap();
    within(slow.stopped()).await;
    // Before and after the registry takes the exit in, the name is restarting, never absent.
    let view = registry.view();
    assert!(registry.lookup(b"slow").is_none());
    assert_eq!(
        view.why_missing(b"slow", true),
        Some(kv::registry::Down::Restarting)
    );

    // The read from disk is held up; the registry serves other calls meanwhile.
    within(registry.create("other")).await.unwrap();
    assert!(within(registry.drop_bucket(b"other")).await.unwrap());
    assert_eq!(
        within(registry.create("slow")).await.unwrap_err(),
        RegistryError::Restarting(kv::BucketName::from("slow"))
    );
    assert_eq!(
        view.why_missing(b"slow", true),
        Some(kv::registry::Down::Restarting)
    );

    disk.release.add_permits(1);
    within(registry.settle()).await.unwrap();
    let restarted = registry.lookup(b"slow").expect("back from disk");
    assert_eq!(restarted.get(b"milk").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(view.why_missing(b"slow", true), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_dropped_while_it_restarts_stays_dropped() {
    let registry = kv::Registry::start(CoreConfig::default());
    let disk = Arc::new(SlowDisk {
        entries: vec![(b"milk".to_vec(), b"1".to_vec())],
        release: tokio::sync::Semaphore::new(0),
    });
    registry.set_durable_state(Arc::clone(&disk) as Arc<dyn kv::registry::DurableState>);
    let slow = registry.create("slow").await.unwrap();
    slow.inject_fault(BucketFault::Panic).unwrap();
    within(slow.stopped()).await;
    assert!(within(registry.drop_bucket(b"slow")).await.unwrap());
    assert_eq!(registry.view().why_missing(b"slow", true), None);
    disk.release.add_permits(1);
    within(registry.settle()).await.unwrap();
    assert!(
        registry.lookup(b"slow").is_none(),
        "the late read is not installed"
    );
}
