//! Three `kv serve` processes under faults while clients write and read through every node:
//! kill -9 of a shard's leader with writes in flight and its restart, a leader paused with
//! SIGSTOP while the others elect a new one and then woken, and a crash of the whole cluster
//! and its restart. Every key's history must be linearizable (see
//! `common/linearizability.rs`): no acknowledged write lost, no read of a stale or unwritten
//! value, through any node.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
#[path = "common/linearizability.rs"]
mod linearizability;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv::client::Client;
use kv::protocol::ReplyValue;
use linearizability::{Action, History, Operation};
use tokio_util::sync::CancellationToken;

/// The registers the clients share: two keys in each of three buckets (spread over shards).
const BUCKETS: [&str; 3] = ["apples", "pears", "plums"];
const KEYS: [&str; 2] = ["x", "y"];

/// How long a client waits for an answer. Longer than a pause: a request sent to the paused
/// leader is answered after it wakes, and that answer must not be stale.
const ANSWER_WITHIN: Duration = Duration::from_secs(8);

/// The whole test, faults and checking included, ends within this.
const BOUND: Duration = Duration::from_secs(120);

/// The tests here pick free ports and bind them again a moment later, and each runs three
/// servers: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    directory: tempfile::TempDir,
    binds: Vec<SocketAddr>,
    peers: String,
    nodes: Vec<Option<common::Binary>>,
    /// Where each live node's clients connect, for the clients to pick from.
    addresses: Arc<Mutex<Vec<Option<SocketAddr>>>>,
}

impl Cluster {
    fn start() -> Self {
        let (binds, peers) = common::cluster_peers(3);
        let mut cluster = Self {
            directory: tempfile::tempdir().unwrap(),
            binds,
            peers,
            nodes: (0..3).map(|_| None).collect(),
            addresses: Arc::new(Mutex::new(vec![None; 3])),
        };
        for index in 0..3 {
            cluster.start_node(index);
        }
        cluster
    }

    fn start_node(&mut self, index: usize) {
        let node = common::Binary::cluster_node(
            index + 1,
            &self.peers,
            self.binds[index],
            self.directory.path(),
            &[],
        );
        self.addresses.lock().unwrap()[index] = Some(node.address);
        self.nodes[index] = Some(node);
    }

    /// Sends `signal` to node `index`; `KILL` also waits for it to be gone.
    async fn signal(&mut self, index: usize, signal: &str) {
        if signal == "KILL" {
            self.addresses.lock().unwrap()[index] = None;
            let node = self.nodes[index].take().unwrap();
            node.signal("KILL");
            node.wait().await;
        } else {
            self.nodes[index].as_ref().unwrap().signal(signal);
        }
    }

    /// A client of node `index`.
    async fn client(&self, index: usize) -> Client {
        let address = self.addresses.lock().unwrap()[index].unwrap();
        Client::connect(address).await.unwrap()
    }

    /// The index of the node leading the shard of `bucket`, as node `asked` knows it, once it
    /// knows one other than `not`.
    async fn leader_of(&self, bucket: &str, asked: usize, not: Option<usize>) -> usize {
        common::within(async {
            loop {
                let mut client = self.client(asked).await;
                let slot = match client
                    .call(&[b"CLUSTER", b"KEYSLOT", bucket.as_bytes()])
                    .await
                {
                    Ok(ReplyValue::Integer(slot)) => slot,
                    other => panic!("CLUSTER KEYSLOT: {other:?}"),
                };
                let Ok(ReplyValue::Bulk(Some(nodes))) = client.call(&[b"CLUSTER", b"NODES"]).await
                else {
                    continue;
                };
                let nodes = String::from_utf8(nodes.to_vec()).unwrap();
                for line in nodes.lines() {
                    let words: Vec<&str> = line.split_whitespace().collect();
                    let leads = words.iter().skip(8).any(|range| {
                        let (first, last) = range.split_once('-').unwrap();
                        (first.parse().unwrap()..=last.parse().unwrap()).contains(&slot)
                    });
                    let id = u64::from_str_radix(words[0], 16).unwrap();
                    let index = usize::try_from(id).unwrap() - 1;
                    if leads && Some(index) != not {
                        return index;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }
}

/// What the clients recorded, and anything they were answered that no request should get.
#[derive(Default)]
struct Record {
    history: History,
    unexpected: Vec<String>,
}

/// One client: writes unique values and reads them back, on random keys, through a random
/// live node, reconnecting elsewhere when its node stops answering; records every operation.
async fn client(
    id: u64,
    addresses: Arc<Mutex<Vec<Option<SocketAddr>>>>,
    stop: CancellationToken,
    record: Arc<Mutex<Record>>,
) {
    let mut random = fastrand::Rng::with_seed(id);
    let mut connection: Option<Client> = None;
    for sequence in 0u64.. {
        if stop.is_cancelled() {
            return;
        }
        let Some(client) = connection.as_mut() else {
            let live: Vec<SocketAddr> = addresses
                .lock()
                .unwrap()
                .iter()
                .flatten()
                .copied()
                .collect();
            if !live.is_empty() {
                let address = live[random.usize(..live.len())];
                if let Ok(Ok(client)) =
                    tokio::time::timeout(Duration::from_secs(1), Client::connect(address)).await
                {
                    connection = Some(client);
                    continue;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let bucket = BUCKETS[random.usize(..BUCKETS.len())];
        let key = KEYS[random.usize(..KEYS.len())];
        let write = random
            .bool()
            .then(|| format!("{id}-{sequence}").into_bytes());
        let words = request(bucket, key, write.as_deref());
        let invoked = Instant::now();
        let answer = tokio::time::timeout(ANSWER_WITHIN, client.call(&words)).await;
        let answered = matches!(answer, Ok(Ok(_)));
        note(
            &record,
            bucket,
            key,
            write,
            invoked,
            answer.ok().and_then(Result::ok),
        );
        if !answered {
            // No answer, or the connection broke: the node may be gone or paused. Try another.
            connection = None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The words of a write of `value`, or of a read.
fn request<'a>(bucket: &'a str, key: &'a str, value: Option<&'a [u8]>) -> Vec<&'a [u8]> {
    match value {
        Some(value) => vec![b"PUT", bucket.as_bytes(), key.as_bytes(), value],
        None => vec![b"GET", bucket.as_bytes(), key.as_bytes()],
    }
}

/// Records a read (`write` is `None`) or a write sent at `invoked` and what it was answered
/// (`None`: nothing, in time). A write answered with an error or not at all may or may not
/// have been made; a read without an answer says nothing.
fn note(
    record: &Mutex<Record>,
    bucket: &str,
    key: &str,
    write: Option<Vec<u8>>,
    invoked: Instant,
    answer: Option<ReplyValue>,
) {
    let completed = Instant::now();
    let mut record = record.lock().unwrap();
    let (action, completed) = match (write, answer) {
        (Some(value), Some(ReplyValue::Simple(ok))) if ok == "OK" => (
            Action::Write {
                value,
                acknowledged: true,
            },
            Some(completed),
        ),
        (None, Some(ReplyValue::Bulk(found))) => (
            Action::Read {
                value: found.map(|found| found.to_vec()),
            },
            Some(completed),
        ),
        (Some(value), None) => (
            Action::Write {
                value,
                acknowledged: false,
            },
            None,
        ),
        (Some(value), Some(ReplyValue::Error(error))) if error.starts_with("TRYAGAIN") => (
            Action::Write {
                value,
                acknowledged: false,
            },
            None,
        ),
        (None, None) => return,
        (None, Some(ReplyValue::Error(error))) if error.starts_with("TRYAGAIN") => return,
        (write, Some(other)) => {
            let what = if write.is_some() { "PUT" } else { "GET" };
            record
                .unexpected
                .push(format!("{what} {bucket} {key} answered {other:?}"));
            return;
        }
    };
    record.history.operations.push(Operation {
        key: format!("{bucket}/{key}").into_bytes(),
        invoked,
        completed,
        action,
    });
}

/// Acknowledged operations recorded so far.
fn acknowledged(record: &Mutex<Record>) -> usize {
    record
        .lock()
        .unwrap()
        .history
        .operations
        .iter()
        .filter(|operation| operation.completed.is_some())
        .count()
}

/// Waits until the clients have had `more` operations acknowledged.
async fn progress(record: &Mutex<Record>, more: usize) {
    let target = acknowledged(record) + more;
    common::within(async {
        while acknowledged(record) < target {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_through_leader_kills_pauses_and_a_whole_cluster_crash_are_linearizable() {
    let _alone = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(BOUND, faults_and_check())
        .await
        .expect("the test ends within its bound");
}

async fn faults_and_check() {
    let mut cluster = Cluster::start();
    let mut setup = cluster.client(0).await;
    for bucket in BUCKETS {
        common::within(async {
            while setup.call(&[b"CREATE", bucket.as_bytes()]).await.unwrap()
                != ReplyValue::Simple("OK".into())
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    drop(setup);

    let stop = CancellationToken::new();
    let record = Arc::new(Mutex::new(Record::default()));
    let clients: Vec<_> = (0..4)
        .map(|id| {
            tokio::spawn(client(
                id,
                Arc::clone(&cluster.addresses),
                stop.clone(),
                Arc::clone(&record),
            ))
        })
        .collect();
    progress(&record, 200).await;

    // kill -9 of a shard's leader while writes are in flight, then its restart.
    let victim = cluster.leader_of(BUCKETS[0], 0, None).await;
    cluster.signal(victim, "KILL").await;
    progress(&record, 200).await;
    cluster.start_node(victim);
    progress(&record, 200).await;

    // A leader paused long enough for the others to elect a new one, then woken. Meanwhile
    // keys of its shard are overwritten through the new leader, and then read through the
    // paused one: those reads are answered after it wakes, and must see the new values, not
    // what the old leader had.
    let paused = cluster.leader_of(BUCKETS[1], 0, None).await;
    let mut to_paused = cluster.client(paused).await;
    cluster.signal(paused, "STOP").await;
    let other = (paused + 1) % 3;
    let successor = cluster.leader_of(BUCKETS[1], other, Some(paused)).await;
    let mut to_successor = cluster.client(successor).await;
    for key in KEYS {
        let value = format!("while {paused} was paused").into_bytes();
        let words = request(BUCKETS[1], key, Some(&value));
        let invoked = Instant::now();
        let answer = common::within(to_successor.call(&words)).await.unwrap();
        assert_eq!(answer, ReplyValue::Simple("OK".into()));
        note(&record, BUCKETS[1], key, Some(value), invoked, Some(answer));
    }
    let invoked = Instant::now();
    for key in KEYS {
        to_paused.queue(&request(BUCKETS[1], key, None));
    }
    to_paused.send().await.unwrap();
    cluster.signal(paused, "CONT").await;
    for key in KEYS {
        let answer = common::within(to_paused.read_reply()).await.unwrap();
        note(&record, BUCKETS[1], key, None, invoked, Some(answer));
    }
    progress(&record, 200).await;

    // Every node crashes at once and comes back on its directory.
    for index in 0..3 {
        cluster.signal(index, "KILL").await;
    }
    for index in 0..3 {
        cluster.start_node(index);
    }
    progress(&record, 200).await;

    stop.cancel();
    for client in clients {
        client.await.unwrap();
    }
    let record = std::mem::take(&mut *record.lock().unwrap());
    assert!(record.unexpected.is_empty(), "{:?}", record.unexpected);
    let checked = record.history.check().unwrap();
    assert!(checked >= 1000, "{checked} operations checked");
    for node in cluster.nodes.into_iter().flatten() {
        node.signal("TERM");
        assert!(node.wait().await.success());
    }
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
