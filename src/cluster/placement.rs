//! Which nodes hold each shard, and which of them should lead it: decided by every node alike
//! from the members, the number of shards and of replicas, with nothing to agree on at run
//! time.
//!
//! Replicas are picked by rendezvous hashing: a shard's replicas are the members with the
//! highest weight for it, so each node gets an even share, and a member added or removed moves
//! only the replicas it gains or held (about 1/N of them). Preferred leaders are picked so that
//! leaderships spread as evenly over the nodes as the placement allows.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;

/// A node's identity in the cluster (`--node-id`).
pub type NodeId = u64;

/// The replicas of `shard`: the `replicas` members (all of them, if fewer) of the highest
/// weight for it, in ascending node id.
#[must_use]
pub fn replicas_of(shard: u16, members: &[NodeId], replicas: usize) -> Vec<NodeId> {
    let mut weighted: Vec<(u64, NodeId)> = members
        .iter()
        .map(|&node| (weight(shard, node), node))
        .collect();
    weighted.sort_unstable_by(|a, b| b.cmp(a));
    let mut chosen: Vec<NodeId> = weighted
        .into_iter()
        .take(replicas)
        .map(|(_, node)| node)
        .collect();
    chosen.sort_unstable();
    chosen
}

/// The replica that should lead each shard of `placement` (shard to replicas): leaderships
/// spread as evenly as the placement allows. Each shard in turn goes to the replica that leads
/// the fewest so far, ties broken by rotating through its replicas with the shard's index (so
/// that with every node holding every shard, shard `i` goes to the `i`th node, round and
/// round).
#[must_use]
pub fn preferred_leaders(placement: &BTreeMap<u16, Vec<NodeId>>) -> BTreeMap<u16, NodeId> {
    let mut leads = HashMap::<NodeId, usize>::new();
    let mut preferred = BTreeMap::new();
    for (&shard, replicas) in placement {
        let Some(count) = NonZeroUsize::new(replicas.len()) else {
            continue;
        };
        let start = usize::from(shard) % count;
        let chosen = (0..count.get())
            .map(|offset| replicas[(start + offset) % count])
            .min_by_key(|node| leads.get(node).copied().unwrap_or(0))
            .unwrap_or(replicas[start]);
        *leads.entry(chosen).or_default() += 1;
        preferred.insert(shard, chosen);
    }
    preferred
}

/// A stable pseudo-random weight of `node` for `shard`, the same on every node and every
/// version: SplitMix64's finaliser over both (a hasher seeded per process would not do).
fn weight(shard: u16, node: NodeId) -> u64 {
    let mut mixed = (u64::from(shard) << 48) ^ node.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    mixed ^ (mixed >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(shards: u16, members: &[NodeId], replicas: usize) -> BTreeMap<NodeId, usize> {
        let mut counts = BTreeMap::new();
        for shard in 0..shards {
            for node in replicas_of(shard, members, replicas) {
                *counts.entry(node).or_default() += 1;
            }
        }
        counts
    }

    #[test]
    fn every_shard_gets_its_replicas_and_shares_are_even() {
        let members = [1, 2, 3, 4, 5];
        for shard in 0..64 {
            let chosen = replicas_of(shard, &members, 3);
            assert_eq!(chosen.len(), 3);
            assert!(chosen.windows(2).all(|pair| pair[0] < pair[1]));
        }
        assert_eq!(replicas_of(7, &[1, 2], 3), [1, 2], "every node if fewer");
        let shares = counts(1000, &members, 3);
        for (&node, &share) in &shares {
            // 600 each if perfectly even.
            assert!((520..=680).contains(&share), "node {node} holds {share}");
        }
    }

    #[test]
    fn a_node_added_takes_about_its_share_and_nothing_else_moves() {
        let before: Vec<NodeId> = vec![1, 2, 3, 4];
        let after: Vec<NodeId> = vec![1, 2, 3, 4, 5];
        let mut moved = 0;
        for shard in 0..1000 {
            let old = replicas_of(shard, &before, 3);
            let new = replicas_of(shard, &after, 3);
            for node in &new {
                if !old.contains(node) {
                    assert_eq!(*node, 5, "shard {shard}: only the new node gains replicas");
                    moved += 1;
                }
            }
        }
        // 3,000 replicas, a fifth of them to the new node.
        assert!((500..=700).contains(&moved), "{moved} replicas moved");
    }

    fn leaderships(shards: u16, members: &[NodeId]) -> BTreeMap<NodeId, usize> {
        let placement = (0..shards)
            .map(|shard| (shard, replicas_of(shard, members, 3)))
            .collect();
        let mut leads = BTreeMap::new();
        for (shard, leader) in preferred_leaders(&placement) {
            assert!(placement[&shard].contains(&leader), "a replica leads");
            *leads.entry(leader).or_default() += 1;
        }
        leads
    }

    #[test]
    fn leaders_spread_evenly_over_the_nodes() {
        assert_eq!(
            leaderships(9, &[1, 2, 3]),
            BTreeMap::from([(1, 3), (2, 3), (3, 3)])
        );
        let three_over_four = leaderships(3, &[1, 2, 3, 4]);
        assert!(
            three_over_four.values().all(|&leads| leads == 1),
            "{three_over_four:?}"
        );
        let twelve_over_five = leaderships(12, &[1, 2, 3, 4, 5]);
        assert!(
            twelve_over_five
                .values()
                .all(|&leads| (2..=3).contains(&leads)),
            "{twelve_over_five:?}"
        );
        assert!(preferred_leaders(&BTreeMap::from([(0, vec![])])).is_empty());
    }
}
