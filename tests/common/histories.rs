//! A cluster of `kv serve` processes and clients that write and read registers through its
//! live nodes, recording every operation for the linearizability check: what the fault tests
//! and the membership tests share.

#![allow(dead_code)] // each test file uses its own part of this

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv::client::Client;
use kv::protocol::ReplyValue;
use tokio_util::sync::CancellationToken;

use crate::common;
use crate::linearizability::{Action, History, Operation};

/// The registers the clients share: two keys in each of three buckets (spread over shards).
pub const BUCKETS: [&str; 3] = ["apples", "pears", "plums"];
pub const KEYS: [&str; 2] = ["x", "y"];

/// How long a client waits for an answer. Longer than a pause: a request sent to the paused
/// leader is answered after it wakes, and that answer must not be stale.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(8);

pub struct Cluster {
    pub directory: tempfile::TempDir,
    pub binds: Vec<SocketAddr>,
    pub peers: String,
    pub nodes: Vec<Option<common::Binary>>,
    /// Where each live node's clients connect, for the clients to pick from.
    pub addresses: Arc<Mutex<Vec<Option<SocketAddr>>>>,
    /// For each node that joined the running cluster, the member it joined through.
    joined_via: Vec<Option<SocketAddr>>,
}

impl Cluster {
    pub fn start() -> Self {
        let (binds, peers) = common::cluster_peers(3);
        let mut cluster = Self {
            directory: tempfile::tempdir().unwrap(),
            binds,
            peers,
            nodes: (0..3).map(|_| None).collect(),
            addresses: Arc::new(Mutex::new(vec![None; 3])),
            joined_via: vec![None; 3],
        };
        for index in 0..3 {
            cluster.start_node(index);
        }
        cluster
    }

    /// Starts node `index` (again): an initial member with `--peers`, a node that joined with
    /// `--join`.
    pub fn start_node(&mut self, index: usize) {
        let node = match self.joined_via[index] {
            None => common::Binary::cluster_node(
                index + 1,
                &self.peers,
                self.binds[index],
                self.directory.path(),
                &[],
            ),
            Some(via) => common::Binary::joining_node(
                index + 1,
                via,
                self.binds[index],
                self.directory.path(),
            ),
        };
        self.addresses.lock().unwrap()[index] = Some(node.address);
        self.nodes[index] = Some(node);
    }

    /// Starts a new node that joins the running cluster through node `via`; its index.
    pub fn join_node(&mut self, via: usize) -> usize {
        let index = self.reserve_node(via);
        self.start_node(index);
        index
    }

    /// A cluster address for a new node that will join through node `via` (with
    /// [`start_node`](Self::start_node)); its index.
    pub fn reserve_node(&mut self, via: usize) -> usize {
        let index = self.nodes.len();
        self.binds.push(
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap(),
        );
        self.joined_via.push(Some(self.binds[via]));
        self.nodes.push(None);
        self.addresses.lock().unwrap().push(None);
        index
    }

    /// Sends `signal` to node `index`; `KILL` also waits for it to be gone.
    pub async fn signal(&mut self, index: usize, signal: &str) {
        if signal == "KILL" {
            self.addresses.lock().unwrap()[index] = None;
            let node = self.nodes[index].take().unwrap();
            node.signal("KILL");
            node.wait().await;
        } else {
            self.nodes[index].as_ref().unwrap().signal(signal);
        }
    }

    /// Kills every node at once (`SIGKILL`) and starts each again on its directory.
    pub async fn crash_all(&mut self) {
        for index in 0..self.nodes.len() {
            self.signal(index, "KILL").await;
        }
        for index in 0..self.nodes.len() {
            self.start_node(index);
        }
    }

    /// Stops every running node with `SIGTERM` and checks that each shut down cleanly.
    pub async fn stop_all(self) {
        for node in self.nodes.into_iter().flatten() {
            node.signal("TERM");
            assert!(node.wait().await.success());
        }
    }

    /// A client of node `index`.
    pub async fn client(&self, index: usize) -> Client {
        let address = self.addresses.lock().unwrap()[index].unwrap();
        Client::connect(address).await.unwrap()
    }

    /// The index of the node leading the shard of `bucket`, as node `asked` knows it, once it
    /// knows one other than `not`.
    pub async fn leader_of(&self, bucket: &str, asked: usize, not: Option<usize>) -> usize {
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

impl Cluster {
    /// Creates the registers' buckets through node 0, once the cluster has leaders.
    pub async fn create_buckets(&self) {
        let mut setup = self.client(0).await;
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
    }
}

/// Clients writing and reading the registers through the cluster's live nodes until
/// [`check`](Self::check)ed.
pub struct Clients {
    stop: CancellationToken,
    pub record: Arc<Mutex<Record>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    /// Starts `count` clients of `cluster`'s live nodes.
    pub fn start(cluster: &Cluster, count: u64) -> Self {
        let stop = CancellationToken::new();
        let record = Arc::new(Mutex::new(Record::default()));
        let tasks = (0..count)
            .map(|id| {
                tokio::spawn(client(
                    id,
                    Arc::clone(&cluster.addresses),
                    stop.clone(),
                    Arc::clone(&record),
                ))
            })
            .collect();
        Self {
            stop,
            record,
            tasks,
        }
    }

    /// Waits until they have had `more` operations acknowledged.
    pub async fn progress(&self, more: usize) {
        progress(&self.record, more).await;
    }

    /// Stops them, checks that no answer was one no request should get and that every key's
    /// history is linearizable, and returns how many operations were checked.
    pub async fn check(self) -> usize {
        self.stop.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
        let record = std::mem::take(&mut *self.record.lock().unwrap());
        assert!(record.unexpected.is_empty(), "{:?}", record.unexpected);
        record.history.check().unwrap()
    }
}

/// What the clients recorded, and anything they were answered that no request should get.
#[derive(Default)]
pub struct Record {
    pub history: History,
    pub unexpected: Vec<String>,
}

/// One client: writes unique values and reads them back, on random keys, through a random
/// live node, reconnecting elsewhere when its node stops answering; records every operation.
pub async fn client(
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
pub fn request<'a>(bucket: &'a str, key: &'a str, value: Option<&'a [u8]>) -> Vec<&'a [u8]> {
    match value {
        Some(value) => vec![b"PUT", bucket.as_bytes(), key.as_bytes(), value],
        None => vec![b"GET", bucket.as_bytes(), key.as_bytes()],
    }
}

/// Records a read (`write` is `None`) or a write sent at `invoked` and what it was answered
/// (`None`: nothing, in time). A write answered with an error or not at all may or may not
/// have been made; a read without an answer says nothing.
pub fn note(
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
pub fn acknowledged(record: &Mutex<Record>) -> usize {
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
pub async fn progress(record: &Mutex<Record>, more: usize) {
    let target = acknowledged(record) + more;
    common::within(async {
        while acknowledged(record) < target {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
