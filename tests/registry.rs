//! The guide's registry tests, in Rust, and the supervision rules around them.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use kv::config::RestartIntensity;
use kv::{BucketError, BucketFault, CoreConfig, Registry, RegistryError};

/// A bound on every wait below: a hang fails the test instead of stalling the suite.
const PATIENCE: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .expect("waited too long: something hangs")
}

#[tokio::test]
async fn spawns_buckets() {
    let registry = Registry::start(CoreConfig::default());
    assert!(registry.lookup(b"shopping").is_none());

    registry.create("shopping").await.unwrap();
    let bucket = registry
        .lookup(b"shopping")
        .expect("created bucket is found");
    bucket.put(b"milk", b"1").unwrap();
    assert_eq!(bucket.get(b"milk").unwrap().as_deref(), Some(&b"1"[..]));
}

#[tokio::test]
async fn create_is_idempotent() {
    let registry = Registry::start(CoreConfig::default());
    let first = registry.create("shopping").await.unwrap();
    first.put(b"milk", b"1").unwrap();
    let second = registry.create("shopping").await.unwrap();
    assert_eq!(first.id(), second.id());
    assert_eq!(second.get(b"milk").unwrap().as_deref(), Some(&b"1"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_is_visible_to_lookup_at_once_from_every_task() {
    let registry = Registry::start(CoreConfig::default());
    for index in 0..200 {
        let name = format!("bucket-{index}");
        registry.create(name.as_str()).await.unwrap();
        let view = registry.view();
        // Another task, on another worker where there is one, looks it up straight away.
        let found = tokio::spawn(async move { view.lookup(name.as_bytes()).is_some() })
            .await
            .unwrap();
        assert!(found, "bucket-{index} not visible after create returned");
    }
}

#[tokio::test]
async fn removes_buckets_on_exit() {
    let registry = Registry::start(CoreConfig::default());
    let bucket = registry.create("shopping").await.unwrap();
    bucket.inject_fault(BucketFault::Stop).unwrap();
    within(bucket.stopped()).await;
    assert!(registry.lookup(b"shopping").is_none());
    let counts = within(registry.settle()).await.unwrap();
    assert_eq!(counts.names, 0, "the registry forgot the name");
    assert_eq!(counts.running_buckets, 0);
}

#[tokio::test]
async fn removes_buckets_on_drop() {
    let registry = Registry::start(CoreConfig::default());
    let bucket = registry.create("shopping").await.unwrap();
    bucket.put(b"milk", b"1").unwrap();
    assert!(registry.drop_bucket(b"shopping").await.unwrap());
    assert!(registry.lookup(b"shopping").is_none());
    assert_eq!(bucket.get(b"milk"), Err(BucketError::Stopped));
    assert!(!registry.drop_bucket(b"shopping").await.unwrap());
    within(bucket.stopped()).await;
}

#[tokio::test]
async fn removes_buckets_on_crash() {
    let registry = Registry::start(CoreConfig::default());
    let bucket = registry.create("shopping").await.unwrap();
    bucket.inject_fault(BucketFault::Panic).unwrap();
    within(bucket.stopped()).await;
    assert!(registry.lookup(b"shopping").is_none());
    let counts = within(registry.settle()).await.unwrap();
    assert_eq!(counts.names, 0, "the registry forgot the crashed bucket");
    assert_eq!(counts.running_buckets, 0);
}

#[tokio::test]
async fn a_crashed_bucket_is_not_revived_with_empty_data() {
    let registry = Registry::start(CoreConfig::default());
    let bucket = registry.create("shopping").await.unwrap();
    bucket.put(b"milk", b"1").unwrap();
    bucket.inject_fault(BucketFault::Panic).unwrap();
    within(bucket.stopped()).await;
    within(registry.settle()).await.unwrap();
    assert!(
        registry.lookup(b"shopping").is_none(),
        "no bucket appeared in its place"
    );
    // Creating it again is the user's choice, and gives a new, empty bucket.
    let again = registry.create("shopping").await.unwrap();
    assert_ne!(again.id(), bucket.id());
    assert_eq!(again.get(b"milk").unwrap(), None);
}

#[tokio::test]
async fn operations_on_the_handle_of_a_crashed_bucket_return_errors() {
    let registry = Registry::start(CoreConfig::default());
    let bucket = registry.create("shopping").await.unwrap();
    bucket.put(b"milk", b"1").unwrap();
    bucket.inject_fault(BucketFault::Panic).unwrap();
    within(bucket.stopped()).await;

    assert!(bucket.is_stopped());
    assert_eq!(bucket.get(b"milk"), Err(BucketError::Stopped));
    assert_eq!(bucket.put(b"milk", b"2"), Err(BucketError::Stopped));
    assert_eq!(bucket.delete(b"milk"), Err(BucketError::Stopped));
    assert_eq!(bucket.len(), Err(BucketError::Stopped));
    assert_eq!(bucket.keys(None, 10), Err(BucketError::Stopped));
    assert_eq!(
        bucket.inject_fault(BucketFault::Panic),
        Err(BucketError::Stopped)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_can_crash_while_others_use_it() {
    let registry = Registry::start(CoreConfig::default());
    let bucket = registry.create("shopping").await.unwrap();
    let users: Vec<_> = (0..4)
        .map(|user| {
            let bucket = bucket.clone();
            tokio::spawn(async move {
                let key = format!("key-{user}");
                // Runs until the crash reaches this handle; every result is OK or Stopped.
                loop {
                    match bucket.put(key.as_bytes(), b"value") {
                        Ok(()) => {}
                        Err(BucketError::Stopped) => return,
                        Err(other) => panic!("unexpected error {other}"),
                    }
                    match bucket.get(key.as_bytes()) {
                        Ok(value) => assert_eq!(value.as_deref(), Some(&b"value"[..])),
                        Err(BucketError::Stopped) => return,
                        Err(other) => panic!("unexpected error {other}"),
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    tokio::task::yield_now().await;
    bucket.inject_fault(BucketFault::Panic).unwrap();
    for user in users {
        within(user)
            .await
            .expect("a user of the crashed bucket panicked");
    }
}

#[tokio::test]
async fn a_crash_leaves_other_buckets_and_their_data_alone() {
    let registry = Registry::start(CoreConfig::default());
    let doomed = registry.create("doomed").await.unwrap();
    let neighbour = registry.create("neighbour").await.unwrap();
    neighbour.put(b"milk", b"1").unwrap();
    doomed.inject_fault(BucketFault::Panic).unwrap();
    within(doomed.stopped()).await;
    within(registry.settle()).await.unwrap();

    let found = registry.lookup(b"neighbour").expect("neighbour survives");
    assert_eq!(found.get(b"milk").unwrap().as_deref(), Some(&b"1"[..]));
    assert!(
        registry.create("another").await.is_ok(),
        "the registry still serves"
    );
}

#[tokio::test]
async fn unexpected_messages_do_not_crash_the_registry() {
    // Typed channels rule out the guide's arbitrary `send/2` messages at compile time. What a
    // registry can still receive unexpectedly: a request whose caller has gone, a drop of a
    // name it does not know, and the late exit of a bucket whose name now belongs to another.
    let registry = Registry::start(CoreConfig::default());

    // A caller that gives up before its reply: the reply has nowhere to go.
    for index in 0..100 {
        let name = format!("abandoned-{index}");
        let create = registry.create(name.as_str());
        drop(tokio::time::timeout(Duration::ZERO, create).await);
    }

    assert!(!registry.drop_bucket(b"never-created").await.unwrap());

    // The old bucket's exit arrives after the name was given to a new one.
    let old = registry.create("shopping").await.unwrap();
    assert!(registry.drop_bucket(b"shopping").await.unwrap());
    let new = registry.create("shopping").await.unwrap();
    new.put(b"milk", b"1").unwrap();
    within(old.stopped()).await;
    within(registry.settle()).await.unwrap();

    let found = registry.lookup(b"shopping").expect("the new bucket stays");
    assert_eq!(found.id(), new.id());
    assert_eq!(found.get(b"milk").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(
        registry.status().borrow().starts,
        1,
        "the loop never restarted"
    );
}

#[tokio::test]
async fn the_bucket_limit_gives_a_clear_error_and_frees_up_on_drop() {
    let registry = Registry::start(CoreConfig {
        max_buckets: 2,
        ..CoreConfig::default()
    });
    registry.create("one").await.unwrap();
    registry.create("two").await.unwrap();
    assert_eq!(
        registry.create("three").await.unwrap_err(),
        RegistryError::TooManyBuckets { limit: 2 }
    );
    // An existing name is not a new bucket: still fine at the limit.
    registry.create("two").await.unwrap();

    let one = registry.lookup(b"one").unwrap();
    registry.drop_bucket(b"one").await.unwrap();
    within(one.stopped()).await;
    within(registry.settle()).await.unwrap();
    registry.create("three").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_created_right_after_a_drop_at_the_limit_is_never_refused() {
    // The dropped bucket's task ends a moment after DROP answers; a CREATE in that moment
    // must not count it.
    let registry = Registry::start(CoreConfig {
        max_buckets: 10,
        ..CoreConfig::default()
    });
    for name in 0..9 {
        registry
            .create(format!("live{name}").as_str())
            .await
            .unwrap();
    }
    for cycle in 0..3000 {
        assert!(registry.drop_bucket(b"churn").await.unwrap() || cycle == 0);
        registry
            .create("churn")
            .await
            .unwrap_or_else(|error| panic!("cycle {cycle}: {error}"));
    }
}

#[tokio::test]
async fn names_longer_than_the_limit_are_refused() {
    let registry = Registry::start(CoreConfig {
        max_name_len: 8,
        ..CoreConfig::default()
    });
    registry.create("12345678").await.unwrap();
    assert_eq!(
        registry.create("123456789").await.unwrap_err(),
        RegistryError::NameTooLong {
            length: 9,
            limit: 8
        }
    );
}

#[tokio::test]
async fn names_keys_and_values_are_arbitrary_bytes() {
    let registry = Registry::start(CoreConfig::default());
    let name: &[u8] = b"\x00\xff bucket\r\n";
    let bucket = registry.create(name).await.unwrap();
    bucket.put(b"\x00\x01", b"\xff\xfe\x00").unwrap();
    let found = registry.lookup(name).unwrap();
    assert_eq!(
        found.get(b"\x00\x01").unwrap().as_deref(),
        Some(&b"\xff\xfe\x00"[..])
    );
}

#[tokio::test]
async fn the_memory_limit_refuses_puts_with_a_clear_error() {
    // Room for the bucket itself (about 1.2 KB) and one 600-byte value, not two.
    let registry = Registry::start(CoreConfig {
        max_memory: 2400,
        ..CoreConfig::default()
    });
    let bucket = registry.create("shopping").await.unwrap();
    let big = vec![b'x'; 600];
    bucket.put(b"one", &big).unwrap();
    assert_eq!(
        bucket.put(b"two", &big),
        Err(BucketError::OutOfMemory { limit: 2400 })
    );
    bucket.delete(b"one").unwrap();
    bucket.put(b"two", &big).unwrap();
    // Dropping a bucket returns what it held.
    registry.drop_bucket(b"shopping").await.unwrap();
    assert_eq!(registry.memory().used(), 0);
}

#[tokio::test]
async fn keys_and_names_are_listed_in_bounded_pages() {
    let registry = Registry::start(CoreConfig::default());
    for name in ["c", "a", "b"] {
        registry.create(name).await.unwrap();
    }
    let page = registry.view().names(None, 2);
    let page: Vec<&[u8]> = page.iter().map(kv::BucketName::as_bytes).collect();
    assert_eq!(page, [&b"a"[..], b"b"]);
    let rest = registry.view().names(Some(b"b"), 2);
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].as_bytes(), b"c");

    // The order follows drops and crashes, and a cursor need not be a name.
    registry.drop_bucket(b"b").await.unwrap();
    let crashed = registry.lookup(b"c").unwrap();
    crashed.inject_fault(kv::BucketFault::Panic).unwrap();
    within(crashed.stopped()).await;
    within(registry.settle()).await.unwrap();
    registry.create("ab").await.unwrap();
    let all: Vec<Vec<u8>> = registry
        .view()
        .names(None, 10)
        .iter()
        .map(|name| name.as_bytes().to_vec())
        .collect();
    assert_eq!(all, [b"a".to_vec(), b"ab".to_vec()]);
    let after: Vec<Vec<u8>> = registry
        .view()
        .names(Some(b"aa"), 10)
        .iter()
        .map(|name| name.as_bytes().to_vec())
        .collect();
    assert_eq!(after, [b"ab".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_registry_fails_registry_and_buckets_restart_together() {
    let registry = Registry::start(CoreConfig::default());
    let mut status = registry.status();
    let bucket = registry.create("shopping").await.unwrap();
    bucket.put(b"milk", b"1").unwrap();

    registry.inject_fault().await.unwrap();
    within(status.wait_for(|status| status.starts == 2 && status.running))
        .await
        .unwrap();

    // The old loop's buckets ended with it: no registry points at buckets it does not own.
    within(bucket.stopped()).await;
    assert_eq!(bucket.get(b"milk"), Err(BucketError::Stopped));
    assert!(registry.lookup(b"shopping").is_none());
    let counts = within(registry.settle()).await.unwrap();
    assert_eq!(counts.names, 0);
    assert_eq!(counts.running_buckets, 0);

    // The new loop serves.
    let fresh = registry.create("shopping").await.unwrap();
    assert_eq!(fresh.get(b"milk").unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_get_errors_not_hangs_while_the_registry_restarts() {
    let registry = Registry::start(CoreConfig::default());
    let mut status = registry.status();
    let callers: Vec<_> = (0..8)
        .map(|caller| {
            let registry = registry.clone();
            tokio::spawn(async move {
                let mut unavailable = 0;
                for round in 0..300 {
                    let name = format!("caller-{caller}-{round}");
                    match within(registry.create(name.as_str())).await {
                        Ok(bucket) => {
                            // The bucket may end under us with the registry; never a panic.
                            let _ = bucket.put(b"k", b"v");
                        }
                        Err(RegistryError::Unavailable) => unavailable += 1,
                        Err(other) => panic!("unexpected error {other}"),
                    }
                    let _ = within(registry.drop_bucket(name.as_bytes())).await;
                }
                unavailable
            })
        })
        .collect();
    registry.inject_fault().await.unwrap();
    for caller in callers {
        within(caller).await.expect("a caller panicked");
    }
    within(status.wait_for(|status| status.starts == 2 && status.running))
        .await
        .unwrap();
    assert!(registry.create("after").await.is_ok());
}

#[tokio::test]
async fn the_supervisor_gives_up_after_too_many_failures() {
    let registry = Registry::start(CoreConfig {
        restart_intensity: RestartIntensity {
            max_restarts: 1,
            period: Duration::from_secs(60),
        },
        ..CoreConfig::default()
    });
    let mut status = registry.status();
    registry.inject_fault().await.unwrap();
    within(status.wait_for(|status| status.starts == 2 && status.running))
        .await
        .unwrap();
    registry.inject_fault().await.unwrap();
    within(status.wait_for(|status| !status.running))
        .await
        .unwrap();

    assert_eq!(status.borrow().starts, 2, "no third start");
    assert_eq!(
        registry.create("shopping").await.unwrap_err(),
        RegistryError::Unavailable
    );
    assert_eq!(
        registry.drop_bucket(b"shopping").await.unwrap_err(),
        RegistryError::Unavailable
    );
}

#[tokio::test]
async fn dropping_the_last_registry_handle_stops_every_bucket() {
    let registry = Registry::start(CoreConfig::default());
    let bucket = registry.create("shopping").await.unwrap();
    drop(registry);
    within(bucket.stopped()).await;
    assert_eq!(bucket.get(b"milk"), Err(BucketError::Stopped));
}
