//! The two shapes a bucket could take, measured on the same operations:
//!
//! - `mailbox`: the Agent shape of the guide. A task owns a `HashMap`; every operation is a
//!   message on a bounded channel with a oneshot for the reply.
//! - `in_place`: kv's shape. The task owns the lifetime of a table that callers lock and use
//!   directly (`kv::BucketHandle`).
//!
//! Both are driven from a task on a two-worker runtime, as connection tasks would drive them.
//! Run with `cargo bench --bench bucket_shapes`.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_main};
use tokio::sync::{mpsc, oneshot};

const KEYS: u32 = 10_000;
const VALUE: [u8; 32] = [b'v'; 32];

fn key(index: u32) -> [u8; 16] {
    let mut key = *b"key:000000000000";
    key[4..].copy_from_slice(format!("{index:012}").as_bytes());
    key
}

enum Operation {
    Get(Vec<u8>, oneshot::Sender<Option<Vec<u8>>>),
    Put(Vec<u8>, Vec<u8>, oneshot::Sender<()>),
}

/// The mailbox shape, reduced to what the comparison needs.
fn start_mailbox_bucket() -> mpsc::Sender<Operation> {
    let (sender, mut mailbox) = mpsc::channel::<Operation>(1024);
    tokio::spawn(async move {
        let mut table: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        while let Some(operation) = mailbox.recv().await {
            match operation {
                Operation::Get(key, reply) => {
                    let _ = reply.send(table.get(&key).cloned());
                }
                Operation::Put(key, value, reply) => {
                    table.insert(key, value);
                    let _ = reply.send(());
                }
            }
        }
    });
    sender
}

fn shapes(criterion: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let (mailbox, in_place) = runtime.block_on(async {
        let mailbox = start_mailbox_bucket();
        let registry = kv::Registry::start(kv::CoreConfig::default());
        let in_place = registry.create("bench").await.expect("create");
        for index in 0..KEYS {
            let (reply, done) = oneshot::channel();
            mailbox
                .send(Operation::Put(key(index).to_vec(), VALUE.to_vec(), reply))
                .await
                .expect("send");
            done.await.expect("reply");
            in_place.put(&key(index), &VALUE).expect("put");
        }
        // Keep the registry alive for the whole benchmark: dropping it stops the bucket.
        std::mem::forget(registry);
        (mailbox, in_place)
    });

    let mut group = criterion.benchmark_group("bucket");
    for operation in ["get", "put"] {
        let mut index = 0u32;
        group.bench_function(BenchmarkId::new("mailbox", operation), |bench| {
            bench.to_async(&runtime).iter(|| {
                index = (index + 1) % KEYS;
                let mailbox = mailbox.clone();
                async move {
                    let key = key(index).to_vec();
                    if operation == "get" {
                        let (reply, answer) = oneshot::channel();
                        mailbox
                            .send(Operation::Get(key, reply))
                            .await
                            .expect("send");
                        black_box(answer.await.expect("reply"));
                    } else {
                        let (reply, answer) = oneshot::channel();
                        mailbox
                            .send(Operation::Put(key, VALUE.to_vec(), reply))
                            .await
                            .expect("send");
                        answer.await.expect("reply");
                    }
                }
            });
        });
        let mut index = 0u32;
        group.bench_function(BenchmarkId::new("in_place", operation), |bench| {
            bench.to_async(&runtime).iter(|| {
                index = (index + 1) % KEYS;
                let bucket = in_place.clone();
                async move {
                    let key = key(index);
                    if operation == "get" {
                        black_box(bucket.get_with(&key, |value| value.map(<[u8]>::len)))
                            .expect("get");
                    } else {
                        bucket.put(&key, &VALUE).expect("put");
                    }
                }
            });
        });
    }
    group.finish();
}

/// The criterion group; criterion's macro writes an undocumented function, hence the module.
mod harness {
    #![allow(missing_docs)]
    criterion::criterion_group!(benches, super::shapes);
}

criterion_main!(harness::benches);
