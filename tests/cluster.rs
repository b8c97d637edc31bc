//! Three nodes on loopback ports: a shard's Raft group elects a leader, replicates changes to
//! every replica, and comes back whole after every node restarts.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{PATIENCE, within};
use kv::change::Change;
use kv::cluster::node::{Node, NodeConfig};
use kv::cluster::raft::{Outcome, ShardCommand};
use kv::config::{CoreConfig, FsyncPolicy};
use openraft::Instant as _;
use tokio::net::TcpListener;

/// Binds a cluster port for each of `count` nodes.
async fn listeners(count: u64) -> (Vec<TcpListener>, BTreeMap<u64, std::net::SocketAddr>) {
    let mut listeners = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=count {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        members.insert(id, listener.local_addr().unwrap());
        listeners.push(listener);
    }
    (listeners, members)
}

async fn start(
    directory: &Path,
    listeners: Vec<TcpListener>,
    members: &BTreeMap<u64, std::net::SocketAddr>,
) -> Vec<std::sync::Arc<Node>> {
    let mut nodes = Vec::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        let id = index as u64 + 1;
        let config = NodeConfig {
            id,
            members: members.clone(),
            shards: 1,
            replicas: 3,
            data_dir: directory.join(id.to_string()),
            fsync: FsyncPolicy::No,
            heartbeat: Duration::from_millis(50),
            election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
            core: CoreConfig::default(),
        };
        nodes.push(Node::start(config, listener).await.unwrap());
    }
    nodes
}

/// Waits until a node leads shard 0 with a quorum's acknowledgement fresh enough for it to
/// take writes; returns its index in `nodes`.
async fn leader(nodes: &[std::sync::Arc<Node>]) -> usize {
    let metrics = nodes[0]
        .group(0)
        .unwrap()
        .wait(Some(PATIENCE))
        .metrics(|metrics| metrics.current_leader.is_some(), "a leader")
        .await
        .unwrap();
    let leader = usize::try_from(metrics.current_leader.unwrap()).unwrap() - 1;
    nodes[leader]
        .group(0)
        .unwrap()
        .wait(Some(PATIENCE))
        .metrics(
            |metrics| {
                metrics
                    .last_quorum_acked
                    .as_ref()
                    .is_some_and(|acked| acked.elapsed() < Duration::from_millis(200))
            },
            "a leader acknowledged by a quorum",
        )
        .await
        .unwrap();
    leader
}

/// Proposes `change` to the leader of shard 0 until one takes it (a leader whose lease lapsed,
/// or that lost its leadership meanwhile, refuses); returns what applying it did and its index.
async fn write(nodes: &[std::sync::Arc<Node>], change: &Change<'_>) -> (Outcome, u64) {
    within(async {
        loop {
            let leader = leader(nodes).await;
            match nodes[leader]
                .group(0)
                .unwrap()
                .client_write(ShardCommand::new(change))
                .await
            {
                Ok(response) => return (response.data, response.log_id.index),
                Err(error) if error.forward_to_leader().is_some() => continue,
                Err(error) => panic!("{error}"),
            }
        }
    })
    .await
}

/// Waits until every node has applied `index`, then reads `key` of `bucket` on each.
async fn read_everywhere(
    nodes: &[std::sync::Arc<Node>],
    index: u64,
    bucket: &[u8],
    key: &[u8],
) -> Vec<Option<Vec<u8>>> {
    let mut values = Vec::new();
    for node in nodes {
        node.group(0)
            .unwrap()
            .wait(Some(PATIENCE))
            .applied_index_at_least(Some(index), "applied")
            .await
            .unwrap();
        let registry = node.state(0).unwrap().registry().await;
        values.push(
            registry
                .lookup(bucket)
                .and_then(|found| found.get(key).unwrap())
                .map(|value| value.to_vec()),
        );
    }
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_changes_and_come_back_whole_after_a_restart() {
    let directory = tempfile::tempdir().unwrap();
    let (bound, members) = listeners(3).await;
    let nodes = start(directory.path(), bound, &members).await;

    assert_eq!(
        write(&nodes, &Change::Create { bucket: b"s" }).await.0,
        Outcome::Done
    );
    let put = Change::Put {
        bucket: b"s",
        key: b"milk",
        value: b"1",
    };
    let (outcome, index) = write(&nodes, &put).await;
    assert_eq!(outcome, Outcome::Done);
    let nowhere = Change::Put {
        bucket: b"nowhere",
        key: b"k",
        value: b"v",
    };
    assert_eq!(write(&nodes, &nowhere).await.0, Outcome::NoSuchBucket);
    assert_eq!(
        read_everywhere(&nodes, index, b"s", b"milk").await,
        vec![Some(b"1".to_vec()); 3]
    );

    // Every node stops; they restart on the same ports and directories.
    for node in nodes {
        node.stop().await;
    }
    let mut bound = Vec::new();
    for address in members.values() {
        bound.push(TcpListener::bind(address).await.unwrap());
    }
    let nodes = start(directory.path(), bound, &members).await;
    let put = Change::Put {
        bucket: b"s",
        key: b"eggs",
        value: b"3",
    };
    let (_, index) = write(&nodes, &put).await;
    assert_eq!(
        read_everywhere(&nodes, index, b"s", b"milk").await,
        vec![Some(b"1".to_vec()); 3],
        "what was committed before the restart"
    );
    assert_eq!(
        read_everywhere(&nodes, index, b"s", b"eggs").await,
        vec![Some(b"3".to_vec()); 3]
    );
    for node in nodes {
        node.stop().await;
    }
}

/// Three `kv serve`s in this process forming a cluster on loopback ports.
async fn three_servers(directory: &Path) -> Vec<common::TestServer> {
    use kv::config::{ClusterConfig, DurabilityConfig, ServerConfig};
    let (bound, members) = listeners(3).await;
    // The ports are free again for the servers to bind.
    drop(bound);
    let mut servers = Vec::new();
    for (&id, &address) in &members {
        let cluster = ClusterConfig {
            heartbeat: Duration::from_millis(50),
            election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
            ..ClusterConfig::new(id, address, members.clone())
        };
        let durability = DurabilityConfig {
            fsync: FsyncPolicy::No,
            ..DurabilityConfig::new(directory.join(id.to_string()))
        };
        servers.push(
            common::TestServer::start(ServerConfig {
                durability: Some(durability),
                cluster: Some(cluster),
                ..ServerConfig::default()
            })
            .await,
        );
    }
    servers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_answers_every_request_as_one_node_would() {
    let directory = tempfile::tempdir().unwrap();
    let servers = three_servers(directory.path()).await;
    let mut first = servers[0].connect().await;
    let mut second = servers[1].connect().await;
    let mut third = servers[2].connect().await;

    first
        .send(b"CREATE shopping\nPUT shopping milk 1\nPUT shopping eggs 3\n")
        .await;
    first.expect(b"OK\r\nOK\r\nOK\r\n").await;
    // Every node reads what was written through another, whichever leads the shard.
    second
        .send(b"GET shopping milk\nGET shopping bread\n")
        .await;
    second.expect(b"1\r\nOK\r\n\r\nOK\r\n").await;
    third
        .send(b"DELETE shopping eggs\nGET shopping eggs\nGET nowhere milk\n")
        .await;
    third.expect(b"OK\r\n\r\nOK\r\nNOT FOUND\r\n").await;
    // Buckets hash to different shards, each led somewhere.
    for bucket in ["a", "b", "c", "d", "e", "f"] {
        first
            .send(format!("CREATE {bucket}\nPUT {bucket} k {bucket}\n").as_bytes())
            .await;
        first.expect(b"OK\r\nOK\r\n").await;
        third.send(format!("GET {bucket} k\n").as_bytes()).await;
        third.expect(format!("{bucket}\r\nOK\r\n").as_bytes()).await;
    }
    second.send(b"DROP shopping\nDROP shopping\n").await;
    second.expect(b"OK\r\nNOT FOUND\r\n").await;
    first.send(b"GET shopping milk\n").await;
    first.expect(b"NOT FOUND\r\n").await;

    // RESP, through the client library, on the third node.
    let mut client = servers[2].client().await;
    client.create(b"binary").await.unwrap();
    client.put(b"binary", b"k\x00", b"\r\nv\xff").await.unwrap();
    let mut other = servers[0].client().await;
    assert_eq!(
        other.get(b"binary", b"k\x00").await.unwrap().as_deref(),
        Some(&b"\r\nv\xff"[..])
    );
    for server in servers {
        server.shutdown.cancel();
        within(server.task).await.unwrap().unwrap();
    }
}
