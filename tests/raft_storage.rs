//! A shard's Raft storage (its log on disk, its registry as the state machine) against
//! openraft's own storage suite, and what survives a reopen of the log.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use kv::cluster::raft::{ShardLog, ShardRaft, ShardStateMachine};
use kv::config::{CoreConfig, FsyncPolicy};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<ShardRaft, ShardLog, ShardStateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, ShardLog, ShardStateMachine), StorageError<ShardRaft>> {
        let directory = tempfile::tempdir().unwrap();
        // Syncing is not what the suite checks; a vote is synced whatever the policy.
        let log = ShardLog::open(directory.path(), FsyncPolicy::No).unwrap();
        // Every entry the suite reads comes back from the file.
        log.keep_in_memory(0).await;
        Ok((
            directory,
            log,
            ShardStateMachine::new(CoreConfig::default()),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shard_storage_passes_openrafts_suite() {
    Suite::test_all(Builder).await.unwrap();
}

/// Appends `entries` and waits until the log says they are flushed.
async fn append(
    log: &mut ShardLog,
    entries: Vec<openraft::type_config::alias::EntryOf<ShardRaft>>,
) {
    use openraft::storage::RaftLogStorageExt;
    log.blocking_append(entries).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_log_has_its_vote_entries_truncations_and_purges() {
    use openraft::storage::RaftLogStorage;
    use openraft::testing::{blank_ent, log_id};
    use openraft::type_config::alias::VoteOf;

    let directory = tempfile::tempdir().unwrap();
    let vote = VoteOf::<ShardRaft>::new(3, 2);
    {
        let mut log = ShardLog::open(directory.path(), FsyncPolicy::Always).unwrap();
        append(
            &mut log,
            (1..=10)
                .map(|index| blank_ent::<ShardRaft>(1, 1, index))
                .collect(),
        )
        .await;
        log.save_vote(&vote).await.unwrap();
        log.truncate_after(Some(log_id::<ShardRaft>(1, 1, 8)))
            .await
            .unwrap();
        log.purge(log_id::<ShardRaft>(1, 1, 3)).await.unwrap();
        log.save_committed(Some(log_id::<ShardRaft>(1, 1, 6)))
            .await
            .unwrap();
    }
    // A crash mid-write leaves a torn frame at the end: cut off at the next open.
    let file = directory.path().join("raft-log.kv");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(&[0x10, 0, 0, 0, 1, 2]);
    std::fs::write(&file, &bytes).unwrap();

    assert_eq!(
        Reopened::from(directory.path()).await,
        Reopened {
            purged: Some(3),
            last: Some(8),
            vote: Some(vote),
            committed: Some(6),
            entries: vec![4, 5, 6, 7, 8],
        }
    );
}

/// What a log reopened from its directory holds: indexes of its last purged entry, its last
/// entry, its committed entry and its entries, and its vote.
#[derive(Debug, PartialEq)]
struct Reopened {
    purged: Option<u64>,
    last: Option<u64>,
    vote: Option<openraft::type_config::alias::VoteOf<ShardRaft>>,
    committed: Option<u64>,
    entries: Vec<u64>,
}

impl Reopened {
    async fn from(directory: &std::path::Path) -> Self {
        use openraft::storage::{RaftLogReader, RaftLogStorage};

        let mut log = ShardLog::open(directory, FsyncPolicy::No).unwrap();
        let state = log.get_log_state().await.unwrap();
        Self {
            purged: state.last_purged_log_id.map(|id| id.index),
            last: state.last_log_id.map(|id| id.index),
            vote: log.read_vote().await.unwrap(),
            committed: log.read_committed().await.unwrap().map(|id| id.index),
            entries: log
                .try_get_log_entries(0..u64::MAX)
                .await
                .unwrap()
                .iter()
                .map(|entry| entry.log_id.index)
                .collect(),
        }
    }
}

/// A few large entries, far fewer frames than the rewrite waits for, are rewritten away once
/// purged too: the file is bounded by its bytes as well as its frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_of_few_large_entries_is_rewritten_once_purged() {
    use openraft::storage::RaftLogStorage;
    use openraft::testing::log_id;

    let directory = tempfile::tempdir().unwrap();
    let mut log = ShardLog::open(directory.path(), FsyncPolicy::No).unwrap();
    let value = vec![b'v'; 1 << 20];
    let changes: Vec<_> = (0..80)
        .map(|_| kv::change::Change::Put {
            bucket: b"big",
            key: b"k",
            value: &value,
        })
        .collect();
    append(&mut log, entries_of(&changes, 1)).await;
    let file = directory.path().join("raft-log.kv");
    let before = std::fs::metadata(&file).unwrap().len();
    assert!(before > 80 << 20, "{before}");
    assert!(log.held_bytes() > 80 << 20, "{}", log.held_bytes());
    log.purge(log_id::<ShardRaft>(1, 1, 79)).await.unwrap();
    log.wait_for_rewrite().await;
    let after = std::fs::metadata(&file).unwrap().len();
    assert!(after < 2 << 20, "rewritten: {before} bytes, then {after}");
    assert!(log.held_bytes() < 2 << 20, "{}", log.held_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_mostly_purged_is_rewritten_and_reads_back_the_same() {
    use openraft::storage::{RaftLogReader, RaftLogStorage};
    use openraft::testing::{blank_ent, log_id};

    let directory = tempfile::tempdir().unwrap();
    {
        let mut log = ShardLog::open(directory.path(), FsyncPolicy::No).unwrap();
        append(
            &mut log,
            (1..=5000)
                .map(|index| blank_ent::<ShardRaft>(1, 1, index))
                .collect(),
        )
        .await;
        let before = std::fs::metadata(directory.path().join("raft-log.kv"))
            .unwrap()
            .len();
        log.purge(log_id::<ShardRaft>(1, 1, 4990)).await.unwrap();
        log.wait_for_rewrite().await;
        let after = std::fs::metadata(directory.path().join("raft-log.kv"))
            .unwrap()
            .len();
        assert!(
            after * 100 < before,
            "rewritten: {before} bytes, then {after}"
        );
    }
    let mut log = ShardLog::open(directory.path(), FsyncPolicy::No).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(
        state.last_purged_log_id,
        Some(log_id::<ShardRaft>(1, 1, 4990))
    );
    assert_eq!(state.last_log_id, Some(log_id::<ShardRaft>(1, 1, 5000)));
    assert_eq!(log.try_get_log_entries(0..10_000).await.unwrap().len(), 10);
}

/// A rewrite runs in the background: what is appended, truncated and voted while it writes
/// the live log is in the new file too. (On one thread, the rewrite cannot finish before the
/// test yields: everything after the purge is written while it runs.)
#[tokio::test(flavor = "current_thread")]
async fn what_is_written_during_a_rewrite_is_in_the_rewritten_file() {
    use openraft::storage::RaftLogStorage;
    use openraft::testing::log_id;
    use openraft::type_config::alias::VoteOf;

    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("raft-log.kv");
    let value = vec![b'v'; 1 << 20];
    let change = kv::change::Change::Put {
        bucket: b"big",
        key: b"k",
        value: &value,
    };
    let vote = VoteOf::<ShardRaft>::new(2, 1);
    {
        let mut log = ShardLog::open(directory.path(), FsyncPolicy::No).unwrap();
        append(&mut log, entries_of(&vec![change; 80], 1)).await;
        let before = std::fs::metadata(&file).unwrap().len();
        log.purge(log_id::<ShardRaft>(1, 1, 70)).await.unwrap();
        append(&mut log, entries_of(&vec![change; 10], 81)).await;
        log.truncate_after(Some(log_id::<ShardRaft>(1, 1, 85)))
            .await
            .unwrap();
        log.save_vote(&vote).await.unwrap();
        log.wait_for_rewrite().await;
        let after = std::fs::metadata(&file).unwrap().len();
        assert!(
            after < before / 2,
            "rewritten: {before} bytes, then {after}"
        );
        // Written after the rewrite, to the new file.
        log.save_committed(Some(log_id::<ShardRaft>(1, 1, 84)))
            .await
            .unwrap();
    }
    assert_eq!(
        Reopened::from(directory.path()).await,
        Reopened {
            purged: Some(70),
            last: Some(85),
            vote: Some(vote),
            committed: Some(84),
            entries: (71..=85).collect(),
        }
    );
}

/// Entries the log no longer keeps in memory are read back from their frames: from the file
/// they were appended to, from the file a rewrite replaced it with (entries copied into it, and
/// those written while it ran), and after appends to that one.
#[tokio::test(flavor = "current_thread")]
async fn entries_not_kept_in_memory_read_back_the_same_across_a_rewrite() {
    use openraft::storage::{RaftLogReader, RaftLogStorage};
    use openraft::testing::log_id;

    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("raft-log.kv");
    let values: Vec<Vec<u8>> = (0..100u8).map(|byte| vec![byte; 1 << 20]).collect();
    let changes: Vec<_> = values
        .iter()
        .map(|value| kv::change::Change::Put {
            bucket: b"big",
            key: b"k",
            value,
        })
        .collect();
    let entries =
        |from: u64, through: u64| entries_of(&changes[from as usize..=through as usize], from);
    let mut log = ShardLog::open(directory.path(), FsyncPolicy::No).unwrap();
    // The two newest entries stay in memory; older ones are read back.
    log.keep_in_memory(2 << 20 | 4096).await;
    append(&mut log, entries(1, 80)).await;
    assert_eq!(
        log.try_get_log_entries(1..=80).await.unwrap(),
        entries(1, 80)
    );
    let before = std::fs::metadata(&file).unwrap().len();

    log.purge(log_id::<ShardRaft>(1, 1, 70)).await.unwrap();
    append(&mut log, entries(81, 90)).await;
    log.truncate_after(Some(log_id::<ShardRaft>(1, 1, 85)))
        .await
        .unwrap();
    log.wait_for_rewrite().await;
    let after = std::fs::metadata(&file).unwrap().len();
    assert!(
        after < before / 2,
        "rewritten: {before} bytes, then {after}"
    );
    assert_eq!(
        log.try_get_log_entries(0..100).await.unwrap(),
        entries(71, 85)
    );

    append(&mut log, entries(86, 95)).await;
    log.keep_in_memory(0).await;
    assert_eq!(
        log.try_get_log_entries(0..100).await.unwrap(),
        entries(71, 95)
    );
    let blocking = log.clone();
    let read = tokio::task::spawn_blocking(move || blocking.entries_blocking(71..=95))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read, entries(71, 95));
    drop(log);
    let mut reopened = ShardLog::open(directory.path(), FsyncPolicy::No).unwrap();
    assert_eq!(
        reopened.try_get_log_entries(0..100).await.unwrap(),
        entries(71, 95)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_apply_to_the_shards_buckets_and_travel_in_a_snapshot() {
    use kv::change::Change;
    use openraft::storage::RaftStateMachine;
    use openraft::testing::log_id;

    let changes = [
        Change::Create { bucket: b"s" },
        Change::Put {
            bucket: b"s",
            key: b"milk",
            value: b"1",
        },
        Change::Put {
            bucket: b"s",
            key: b"eggs",
            value: b"3",
        },
        Change::Delete {
            bucket: b"s",
            key: b"eggs",
        },
        Change::Put {
            bucket: b"nowhere",
            key: b"k",
            value: b"v",
        },
        Change::Create { bucket: b"gone" },
        Change::Drop { bucket: b"gone" },
        Change::Drop { bucket: b"gone" },
    ];
    let mut machine = ShardStateMachine::new(CoreConfig::default());
    apply_changes(&mut machine, &changes).await;
    let applied = machine.registry().clone();
    assert!(applied.lookup(b"gone").is_none());
    assert!(applied.lookup(b"nowhere").is_none());

    let mut follower = installed_from(&mut machine).await;
    let registry = follower.registry().clone();
    let names: Vec<_> = registry.view().names(None, 10);
    assert_eq!(names.len(), 1);
    let bucket = registry.lookup(b"s").unwrap();
    assert_eq!(bucket.get(b"milk").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(bucket.get(b"eggs").unwrap(), None);
    assert_eq!(
        follower.applied_state().await.unwrap().0,
        Some(log_id::<ShardRaft>(1, 1, 8))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_on_disk_before_it_counts_and_a_reopened_machine_starts_from_it() {
    use kv::change::Change;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

    let directory = tempfile::tempdir().unwrap();
    let log = ShardLog::open(directory.path(), FsyncPolicy::No).unwrap();
    let mut machine = ShardStateMachine::open(
        directory.path(),
        CoreConfig::default(),
        budget(),
        log.clone(),
    )
    .await
    .unwrap();
    let changes = [
        Change::Create { bucket: b"s" },
        Change::Put {
            bucket: b"s",
            key: b"k",
            value: b"v",
        },
    ];
    apply_changes(&mut machine, &changes).await;
    let built = machine
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert!(directory.path().join("snapshot.kv").exists());
    // The snapshot sent to a replica is read back from its file, and is the one built.
    let current = machine.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, built.meta);
    assert_eq!(current.snapshot, built.snapshot);

    let mut reopened =
        ShardStateMachine::open(directory.path(), CoreConfig::default(), budget(), log)
            .await
            .unwrap();
    assert_eq!(
        reopened.applied_state().await.unwrap().0,
        built.meta.last_log_id
    );
    let registry = reopened.registry().clone();
    assert_eq!(
        registry.lookup(b"s").unwrap().get(b"k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    let current = reopened.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(
        (current.meta, current.snapshot),
        (built.meta, built.snapshot)
    );
    // Its records are in the file only: without it, there is no snapshot to send.
    std::fs::remove_file(directory.path().join("snapshot.kv")).unwrap();
    assert!(machine.get_current_snapshot().await.is_err());
}

/// A snapshot is built while the shard's changes go on (its buckets are copied a page at a
/// time, not under the shard's applying), and holds exactly the state after the last entry
/// applied when it ended: keys overwritten meanwhile (some with values of another size, which
/// moves them in the table), deleted or added, and a bucket dropped and created again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_built_while_changes_apply_is_the_state_after_its_last_entry() {
    build_while_changes_apply(ShardStateMachine::new(CoreConfig::default())).await;
}

/// The same with a directory, where a build writes its records to a file as it copies them
/// (a megabyte at a time: the bucket's records here take more) and hands them over mapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_built_into_a_file_while_changes_apply_is_the_state_after_its_last_entry() {
    let directory = tempfile::tempdir().unwrap();
    let log = ShardLog::open(directory.path(), FsyncPolicy::No).unwrap();
    let machine = ShardStateMachine::open(directory.path(), CoreConfig::default(), budget(), log)
        .await
        .unwrap();
    build_while_changes_apply(machine).await;
    // The records' file had no name, and is gone with the build.
    let mut names: Vec<String> = std::fs::read_dir(directory.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["raft-log.kv", "snapshot.kv"]);
}

async fn build_while_changes_apply(mut machine: ShardStateMachine) {
    use kv::change::Change;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

    const KEYS: usize = 50_000;
    let key = |i: usize| format!("key{i}").into_bytes();
    let mut history = Vec::new();
    let mut fill = vec![
        Change::Create { bucket: b"s" },
        Change::Create { bucket: b"t" },
    ];
    let keys: Vec<Vec<u8>> = (0..KEYS).map(key).collect();
    fill.extend(keys.iter().map(|key| Change::Put {
        bucket: b"s",
        key,
        value: b"first",
    }));
    for changes in fill.chunks(1_000) {
        apply_entry(&mut machine, &mut history, changes).await;
    }
    // A build that happened to run while nothing was applied (the copy is quick, and other
    // tests share the cores) proves nothing about changes during the copy: build again.
    let long = vec![b'L'; 300];
    let mut round = 0;
    for _attempt in 0..10 {
        let started_at = history.len() as u64;
        let mut builder = machine.get_snapshot_builder().await;
        let build = tokio::spawn(async move { builder.build_snapshot().await });
        while !build.is_finished() && round < 1_000_000 {
            let (overwritten, deleted, added) = (
                key(round * 7 % KEYS),
                key(round * 13 % KEYS),
                key(KEYS + round),
            );
            let mut changes = vec![
                Change::Put {
                    bucket: b"s",
                    key: &overwritten,
                    value: if round % 2 == 0 { &long } else { b"short" },
                },
                Change::Delete {
                    bucket: b"s",
                    key: &deleted,
                },
                Change::Put {
                    bucket: b"s",
                    key: &added,
                    value: b"new",
                },
            ];
            if round % 50 == 0 {
                changes.extend([
                    Change::Drop { bucket: b"t" },
                    Change::Create { bucket: b"t" },
                    Change::Put {
                        bucket: b"t",
                        key: &added,
                        value: b"again",
                    },
                ]);
            }
            apply_entry(&mut machine, &mut history, &changes).await;
            round += 1;
            tokio::task::yield_now().await;
        }
        let snapshot = build.await.unwrap().unwrap();
        let last = snapshot.meta.last_log_id.unwrap().index;
        assert!(last >= started_at);

        let mut replayed = ShardStateMachine::new(CoreConfig::default());
        let through = history
            .iter()
            .filter(|entry| entry.log_id.index <= last)
            .cloned()
            .map(|entry| Ok((entry, None)));
        replayed
            .apply(futures::stream::iter(through))
            .await
            .unwrap();
        let installed = installed(snapshot.clone()).await;
        assert_eq!(
            contents(installed.registry()),
            contents(replayed.registry()),
            "the snapshot ending at entry {last} holds what applying through it leaves"
        );

        // The copy writes only `Create`s and `Put`s: a `Delete` is a change made while it ran.
        let mut made_during_the_copy = 0;
        kv::shard::wal::record::scan(&snapshot.snapshot, |change, _| {
            made_during_the_copy += usize::from(matches!(change, Change::Delete { .. }));
            Ok::<(), ()>(())
        })
        .unwrap();
        if made_during_the_copy > 0 {
            return;
        }
    }
    panic!("no snapshot build saw a change applied while it copied the buckets");
}

/// A new state machine that installed the snapshot `machine` builds now.
async fn installed_from(machine: &mut ShardStateMachine) -> ShardStateMachine {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    let snapshot = machine
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    installed(snapshot).await
}

/// A new state machine that installed `snapshot`.
async fn installed(
    snapshot: openraft::type_config::alias::SnapshotOf<ShardRaft, kv::cluster::raft::SnapshotBytes>,
) -> ShardStateMachine {
    use openraft::storage::RaftStateMachine;
    let mut machine = ShardStateMachine::new(CoreConfig::default());
    machine
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    machine
}

/// A bucket's name and its entries, in order.
type Contents = (Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>);

/// Every bucket of `registry` with its entries, in order.
fn contents(registry: &kv::Registry) -> Vec<Contents> {
    let mut buckets: Vec<_> = registry
        .view()
        .buckets()
        .iter()
        .map(|bucket| {
            let mut entries = Vec::new();
            bucket
                .for_each_entry(|key, value| entries.push((key.to_vec(), value.to_vec())))
                .unwrap();
            entries.sort();
            (bucket.name().as_bytes().to_vec(), entries)
        })
        .collect();
    buckets.sort();
    buckets
}

/// Applies `changes` to `machine` as one committed entry, the next after those in `history`,
/// and adds it there.
async fn apply_entry(
    machine: &mut ShardStateMachine,
    history: &mut Vec<openraft::type_config::alias::EntryOf<ShardRaft>>,
    changes: &[kv::change::Change<'_>],
) {
    use kv::cluster::raft::ShardCommand;
    use openraft::storage::RaftStateMachine;
    let entry = openraft::Entry {
        log_id: openraft::testing::log_id::<ShardRaft>(1, 1, history.len() as u64 + 1),
        payload: openraft::EntryPayload::Normal(ShardCommand::batch(changes)),
    };
    history.push(entry.clone());
    machine
        .apply(futures::stream::iter([Ok((entry, None))]))
        .await
        .unwrap();
}

/// Applies `changes` to `machine` as committed entries 1, 2, …
async fn apply_changes(machine: &mut ShardStateMachine, changes: &[kv::change::Change<'_>]) {
    use openraft::storage::RaftStateMachine;
    let entries = entries_of(changes, 1)
        .into_iter()
        .map(|entry| Ok((entry, None)));
    machine.apply(futures::stream::iter(entries)).await.unwrap();
}

/// `changes` as entries of term 1, the first at index `first`.
fn entries_of(
    changes: &[kv::change::Change<'_>],
    first: u64,
) -> Vec<openraft::type_config::alias::EntryOf<ShardRaft>> {
    use kv::cluster::raft::ShardCommand;
    changes
        .iter()
        .zip(first..)
        .map(|(change, index)| openraft::Entry {
            log_id: openraft::testing::log_id::<ShardRaft>(1, 1, index),
            payload: openraft::EntryPayload::Normal(ShardCommand::new(change)),
        })
        .collect()
}

/// The guide's supervision on a replica: a bucket that crashes is restarted from the shard's
/// snapshot and the entries applied since, so it comes back with everything every replica
/// has; changes committed meanwhile wait for it and are made too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_crashes_on_a_replica_comes_back_with_what_every_replica_has() {
    use kv::change::Change;
    use openraft::storage::{RaftLogStorageExt, RaftSnapshotBuilder, RaftStateMachine};

    let directory = tempfile::tempdir().unwrap();
    let mut log = ShardLog::open(directory.path(), FsyncPolicy::No).unwrap();
    let mut machine = ShardStateMachine::open(
        directory.path(),
        CoreConfig::default(),
        budget(),
        log.clone(),
    )
    .await
    .unwrap();
    let put = |key: &'static [u8], value: &'static [u8]| Change::Put {
        bucket: b"s",
        key,
        value,
    };
    // Some of the bucket is in a snapshot, the rest only in the log.
    let before = [
        Change::Create { bucket: b"s" },
        put(b"a", b"1"),
        put(b"b", b"2"),
    ];
    let entries = entries_of(&before, 1);
    log.blocking_append(entries.clone()).await.unwrap();
    apply_changes(&mut machine, &before).await;
    machine
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let after = [
        put(b"b", b"3"),
        Change::Delete {
            bucket: b"s",
            key: b"a",
        },
        put(b"c", b"4"),
    ];
    let entries = entries_of(&after, 4);
    log.blocking_append(entries.clone()).await.unwrap();
    machine
        .apply(futures::stream::iter(
            entries.into_iter().map(|entry| Ok((entry, None))),
        ))
        .await
        .unwrap();

    let registry = machine.registry().clone();
    let crashed = registry.lookup(b"s").unwrap();
    crashed.inject_fault(kv::BucketFault::Panic).unwrap();
    crashed.stopped().await;
    // A snapshot built while the bucket restarts holds it all the same.
    let installed = installed_from(&mut machine).await;
    let held: Vec<(Vec<u8>, Vec<u8>)> = [(b"b", b"3"), (b"c", b"4")]
        .iter()
        .map(|(key, value)| (key.to_vec(), value.to_vec()))
        .collect();
    assert_eq!(contents(installed.registry()), [(b"s".to_vec(), held)]);
    // A change committed while the bucket restarts waits for it, then is made.
    let next = entries_of(&[put(b"d", b"5")], 7);
    log.blocking_append(next.clone()).await.unwrap();
    machine
        .apply(futures::stream::iter(
            next.into_iter().map(|entry| Ok((entry, None))),
        ))
        .await
        .unwrap();

    // Applying the change waited for the restart: the bucket is back.
    let restarted = registry.lookup(b"s").expect("restarted");
    assert_ne!(restarted.id(), crashed.id());
    let mut contents = Vec::new();
    restarted
        .for_each_entry(|key, value| contents.push((key.to_vec(), value.to_vec())))
        .unwrap();
    contents.sort();
    let expected: Vec<(Vec<u8>, Vec<u8>)> = [(b"b", b"3"), (b"c", b"4"), (b"d", b"5")]
        .iter()
        .map(|(key, value)| (key.to_vec(), value.to_vec()))
        .collect();
    assert_eq!(contents, expected);
}

fn budget() -> std::sync::Arc<kv::MemoryBudget> {
    std::sync::Arc::new(kv::MemoryBudget::new(CoreConfig::default().max_memory))
}
