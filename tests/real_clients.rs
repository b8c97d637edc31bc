//! Clients nobody here wrote, with their defaults: redis-py 8 (`tests/clients/redis_py.py`), and
//! its `RedisCluster` against three nodes (`tests/clients/redis_py_cluster.py`).
//! redis-cli and redis-benchmark are driven by `tests/clients/tools.sh`, which installs them.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::Binary;

/// A Python that has redis-py 8: the system's if it has it, else a virtual environment made
/// for the tests (with pip, from PyPI), once for all the tests that want it.
fn python_with_redis_py() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(find_or_make_python).clone()
}

fn find_or_make_python() -> PathBuf {
    let has_redis_py = |python: &PathBuf| {
        Command::new(python)
            .args([
                "-c",
                "import redis, sys; sys.exit(int(redis.__version__.split('.')[0]) < 8)",
            ])
            .status()
            .is_ok_and(|status| status.success())
    };
    let system = PathBuf::from("python3");
    if has_redis_py(&system) {
        return system;
    }
    let target_tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let venv = target_tmp.join("redis-py");
    let python = venv.join("bin/python");
    if has_redis_py(&python) {
        return python;
    }
    // Made under a name of this process's own and renamed into place, so that test processes
    // running at once (nextest) never build into the same directory; a venv's python finds its
    // packages relative to itself, so the rename keeps it whole.
    let building = target_tmp.join(format!("redis-py.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&building)
        .status()
        .unwrap();
    assert!(made.success(), "python3 -m venv failed");
    let installed = Command::new(building.join("bin/python"))
        .args(["-m", "pip", "install", "--quiet", "redis>=8,<9"])
        .status()
        .unwrap();
    assert!(installed.success(), "pip install redis failed");
    if std::fs::rename(&building, &venv).is_err() {
        if has_redis_py(&python) {
            // Another process finished first.
            std::fs::remove_dir_all(&building).unwrap();
            return python;
        }
        // A broken leftover of an interrupted run.
        std::fs::remove_dir_all(&venv).unwrap();
        std::fs::rename(&building, &venv).unwrap();
    }
    python
}

#[test]
fn redis_py_works_with_its_defaults() {
    let python = python_with_redis_py();
    let server = Binary::start(&["--requirepass", "sesame"]);
    run_script(
        &python,
        "redis_py.py",
        &[&server.address.port().to_string(), "sesame"],
    );
}

/// redis-py's `RedisCluster` with its defaults against three kv nodes, one of them killed
/// halfway (`tests/clients/redis_py_cluster.py` says what it checks).
#[test]
fn redis_py_cluster_client_works_with_its_defaults_and_a_node_killed() {
    let python = python_with_redis_py();
    let directory = tempfile::tempdir().unwrap();
    let (binds, peers) = common::cluster_peers(3);
    let nodes: Vec<Binary> = (0..3)
        .map(|index| Binary::cluster_node(index + 1, &peers, binds[index], directory.path(), &[]))
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for node in &nodes {
            let mut client = kv::client::Client::connect(node.address).await.unwrap();
            common::cluster_ok(&mut client).await;
        }
        // Each node comes to lead a shard, so that the client is shown three masters.
        let mut client = kv::client::Client::connect(nodes[0].address).await.unwrap();
        common::masters_until(&mut client, 3).await;
    });
    run_script(
        &python,
        "redis_py_cluster.py",
        &[
            &nodes[0].address.port().to_string(),
            &nodes[2].id().to_string(),
        ],
    );
}

/// Runs `tests/clients/<script>` with `arguments`, bounded in time (a client that hangs fails
/// the test rather than holding CI), and fails with its output unless it succeeds.
fn run_script(python: &std::path::Path, script: &str, arguments: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let output = Command::new("timeout")
        .arg("120")
        .arg(python)
        .arg(script)
        .args(arguments)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    print!("{}", String::from_utf8_lossy(&output.stdout));
}
