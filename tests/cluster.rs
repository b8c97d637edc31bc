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
use openraft::type_config::async_runtime::WatchReceiver as _;
use tokio::net::TcpListener;

/// The tests here pick free ports and bind them again a moment later: run one at a time, so
/// that one test cannot take a port another has just picked.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
        nodes.push(start_one(directory, listener, index as u64 + 1, members).await);
    }
    nodes
}

/// Node `id` of `members`, listening on `listener`.
async fn start_one(
    directory: &Path,
    listener: TcpListener,
    id: u64,
    members: &BTreeMap<u64, std::net::SocketAddr>,
) -> std::sync::Arc<Node> {
    let config = NodeConfig {
        id,
        members: members.clone(),
        join: Vec::new(),
        address: members[&id],
        shards: 1,
        replicas: 3,
        data_dir: directory.join(id.to_string()),
        fsync: FsyncPolicy::No,
        heartbeat: Duration::from_millis(50),
        election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
        core: CoreConfig::default(),
        // Small, so that the test sees snapshots taken, logs purged, and a snapshot sent in
        // many pieces.
        snapshot_every: 20,
        log_memory: 64 << 20,
        snapshot_piece: 256,
    };
    Node::start(config, listener).await.unwrap()
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
                Ok(response) => {
                    assert_eq!(response.data.len(), 1, "one change, one outcome");
                    return (response.data[0].clone(), response.log_id.index);
                }
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
        let machine = node.state(0).unwrap();
        let registry = machine.registry();
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
    let _alone = ONE_AT_A_TIME.lock().await;
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

    // Enough changes for snapshots, after which every replica purges its log.
    for index in 0..60u32 {
        let key = format!("k{index}");
        let put = Change::Put {
            bucket: b"s",
            key: key.as_bytes(),
            value: key.as_bytes(),
        };
        assert_eq!(write(&nodes, &put).await.0, Outcome::Done);
    }
    for node in &nodes {
        node.group(0)
            .unwrap()
            .wait(Some(PATIENCE))
            .metrics(
                |metrics| metrics.purged.is_some(),
                "a snapshot, then a purge",
            )
            .await
            .unwrap();
    }
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
    // What only a snapshot holds now (the log was purged past it) came back too.
    assert_eq!(
        read_everywhere(&nodes, index, b"s", b"k0").await,
        vec![Some(b"k0".to_vec()); 3]
    );
    assert_eq!(
        read_everywhere(&nodes, index, b"s", b"k59").await,
        vec![Some(b"k59".to_vec()); 3]
    );
    for node in nodes {
        node.stop().await;
    }
}

/// A replica that was away while the others snapshotted and purged their logs past what it
/// has catches up from a snapshot, sent to it in pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_the_purged_log_catches_up_from_a_snapshot_sent_in_pieces() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let directory = tempfile::tempdir().unwrap();
    let (bound, members) = listeners(3).await;
    let mut nodes = start(directory.path(), bound, &members).await;
    write(&nodes, &Change::Create { bucket: b"s" }).await;

    let away = nodes.pop().unwrap();
    away.stop().await;
    drop(away);
    let mut last = 0;
    for index in 0..60u32 {
        let key = format!("k{index}");
        let put = Change::Put {
            bucket: b"s",
            key: key.as_bytes(),
            value: key.as_bytes(),
        };
        last = write(&nodes, &put).await.1;
    }
    for node in &nodes {
        node.group(0)
            .unwrap()
            .wait(Some(PATIENCE))
            .metrics(
                |metrics| metrics.purged.is_some_and(|purged| purged.index > 20),
                "the log purged past what the away replica has",
            )
            .await
            .unwrap();
    }

    let listener = TcpListener::bind(members[&3]).await.unwrap();
    nodes.push(start_one(directory.path(), listener, 3, &members).await);
    assert_eq!(
        read_everywhere(&nodes, last, b"s", b"k0").await,
        vec![Some(b"k0".to_vec()); 3]
    );
    assert_eq!(
        read_everywhere(&nodes, last, b"s", b"k59").await,
        vec![Some(b"k59".to_vec()); 3]
    );
    let returned = nodes[2]
        .group(0)
        .unwrap()
        .metrics()
        .borrow_watched()
        .clone();
    assert!(returned.snapshot.is_some(), "it installed a snapshot");
    for node in nodes {
        node.stop().await;
    }
}

/// Stops in-process servers, each cleanly.
async fn stop(servers: Vec<common::TestServer>) {
    for server in servers {
        server.shutdown.cancel();
        within(server.task).await.unwrap().unwrap();
    }
}

/// Three `kv serve`s in this process forming a cluster on loopback ports.
async fn three_servers(directory: &Path) -> Vec<common::TestServer> {
    three_servers_with(directory, CoreConfig::default(), |_| {}).await
}

/// Three in-process servers forming a cluster, with the limits of `core` and the cluster
/// settings `tune` leaves.
async fn three_servers_with(
    directory: &Path,
    core: CoreConfig,
    tune: impl Fn(&mut kv::config::ClusterConfig),
) -> Vec<common::TestServer> {
    servers_of_three(directory, core, tune, &[1, 2, 3]).await
}

/// The servers `started` of a cluster of three, in this process.
async fn servers_of_three(
    directory: &Path,
    core: CoreConfig,
    tune: impl Fn(&mut kv::config::ClusterConfig),
    started: &[u64],
) -> Vec<common::TestServer> {
    start_members(directory, &members_of_three().await, started, core, tune).await
}

/// Starts the nodes `ids` of the cluster `members`, in this process.
async fn start_members(
    directory: &Path,
    members: &BTreeMap<u64, std::net::SocketAddr>,
    ids: &[u64],
    core: CoreConfig,
    tune: impl Fn(&mut kv::config::ClusterConfig),
) -> Vec<common::TestServer> {
    let mut servers = Vec::new();
    for &id in ids {
        servers.push(start_member(directory, members, id, core.clone(), &tune).await);
    }
    servers
}

/// Free cluster addresses for nodes 1, 2 and 3.
async fn members_of_three() -> BTreeMap<u64, std::net::SocketAddr> {
    let (bound, members) = listeners(3).await;
    // The ports are free again for the servers to bind.
    drop(bound);
    members
}

/// Starts node `id` of the cluster `members`, in this process, with its data under
/// `directory`.
async fn start_member(
    directory: &Path,
    members: &BTreeMap<u64, std::net::SocketAddr>,
    id: u64,
    core: CoreConfig,
    tune: impl Fn(&mut kv::config::ClusterConfig),
) -> common::TestServer {
    use kv::config::{ClusterConfig, DurabilityConfig, ServerConfig};
    let mut cluster = ClusterConfig {
        heartbeat: Duration::from_millis(50),
        election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
        ..ClusterConfig::new(id, members[&id], members.clone())
    };
    tune(&mut cluster);
    let durability = DurabilityConfig {
        fsync: FsyncPolicy::No,
        ..DurabilityConfig::new(directory.join(id.to_string()))
    };
    common::TestServer::start(ServerConfig {
        durability: Some(durability),
        cluster: Some(cluster),
        // DEBUG CRASH is allowed, for the supervision test.
        enable_debug_commands: true,
        core,
        ..ServerConfig::default()
    })
    .await
}

/// Each shard is formed by its preferred leader (with every node holding every shard, shard
/// `i` by the `i`th node), the only node able to stand in its first election: no shard is led
/// by another node, even in the cluster's first moments. Before, node 1 formed every shard and
/// led them all until it handed them over a second or so later, and writes in flight during a
/// hand-over could be answered TRYAGAIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shard_is_led_by_its_preferred_leader_from_the_start() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let directory = tempfile::tempdir().unwrap();
    let servers = three_servers(directory.path()).await;
    let mut client = servers[0].client().await;
    common::cluster_ok(&mut client).await;
    for shard in 0..3 {
        let (leader, _) = leader_and_term(&mut client, shard).await;
        assert_eq!(leader, u64::from(shard) + 1, "shard {shard}");
    }
    stop(servers).await;
}

/// A cluster forms with a majority of its initial nodes started: the groups the missing node
/// was to form (shard 2, led by node 3 by preference) are formed by their other replicas once
/// they have waited for it. Before, such a group had no leader until that node started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_forms_with_two_of_its_three_nodes() {
    use kv::protocol::ReplyValue;
    let _alone = ONE_AT_A_TIME.lock().await;
    let directory = tempfile::tempdir().unwrap();
    let servers = servers_of_three(directory.path(), CoreConfig::default(), |_| {}, &[1, 2]).await;
    let mut client = servers[0].client().await;
    common::cluster_ok(&mut client).await;
    for shard in 0..3 {
        let bucket = &common::bucket_in(shard, 3)[..];
        let ok = ReplyValue::Simple("OK".into());
        assert_eq!(client.call(&[b"CREATE", bucket]).await.unwrap(), ok);
        assert_eq!(
            client.call(&[b"PUT", bucket, b"k", b"v"]).await.unwrap(),
            ok
        );
        assert_eq!(
            client.call(&[b"GET", bucket, b"k"]).await.unwrap(),
            ReplyValue::Bulk(Some("v".into()))
        );
    }
    stop(servers).await;
}

/// A node started after its groups formed without it leaves them alone: its replica of the
/// group it is the preferred leader of (shard 2 for node 3) hears from the group's leader,
/// catches up and is handed leadership, one term later. Before, it formed the group again and
/// stood for an election the others refused: the group lost its leader for most of a second
/// and ended two terms later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_after_its_group_formed_follows_its_leader() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let directory = tempfile::tempdir().unwrap();
    let members = members_of_three().await;
    let mut servers = start_members(
        directory.path(),
        &members,
        &[1, 2],
        CoreConfig::default(),
        |_| {},
    )
    .await;
    let mut client = servers[0].client().await;
    common::cluster_ok(&mut client).await;
    let (leader, term) = leader_and_term(&mut client, 2).await;
    assert!(
        leader == 1 || leader == 2,
        "shard 2 is led by node {leader}"
    );
    servers.push(start_member(directory.path(), &members, 3, CoreConfig::default(), |_| {}).await);
    let handed_over = within(async {
        loop {
            let (leader, term) = leader_and_term(&mut client, 2).await;
            if leader == 3 {
                return term;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        handed_over,
        term + 1,
        "shard 2's term when node 3 took it over"
    );
    stop(servers).await;
}

/// Nodes stopped before their groups formed form them when started again. Nodes 1 and 2
/// start without node 3 and stop before shard 2, node 3's to form, is formed (they form it
/// themselves only after twice the longest election timeout, here 12 s). Before, their
/// `cluster` file said formed, and restarted they left shard 2 to node 3 for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_stopped_while_forming_form_the_cluster_when_restarted() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let directory = tempfile::tempdir().unwrap();
    let members = members_of_three().await;
    let slow_elections = |cluster: &mut kv::config::ClusterConfig| {
        cluster.election_timeout = (Duration::from_secs(3), Duration::from_secs(6));
    };
    let servers = start_members(
        directory.path(),
        &members,
        &[1, 2],
        CoreConfig::default(),
        slow_elections,
    )
    .await;
    let mut client = servers[0].client().await;
    assert_eq!(
        leader_and_term(&mut client, 2).await,
        (0, 0),
        "shard 2 is not formed yet"
    );
    drop(client);
    stop(servers).await;
    let servers = start_members(
        directory.path(),
        &members,
        &[1, 2],
        CoreConfig::default(),
        |_| {},
    )
    .await;
    let mut client = servers[1].client().await;
    common::cluster_ok(&mut client).await;
    let bucket = &common::bucket_in(2, 3)[..];
    let ok = kv::protocol::ReplyValue::Simple("OK".into());
    assert_eq!(client.call(&[b"CREATE", bucket]).await.unwrap(), ok);
    assert_eq!(
        client.call(&[b"PUT", bucket, b"k", b"v"]).await.unwrap(),
        ok
    );
    stop(servers).await;
}

/// The leader (0 for none) and term of `shard`, as `INFO cluster` on `client`'s node shows.
async fn leader_and_term(client: &mut kv::client::Client, shard: u16) -> (u64, u64) {
    let kv::protocol::ReplyValue::Bulk(Some(info)) =
        client.call(&[b"INFO", b"cluster"]).await.unwrap()
    else {
        panic!("INFO is a bulk string");
    };
    let info = String::from_utf8_lossy(&info);
    let line = info
        .lines()
        .find(|line| line.starts_with(&format!("shard_{shard}:")))
        .unwrap_or_else(|| panic!("shard {shard} in {info}"));
    let field = |name: &str| -> u64 {
        line.split(',')
            .find_map(|field| {
                field
                    .split(':')
                    .next_back()?
                    .strip_prefix(&format!("{name}="))
            })
            .unwrap_or_else(|| panic!("{name} in {line}"))
            .parse()
            .unwrap()
    };
    (field("leader"), field("term"))
}

/// `kv bench` spreads its connections over several nodes, every reply checked; `kv cli` uses
/// the first node that answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_bench_and_kv_cli_take_several_nodes() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let directory = tempfile::tempdir().unwrap();
    let servers = three_servers(directory.path()).await;
    let addresses: Vec<String> = servers
        .iter()
        .map(|server| server.address.to_string())
        .collect();
    // Every reply must be right: no leadership moving meanwhile.
    let mut client = kv::client::Client::connect(servers[0].address)
        .await
        .unwrap();
    common::masters_until(&mut client, 3).await;
    let report = within(kv::bench::run(kv::bench::BenchConfig {
        addresses: addresses.clone(),
        connections: 6,
        pipeline: 8,
        requests: 3000,
        duration: None,
        keys: 60,
        value_size: 16,
        buckets: 6,
        mix: "get=0.6,put=0.3,delete=0.1".parse().unwrap(),
        dialect: kv::protocol::Dialect::Resp,
        preload: true,
        progress: false,
        // `kv cli` reads one of its keys below.
        keep: true,
    }))
    .await
    .unwrap();
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    assert_eq!(report.requests, 3000);

    // The first node listed is not listening: the next one answers.
    let closed = free_address();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(["cli", "--nodes", &format!("{closed},{}", addresses[1])])
        .args(["GET", "bench-0", "key:000000000000"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(!output.stdout.is_empty());

    // `kv cluster status` through the same list: every node up, every shard led.
    let status = cluster_status(&format!("{closed},{}", addresses[1]));
    for (index, address) in addresses.iter().enumerate() {
        let node = status
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{} ", index + 1)))
            .unwrap_or_else(|| panic!("node {} listed in {status}", index + 1));
        assert!(node.contains(address) && node.contains(" up "), "{status}");
    }
    assert_eq!(status.matches(" up ").count(), 3, "{status}");
    assert!(!status.contains("no leader"), "{status}");
    stop(servers).await;
}

/// `kv cluster status --nodes nodes`'s output; it must succeed.
fn cluster_status(nodes: &str) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(["cluster", "status", "--nodes", nodes])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// Limits hold in a cluster as on one node: the leader refuses a change past them, with the
/// same reply, and never proposes it (replicas apply whatever is committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_refuses_changes_past_the_limits_as_one_node_does() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let core = CoreConfig {
        max_buckets: 2,
        max_name_len: 8,
        max_memory: 8 * 1024,
        ..CoreConfig::default()
    };
    let single = common::TestServer::start(kv::config::ServerConfig {
        core: core.clone(),
        ..kv::config::ServerConfig::default()
    })
    .await;
    let directory = tempfile::tempdir().unwrap();
    let servers = three_servers_with(directory.path(), core, |_| {}).await;
    let big = "v".repeat(2000);
    let requests = [
        "CREATE a-name-too-long".to_owned(),
        "CREATE one".to_owned(),
        "CREATE two".to_owned(),
        "CREATE three".to_owned(),
        format!("PUT one k1 {big}"),
        format!("PUT one k2 {big}"),
        format!("PUT one k3 {big}"),
        format!("PUT one k1 {big}"),
        "DELETE one k2".to_owned(),
        format!("PUT one k3 {big}"),
        "GET one k3".to_owned(),
    ];
    let mut on_single = single.connect().await;
    let mut on_cluster = servers[1].connect().await;
    let mut refused = Vec::new();
    for request in &requests {
        let request = format!("{request}\n");
        on_single.send(request.as_bytes()).await;
        let expected = on_single.line().await;
        on_cluster.send(request.as_bytes()).await;
        let answered = on_cluster.line().await;
        assert_eq!(
            String::from_utf8_lossy(&answered),
            String::from_utf8_lossy(&expected),
            "{request}"
        );
        if answered.starts_with(b"ERROR") {
            refused.push(
                request
                    .split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        if request.starts_with("GET") {
            assert_eq!(on_cluster.line().await, on_single.line().await);
        }
    }
    assert_eq!(
        refused,
        ["CREATE a-name-too-long", "CREATE three", "PUT one k3"],
        "the limits were met"
    );
    stop(servers).await;
}

/// The guide's supervision on every replica: `DEBUG CRASH` crashes the bucket in the node's own
/// replica, which restarts it from what every replica has. Crashed on each node in turn with
/// writes between, the bucket still holds every write, whichever replica answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_crashed_on_each_replica_in_turn_keeps_every_write() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let directory = tempfile::tempdir().unwrap();
    let servers = three_servers(directory.path()).await;
    let mut clients = Vec::new();
    for server in &servers {
        clients.push(server.connect().await);
    }
    // A cluster just formed may answer its first write "try again" while its shards' leaders
    // settle (the first elections, then leadership spreading over the nodes); a CREATE may be
    // made again.
    within(async {
        loop {
            clients[0].send(b"CREATE pantry\n").await;
            match clients[0].line().await.as_slice() {
                b"OK\r\n" => break,
                b"ERROR cluster unavailable, try again\r\n" => {}
                other => panic!("CREATE answered {:?}", other.escape_ascii().to_string()),
            }
        }
    })
    .await;
    for round in 0..3 {
        for (index, client) in clients.iter_mut().enumerate() {
            client
                .send(format!("PUT pantry k{round}{index} v{round}{index}\n").as_bytes())
                .await;
            client.expect(b"OK\r\n").await;
        }
        clients[round].send(b"DEBUG CRASH pantry\n").await;
        clients[round].expect(b"OK\r\n").await;
        for client in &mut clients {
            for written in 0..=round {
                for by in 0..3 {
                    client
                        .send(format!("GET pantry k{written}{by}\n").as_bytes())
                        .await;
                    client
                        .expect(format!("v{written}{by}\r\nOK\r\n").as_bytes())
                        .await;
                }
            }
        }
    }
    stop(servers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_answers_every_request_as_one_node_would() {
    let _alone = ONE_AT_A_TIME.lock().await;
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
    // Every shard's buckets, in byte order, through any node; and from a given name on.
    second.send(b"BUCKETS\nBUCKETS c\n").await;
    second
        .expect(
            b"a\r\nb\r\nc\r\nd\r\ne\r\nf\r\nshopping\r\nOK\r\nd\r\ne\r\nf\r\nshopping\r\nOK\r\n",
        )
        .await;
    second.send(b"DROP shopping\nDROP shopping\n").await;
    second.expect(b"OK\r\nNOT FOUND\r\n").await;
    first.send(b"GET shopping milk\n").await;
    first.expect(b"NOT FOUND\r\n").await;

    // One pipelined batch of reads and writes on several buckets of one shard (a hash tag
    // puts them in one slot), a missing bucket and a page of keys among them: the same bytes
    // as a single node gives, whichever node leads the shard.
    let session = b"CREATE {t}a\nCREATE {t}b\nPUT {t}a k 1\nPUT {t}b k 2\nPUT {t}a j 3\n\
        GET {t}a k\nGET {t}a j\nGET {t}b k\nGET {t}c k\nGET {t}a missing\nKEYS {t}b\n\
        GET {t}b k\nDELETE {t}a j\nGET {t}a j\nGET {t}a k\nPING\n";
    let single = common::TestServer::default().await;
    let mut alone = single.connect().await;
    alone.send(session).await;
    let expected = alone.lines_until(b"PONG\r\n").await;
    assert!(
        expected.starts_with(b"OK\r\nOK\r\nOK\r\nOK\r\nOK\r\n1\r\nOK\r\n3\r\nOK\r\n"),
        "{}",
        expected.escape_ascii()
    );
    second.send(session).await;
    second.expect(&expected).await;

    // RESP, through the client library, on the third node.
    let mut client = servers[2].client().await;
    client.create(b"binary").await.unwrap();
    client.put(b"binary", b"k\x00", b"\r\nv\xff").await.unwrap();
    let mut other = servers[0].client().await;
    assert_eq!(
        other.get(b"binary", b"k\x00").await.unwrap().as_deref(),
        Some(&b"\r\nv\xff"[..])
    );

    // What Redis Cluster clients route with.
    use kv::protocol::ReplyValue;
    let myid = other.call(&[b"CLUSTER", b"MYID"]).await.unwrap();
    assert_eq!(myid, ReplyValue::Bulk(Some(format!("{:040x}", 1).into())));
    let info = common::cluster_ok(&mut other).await;
    assert!(info.contains("cluster_slots_ok:16384"), "{info}");
    assert!(info.contains("cluster_known_nodes:3"), "{info}");
    let ReplyValue::Array(Some(ranges)) = other.call(&[b"CLUSTER", b"SLOTS"]).await.unwrap() else {
        panic!("CLUSTER SLOTS is an array");
    };
    let ports: Vec<i64> = servers
        .iter()
        .map(|server| i64::from(server.address.port()))
        .collect();
    let mut covered = 0;
    for range in &ranges {
        let ReplyValue::Array(Some(range)) = range else {
            panic!("{range:?}")
        };
        let [
            ReplyValue::Integer(first),
            ReplyValue::Integer(last),
            nodes @ ..,
        ] = &range[..]
        else {
            panic!("{range:?}")
        };
        assert_eq!(*first, covered, "ranges follow one another");
        covered = last + 1;
        assert_eq!(nodes.len(), 3, "every shard on every node");
        for node in nodes {
            let ReplyValue::Array(Some(node)) = node else {
                panic!("{node:?}")
            };
            let ReplyValue::Integer(port) = &node[1] else {
                panic!("{node:?}")
            };
            assert!(ports.contains(port), "a client port: {port}");
        }
    }
    assert_eq!(covered, 16384);
    // Leadership spreads: each node comes to lead one of the three shards.
    within(async {
        loop {
            let ReplyValue::Array(Some(ranges)) =
                other.call(&[b"CLUSTER", b"SLOTS"]).await.unwrap()
            else {
                panic!("CLUSTER SLOTS is an array");
            };
            // Each range's first node is its shard's leader: [first, last, [host, port, id], …].
            let leader_port = |range: &ReplyValue| match range {
                ReplyValue::Array(Some(range)) => match range.get(2) {
                    Some(ReplyValue::Array(Some(node))) => match node.get(1) {
                        Some(ReplyValue::Integer(port)) => *port,
                        _ => 0,
                    },
                    _ => 0,
                },
                _ => 0,
            };
            let mut leaders: Vec<i64> = ranges.iter().map(leader_port).collect();
            leaders.sort();
            leaders.dedup();
            if leaders.len() == 3 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // INFO says which shards this node leads and follows, and how far each has got.
    let info = other.info().await.unwrap();
    assert!(info.contains("cluster_node:1"), "{info}");
    assert!(info.contains("cluster_shards_led:1"), "{info}");
    assert!(info.contains("cluster_shards_followed:2"), "{info}");
    assert_eq!(info.matches("shard_").count(), 3, "{info}");
    // What this node's replicas hold, across its shards.
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("{name} in {info}"))
            .parse()
            .unwrap()
    };
    assert!(field("buckets") >= 6 && field("keys") >= 6, "{info}");
    assert!(field("memory_used_bytes") > 0, "{info}");
    // On the shard it leads: each follower's progress and last contact.
    let led = info
        .lines()
        .find(|line| line.contains("role=leader"))
        .unwrap_or_else(|| panic!("{info}"));
    assert!(
        led.contains("matched_2=") && led.contains("last_contact_ms_3="),
        "{led}"
    );
    let ReplyValue::Bulk(Some(nodes)) = other.call(&[b"CLUSTER", b"NODES"]).await.unwrap() else {
        panic!("CLUSTER NODES is text");
    };
    let nodes = String::from_utf8(nodes.to_vec()).unwrap();
    assert_eq!(nodes.lines().count(), 3, "{nodes}");
    assert_eq!(nodes.matches("myself").count(), 1, "{nodes}");

    stop(servers).await;
}

/// A node that does not hold every shard (here `--replicas 1`: each shard on one node) tells
/// Redis Cluster clients every shard's leader all the same, as the shard's replicas say: its
/// `CLUSTER INFO` is `ok` and its `CLUSTER SLOTS` names each shard's leader first. And it
/// answers requests on every shard, forwarding them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_every_shard_shows_every_shards_leader() {
    use kv::cluster::slot::shard_of;
    use kv::protocol::ReplyValue;
    let _alone = ONE_AT_A_TIME.lock().await;
    let directory = tempfile::tempdir().unwrap();
    let servers = three_servers_with(directory.path(), CoreConfig::default(), |cluster| {
        cluster.replicas = 1;
    })
    .await;
    // Which node's client port holds (and so leads) each shard, from their INFO.
    let mut holder = BTreeMap::new();
    for server in &servers {
        let info = server.client().await.info().await.unwrap();
        for line in info.lines().filter(|line| line.starts_with("shard_")) {
            let shard: u16 = line["shard_".len()..line.find(':').unwrap()]
                .parse()
                .unwrap();
            holder.insert(shard, i64::from(server.address.port()));
        }
    }
    assert_eq!(holder.len(), 3, "each shard held once: {holder:?}");
    for server in &servers {
        let mut client = server.client().await;
        common::cluster_ok(&mut client).await;
        let ReplyValue::Array(Some(ranges)) = client.call(&[b"CLUSTER", b"SLOTS"]).await.unwrap()
        else {
            panic!("CLUSTER SLOTS is an array");
        };
        assert_eq!(ranges.len(), 3, "{ranges:?}");
        for range in &ranges {
            let ReplyValue::Array(Some(range)) = range else {
                panic!("{range:?}")
            };
            let [
                ReplyValue::Integer(first),
                _,
                ReplyValue::Array(Some(leader)),
                ..,
            ] = &range[..]
            else {
                panic!("{range:?}")
            };
            let shard = shard_of(u16::try_from(*first).unwrap(), 3);
            assert_eq!(
                leader.get(1),
                Some(&ReplyValue::Integer(holder[&shard])),
                "shard {shard}'s leader, as node {} says: {range:?}",
                server.address
            );
        }
    }
    // Every node answers on every shard.
    let buckets: Vec<Vec<u8>> = (0..3).map(|shard| common::bucket_in(shard, 3)).collect();
    let mut first = servers[0].client().await;
    for bucket in &buckets {
        first.create(bucket).await.unwrap();
        first.put(bucket, b"k", bucket).await.unwrap();
    }
    for server in &servers {
        let mut client = server.client().await;
        for bucket in &buckets {
            assert_eq!(
                client.get(bucket, b"k").await.unwrap().as_deref(),
                Some(&bucket[..])
            );
        }
    }
    stop(servers).await;
}

/// A node that holds no replica of a shard (here `--replicas 2`) forwards its requests to the
/// shard's leader once it has learned which node that is: one hop per request, not a try at a
/// follower first each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_shard_forwards_straight_to_its_leader() {
    const READS: u64 = 50;
    let _alone = ONE_AT_A_TIME.lock().await;
    let directory = tempfile::tempdir().unwrap();
    let servers = three_servers_with(directory.path(), CoreConfig::default(), |cluster| {
        cluster.replicas = 2;
    })
    .await;
    let field = |info: &str, name: &str| -> String {
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("{name} in {info}"))
            .to_owned()
    };
    // Leadership spreads: each node leads one shard and holds one more.
    let infos = within(async {
        loop {
            let mut infos = Vec::new();
            for server in &servers {
                infos.push(server.client().await.info().await.unwrap());
            }
            if infos
                .iter()
                .all(|info| field(info, "cluster_shards_led") == "1")
            {
                return infos;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // The node lacking a shard whose leader is not the first of its replicas (where a node
    // that knows no leader tries first): the placement of three shards on two of three nodes
    // and the spread of their leaders give one.
    let shard_lines = |info: &str| -> Vec<(u16, u64, Vec<u64>)> {
        info.lines()
            .filter(|line| line.starts_with("shard_"))
            .map(|line| {
                let shard = line["shard_".len()..line.find(':').unwrap()]
                    .parse()
                    .unwrap();
                let value = |name: &str| {
                    line.split(',')
                        .find_map(|field| {
                            field.split_once('=').filter(|(key, _)| key.ends_with(name))
                        })
                        .unwrap()
                        .1
                };
                let placed = value("placed")
                    .split('+')
                    .map(|id| id.parse().unwrap())
                    .collect();
                (shard, value("leader").parse().unwrap(), placed)
            })
            .collect()
    };
    let held: Vec<Vec<(u16, u64, Vec<u64>)>> = infos.iter().map(|info| shard_lines(info)).collect();
    let (asker, shard) = (0..servers.len())
        .find_map(|asker| {
            let lacking =
                (0..3u16).find(|shard| held[asker].iter().all(|(held, ..)| held != shard))?;
            let (_, leader, placed) = held.iter().flatten().find(|(held, ..)| *held == lacking)?;
            (placed.first() != Some(leader)).then_some((asker, lacking))
        })
        .expect("a node lacking a shard led by its second replica");
    let bucket = common::bucket_in(shard, 3);
    let mut client = servers[asker].client().await;
    client.create(&bucket).await.unwrap();
    let forwarded =
        |info: &str| -> u64 { field(info, "cluster_forwarded_requests").parse().unwrap() };
    let before = forwarded(&client.info().await.unwrap());
    for _ in 0..READS {
        assert_eq!(client.get(&bucket, b"k").await.unwrap(), None);
    }
    let sent = forwarded(&client.info().await.unwrap()) - before;
    assert!(
        (READS..=READS + 1).contains(&sent),
        "{READS} reads through a node without their shard forwarded {sent} times"
    );
    stop(servers).await;
}

/// Entries batch changes and may be megabytes each, and a node may hold many shards: what a
/// node's shard logs hold in memory is bounded by their bytes, together. Large values written to
/// a bucket of each shard, each shard's log well within `log_memory` but all three past it and
/// far fewer entries than a snapshot waits for, leave every node's logs within `log_memory`
/// once compacted, and the values whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_logs_are_compacted_by_the_bytes_they_hold_together() {
    const LOG_MEMORY: u64 = 1 << 20;
    const ROUNDS: u8 = 12;
    let _alone = ONE_AT_A_TIME.lock().await;
    let directory = tempfile::tempdir().unwrap();
    let servers = three_servers_with(directory.path(), CoreConfig::default(), |cluster| {
        cluster.log_memory = LOG_MEMORY;
    })
    .await;
    // The default number of shards; checked against INFO below.
    let shards: u16 = 3;
    let buckets: Vec<Vec<u8>> = (0..shards)
        .map(|shard| common::bucket_in(shard, shards))
        .collect();
    let mut writer = servers[0].client().await;
    for bucket in &buckets {
        writer.create(bucket).await.unwrap();
    }
    let value = |round: u8| {
        let mut value = vec![b'v'; 64 << 10];
        value[0] = round;
        value
    };
    for round in 0..ROUNDS {
        for bucket in &buckets {
            writer.put(bucket, b"k", &value(round)).await.unwrap();
        }
    }
    // What each shard's log holds here, from INFO's `shard_N:…,log_bytes=B,…` lines, and
    // the node's logs together, from `cluster_log_memory:B`.
    let held = |info: &str| -> (Vec<u64>, u64) {
        let shards = info
            .lines()
            .filter(|line| line.starts_with("shard_"))
            .map(|line| {
                line.split(',')
                    .find_map(|field| field.strip_prefix("log_bytes="))
                    .unwrap_or_else(|| panic!("log_bytes in {line}"))
                    .parse()
                    .unwrap()
            })
            .collect();
        let node = info
            .lines()
            .find_map(|line| line.strip_prefix("cluster_log_memory:"))
            .unwrap_or_else(|| panic!("cluster_log_memory in {info}"))
            .parse()
            .unwrap();
        (shards, node)
    };
    let written = u64::from(ROUNDS) * (64 << 10);
    assert!(
        written < LOG_MEMORY && written * u64::from(shards) > 2 * LOG_MEMORY,
        "each shard's writes within the budget, all of them well past it"
    );
    let info = writer.info().await.unwrap();
    assert_eq!(held(&info).0.len(), 3, "every shard");
    assert!(info.contains(&format!("cluster_log_memory_budget:{LOG_MEMORY}\r\n")));
    for server in &servers {
        let mut client = server.client().await;
        within(async {
            loop {
                let (shards, node) = held(&client.info().await.unwrap());
                if node <= LOG_MEMORY {
                    assert!(
                        shards.iter().sum::<u64>() <= node,
                        "{shards:?} within {node}"
                    );
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        for bucket in &buckets {
            assert_eq!(
                client.get(bucket, b"k").await.unwrap().as_deref(),
                Some(&value(ROUNDS - 1)[..])
            );
        }
    }
    stop(servers).await;
}

/// A free loopback address for a node's cluster port.
fn free_address() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `kv serve` as node `id` of `peers`, its data in `directory`, every write synced.
fn node_process(
    id: u64,
    peers: &str,
    bind: std::net::SocketAddr,
    directory: &Path,
) -> common::Binary {
    let id = usize::try_from(id).unwrap();
    common::Binary::cluster_node(id, peers, bind, directory, &["--fsync", "always"])
}

/// Sends `request` until it is answered with something other than "try again" (a shard
/// without a leader); returns the answer.
async fn until_answered(
    client: &mut kv::client::Client,
    request: &[&[u8]],
) -> kv::protocol::ReplyValue {
    within(async {
        loop {
            match client.call(request).await.unwrap() {
                kv::protocol::ReplyValue::Error(message) if message.starts_with("TRYAGAIN") => {}
                reply => return reply,
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_writes_loses_no_acknowledged_write_and_rejoins() {
    let _alone = ONE_AT_A_TIME.lock().await;
    use kv::protocol::ReplyValue;
    let directory = tempfile::tempdir().unwrap();
    let (binds, peers) = common::cluster_peers(3);
    let mut nodes: Vec<Option<common::Binary>> = (0..3)
        .map(|index| {
            Some(node_process(
                index as u64 + 1,
                &peers,
                binds[index],
                directory.path(),
            ))
        })
        .collect();
    let ok = ReplyValue::Simple("OK".into());
    let mut second = kv::client::Client::connect(nodes[1].as_ref().unwrap().address)
        .await
        .unwrap();
    for bucket in ["a", "b", "c", "d"] {
        assert_eq!(
            until_answered(&mut second, &[b"CREATE", bucket.as_bytes()]).await,
            ok
        );
    }
    let key = |index: usize| format!("k{index}").into_bytes();
    let bucket = |index: usize| ["a", "b", "c", "d"][index % 4].as_bytes().to_vec();
    for index in 0..40 {
        let reply = until_answered(
            &mut second,
            &[b"PUT", &bucket(index), &key(index), &key(index)],
        )
        .await;
        assert_eq!(reply, ok, "write {index}");
    }

    // Node 1 dies without a word; it led some of the shards.
    let first = nodes[0].take().unwrap();
    first.signal("KILL");
    first.wait().await;
    let mut third = kv::client::Client::connect(nodes[2].as_ref().unwrap().address)
        .await
        .unwrap();
    for index in 40..80 {
        let reply = until_answered(
            &mut third,
            &[b"PUT", &bucket(index), &key(index), &key(index)],
        )
        .await;
        assert_eq!(reply, ok, "write {index} after the kill");
    }
    // `kv cluster status` shows node 1 down and, once each of its shards has elected a new
    // leader (those no write above went to may still be electing), every shard led.
    let survivor = nodes[1].as_ref().unwrap().address.to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = cluster_status(&survivor);
        if !status.contains("no leader") || std::time::Instant::now() > deadline {
            break status;
        }
    };
    let first_line = status
        .lines()
        .find(|line| line.trim_start().starts_with("1 "))
        .unwrap();
    assert!(first_line.ends_with("down"), "{status}");
    assert_eq!(status.matches(" up ").count(), 2, "{status}");
    assert!(!status.contains("no leader"), "{status}");
    // `CLUSTER NODES` on a survivor flags node 1 as failing in this node's view (`fail?`,
    // link down) and no other.
    let dead = format!("{:040x} ", 1);
    let nodes_seen = common::cluster_text_until(&mut second, b"NODES", |text| {
        text.lines()
            .any(|line| line.starts_with(&dead) && line.contains(" master,fail? "))
    })
    .await;
    assert_eq!(nodes_seen.matches("fail?").count(), 1, "{nodes_seen}");
    assert!(nodes_seen.contains(" disconnected"), "{nodes_seen}");
    for index in 0..80 {
        let reply = until_answered(&mut second, &[b"GET", &bucket(index), &key(index)]).await;
        assert_eq!(
            reply,
            ReplyValue::Bulk(Some(key(index).into())),
            "read {index}"
        );
    }

    // The survivors' metrics saw the failover: a shard whose leader changed after it was
    // first elected, and every shard led again.
    let http = nodes[2].as_ref().unwrap().http_address();
    let (_, metrics) = common::http_get(http, "/metrics").await;
    let most_changes = metrics
        .lines()
        .filter_map(|line| line.strip_prefix("kv_shard_leader_changes_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .max();
    assert!(most_changes >= Some(2), "{metrics}");
    // What the node's logs hold in memory, under the default --log-memory (64 MiB).
    assert!(
        metrics.contains("\nkv_cluster_log_memory_budget_bytes 67108864\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nkv_cluster_log_memory_bytes "),
        "{metrics}"
    );
    assert_eq!(common::http_get(http, "/ready").await.0, 200);

    // It comes back on its directory and catches up; the survivors see it answer again.
    nodes[0] = Some(node_process(1, &peers, binds[0], directory.path()));
    let nodes_seen =
        common::cluster_text_until(&mut second, b"NODES", |text| !text.contains("fail?")).await;
    assert!(!nodes_seen.contains("disconnected"), "{nodes_seen}");
    let mut first = kv::client::Client::connect(nodes[0].as_ref().unwrap().address)
        .await
        .unwrap();
    for index in 0..80 {
        let reply = until_answered(&mut first, &[b"GET", &bucket(index), &key(index)]).await;
        assert_eq!(
            reply,
            ReplyValue::Bulk(Some(key(index).into())),
            "read {index} on the returned node"
        );
    }
    for node in nodes.into_iter().flatten() {
        node.signal("TERM");
        assert!(node.wait().await.success());
    }
}

/// A node whose data directory was wiped does not rejoin under its old id (it could vote a
/// stale leader in and lose acknowledged writes): it stops at start with the reason. With its
/// own directory back it rejoins and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_data_directory_was_wiped_is_refused_and_rejoins_with_it_restored() {
    let _alone = ONE_AT_A_TIME.lock().await;
    use kv::protocol::ReplyValue;
    let directory = tempfile::tempdir().unwrap();
    let (binds, peers) = common::cluster_peers(3);
    let mut nodes: Vec<common::Binary> = (0..3)
        .map(|index| node_process(index as u64 + 1, &peers, binds[index], directory.path()))
        .collect();
    // Through node 3, so that it has met the leader of the bucket's shard at least.
    let mut third = kv::client::Client::connect(nodes[2].address).await.unwrap();
    let ok = ReplyValue::Simple("OK".into());
    assert_eq!(until_answered(&mut third, &[b"CREATE", b"a"]).await, ok);
    assert_eq!(
        until_answered(&mut third, &[b"PUT", b"a", b"k", b"v"]).await,
        ok
    );
    drop(third);

    let node = nodes.pop().unwrap();
    node.signal("KILL");
    node.wait().await;
    let data = directory.path().join("3");
    let saved = directory.path().join("3.saved");
    std::fs::rename(&data, &saved).unwrap();

    // Started on an empty directory under the same id: refused, and it says why. (`timeout`
    // bounds the process should the refusal not come.)
    let bind = binds[2].to_string();
    let output = within(tokio::task::spawn_blocking({
        let data = data.clone();
        let peers = peers.clone();
        move || {
            std::process::Command::new("timeout")
                .arg("60")
                .arg(env!("CARGO_BIN_EXE_kv"))
                .args([
                    "serve",
                    "--node-id",
                    "3",
                    "--cluster-bind",
                    &bind,
                    "--peers",
                ])
                .arg(&peers)
                .arg("--data-dir")
                .arg(&data)
                .env("PORT", "0")
                .output()
                .unwrap()
        }
    }))
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("refused by the cluster") && stderr.contains("node 3's data directory"),
        "{stderr}"
    );
    assert!(stderr.contains("wiped"), "{stderr}");

    // Its own directory back: it rejoins and answers, the write there.
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::rename(&saved, &data).unwrap();
    let restored = node_process(3, &peers, binds[2], directory.path());
    let mut client = kv::client::Client::connect(restored.address).await.unwrap();
    assert_eq!(
        until_answered(&mut client, &[b"GET", b"a", b"k"]).await,
        ReplyValue::Bulk(Some(b"v".to_vec().into()))
    );
}
