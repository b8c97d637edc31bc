//! The cluster's layout: its members and which of them hold each shard. The layout is the
//! state of a small Raft group of its own, the metadata group (shard [`META_SHARD`], replicated
//! like any shard: voters chosen by rendezvous, every other member a learner), so that every
//! node reads the same layout and no two disagree about placement.
//!
//! Its records are kept as one bucket of the metadata group's registry, [`LAYOUT_BUCKET`]:
//! the shard count and replica count, one record per member, one placement per shard. A change
//! of the layout (a node joins or is removed) is one Raft entry, written only by the metadata
//! group's leader, and every replica applies it alike.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::placement::{NodeId, preferred_leaders, replicas_of};
use crate::change::Change;

/// The shard index of the metadata group: past every data shard (`--shards` is at most
/// 16384, a shard per slot).
pub const META_SHARD: u16 = u16::MAX;

/// The bucket of the metadata group that holds the layout.
pub const LAYOUT_BUCKET: &[u8] = b"layout";

/// The most members a cluster records, removed ones included (ids are never reused, so
/// their records stay): a bound on what joins can make the layout hold.
pub const MAX_MEMBERS: usize = 1024;

/// A member's part in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Holds replicas as placement gives them.
    Active,
    /// Added by an operator (`CLUSTER ADDNODE`) and not joined yet: placed on like an active
    /// member, its replicas wait for it.
    Expected,
    /// Being removed: its replicas move to the other members, then it is `Removed`.
    Draining,
    /// Gone for good: holds nothing, and is refused if it comes back. Its id is never reused.
    Removed,
}

/// What the layout records of a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Where the other nodes reach it.
    pub address: SocketAddr,
    /// The incarnation of the data directory it joined with (0 for an initial member, whose
    /// incarnation the peers keep on first contact instead).
    pub incarnation: u64,
    /// Its part.
    pub state: MemberState,
}

/// How the slots are cut and replicated: fixed when the cluster forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// How many shards the slots are cut into.
    pub shards: u16,
    /// Replicas per shard (every active member if fewer).
    pub replicas: usize,
}

/// The cluster's layout as the metadata group has applied it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// `None` until the metadata group's first leader writes the initial layout.
    pub settings: Option<Settings>,
    /// Every member ever, removed ones included.
    pub members: BTreeMap<NodeId, Member>,
    /// The nodes each shard should be on (the metadata group's own voters are not here; see
    /// [`Layout::meta_voters`]).
    pub placement: BTreeMap<u16, Vec<NodeId>>,
}

const SETTINGS_KEY: &[u8] = b"settings";
const MEMBER_PREFIX: u8 = b'm';
const PLACEMENT_PREFIX: u8 = b'p';

impl Layout {
    /// The layout a cluster forms with: `members` all active, each shard on the replicas
    /// rendezvous hashing gives it.
    #[must_use]
    pub fn initial(settings: Settings, members: &BTreeMap<NodeId, SocketAddr>) -> Self {
        let mut layout = Self {
            settings: Some(settings),
            members: members
                .iter()
                .map(|(&id, &address)| {
                    let member = Member {
                        address,
                        incarnation: 0,
                        state: MemberState::Active,
                    };
                    (id, member)
                })
                .collect(),
            placement: BTreeMap::new(),
        };
        layout.place();
        layout
    }

    /// Reads the layout from the records of [`LAYOUT_BUCKET`]; records it does not know are
    /// skipped (a newer version's), damaged ones are an error.
    ///
    /// # Errors
    /// A record that does not decode.
    pub fn from_records<'a>(
        records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Self, String> {
        let mut layout = Self::default();
        for (key, value) in records {
            let damaged = |what: &str| format!("a damaged {what} record in the cluster layout");
            match key {
                SETTINGS_KEY => {
                    layout.settings =
                        Some(postcard::from_bytes(value).map_err(|_| damaged("settings"))?);
                }
                [MEMBER_PREFIX, id @ ..] if id.len() == 8 => {
                    let id = NodeId::from_be_bytes(id.try_into().unwrap_or_default());
                    let member = postcard::from_bytes(value).map_err(|_| damaged("member"))?;
                    layout.members.insert(id, member);
                }
                [PLACEMENT_PREFIX, a, b] => {
                    let shard = u16::from_be_bytes([*a, *b]);
                    let nodes = postcard::from_bytes(value).map_err(|_| damaged("placement"))?;
                    layout.placement.insert(shard, nodes);
                }
                _ => {}
            }
        }
        Ok(layout)
    }

    /// The changes that make the records of `self` where `before` was: the bucket's creation
    /// when `before` had no settings, then every record that differs.
    #[must_use]
    pub fn changes_from(&self, before: &Self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut records = Vec::new();
        if self.settings != before.settings
            && let Some(settings) = &self.settings
        {
            records.push((SETTINGS_KEY.to_vec(), encode(settings)));
        }
        for (id, member) in &self.members {
            if before.members.get(id) != Some(member) {
                records.push((member_key(*id), encode(member)));
            }
        }
        for (shard, nodes) in &self.placement {
            if before.placement.get(shard) != Some(nodes) {
                records.push((placement_key(*shard), encode(nodes)));
            }
        }
        records
    }

    /// The members that hold replicas or may: active and draining ones.
    pub fn present(&self) -> impl Iterator<Item = (NodeId, &Member)> {
        self.members
            .iter()
            .filter(|(_, member)| member.state != MemberState::Removed)
            .map(|(&id, member)| (id, member))
    }

    /// The active (and expected) members' ids: the ones placement puts replicas on.
    #[must_use]
    pub fn active(&self) -> Vec<NodeId> {
        self.members
            .iter()
            .filter(|(_, member)| {
                matches!(member.state, MemberState::Active | MemberState::Expected)
            })
            .map(|(&id, _)| id)
            .collect()
    }

    /// Places every shard on the active members by rendezvous hashing, so that a member added
    /// or removed moves only the replicas it gains or held.
    pub fn place(&mut self) {
        let Some(settings) = self.settings else {
            return;
        };
        let active = self.active();
        self.placement = (0..settings.shards)
            .map(|shard| (shard, replicas_of(shard, &active, settings.replicas)))
            .collect();
    }

    /// The voters of the metadata group: chosen among the active members like any shard's.
    #[must_use]
    pub fn meta_voters(&self) -> Vec<NodeId> {
        let replicas = self.settings.map_or(0, |settings| settings.replicas);
        replicas_of(META_SHARD, &self.active(), replicas)
    }

    /// The nodes `shard` should be on: the metadata group's voters for [`META_SHARD`].
    #[must_use]
    pub fn replicas(&self, shard: u16) -> Vec<NodeId> {
        if shard == META_SHARD {
            return self.meta_voters();
        }
        self.placement.get(&shard).cloned().unwrap_or_default()
    }

    /// The replica that should lead each shard (see [`preferred_leaders`]), the metadata
    /// group's included: the voter of it leading the fewest data shards (it does little).
    #[must_use]
    pub fn preferred_leaders(&self) -> BTreeMap<u16, NodeId> {
        let mut preferred = preferred_leaders(&self.placement);
        let meta = self.meta_voters().into_iter().min_by_key(|&node| {
            let leads = preferred.values().filter(|&&leader| leader == node).count();
            (leads, node)
        });
        preferred.extend(meta.map(|node| (META_SHARD, node)));
        preferred
    }

    /// Whether any shard is placed on `node`.
    #[must_use]
    pub fn places_anything_on(&self, node: NodeId) -> bool {
        self.placement.values().any(|nodes| nodes.contains(&node))
    }
}

/// The changes that write `records` into [`LAYOUT_BUCKET`] (creating it first when `create`).
#[must_use]
pub fn as_changes(records: &[(Vec<u8>, Vec<u8>)], create: bool) -> Vec<Change<'_>> {
    let create = create.then_some(Change::Create {
        bucket: LAYOUT_BUCKET,
    });
    create
        .into_iter()
        .chain(records.iter().map(|(key, value)| Change::Put {
            bucket: LAYOUT_BUCKET,
            key,
            value,
        }))
        .collect()
}

fn member_key(id: NodeId) -> Vec<u8> {
    let mut key = vec![MEMBER_PREFIX];
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn placement_key(shard: u16) -> Vec<u8> {
    let mut key = vec![PLACEMENT_PREFIX];
    key.extend_from_slice(&shard.to_be_bytes());
    key
}

/// A record's value: the layout's types are plain data, so encoding them cannot fail.
fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn three() -> Layout {
        let members = (1..=3).map(|id| (id, address(7400 + id as u16))).collect();
        Layout::initial(
            Settings {
                shards: 8,
                replicas: 3,
            },
            &members,
        )
    }

    fn round_trip(layout: &Layout) -> Layout {
        let records = layout.changes_from(&Layout::default());
        Layout::from_records(
            records
                .iter()
                .map(|(key, value)| (key.as_slice(), value.as_slice())),
        )
        .unwrap()
    }

    #[test]
    fn a_layout_reads_back_from_its_records() {
        let layout = three();
        assert_eq!(layout.placement.len(), 8);
        assert!(layout.placement.values().all(|nodes| nodes == &[1, 2, 3]));
        assert_eq!(round_trip(&layout), layout);
        assert!(
            Layout::from_records([(&b"m\0\0\0\0\0\0\0\x01"[..], &b"\xff"[..])]).is_err(),
            "a damaged member"
        );
        assert_eq!(
            Layout::from_records([(&b"future"[..], &b"x"[..])]).unwrap(),
            Layout::default(),
            "an unknown record is skipped"
        );
    }

    #[test]
    fn a_change_writes_only_the_records_that_differ() {
        let before = three();
        let mut after = before.clone();
        after.members.insert(
            4,
            Member {
                address: address(7404),
                incarnation: 9,
                state: MemberState::Active,
            },
        );
        after.place();
        let records = after.changes_from(&before);
        let moved = after
            .placement
            .iter()
            .filter(|(shard, nodes)| before.placement[shard] != **nodes)
            .count();
        assert!(moved > 0, "node 4 takes some replicas");
        assert_eq!(
            records.len(),
            1 + moved,
            "node 4's record and the moved shards"
        );
        // Later records overwrite earlier ones, as puts to a bucket do.
        let mut bucket = BTreeMap::new();
        bucket.extend(before.changes_from(&Layout::default()));
        bucket.extend(records);
        let applied = Layout::from_records(
            bucket
                .iter()
                .map(|(key, value)| (key.as_slice(), value.as_slice())),
        )
        .unwrap();
        assert_eq!(applied, after);
    }

    #[test]
    fn draining_and_removed_members_hold_nothing() {
        let mut layout = three();
        layout.members.get_mut(&3).unwrap().state = MemberState::Draining;
        layout.place();
        assert!(!layout.places_anything_on(3));
        assert_eq!(layout.meta_voters(), [1, 2]);
        assert_eq!(
            layout.present().count(),
            3,
            "a draining member is still there"
        );
        layout.members.get_mut(&3).unwrap().state = MemberState::Removed;
        assert_eq!(layout.present().count(), 2);
        assert_eq!(layout.replicas(META_SHARD), [1, 2]);
    }
}
