//! Many tasks creating, looking up, dropping and crashing the same few names at once; afterwards
//! the registry's names and its running buckets agree exactly.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use kv::{BucketError, BucketFault, CoreConfig, Registry};

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_live_buckets_agree_after_a_storm() {
    let registry = Registry::start(CoreConfig::default());
    let workers: Vec<_> = (0..16u64)
        .map(|worker| {
            let registry = registry.clone();
            tokio::spawn(async move {
                // A cheap deterministic sequence per worker, so each does something different.
                let mut state = worker.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for _ in 0..2_000 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let name = NAMES[(state % 4) as usize];
                    match (state >> 8) % 10 {
                        0..=2 => {
                            let bucket = registry.create(name).await.unwrap();
                            // Anything but a stopped bucket must accept the write.
                            match bucket.put(b"k", b"v") {
                                Ok(()) | Err(BucketError::Stopped) => {}
                                Err(other) => panic!("unexpected {other}"),
                            }
                        }
                        3..=5 => {
                            if let Some(bucket) = registry.lookup(name.as_bytes()) {
                                match bucket.get(b"k") {
                                    Ok(_) | Err(BucketError::Stopped) => {}
                                    Err(other) => panic!("unexpected {other}"),
                                }
                            }
                        }
                        6..=7 => {
                            registry.drop_bucket(name.as_bytes()).await.unwrap();
                        }
                        _ => {
                            if let Some(bucket) = registry.lookup(name.as_bytes()) {
                                // Someone else may have ended it first.
                                let _ = bucket.inject_fault(if state & 1 == 0 {
                                    BucketFault::Panic
                                } else {
                                    BucketFault::Stop
                                });
                            }
                        }
                    }
                    if state % 3 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        tokio::time::timeout(Duration::from_secs(60), worker)
            .await
            .expect("a worker hung")
            .expect("a worker panicked");
    }

    // A fault sent last may still be on its way to a bucket; that bucket counts as running and
    // named until it ends, so the counts below agree either way.
    let counts = registry.settle().await.unwrap();
    assert_eq!(counts.names, counts.running_buckets, "{counts:?}");
    assert_eq!(
        counts.named_running_buckets, counts.running_buckets,
        "{counts:?}"
    );
    for name in registry.view().names(None, NAMES.len() + 1) {
        assert!(
            NAMES
                .iter()
                .any(|known| known.as_bytes() == name.as_bytes())
        );
    }
    assert_eq!(
        registry.status().borrow().starts,
        1,
        "the registry never crashed"
    );
}
