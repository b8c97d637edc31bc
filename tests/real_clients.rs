//! Clients nobody here wrote, with their defaults: redis-py 8 (`tests/clients/redis_py.py`).
//! redis-cli and redis-benchmark are driven by `tests/clients/tools.sh`, which installs them.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Binary;

/// A Python that has redis-py 8: the system's if it has it, else a virtual environment made
/// for the tests (with pip, from PyPI).
fn python_with_redis_py() -> PathBuf {
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
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("redis-py");
    let python = venv.join("bin/python");
    if !has_redis_py(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(made.success(), "python3 -m venv failed");
        let installed = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "redis>=8,<9"])
            .status()
            .unwrap();
        assert!(installed.success(), "pip install redis failed");
    }
    python
}

#[test]
fn redis_py_works_with_its_defaults() {
    let python = python_with_redis_py();
    let server = Binary::start(&["--requirepass", "sesame"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/redis_py.py");
    let output = Command::new(python)
        .arg(script)
        .arg(server.address.port().to_string())
        .arg("sesame")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
