//! Durability through the library: recovery after a clean stop and after a crash, torn and
//! corrupt logs, compaction, and random operations with restarts against a model.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use kv::Registry;
use kv::config::CoreConfig;
use kv::config::DurabilityConfig;
use kv::config::FsyncPolicy;
use kv::shard::LocalShard;
use kv::shard::wal::WalError;
use kv::shard::wal::record::{ScanEnd, scan};

type State = BTreeMap<Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>>;

fn config(directory: &Path) -> DurabilityConfig {
    DurabilityConfig {
        fsync: FsyncPolicy::No,
        ..DurabilityConfig::new(directory.to_owned())
    }
}

async fn open(directory: &Path) -> Arc<LocalShard> {
    common::open_shard(config(directory), CoreConfig::default())
        .await
        .unwrap()
        .0
}

/// Everything a registry holds.
fn contents(registry: &Registry) -> State {
    let mut state = State::new();
    for bucket in registry.view().buckets() {
        let mut table = BTreeMap::new();
        for key in bucket.keys(None, usize::MAX).unwrap() {
            let value = bucket.get(&key).unwrap().unwrap();
            table.insert(key.to_vec(), value.to_vec());
        }
        state.insert(bucket.name().as_bytes().to_vec(), table);
    }
    state
}

/// Drops a store without closing it: what a crash after the last commit leaves.
async fn crash(durable: Arc<LocalShard>) {
    drop(durable);
    // The lock goes with the directory handle; nothing else to wait for.
}

fn log_file(directory: &Path) -> std::path::PathBuf {
    let mut logs: Vec<_> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("log-")
        })
        .collect();
    logs.sort();
    logs.pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_a_clean_stop_and_a_crash() {
    let directory = tempfile::tempdir().unwrap();
    let durable = open(directory.path()).await;
    let registry = durable.registry();
    let bucket = registry.create("shopping").await.unwrap();
    bucket.put(b"milk", b"1").unwrap();
    bucket.put(b"eggs", b"3").unwrap();
    bucket.delete(b"milk").unwrap();
    registry
        .create("gone")
        .await
        .unwrap()
        .put(b"k", b"v")
        .unwrap();
    registry.drop_bucket(b"gone").await.unwrap();
    durable.commit(true).await.unwrap();
    let expected = contents(registry);
    durable.close().unwrap();
    drop(durable);

    let durable = open(directory.path()).await;
    assert_eq!(contents(durable.registry()), expected);
    durable
        .registry()
        .lookup(b"shopping")
        .unwrap()
        .put(b"bread", b"2")
        .unwrap();
    durable.commit(true).await.unwrap();
    let expected = contents(durable.registry());
    crash(durable).await;

    let durable = open(directory.path()).await;
    assert_eq!(contents(durable.registry()), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_recovers_at_the_bucket_limit_it_ran_under() {
    let directory = tempfile::tempdir().unwrap();
    let limits = CoreConfig {
        max_buckets: 2,
        ..CoreConfig::default()
    };
    let durable = common::open_shard(config(directory.path()), limits.clone())
        .await
        .unwrap()
        .0;
    let registry = durable.registry();
    registry.create("a").await.unwrap();
    registry.create("b").await.unwrap();
    for _ in 0..20 {
        assert!(registry.drop_bucket(b"a").await.unwrap());
        registry.create("a").await.unwrap();
    }
    registry.lookup(b"a").unwrap().put(b"k", b"v").unwrap();
    durable.commit(true).await.unwrap();
    durable.close().unwrap();
    drop(durable);

    for _restart in 0..3 {
        let (durable, _) = common::open_shard(config(directory.path()), limits.clone())
            .await
            .expect("a directory the server kept within its limits starts under them");
        let state = contents(durable.registry());
        assert_eq!(state.keys().collect::<Vec<_>>(), [b"a", b"b"]);
        assert_eq!(state[&b"a"[..]][&b"k"[..]], b"v");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_ahead_of_its_log_recovers_at_the_memory_limit() {
    // What compaction leaves when the live data sits near the memory limit: the log of the new
    // generation begins with changes the snapshot, copied after them, already holds. Replayed
    // on top of it, they pass through a state with both large values, which the running server
    // never had.
    use kv::change::Change;
    use kv::shard::wal::record::encode;
    let directory = tempfile::tempdir().unwrap();
    let large = vec![7u8; 40_000];
    let mut snapshot = Vec::new();
    encode(&Change::Create { bucket: b"s" }, &mut snapshot);
    let put = |key: &'static [u8]| Change::Put {
        bucket: b"s",
        key,
        value: &large,
    };
    encode(&put(b"c"), &mut snapshot);
    let mut log = Vec::new();
    encode(
        &Change::Delete {
            bucket: b"s",
            key: b"a",
        },
        &mut log,
    );
    encode(&put(b"b"), &mut log);
    encode(
        &Change::Delete {
            bucket: b"s",
            key: b"b",
        },
        &mut log,
    );
    encode(&put(b"c"), &mut log);
    std::fs::write(
        directory.path().join(format!("snapshot-{:020}.kv", 1)),
        snapshot,
    )
    .unwrap();
    std::fs::write(directory.path().join(format!("log-{:020}.kv", 1)), log).unwrap();

    let limits = CoreConfig {
        max_memory: 60_000,
        ..CoreConfig::default()
    };
    let (durable, _) = common::open_shard(config(directory.path()), limits)
        .await
        .expect("replay is not refused by the memory limit");
    let bucket = durable.registry().lookup(b"s").unwrap();
    assert_eq!(bucket.len().unwrap(), 1);
    assert_eq!(bucket.get(b"c").unwrap().unwrap(), large);
    assert!(durable.registry().memory().used() <= 60_000);
    // The limit still holds for what clients do.
    assert!(bucket.put(b"d", &large).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_cannot_share_a_directory() {
    let directory = tempfile::tempdir().unwrap();
    let _first = open(directory.path()).await;
    let second = common::open_shard(config(directory.path()), CoreConfig::default()).await;
    assert!(matches!(second, Err(WalError::Locked(_))));
}

/// Writes a known sequence; returns the state after each record (one record per operation).
async fn write_sequence(directory: &Path) -> Vec<State> {
    let durable = open(directory).await;
    let registry = durable.registry();
    let mut states = vec![State::new()];
    registry.create("b").await.unwrap();
    states.push(contents(registry));
    let bucket = registry.lookup(b"b").unwrap();
    for index in 0..6u8 {
        bucket
            .put(&[b'k', index % 3], &vec![index; 5 + index as usize * 20])
            .unwrap();
        states.push(contents(registry));
    }
    bucket.delete(&[b'k', 0]).unwrap();
    states.push(contents(registry));
    durable.commit(true).await.unwrap();
    durable.close().unwrap();
    states
}

fn record_ends(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let end = scan(bytes, |_, offset| {
        starts.push(offset as usize);
        Ok::<(), ()>(())
    })
    .unwrap();
    assert_eq!(end, ScanEnd::Clean);
    let mut ends: Vec<usize> = starts[1..].to_vec();
    ends.push(bytes.len());
    ends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_torn_at_any_byte_of_its_last_records_starts_with_every_whole_record() {
    let original = tempfile::tempdir().unwrap();
    let states = write_sequence(original.path()).await;
    let log = log_file(original.path());
    let bytes = std::fs::read(&log).unwrap();
    let ends = record_ends(&bytes);
    assert_eq!(ends.len() + 1, states.len());
    // Every byte offset within the last three records.
    let from = ends[ends.len() - 4];
    for cut in from..bytes.len() {
        let directory = tempfile::tempdir().unwrap();
        let copy = directory.path().join(log.file_name().unwrap());
        std::fs::write(&copy, &bytes[..cut]).unwrap();
        let (durable, report) = common::open_shard(config(directory.path()), CoreConfig::default())
            .await
            .unwrap_or_else(|error| panic!("cut at {cut}: {error}"));
        let whole = ends.iter().filter(|&&end| end <= cut).count();
        assert_eq!(report.records as usize, whole, "cut at {cut}");
        assert_eq!(contents(durable.registry()), states[whole], "cut at {cut}");
        // The torn end is cut off, and new records follow the last whole one.
        drop(durable);
        let kept = ends[..whole].last().copied().unwrap_or(0);
        assert_eq!(std::fs::metadata(&copy).unwrap().len() as usize, kept);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_in_the_middle_stops_the_start_unless_told_to_truncate() {
    let directory = tempfile::tempdir().unwrap();
    let states = write_sequence(directory.path()).await;
    let log = log_file(directory.path());
    let mut bytes = std::fs::read(&log).unwrap();
    let ends = record_ends(&bytes);
    // A byte in the payload of the fourth record.
    let record = 3;
    let start = ends[record - 1];
    bytes[start + 10] ^= 0x20;
    std::fs::write(&log, &bytes).unwrap();

    let error = common::open_shard(config(directory.path()), CoreConfig::default())
        .await
        .err()
        .expect("corruption stops the start");
    match &error {
        WalError::Corrupt { file, offset, .. } => {
            assert_eq!(file, &log);
            assert_eq!(*offset as usize, start);
        }
        other => panic!("expected corruption, got {other}"),
    }
    let message = error.to_string();
    assert!(message.contains(&log.display().to_string()), "{message}");
    assert!(message.contains(&format!("offset {start}")), "{message}");
    assert!(message.contains("--truncate-corrupt-log"), "{message}");

    let (durable, _) = common::open_shard(
        DurabilityConfig {
            truncate_corrupt_log: true,
            ..config(directory.path())
        },
        CoreConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(contents(durable.registry()), states[record]);
    assert_eq!(std::fs::metadata(&log).unwrap().len() as usize, start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_last_record_that_fails_its_checksum_is_corruption_not_a_tear() {
    let directory = tempfile::tempdir().unwrap();
    let states = write_sequence(directory.path()).await;
    let log = log_file(directory.path());
    let mut bytes = std::fs::read(&log).unwrap();
    let ends = record_ends(&bytes);
    let last = ends[ends.len() - 2];
    bytes[last + 10] ^= 0x01;
    std::fs::write(&log, &bytes).unwrap();

    let error = common::open_shard(config(directory.path()), CoreConfig::default())
        .await
        .err()
        .expect("an acknowledged write is not dropped silently");
    assert!(
        matches!(error, WalError::Corrupt { offset, .. } if offset as usize == last),
        "{error}"
    );
    assert!(error.to_string().contains("whole"), "{error}");
    let (durable, _) = common::open_shard(
        DurabilityConfig {
            truncate_corrupt_log: true,
            ..config(directory.path())
        },
        CoreConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(contents(durable.registry()), states[states.len() - 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_last_record_is_cut_off_as_a_torn_tail() {
    let directory = tempfile::tempdir().unwrap();
    let states = write_sequence(directory.path()).await;
    let log = log_file(directory.path());
    let whole = std::fs::read(&log).unwrap();
    let mut bytes = whole.clone();
    bytes.extend((0..40u8).map(|byte| byte.wrapping_mul(151).wrapping_add(7)));
    std::fs::write(&log, &bytes).unwrap();

    let (durable, _) = common::open_shard(config(directory.path()), CoreConfig::default())
        .await
        .expect("a tail that holds no whole record is a torn write");
    assert_eq!(&contents(durable.registry()), states.last().unwrap());
    assert_eq!(std::fs::read(&log).unwrap(), whole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_everything_and_shrinks_the_log() {
    let directory = tempfile::tempdir().unwrap();
    let durable = open(directory.path()).await;
    let bucket = durable.registry().create("b").await.unwrap();
    for round in 0..20u32 {
        for key in 0..100u32 {
            bucket
                .put(&key.to_le_bytes(), &round.to_le_bytes())
                .unwrap();
        }
    }
    durable.commit(true).await.unwrap();
    let before = durable.log_status().unwrap().bytes;
    durable.compact().await.unwrap();
    assert_eq!(durable.generation(), Some(1));
    bucket.put(b"after", b"compaction").unwrap();
    durable.commit(true).await.unwrap();
    let expected = contents(durable.registry());
    let files: Vec<String> = std::fs::read_dir(directory.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files
            .iter()
            .all(|name| !name.contains("00000000000000000000")),
        "{files:?}"
    );
    let snapshot_and_log: u64 = std::fs::read_dir(directory.path())
        .unwrap()
        .map(|entry| entry.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        snapshot_and_log * 5 < before,
        "{snapshot_and_log} vs {before}"
    );
    crash(durable).await;

    let durable = open(directory.path()).await;
    assert_eq!(contents(durable.registry()), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_under_concurrent_writes_loses_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let durable = open(directory.path()).await;
    let registry = durable.registry().clone();
    for writer in 0..4 {
        registry
            .create(format!("w{writer}").as_str())
            .await
            .unwrap();
    }
    // Each writer owns its bucket and records the last value committed for each key.
    let writers: Vec<_> = (0..4u32)
        .map(|writer| {
            let durable = Arc::clone(&durable);
            tokio::spawn(async move {
                let bucket = durable
                    .registry()
                    .lookup(format!("w{writer}").as_bytes())
                    .unwrap();
                let mut committed = BTreeMap::new();
                for sequence in 0..3000u32 {
                    let key = (sequence % 50).to_le_bytes().to_vec();
                    let value = sequence.to_le_bytes().to_vec();
                    if sequence % 7 == 3 {
                        bucket.delete(&key).unwrap();
                        durable.commit(true).await.unwrap();
                        committed.remove(&key);
                    } else {
                        bucket.put(&key, &value).unwrap();
                        durable.commit(true).await.unwrap();
                        committed.insert(key, value);
                    }
                    if sequence % 100 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                (format!("w{writer}").into_bytes(), committed)
            })
        })
        .collect();
    let compactions = {
        let durable = Arc::clone(&durable);
        tokio::spawn(async move {
            for _ in 0..5 {
                durable.compact().await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let mut expected = State::new();
    for writer in writers {
        let (name, committed) = writer.await.unwrap();
        expected.insert(name, committed);
    }
    compactions.await.unwrap();
    assert_eq!(durable.generation(), Some(5));
    crash(durable).await;

    let durable = open(directory.path()).await;
    assert_eq!(contents(durable.registry()), expected);
}

mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    pub enum Step {
        Create(u8),
        Put(u8, u8, u8),
        Delete(u8, u8),
        Drop(u8),
        Crash,
        Stop,
        Compact,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            2 => (0..3u8).prop_map(Step::Create),
            6 => (0..3u8, 0..5u8, any::<u8>()).prop_map(|(b, k, v)| Step::Put(b, k, v)),
            2 => (0..3u8, 0..5u8).prop_map(|(b, k)| Step::Delete(b, k)),
            1 => (0..3u8).prop_map(Step::Drop),
            1 => Just(Step::Crash),
            1 => Just(Step::Stop),
            1 => Just(Step::Compact),
        ]
    }

    async fn check(steps: Vec<Step>) -> Result<(), TestCaseError> {
        let directory = tempfile::tempdir().unwrap();
        let mut durable = open(directory.path()).await;
        let mut model = State::new();
        for step in steps {
            let registry = durable.registry().clone();
            match step {
                Step::Create(bucket) => {
                    registry.create(&[bucket][..]).await.unwrap();
                    model.entry(vec![bucket]).or_default();
                }
                Step::Put(bucket, key, value) => {
                    if let Some(handle) = registry.lookup(&[bucket]) {
                        handle.put(&[key], &[value]).unwrap();
                    }
                    if let Some(table) = model.get_mut(&vec![bucket]) {
                        table.insert(vec![key], vec![value]);
                    }
                }
                Step::Delete(bucket, key) => {
                    if let Some(handle) = registry.lookup(&[bucket]) {
                        handle.delete(&[key]).unwrap();
                    }
                    if let Some(table) = model.get_mut(&vec![bucket]) {
                        table.remove(&vec![key]);
                    }
                }
                Step::Drop(bucket) => {
                    registry.drop_bucket(&[bucket]).await.unwrap();
                    model.remove(&vec![bucket]);
                }
                Step::Compact => durable.compact().await.unwrap(),
                Step::Crash | Step::Stop => {
                    if matches!(step, Step::Stop) {
                        durable.close().unwrap();
                    }
                    drop(registry);
                    drop(durable);
                    durable = open(directory.path()).await;
                    prop_assert_eq!(&contents(durable.registry()), &model);
                    continue;
                }
            }
            // Every step is acknowledged, as the server acknowledges a batch.
            durable.commit(true).await.unwrap();
            prop_assert_eq!(&contents(durable.registry()), &model);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_operations_with_restarts_match_a_model(
            steps in proptest::collection::vec(step(), 1..60)
        ) {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(check(steps))?;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_larger_than_a_log_record_is_refused_before_it_is_made() {
    use kv::change::Refusal;
    use kv::shard::wal::record::MAX_CHANGE_LEN;
    let directory = tempfile::tempdir().unwrap();
    let durable = open(directory.path()).await;
    let bucket = durable.registry().create("b").await.unwrap();
    // Zeroed by the allocator on demand: the refusal comes before any of it is read.
    let huge = vec![0u8; MAX_CHANGE_LEN];
    let error = bucket.put(b"k", &huge).unwrap_err();
    assert_eq!(
        error,
        kv::BucketError::Refused(Refusal::TooLarge {
            size: 1 + 1 + MAX_CHANGE_LEN,
            limit: MAX_CHANGE_LEN
        })
    );
    assert!(
        error.to_string().contains("over the log's limit"),
        "{error}"
    );
    drop(huge);
    assert_eq!(bucket.get(b"k").unwrap(), None, "nothing was stored");
    bucket.put(b"small", b"v").unwrap();
    durable.commit(true).await.unwrap();
    durable.close().unwrap();
    drop(durable);
    let reopened = open(directory.path()).await;
    let bucket = reopened.registry().lookup(b"b").unwrap();
    assert_eq!(bucket.len().unwrap(), 1, "the log reads back whole");
}
