//! Three `kv serve` processes under faults while clients write and read through every node:
//! kill -9 of a shard's leader with writes in flight and its restart, a leader paused with
//! SIGSTOP while the others elect a new one and then woken, and a crash of the whole cluster
//! and its restart. Every key's history must be linearizable (see
//! `common/linearizability.rs`): no acknowledged write lost, no read of a stale or unwritten
//! value, through any node.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
#[path = "common/histories.rs"]
mod histories;
#[path = "common/linearizability.rs"]
mod linearizability;

use std::time::{Duration, Instant};

use histories::{ANSWER_WITHIN, BUCKETS, Clients, Cluster, KEYS, note, request};
use kv::protocol::ReplyValue;

/// The whole test, faults and checking included, ends within this.
const BOUND: Duration = Duration::from_secs(120);

/// The tests here pick free ports and bind them again a moment later, and each runs three
/// servers: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_through_leader_kills_pauses_and_a_whole_cluster_crash_are_linearizable() {
    let _alone = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(BOUND, faults_and_check())
        .await
        .expect("the test ends within its bound");
}

async fn faults_and_check() {
    let mut cluster = Cluster::start();
    cluster.create_buckets().await;

    let clients = Clients::start(&cluster, 4);
    clients.progress(200).await;

    // kill -9 of a shard's leader while writes are in flight, then its restart.
    let victim = cluster.leader_of(BUCKETS[0], 0, None).await;
    cluster.signal(victim, "KILL").await;
    clients.progress(200).await;
    cluster.start_node(victim);
    clients.progress(200).await;

    // A leader paused long enough for the others to elect a new one, then woken. Meanwhile
    // keys of its shard are overwritten through the new leader, and then read through the
    // paused one: those reads are answered after it wakes, and must see the new values, not
    // what the old leader had.
    let paused = cluster.leader_of(BUCKETS[1], 0, None).await;
    let mut to_paused = cluster.client(paused).await;
    let mut through_another = cluster.client((paused + 1) % 3).await;
    cluster.signal(paused, "STOP").await;
    // A read through another node, sent before the others notice the pause: that node
    // forwards it to the paused leader, and once a new leader is elected sends it there
    // rather than waiting for the paused one until its bound ("try again").
    let invoked = Instant::now();
    let answer = common::within(through_another.call(&request(BUCKETS[1], KEYS[0], None)))
        .await
        .unwrap();
    assert!(!matches!(answer, ReplyValue::Error(_)), "{answer:?}");
    note(
        &clients.record,
        BUCKETS[1],
        KEYS[0],
        None,
        invoked,
        Some(answer),
    );
    let other = (paused + 1) % 3;
    let successor = cluster.leader_of(BUCKETS[1], other, Some(paused)).await;
    let mut to_successor = cluster.client(successor).await;
    for key in KEYS {
        let value = format!("while {paused} was paused").into_bytes();
        let words = request(BUCKETS[1], key, Some(&value));
        let invoked = Instant::now();
        let answer = common::within(to_successor.call(&words)).await.unwrap();
        assert_eq!(answer, ReplyValue::Simple("OK".into()));
        note(
            &clients.record,
            BUCKETS[1],
            key,
            Some(value),
            invoked,
            Some(answer),
        );
    }
    let invoked = Instant::now();
    for key in KEYS {
        to_paused.queue(&request(BUCKETS[1], key, None));
    }
    to_paused.send().await.unwrap();
    cluster.signal(paused, "CONT").await;
    for key in KEYS {
        let answer = common::within(to_paused.read_reply()).await.unwrap();
        note(
            &clients.record,
            BUCKETS[1],
            key,
            None,
            invoked,
            Some(answer),
        );
    }
    clients.progress(200).await;

    // Every node crashes at once and comes back on its directory.
    cluster.crash_all().await;
    clients.progress(200).await;

    let checked = clients.check().await;
    assert!(checked >= 1000, "{checked} operations checked");
    cluster.stop_all().await;
}

/// Faults drawn at random, one after another, while clients write and read through every
/// live node: kill -9 of a node and its restart (later, or at once), a node paused for up to
/// three seconds, two nodes killed at once (a majority of every shard) and restarted, and the
/// whole cluster crashed and restarted. After each, the clients must get on (100 more
/// operations acknowledged within the common patience); at the end every key's history must be
/// linearizable. `KV_FAULTS` sets how many faults (default 8), `KV_FAULTS_SEED` the draw (else
/// one from the clock, printed, so that a failing run can be run again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_through_random_faults_are_linearizable() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let faults: u32 = std::env::var("KV_FAULTS").map_or(8, |n| n.parse().unwrap());
    let seed: u64 = std::env::var("KV_FAULTS_SEED").map_or_else(
        |_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        },
        |seed| seed.parse().unwrap(),
    );
    println!("KV_FAULTS={faults} KV_FAULTS_SEED={seed}");
    // Each fault takes a few seconds: a node's restart and the clients' progress after it.
    let bound = Duration::from_secs(60 + 15 * u64::from(faults));
    tokio::time::timeout(bound, random_faults_and_check(faults, seed))
        .await
        .expect("the test ends within its bound");
}

async fn random_faults_and_check(faults: u32, seed: u64) {
    let mut random = fastrand::Rng::with_seed(seed);
    let mut cluster = Cluster::start();
    cluster.create_buckets().await;
    let clients = Clients::start(&cluster, 4);
    clients.progress(100).await;
    for _ in 0..faults {
        let node = random.usize(..3);
        match random.u8(..6) {
            0 | 1 => {
                cluster.signal(node, "KILL").await;
                clients.progress(50).await;
                cluster.start_node(node);
            }
            2 => {
                cluster.signal(node, "KILL").await;
                cluster.start_node(node);
            }
            3 => {
                cluster.signal(node, "STOP").await;
                tokio::time::sleep(Duration::from_millis(random.u64(100..3000))).await;
                cluster.signal(node, "CONT").await;
            }
            4 => {
                let other = (node + 1 + random.usize(..2)) % 3;
                cluster.signal(node, "KILL").await;
                cluster.signal(other, "KILL").await;
                tokio::time::sleep(Duration::from_millis(random.u64(100..1500))).await;
                cluster.start_node(node);
                cluster.start_node(other);
            }
            _ => cluster.crash_all().await,
        }
        clients.progress(100).await;
    }
    let checked = clients.check().await;
    assert!(
        checked >= 100 * faults as usize,
        "{checked} operations checked"
    );
    cluster.stop_all().await;
}

/// With a majority of a shard's replicas gone, nothing is acknowledged and nothing is read:
/// requests wait out their bound and are answered "try again". Once the nodes return, the
/// cluster serves again, and the write that was refused is there or not, never half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_majority_gone_nothing_is_acknowledged_or_read() {
    let _alone = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(BOUND, async {
        let mut cluster = Cluster::start();
        let mut client = cluster.client(0).await;
        for words in [
            &[&b"CREATE"[..], b"apples"][..],
            &[b"PUT", b"apples", b"x", b"1"],
        ] {
            common::within(async {
                while client.call(words).await.unwrap() != ReplyValue::Simple("OK".into()) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
        }
        cluster.signal(1, "KILL").await;
        cluster.signal(2, "KILL").await;

        client.queue(&[b"PUT", b"apples", b"x", b"2"]);
        client.queue(&[b"GET", b"apples", b"x"]);
        client.send().await.unwrap();
        for what in ["the write", "the read"] {
            let answer = tokio::time::timeout(ANSWER_WITHIN, client.read_reply())
                .await
                .expect("answered within the bound")
                .unwrap();
            let ReplyValue::Error(error) = &answer else {
                panic!("{what} was answered {answer:?} with a majority gone");
            };
            assert!(error.starts_with("TRYAGAIN"), "{what}: {error}");
        }

        cluster.start_node(1);
        cluster.start_node(2);
        let value = common::within(async {
            loop {
                match client.call(&[b"GET", b"apples", b"x"]).await.unwrap() {
                    ReplyValue::Error(error) if error.starts_with("TRYAGAIN") => {}
                    other => return other,
                }
            }
        })
        .await;
        assert!(
            [b"1".as_slice(), b"2"].iter().any(
                |expected| value == ReplyValue::Bulk(Some(bytes::Bytes::from_static(expected)))
            ),
            "{value:?}"
        );
    })
    .await
    .expect("the test ends within its bound");
}

/// A node holding no replica of a shard (four nodes, three replicas each) stops waiting for a
/// batch it forwarded to the shard's leader once that leader is paused and another elected:
/// the read goes to the new leader, rather than waiting out its bound ("try again").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_shard_reads_from_the_new_leader_while_the_old_is_paused() {
    let _alone = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(BOUND, async {
        let directory = tempfile::tempdir().unwrap();
        let (binds, peers) = common::cluster_peers(4);
        let nodes: Vec<common::Binary> = (0..4)
            .map(|index| {
                common::Binary::cluster_node(index + 1, &peers, binds[index], directory.path(), &[])
            })
            .collect();
        // Each node's INFO, once it knows every shard led.
        let mut infos = Vec::new();
        for node in &nodes {
            let mut client = kv::client::Client::connect(node.address).await.unwrap();
            common::cluster_ok(&mut client).await;
            infos.push(client.info().await.unwrap());
        }
        // A node lacking a shard.
        let holds = |info: &str, shard: u16| info.contains(&format!("shard_{shard}:"));
        let (asker, shard) = (0..nodes.len())
            .find_map(|asker| {
                let lacking = (0..3).find(|&shard| !holds(&infos[asker], shard))?;
                Some((asker, lacking))
            })
            .expect("three shards of three replicas on four nodes leave one out somewhere");
        let bucket = common::bucket_in(shard, 3);
        // The asker learns who leads as it forwards these.
        let mut client = kv::client::Client::connect(nodes[asker].address)
            .await
            .unwrap();
        client.create(&bucket).await.unwrap();
        client.put(&bucket, b"k", b"v").await.unwrap();
        // The node leading the shard now, as its INFO says.
        let mut leader = None;
        for (index, node) in nodes.iter().enumerate() {
            let mut client = kv::client::Client::connect(node.address).await.unwrap();
            let info = client.info().await.unwrap();
            if info.lines().any(|line| {
                line.starts_with(&format!("shard_{shard}:")) && line.contains("role=leader")
            }) {
                leader = Some(index);
            }
        }
        let leader = leader.expect("the shard is led");

        nodes[leader].signal("STOP");
        let answer = tokio::time::timeout(ANSWER_WITHIN, client.get(&bucket, b"k"))
            .await
            .expect("answered within the bound");
        nodes[leader].signal("CONT");
        assert_eq!(answer.unwrap().as_deref(), Some(&b"v"[..]));
        for node in nodes {
            node.signal("TERM");
            assert!(node.wait().await.success());
        }
    })
    .await
    .expect("the test ends within its bound");
}
