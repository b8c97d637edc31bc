//! Random sequences of create / put / get / delete / drop / crash, checked step by step
//! against a `HashMap` of `HashMap`s.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::HashMap;

use kv::{BucketFault, CoreConfig, Registry};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
    Create(u8),
    Put(u8, u8, Vec<u8>),
    Get(u8, u8),
    Delete(u8, u8),
    Drop(u8),
    Crash(u8),
}

fn step() -> impl Strategy<Value = Step> {
    let name = 0..4u8;
    let key = 0..6u8;
    prop_oneof![
        2 => name.clone().prop_map(Step::Create),
        4 => (name.clone(), key.clone(), proptest::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(name, key, value)| Step::Put(name, key, value)),
        4 => (name.clone(), key.clone()).prop_map(|(name, key)| Step::Get(name, key)),
        2 => (name.clone(), key).prop_map(|(name, key)| Step::Delete(name, key)),
        1 => name.clone().prop_map(Step::Drop),
        1 => name.prop_map(Step::Crash),
    ]
}

fn name(index: u8) -> Vec<u8> {
    // Not UTF-8 on purpose: names are bytes.
    vec![b'b', 0xff, index]
}

type Model = HashMap<Vec<u8>, HashMap<Vec<u8>, Vec<u8>>>;

async fn check(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let registry = Registry::start(CoreConfig::default());
    let mut model = Model::new();
    for step in steps {
        match step {
            Step::Create(index) => {
                registry.create(name(index)).await.unwrap();
                model.entry(name(index)).or_default();
            }
            Step::Put(index, key, value) => {
                let real = registry.lookup(&name(index));
                let expected = model.get_mut(&name(index));
                prop_assert_eq!(real.is_some(), expected.is_some());
                if let (Some(bucket), Some(table)) = (real, expected) {
                    bucket.put(&[key], &value).unwrap();
                    table.insert(vec![key], value);
                }
            }
            Step::Get(index, key) => {
                let real = registry
                    .lookup(&name(index))
                    .map(|bucket| bucket.get(&[key]).unwrap().map(|value| value.to_vec()));
                let expected = model
                    .get(&name(index))
                    .map(|table| table.get(&vec![key]).cloned());
                prop_assert_eq!(real, expected);
            }
            Step::Delete(index, key) => {
                let real = registry
                    .lookup(&name(index))
                    .map(|bucket| bucket.delete(&[key]).unwrap());
                let expected = model
                    .get_mut(&name(index))
                    .map(|table| table.remove(&vec![key]).is_some());
                prop_assert_eq!(real, expected);
            }
            Step::Drop(index) => {
                let dropped = registry.drop_bucket(&name(index)).await.unwrap();
                prop_assert_eq!(dropped, model.remove(&name(index)).is_some());
            }
            Step::Crash(index) => {
                if let Some(bucket) = registry.lookup(&name(index)) {
                    bucket.inject_fault(BucketFault::Panic).unwrap();
                    bucket.stopped().await;
                }
                model.remove(&name(index));
            }
        }
    }
    let counts = registry.settle().await.unwrap();
    prop_assert_eq!(counts.names, model.len());
    prop_assert_eq!(counts.running_buckets, model.len());
    for (name, table) in &model {
        let bucket = registry.lookup(name).expect("bucket in the model");
        prop_assert_eq!(bucket.len().unwrap(), table.len());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_registry_behaves_like_a_map_of_maps(steps in proptest::collection::vec(step(), 1..80)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(check(steps))?;
    }
}
