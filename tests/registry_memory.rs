//! Creating and dropping a million distinct buckets leaves memory where it started: names are
//! never interned or leaked, and the registry gives back the room it grew into.

#![allow(clippy::unwrap_used)]
// tests fail loudly on purpose

// A global allocator cannot be written without `unsafe`; this file is the only exception in kv.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use kv::{CoreConfig, Registry};

/// Counts the bytes this test process has allocated and not yet freed.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is a side
// effect that does not touch the memory handed out.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as ours.
        unsafe { System.realloc(pointer, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The tests of this file count one process's allocations: they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const TOTAL: usize = 1_000_000;
/// Buckets alive at once: creates and drops overlap, so the registry's map really grows and
/// must shrink back.
const BATCH: usize = 10_000;

async fn create_and_drop(registry: &Registry, first: usize, count: usize) {
    let mut batch = Vec::with_capacity(BATCH);
    for start in (first..first + count).step_by(BATCH) {
        for index in start..start + BATCH {
            let name = format!("bucket-{index:09}-with-a-longer-name");
            let bucket = registry.create(name.as_str()).await.unwrap();
            bucket.put(name.as_bytes(), b"a value").unwrap();
            batch.push(bucket);
        }
        for bucket in batch.drain(..) {
            assert!(
                registry
                    .drop_bucket(bucket.name().as_bytes())
                    .await
                    .unwrap()
            );
            bucket.stopped().await;
        }
        let counts = registry.settle().await.unwrap();
        assert_eq!(counts.running_buckets, 0);
    }
}

#[test]
fn a_million_buckets_created_and_dropped_leave_memory_where_it_started() {
    let _alone = ONE_AT_A_TIME.lock().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let registry = Registry::start(CoreConfig::default());
        // Warm up: the runtime's and the registry's own structures reach their working size.
        create_and_drop(&registry, 0, 2 * BATCH).await;
        let before = LIVE_BYTES.load(Ordering::Relaxed);

        create_and_drop(&registry, 2 * BATCH, TOTAL).await;
        let after = LIVE_BYTES.load(Ordering::Relaxed);

        let grown = after - before;
        println!("live bytes before {before}, after {after}, grown {grown}");
        assert!(
            grown < 16 * 1024,
            "{grown} bytes still allocated after a million buckets came and went"
        );
        assert_eq!(registry.memory().used(), 0);
    });
}

#[test]
fn what_an_empty_bucket_costs_is_charged_to_the_memory_budget() {
    let _alone = ONE_AT_A_TIME.lock().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let registry = Registry::start(CoreConfig::default());
        create_and_drop(&registry, 0, BATCH).await;
        for name_len in [8usize, 100, 1000] {
            let before = LIVE_BYTES.load(Ordering::Relaxed);
            let charged_before = registry.memory().used();
            let count = 20_000;
            let mut buckets = Vec::with_capacity(count);
            for index in 0..count {
                let mut name = format!("{index:08}").into_bytes();
                name.resize(name_len, b'n');
                buckets.push(registry.create(&name[..]).await.unwrap());
            }
            let allocated = (LIVE_BYTES.load(Ordering::Relaxed) - before) as usize / count;
            let charged = (registry.memory().used() - charged_before) / count;
            println!("name of {name_len} bytes: allocated {allocated} per bucket, charged {charged}");
            // The budget bounds memory: it may err high, not much low. (`allocated` includes
            // this test's own vector of handles, 8 bytes a bucket.)
            assert!(
                charged >= allocated * 95 / 100,
                "a bucket with a {name_len}-byte name allocates {allocated} bytes, charged only {charged}"
            );
            assert!(
                charged <= allocated * 3 / 2,
                "a bucket with a {name_len}-byte name allocates {allocated} bytes, charged {charged}"
            );
            for bucket in buckets.drain(..) {
                registry.drop_bucket(bucket.name().as_bytes()).await.unwrap();
            }
            registry.settle().await.unwrap();
            assert_eq!(registry.memory().used(), charged_before);
        }
    });
}
