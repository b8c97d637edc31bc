//! The real binary with `--fsync always`, killed with SIGKILL in the middle of a load: after a
//! restart on the same directory, every acknowledged write is there, and nothing that was
//! never sent.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::Binary;
use kv::client::{Client, ClientError};
use kv::protocol::ReplyValue;

const WRITERS: usize = 4;
const KEYS: u64 = 20;
const PIPELINE: u64 = 8;

/// What one writer sent and what was acknowledged, per key.
#[derive(Default)]
struct Ledger {
    sent: BTreeMap<u64, BTreeSet<u64>>,
    acknowledged: BTreeMap<u64, u64>,
}

/// Writes `PUT w<writer> k<key> <sequence>` in pipelined batches until the server dies. Each
/// key's values increase, so the value after recovery must be at least the last acknowledged.
async fn write_until_killed(
    address: std::net::SocketAddr,
    writer: usize,
    acknowledged_total: Arc<AtomicU64>,
) -> Ledger {
    let mut ledger = Ledger::default();
    let mut client = Client::connect(address).await.unwrap();
    let bucket = format!("w{writer}");
    client.create(bucket.as_bytes()).await.unwrap();
    let mut sequence = 0u64;
    loop {
        let batch: Vec<(u64, u64)> = (0..PIPELINE)
            .map(|offset| ((sequence + offset) % KEYS, sequence + offset))
            .collect();
        sequence += PIPELINE;
        for &(key, value) in &batch {
            let key_text = format!("k{key}");
            let value_text = value.to_string();
            client.queue(&[
                b"PUT",
                bucket.as_bytes(),
                key_text.as_bytes(),
                value_text.as_bytes(),
            ]);
            ledger.sent.entry(key).or_default().insert(value);
        }
        match client.flush().await {
            Ok(replies) => {
                for (&(key, value), reply) in batch.iter().zip(replies) {
                    assert_eq!(reply, ReplyValue::Simple("OK".into()));
                    ledger.acknowledged.insert(key, value);
                }
                acknowledged_total.fetch_add(PIPELINE, Ordering::Relaxed);
            }
            Err(ClientError::Io(_) | ClientError::Closed) => return ledger,
            Err(other) => panic!("unexpected {other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_sigkill() {
    let directory = tempfile::tempdir().unwrap();
    let data_dir = directory.path().to_str().unwrap().to_owned();
    let server = Binary::start(&["--data-dir", &data_dir, "--fsync", "always"]);
    let acknowledged = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            tokio::spawn(write_until_killed(
                server.address,
                writer,
                Arc::clone(&acknowledged),
            ))
        })
        .collect();
    // Kill once the load is well under way.
    common::within(async {
        while acknowledged.load(Ordering::Relaxed) < 4000 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    server.signal("KILL");
    let status = server.wait().await;
    assert!(!status.success(), "killed, not exited");
    let mut ledgers = Vec::new();
    for writer in writers {
        ledgers.push(common::within(writer).await.unwrap());
    }

    let restarted = Binary::start(&["--data-dir", &data_dir, "--fsync", "always"]);
    let mut client = Client::connect(restarted.address).await.unwrap();
    for (writer, ledger) in ledgers.iter().enumerate() {
        let bucket = format!("w{writer}");
        assert!(
            !ledger.acknowledged.is_empty(),
            "writer {writer} got acknowledgements"
        );
        for key in 0..KEYS {
            let found = client
                .get(bucket.as_bytes(), format!("k{key}").as_bytes())
                .await
                .unwrap();
            match (ledger.acknowledged.get(&key), found) {
                (Some(&acknowledged), Some(value)) => {
                    let value: u64 = std::str::from_utf8(&value).unwrap().parse().unwrap();
                    assert!(
                        value >= acknowledged,
                        "{bucket} k{key}: found {value}, but {acknowledged} was acknowledged"
                    );
                    assert!(
                        ledger.sent[&key].contains(&value),
                        "{bucket} k{key}: found {value}, which was never sent"
                    );
                }
                (Some(&acknowledged), None) => {
                    panic!("{bucket} k{key}: lost, though {acknowledged} was acknowledged")
                }
                (None, Some(value)) => {
                    let value: u64 = std::str::from_utf8(&value).unwrap().parse().unwrap();
                    assert!(
                        ledger
                            .sent
                            .get(&key)
                            .is_some_and(|sent| sent.contains(&value))
                    );
                }
                (None, None) => {}
            }
        }
        // Nothing but the keys that were sent.
        // One page holds them all (fewer than the page size): [cursor "0", keys].
        let page = client.call(&[b"KEYS", bucket.as_bytes()]).await.unwrap();
        let ReplyValue::Array(Some(page)) = page else {
            panic!("{page:?}")
        };
        let [cursor, ReplyValue::Array(Some(keys))] = &page[..] else {
            panic!("{page:?}")
        };
        assert_eq!(cursor, &ReplyValue::Bulk(Some(b"0".to_vec().into())));
        assert!(keys.len() as u64 <= KEYS);
        for key in keys {
            let ReplyValue::Bulk(Some(key)) = key else {
                panic!("{key:?}")
            };
            let number: u64 = std::str::from_utf8(&key[1..]).unwrap().parse().unwrap();
            assert!(ledger.sent.contains_key(&number), "{key:?} was never sent");
        }
    }
    restarted.signal("TERM");
    assert!(restarted.wait().await.success());
}
