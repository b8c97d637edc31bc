//! A running cluster of `kv serve` processes grown from three nodes to five and shrunk back to
//! three while clients write and read through its live nodes: two nodes join (`--join`), a
//! node is killed and restarted while replicas move, an initial member and a joined one are
//! killed and restarted, one initial member is drained
//! and removed (`CLUSTER REMOVENODE`), and one that joined is killed and forgotten
//! (`CLUSTER FORGET`), its replicas rebuilt from the others. After each
//! step every shard's voters are the nodes the layout places it on, and every node holds
//! exactly those replicas; every key's history stays linearizable, so no acknowledged write
//! was lost.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
#[path = "common/histories.rs"]
mod histories;
#[path = "common/linearizability.rs"]
mod linearizability;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use histories::{Clients, Cluster};
use kv::client::Client;
use kv::cluster::placement::replicas_of;
use kv::protocol::ReplyValue;

/// The whole test, moves and checking included, ends within this.
const BOUND: Duration = Duration::from_secs(180);

/// How long one step (a join, a removal) may take to settle.
const SETTLES_WITHIN: Duration = Duration::from_secs(40);

/// The shards `kv serve` cuts the slots into by default, and its replicas per shard.
const SHARDS: u16 = 3;
const REPLICAS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_grown_to_five_and_shrunk_to_three_under_writes_stays_linearizable() {
    tokio::time::timeout(BOUND, grow_and_shrink())
        .await
        .expect("the test ends within its bound");
}

async fn grow_and_shrink() {
    let mut cluster = Cluster::start();
    cluster.create_buckets().await;
    settled(&cluster, &[1, 2, 3]).await;

    let clients = Clients::start(&cluster, 4);
    clients.progress(100).await;

    // Two nodes join, through different members: one by itself, one added first with
    // `kv cluster add-node` (replicas wait for it until it starts).
    let four = cluster.join_node(0);
    // Node 2 is killed while replicas move to node 4, and comes back: the moves finish.
    move_under_way(&cluster).await;
    cluster.signal(1, "KILL").await;
    cluster.start_node(1);
    let five = cluster.reserve_node(1);
    let added = kv_cluster(&[
        "add-node",
        "5",
        &cluster.binds[five].to_string(),
        "-p",
        &cluster.nodes[2]
            .as_ref()
            .unwrap()
            .address
            .port()
            .to_string(),
    ])
    .await;
    assert!(added.starts_with("node 5 is added"), "{added}");
    cluster.start_node(five);
    settled(&cluster, &[1, 2, 3, 4, 5]).await;
    let held = |node: u64| {
        (0..SHARDS)
            .filter(|&shard| replicas_of(shard, &[1, 2, 3, 4, 5], REPLICAS).contains(&node))
            .count()
    };
    assert!(
        held(4) + held(5) > 0,
        "the new nodes took replicas: {} and {}",
        held(4),
        held(5)
    );
    clients.progress(100).await;

    // An initial member and a node that joined crash and come back on their directories
    // (with --peers and --join as they first started): they rejoin as they were.
    cluster.signal(1, "KILL").await;
    cluster.signal(five, "KILL").await;
    cluster.start_node(1);
    cluster.start_node(five);
    settled(&cluster, &[1, 2, 3, 4, 5]).await;
    clients.progress(100).await;

    // An initial member is drained and leaves; clients stop using it first (once removed, the
    // others no longer answer it, so it cannot forward).
    cluster.addresses.lock().unwrap()[0] = None;
    let port = cluster.nodes[1]
        .as_ref()
        .unwrap()
        .address
        .port()
        .to_string();
    let removing = kv_cluster(&["remove-node", "1", "-p", &port]).await;
    assert!(
        removing.starts_with("node 1 is being removed"),
        "{removing}"
    );
    settled(&cluster, &[2, 3, 4, 5]).await;
    let removed = cluster.nodes[0].take().unwrap();
    removed.log_line("holds no replicas any more and is leaving the cluster: stop it");
    removed.signal("TERM");
    assert!(removed.wait().await.success());
    clients.progress(100).await;

    // A node that joined dies and is forgotten: its replicas are rebuilt on the others.
    cluster.signal(four, "KILL").await;
    let answer = ask(&cluster, 2, &[b"CLUSTER", b"FORGET", b"4"]).await;
    assert!(
        matches!(&answer, ReplyValue::Bulk(Some(text)) if text.starts_with(b"node 4 is forgotten")),
        "{answer:?}"
    );
    settled(&cluster, &[2, 3, 5]).await;
    clients.progress(100).await;

    // An id is never reused: a new node under node 4's id is refused, and exits saying why.
    let stderr = refused_join(&cluster, "4").await;
    assert!(stderr.contains("node id 4 is taken"), "{stderr}");

    let checked = clients.check().await;
    assert!(checked >= 400, "{checked} operations checked");
    for index in [1, 2, five] {
        let node = cluster.nodes[index].take().unwrap();
        node.signal("TERM");
        assert!(
            node.wait().await.success(),
            "node {} stops cleanly",
            index + 1
        );
    }
}

/// Starts a new node under `id`, joining through node 2, which must exit unsuccessfully; what
/// it wrote to stderr. The free port picked for its cluster address may be taken meanwhile
/// (by a connection's ephemeral port): it is tried again on another then.
async fn refused_join(cluster: &Cluster, id: &str) -> String {
    for _ in 0..3 {
        let data = cluster.directory.path().join(format!("new-{id}"));
        let bind = common::cluster_peers(1).0[0].to_string();
        let arguments = [
            "serve",
            "--port",
            "0",
            "--node-id",
            id,
            "--cluster-bind",
            &bind,
            "--join",
            &cluster.binds[1].to_string(),
            "--data-dir",
            &data.to_string_lossy(),
        ];
        let refused = run_kv(&arguments, Duration::from_secs(40)).await;
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
        if !stderr.contains(&format!("binding {bind}")) {
            return stderr;
        }
    }
    panic!("no free cluster address for a new node in three tries");
}

/// Runs `kv cluster arguments…` and gives what it printed; it must succeed.
async fn kv_cluster(arguments: &[&str]) -> String {
    let arguments: Vec<&str> = std::iter::once("cluster")
        .chain(arguments.iter().copied())
        .collect();
    let output = run_kv(&arguments, Duration::from_secs(30)).await;
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    printed
}

/// Runs the kv binary with `arguments` (off the async workers) and gives its output; it must
/// end `within`.
async fn run_kv(arguments: &[&str], within: Duration) -> std::process::Output {
    let described = arguments.join(" ");
    let arguments: Vec<String> = arguments.iter().map(ToString::to_string).collect();
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kv"))
            .args(&arguments)
            .output()
            .unwrap()
    });
    tokio::time::timeout(within, run)
        .await
        .unwrap_or_else(|_| panic!("kv {described} ends within {within:?}"))
        .unwrap()
}

/// Sends `request` to node `index` and gives its answer.
async fn ask(cluster: &Cluster, index: usize, request: &[&[u8]]) -> ReplyValue {
    let mut client = cluster.client(index).await;
    tokio::time::timeout(Duration::from_secs(20), client.call(request))
        .await
        .expect("answered in time")
        .unwrap()
}

/// One node's `INFO cluster`: its members, and for each shard it holds whether it leads it,
/// its voters and the nodes it is placed on.
struct Report {
    members: Vec<u64>,
    shards: BTreeMap<u16, (bool, Vec<u64>, Vec<u64>)>,
}

async fn report(address: SocketAddr) -> Option<Report> {
    let mut client = tokio::time::timeout(Duration::from_secs(1), Client::connect(address))
        .await
        .ok()?
        .ok()?;
    let ReplyValue::Bulk(Some(info)) =
        tokio::time::timeout(Duration::from_secs(1), client.call(&[b"INFO", b"cluster"]))
            .await
            .ok()?
            .ok()?
    else {
        return None;
    };
    let info = String::from_utf8(info.to_vec()).unwrap();
    let nodes = |text: &str| -> Vec<u64> {
        text.split(['+', ','])
            .filter_map(|id| id.parse().ok())
            .collect()
    };
    let mut report = Report {
        members: Vec::new(),
        shards: BTreeMap::new(),
    };
    for line in info.lines() {
        let Some((name, value)) = line.trim_end().split_once(':') else {
            continue;
        };
        if name == "cluster_members" {
            report.members = nodes(value);
        } else if let Some(shard) = name.strip_prefix("shard_") {
            let fields: BTreeMap<&str, &str> = value
                .split(',')
                .filter_map(|field| field.split_once('='))
                .collect();
            report.shards.insert(
                shard.parse().unwrap(),
                (
                    fields["role"] == "leader",
                    nodes(fields["voters"]),
                    nodes(fields["placed"]),
                ),
            );
        }
    }
    Some(report)
}

/// Waits until a shard's leader reports voters other than the shard's placement.
async fn move_under_way(cluster: &Cluster) {
    common::within(async {
        loop {
            for address in cluster.nodes.iter().flatten().map(|node| node.address) {
                if let Some(report) = report(address).await
                    && report
                        .shards
                        .values()
                        .any(|(leads, voters, placed)| *leads && voters != placed)
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Waits until the cluster has settled on `members`: every live member lists them, every
/// shard is placed as rendezvous hashing over them gives and led by a node whose voters are
/// those, and every live member holds exactly the replicas placed on it.
async fn settled(cluster: &Cluster, members: &[u64]) {
    let wanted: BTreeMap<u16, Vec<u64>> = (0..SHARDS)
        .map(|shard| (shard, replicas_of(shard, members, REPLICAS)))
        .collect();
    let deadline = tokio::time::Instant::now() + SETTLES_WITHIN;
    loop {
        let live: Vec<(u64, SocketAddr)> = cluster
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(index, node)| Some((index as u64 + 1, node.as_ref()?.address)))
            .filter(|(id, _)| members.contains(id))
            .collect();
        let mut reports = BTreeMap::new();
        for (id, address) in &live {
            if let Some(report) = report(*address).await {
                reports.insert(*id, report);
            }
        }
        let problem = (|| {
            for (id, report) in &reports {
                if report.members != members {
                    return Some(format!("node {id} has members {:?}", report.members));
                }
                let held: BTreeSet<u16> = report.shards.keys().copied().collect();
                let placed: BTreeSet<u16> = wanted
                    .iter()
                    .filter(|(_, nodes)| nodes.contains(id))
                    .map(|(shard, _)| *shard)
                    .collect();
                if held != placed {
                    return Some(format!("node {id} holds {held:?}, placed {placed:?}"));
                }
            }
            for (shard, nodes) in &wanted {
                let led = reports.values().any(|report| {
                    report
                        .shards
                        .get(shard)
                        .is_some_and(|(leads, voters, placed)| {
                            *leads && voters == nodes && placed == nodes
                        })
                });
                if !led {
                    return Some(format!("shard {shard} is not led by voters {nodes:?} yet"));
                }
            }
            (reports.len() != live.len()).then(|| "a live member did not answer".to_owned())
        })();
        let Some(problem) = problem else {
            return;
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cluster did not settle on {members:?}: {problem}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
