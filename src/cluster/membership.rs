//! A running cluster growing and shrinking: nodes join and leave, and replicas move to follow
//! the layout, by openraft's own membership changes.
//!
//! - **The layout** (`layout.rs`) is changed only by the metadata group's leader, one entry
//!   per change: a node admitted (`--join`), drained (`CLUSTER REMOVENODE`), forgotten
//!   (`CLUSTER FORGET`, for a dead node). Each change places the shards again by rendezvous
//!   hashing, so about 1/N of the replicas move.
//! - **Every node follows it**, once a second: it opens a fresh replica of each shard placed on
//!   it that it lacks (which waits, empty, to be added); each shard's leader brings its
//!   group's membership to the placement, one node at a time: it adds a missing node as a
//!   learner (openraft sends it a snapshot and the log), waits until that learner has caught
//!   up, then replaces the voters (joint consensus), then removes learners no longer wanted.
//!   A node holding a replica that is no longer placed on it drops it (stops its group and
//!   deletes its files) only once the shard's leader says its committed membership no longer
//!   has the node: a replica is never deleted while it may still count towards a majority.
//! - **Moves are throttled**: a node leads at most one data shard with a learner catching up
//!   at a time, so that a move's snapshot and log traffic shares the cores with clients.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::type_config::async_runtime::WatchReceiver as _;
use openraft::{BasicNode, ChangeMembers, ReadPolicy};

use super::identity::Handshake;
use super::layout::{
    LAYOUT_BUCKET, Layout, MAX_MEMBERS, META_SHARD, Member, MemberState, as_changes,
};
use super::node::{Node, NodeConfig, NodeError};
use super::peer::{
    Admitted, JoinRefusal, MemberChange, PeerRequest, PeerResponse, ShardGroup, ask_to_join,
};
use super::placement::NodeId;
use super::raft::{Outcome, ShardCommand};

/// How long a node asks the members named by `--join` to admit it before giving up.
const JOIN_WITHIN: Duration = Duration::from_secs(30);

/// How long one membership change (or the read before a layout change) may take before the
/// node gives up on it for this tick.
const CHANGE_WITHIN: Duration = Duration::from_secs(5);

/// How long a node waits for another's answer about a shard's membership.
const ASK_WITHIN: Duration = Duration::from_secs(1);

/// A learner this few entries behind the leader's log counts as caught up: becoming a voter
/// then holds up no commit for long.
const CAUGHT_UP_WITHIN: u64 = 64;

impl Node {
    /// The layout the metadata group's replica here has applied; `None` before the first
    /// layout is written (or while its bucket cannot be read).
    pub(super) fn read_layout(&self) -> Option<Layout> {
        let meta = self.state(META_SHARD)?;
        let bucket = meta.registry().lookup(LAYOUT_BUCKET)?;
        let mut records = Vec::new();
        bucket
            .for_each_entry(|key, value| records.push((key.to_vec(), value.to_vec())))
            .ok()?;
        match Layout::from_records(
            records
                .iter()
                .map(|(key, value)| (key.as_slice(), value.as_slice())),
        ) {
            Ok(layout) if layout.settings.is_some() => Some(layout),
            Ok(_) => None,
            Err(error) => {
                tracing::error!(%error, "the cluster layout cannot be read");
                None
            }
        }
    }

    /// Reads the layout again; if it changed, takes its members as the peers to connect to and
    /// to admit. Before the first layout is written, the initial members (`--peers`) stand
    /// for it.
    pub(super) fn refresh_layout(&self) {
        let layout = self.read_layout().unwrap_or_else(|| {
            if self.initial.is_empty() {
                (*self.layout()).clone()
            } else {
                Layout::initial(self.settings, &self.initial)
            }
        });
        if *self.layout.read().as_ref() == layout {
            return;
        }
        self.peers
            .set(layout.present().map(|(id, member)| (id, member.address)));
        self.handshake
            .set_members(layout.present().map(|(id, _)| id));
        tracing::info!(
            members = ?layout.present().map(|(id, _)| id).collect::<Vec<_>>(),
            "the cluster layout is now in effect here"
        );
        *self.layout.write() = std::sync::Arc::new(layout);
    }

    /// Brings this node's replicas in line with the layout (see the module's documentation).
    pub(super) async fn follow_layout(&self) {
        if self.leads(META_SHARD) && !self.initial.is_empty() && self.read_layout().is_none() {
            self.write_initial_layout().await;
            self.refresh_layout();
        }
        let layout = self.layout();
        if layout
            .members
            .get(&self.id())
            .is_some_and(|member| member.state != MemberState::Removed)
        {
            for (&shard, nodes) in &layout.placement {
                if nodes.contains(&self.id()) && self.replica(shard).is_none() {
                    match self.open_replica(shard).await {
                        Ok(replica) => {
                            tracing::info!(shard, "opened a replica placed on this node");
                            self.add_replica(shard, replica);
                        }
                        Err(error) => {
                            tracing::error!(%error, shard, "could not open a replica placed here");
                        }
                    }
                }
            }
        }
        let drained = layout.members.get(&self.id()).is_some_and(|member| {
            matches!(member.state, MemberState::Draining | MemberState::Removed)
        }) && self
            .replica_list()
            .iter()
            .all(|(shard, _)| *shard == META_SHARD);
        if drained
            && !self
                .told_drained
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "this node holds no replicas any more and is leaving the cluster: stop it (its \
                 id is not used again)"
            );
        }
        let mut moving = false;
        for (shard, replica) in self.replica_list() {
            let placed_here = shard == META_SHARD || layout.replicas(shard).contains(&self.id());
            // A leader that removed itself from the shard's voters may still believe it
            // leads (the others moved on without telling it): it only drops its replica.
            let votes = replica
                .group
                .metrics()
                .borrow_watched()
                .membership_config
                .membership()
                .voter_ids()
                .any(|id| id == self.id());
            if self.leads(shard) && (placed_here || votes) {
                self.reconcile(shard, &replica.group, &layout, &mut moving)
                    .await;
            } else if !placed_here {
                self.drop_if_moved_away(shard, &layout).await;
            }
        }
        if self.leads(META_SHARD) {
            self.settle_drained(&layout).await;
        }
    }

    fn leads(&self, shard: u16) -> bool {
        self.group(shard)
            .is_some_and(|group| group.metrics().borrow_watched().current_leader == Some(self.id()))
    }

    /// Writes the layout the cluster formed with (`--peers`), once the metadata group has a
    /// leader and if no layout is there yet.
    async fn write_initial_layout(&self) {
        let _writing = self.layout_writes.lock().await;
        if !self.read_current().await || self.read_layout().is_some() {
            return;
        }
        let initial = Layout::initial(self.settings, &self.initial);
        match self.write_layout(&Layout::default(), &initial).await {
            Ok(()) => tracing::info!("wrote the cluster's first layout"),
            Err(error) => tracing::warn!(%error, "could not write the cluster's first layout"),
        }
    }

    /// Waits until this node's replica of the metadata group has applied everything committed
    /// before now (a linearizable read), if it leads the group.
    async fn read_current(&self) -> bool {
        let Some(meta) = self.group(META_SHARD) else {
            return false;
        };
        matches!(
            tokio::time::timeout(
                CHANGE_WITHIN,
                meta.ensure_linearizable(ReadPolicy::ReadIndex)
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// Proposes the records that turn `before` into `after`, and waits until they are
    /// committed and applied here.
    async fn write_layout(&self, before: &Layout, after: &Layout) -> Result<(), JoinRefusal> {
        let meta = self.group(META_SHARD).ok_or(JoinRefusal::NotLeader(None))?;
        let records = after.changes_from(before);
        let changes = as_changes(&records, before.settings.is_none());
        match tokio::time::timeout(
            CHANGE_WITHIN,
            meta.client_write(ShardCommand::batch(&changes)),
        )
        .await
        {
            Ok(Ok(written)) if written.data.iter().all(|outcome| *outcome == Outcome::Done) => {
                Ok(())
            }
            Ok(Ok(written)) => Err(JoinRefusal::Refused(format!(
                "the layout change was not applied as written: {:?}",
                written.data
            ))),
            Ok(Err(error)) if error.forward_to_leader().is_some() => {
                Err(JoinRefusal::NotLeader(None))
            }
            Ok(Err(error)) => Err(JoinRefusal::Unavailable(format!(
                "the layout change failed: {error}"
            ))),
            // Asking again is safe: a change already made is answered as made.
            Err(_) => Err(JoinRefusal::Unavailable(
                "the layout change was not committed in time (it may yet be)".to_owned(),
            )),
        }
    }

    /// The layout to change, read after everything committed, while this node leads the
    /// metadata group; the refusal to answer otherwise.
    async fn layout_to_change(&self) -> Result<Layout, JoinRefusal> {
        if !self.leads(META_SHARD) {
            let leader = self
                .group(META_SHARD)
                .and_then(|meta| meta.metrics().borrow_watched().current_leader)
                .filter(|&leader| leader != self.id());
            let address = leader.and_then(|leader| {
                self.layout()
                    .members
                    .get(&leader)
                    .map(|member| member.address)
            });
            return Err(JoinRefusal::NotLeader(address));
        }
        if !self.read_current().await {
            return Err(JoinRefusal::NotLeader(None));
        }
        self.read_layout().ok_or_else(|| {
            JoinRefusal::Unavailable("the cluster has not written its first layout yet".to_owned())
        })
    }

    /// Admits node `node` (reached at `address`) if this node leads the metadata group: as an
    /// active member when it joins (`incarnation`: its data directory's), or as one expected
    /// to join (`None`: `CLUSTER ADDNODE`), placed on at once. Asking again with the same
    /// identity is answered as the first time (a joiner that crashed before hearing the
    /// answer).
    async fn admit(
        &self,
        node: NodeId,
        incarnation: Option<u64>,
        address: std::net::SocketAddr,
    ) -> Result<Admitted, JoinRefusal> {
        let _writing = self.layout_writes.lock().await;
        let before = self.layout_to_change().await?;
        let admitted = |layout: &Layout| Admitted {
            settings: layout.settings.unwrap_or(self.settings),
            members: layout
                .present()
                .map(|(id, member)| (id, member.address))
                .collect(),
        };
        let joined = |incarnation: u64| Member {
            address,
            incarnation,
            state: MemberState::Active,
        };
        if let Some(member) = before.members.get(&node) {
            let same_address = member.address == address;
            match (member.state, incarnation) {
                (MemberState::Active, Some(incarnation))
                    if same_address && member.incarnation == incarnation =>
                {
                    return Ok(admitted(&before));
                }
                (MemberState::Expected, None) if same_address => return Ok(admitted(&before)),
                (MemberState::Expected, Some(incarnation)) if same_address => {
                    let mut after = before.clone();
                    after.members.insert(node, joined(incarnation));
                    self.write_layout(&before, &after).await?;
                    tracing::info!(node, %address, "an expected node joined the cluster");
                    self.refresh_layout();
                    return Ok(admitted(&after));
                }
                _ => {
                    return Err(JoinRefusal::Refused(format!(
                        "node id {node} is taken: ids are never reused, not even a removed \
                         node's; start the new node under another --node-id"
                    )));
                }
            }
        }
        if node == 0 {
            return Err(JoinRefusal::Refused("node ids start at 1".to_owned()));
        }
        if before.members.len() >= MAX_MEMBERS {
            return Err(JoinRefusal::Refused(format!(
                "the cluster has had {MAX_MEMBERS} members, the most it records"
            )));
        }
        if let Some((other, _)) = before
            .present()
            .find(|(_, member)| member.address == address)
        {
            return Err(JoinRefusal::Refused(format!(
                "{address} is node {other}'s cluster address"
            )));
        }
        let mut after = before.clone();
        after.members.insert(
            node,
            match incarnation {
                Some(incarnation) => joined(incarnation),
                None => Member {
                    address,
                    incarnation: 0,
                    state: MemberState::Expected,
                },
            },
        );
        after.place();
        self.write_layout(&before, &after).await?;
        tracing::info!(node, %address, "admitted a node to the cluster");
        self.refresh_layout();
        Ok(admitted(&after))
    }

    /// Adds member `node` (expected to join), removes it (draining it first) or forgets it,
    /// if this node leads the metadata group; what was done.
    async fn change_member_here(
        &self,
        node: NodeId,
        change: MemberChange,
    ) -> Result<String, JoinRefusal> {
        if let MemberChange::Add(address) = change {
            self.admit(node, None, address).await?;
            return Ok(format!(
                "node {node} is added: replicas are placed on it, and move there once it is \
                 started with --node-id {node} --cluster-bind {address} --join <a member>"
            ));
        }
        let _writing = self.layout_writes.lock().await;
        let before = self.layout_to_change().await?;
        let Some(member) = before.members.get(&node) else {
            return Err(JoinRefusal::Refused(format!(
                "no node {node} in the cluster"
            )));
        };
        match (member.state, change) {
            (MemberState::Removed, _) => return Ok(format!("node {node} was removed already")),
            (MemberState::Draining, MemberChange::Remove) => {
                return Ok(format!("node {node} is being removed already"));
            }
            _ => {}
        }
        let active = before.active();
        if active.iter().all(|&id| id == node) {
            return Err(JoinRefusal::Refused(format!(
                "node {node} is the last active member: it cannot be removed"
            )));
        }
        let mut after = before.clone();
        let state = match change {
            MemberChange::Forget => MemberState::Removed,
            _ => MemberState::Draining,
        };
        if let Some(member) = after.members.get_mut(&node) {
            member.state = state;
        }
        after.place();
        self.write_layout(&before, &after).await?;
        self.refresh_layout();
        tracing::info!(node, ?change, "a member is leaving the cluster");
        Ok(match change {
            MemberChange::Forget => format!(
                "node {node} is forgotten: its replicas are rebuilt on the other members, and it \
                 is refused if it comes back"
            ),
            _ => format!(
                "node {node} is being removed: its replicas move to the other members, then it leaves"
            ),
        })
    }

    /// Adds, removes or forgets member `node`: here if this node leads the metadata group,
    /// else by asking the node that does.
    ///
    /// # Errors
    /// Why it was not done.
    pub async fn change_member(
        &self,
        node: NodeId,
        change: MemberChange,
    ) -> Result<String, JoinRefusal> {
        match self.change_member_here(node, change).await {
            Err(JoinRefusal::NotLeader(_)) => {}
            done => return done,
        }
        let unavailable = || {
            JoinRefusal::Refused(
                "the cluster's metadata has no leader this node can reach; try again".to_owned(),
            )
        };
        let leader = self
            .group(META_SHARD)
            .and_then(|meta| meta.metrics().borrow_watched().current_leader)
            .filter(|&leader| leader != self.id())
            .ok_or_else(unavailable)?;
        let client = self.peers.get(leader).ok_or_else(unavailable)?;
        match tokio::time::timeout(
            CHANGE_WITHIN * 2,
            client.call(PeerRequest::ChangeMember { node, change }),
        )
        .await
        {
            Ok(Ok(PeerResponse::MemberChanged(Err(JoinRefusal::NotLeader(_))))) => {
                Err(unavailable())
            }
            Ok(Ok(PeerResponse::MemberChanged(Err(JoinRefusal::Unavailable(reason))))) => {
                Err(JoinRefusal::Refused(format!("{reason}; try again")))
            }
            Ok(Ok(PeerResponse::MemberChanged(answer))) => answer,
            _ => Err(unavailable()),
        }
    }

    /// Answers the membership requests of peers and joiners; gives back any other request.
    pub(super) async fn handle_membership(
        &self,
        request: PeerRequest,
    ) -> Result<PeerResponse, PeerRequest> {
        match request {
            PeerRequest::Join {
                node,
                incarnation,
                address,
            } => Ok(PeerResponse::Joined(
                self.admit(node, Some(incarnation), address).await,
            )),
            PeerRequest::ChangeMember { node, change } => Ok(PeerResponse::MemberChanged(
                self.change_member_here(node, change).await,
            )),
            PeerRequest::ShardMembers(shard) => {
                Ok(PeerResponse::ShardMembers(self.settled_members(shard)))
            }
            other => Err(other),
        }
    }

    /// The nodes of `shard`'s membership, voters and learners, if this node leads the shard
    /// and that membership is committed and not mid-change.
    fn settled_members(&self, shard: u16) -> Option<Vec<NodeId>> {
        let group = self.group(shard)?;
        let metrics = group.metrics().borrow_watched().clone();
        let config = &metrics.membership_config;
        let settled = metrics.current_leader == Some(self.id())
            && config.log_id() == metrics.committed_membership_config.log_id()
            && config.membership().get_joint_config().len() == 1;
        settled.then(|| config.membership().nodes().map(|(id, _)| *id).collect())
    }

    /// `shard`'s settled membership, from this node if it leads the shard, else from the
    /// nodes the layout places it on or this replica believes leads it.
    async fn ask_settled_members(&self, shard: u16, layout: &Layout) -> Option<Vec<NodeId>> {
        if let Some(members) = self.settled_members(shard) {
            return Some(members);
        }
        let believed = self
            .group(shard)
            .and_then(|group| group.metrics().borrow_watched().current_leader);
        let mut asked = BTreeSet::new();
        for id in believed.into_iter().chain(layout.replicas(shard)) {
            if id == self.id() || !asked.insert(id) {
                continue;
            }
            let Some(client) = self.peers.get(id) else {
                continue;
            };
            if let Ok(Ok(PeerResponse::ShardMembers(Some(members)))) =
                tokio::time::timeout(ASK_WITHIN, client.call(PeerRequest::ShardMembers(shard)))
                    .await
            {
                return Some(members);
            }
        }
        None
    }

    /// On the leader of `shard`: takes one step to bring the group's membership to the
    /// layout's placement (see the module's documentation). `moving` says whether a data shard
    /// this node leads already has a learner catching up (then no other is added).
    async fn reconcile(&self, shard: u16, group: &ShardGroup, layout: &Layout, moving: &mut bool) {
        let present: BTreeSet<NodeId> = layout.present().map(|(id, _)| id).collect();
        let voters_wanted: BTreeSet<NodeId> = layout
            .replicas(shard)
            .into_iter()
            .filter(|id| present.contains(id))
            .collect();
        if voters_wanted.is_empty() {
            return;
        }
        // Every active member follows the metadata group, as a learner if not a voter (a
        // draining one leaves it with the rest).
        let learners_wanted: BTreeSet<NodeId> = if shard == META_SHARD {
            layout
                .active()
                .into_iter()
                .filter(|id| !voters_wanted.contains(id))
                .collect()
        } else {
            BTreeSet::new()
        };
        let metrics = group.metrics().borrow_watched().clone();
        let config = &metrics.membership_config;
        if config.log_id() != metrics.committed_membership_config.log_id() {
            return;
        }
        // A change cut short (its leader lost after the joint configuration committed) is
        // finished first: to the configuration it was heading for.
        let joint = config.membership().get_joint_config();
        let cut_short = joint.last().filter(|_| joint.len() > 1).cloned();
        let voters: BTreeSet<NodeId> = config.membership().voter_ids().collect();
        let nodes: BTreeSet<NodeId> = config.membership().nodes().map(|(id, _)| *id).collect();
        let caught_up = |id: NodeId| {
            let last = metrics.last_log_index.unwrap_or(0);
            metrics.replication.as_ref().is_some_and(|replication| {
                replication.get(&id).is_some_and(|matched| {
                    matched.map_or(0, |log_id| log_id.index) + CAUGHT_UP_WITHIN >= last
                })
            })
        };
        let joining: Vec<NodeId> = voters_wanted
            .iter()
            .copied()
            .filter(|id| !voters.contains(id))
            .collect();
        if shard != META_SHARD
            && joining
                .iter()
                .any(|&id| nodes.contains(&id) && !caught_up(id))
        {
            *moving = true;
        }
        let change = if let Some(heading_for) = cut_short {
            tracing::info!(shard, to = ?heading_for, "finishing a change of voters cut short");
            let change = ChangeMembers::ReplaceAllVoters(heading_for);
            tokio::time::timeout(CHANGE_WITHIN, group.change_membership(change, false))
                .await
                .map(|written| written.map(|_| ()))
        } else if let Some(&missing) = voters_wanted
            .union(&learners_wanted)
            .find(|id| !nodes.contains(id))
        {
            if shard != META_SHARD && *moving {
                return;
            }
            let Some(member) = layout.members.get(&missing) else {
                return;
            };
            tracing::info!(
                shard,
                node = missing,
                "adding a node to a shard, as a learner"
            );
            if shard != META_SHARD {
                *moving = true;
            }
            let node = BasicNode::new(member.address.to_string());
            tokio::time::timeout(CHANGE_WITHIN, group.add_learner(missing, node, false))
                .await
                .map(|written| written.map(|_| ()))
        } else if voters != voters_wanted {
            if joining.iter().any(|&id| !caught_up(id)) {
                return;
            }
            tracing::info!(shard, from = ?voters, to = ?voters_wanted, "changing a shard's voters");
            let change = ChangeMembers::ReplaceAllVoters(voters_wanted.clone());
            tokio::time::timeout(CHANGE_WITHIN, group.change_membership(change, false))
                .await
                .map(|written| written.map(|_| ()))
        } else {
            let extra: BTreeSet<NodeId> = nodes
                .iter()
                .copied()
                .filter(|id| !voters.contains(id) && !learners_wanted.contains(id))
                .collect();
            if extra.is_empty() {
                return;
            }
            tracing::info!(shard, nodes = ?extra, "removing learners no longer wanted");
            tokio::time::timeout(
                CHANGE_WITHIN,
                group.change_membership(ChangeMembers::RemoveNodes(extra), false),
            )
            .await
            .map(|written| written.map(|_| ()))
        };
        match change {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, shard, "a membership change failed"),
            Err(_) => tracing::warn!(shard, "a membership change took too long; trying again"),
        }
    }

    /// Drops this node's replica of `shard`, which the layout no longer places here, once
    /// the shard's leader says its committed membership no longer has this node.
    async fn drop_if_moved_away(&self, shard: u16, layout: &Layout) {
        // A replica given up while this node may still form its groups again would be
        // re-created pristine by a restart, and could be initialised: kept until then.
        if !self
            .formation_finished
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        let Some(members) = self.ask_settled_members(shard, layout).await else {
            return;
        };
        if members.contains(&self.id()) {
            return;
        }
        let Some(replica) = self.take_replica(shard) else {
            return;
        };
        if let Err(error) = replica.group.shutdown().await {
            tracing::warn!(%error, shard, "a moved replica's group did not shut down cleanly");
        }
        let directory = self.replica_directory(shard);
        match std::fs::remove_dir_all(&directory) {
            Ok(()) => tracing::info!(shard, "the shard moved away; dropped its replica here"),
            Err(error) => tracing::error!(
                %error,
                shard,
                directory = %directory.display(),
                "could not delete a moved replica's files"
            ),
        }
    }

    /// On the metadata group's leader: marks removed each draining member that no shard's
    /// membership has any more.
    async fn settle_drained(&self, layout: &Layout) {
        let draining: Vec<NodeId> = layout
            .members
            .iter()
            .filter(|(_, member)| member.state == MemberState::Draining)
            .map(|(&id, _)| id)
            .collect();
        if draining.is_empty() {
            return;
        }
        let mut holders = BTreeSet::new();
        for shard in std::iter::once(META_SHARD).chain(0..self.shards()) {
            match self.ask_settled_members(shard, layout).await {
                Some(members) => holders.extend(members),
                // Not known yet: nothing is settled this tick.
                None => return,
            }
        }
        let drained: Vec<NodeId> = draining
            .into_iter()
            .filter(|id| !holders.contains(id))
            .collect();
        if drained.is_empty() {
            return;
        }
        let _writing = self.layout_writes.lock().await;
        let Ok(before) = self.layout_to_change().await else {
            return;
        };
        let mut after = before.clone();
        for id in &drained {
            if let Some(member) = after.members.get_mut(id)
                && member.state == MemberState::Draining
            {
                member.state = MemberState::Removed;
            }
        }
        match self.write_layout(&before, &after).await {
            Ok(()) => {
                tracing::info!(nodes = ?drained, "drained members removed from the cluster");
                self.refresh_layout();
            }
            Err(error) => tracing::warn!(%error, "could not mark drained members removed"),
        }
    }
}

/// Asks the members `config.join` names to admit this node, following them to the leader of
/// the metadata group, until one does, one refuses, or [`JOIN_WITHIN`] passes.
pub(super) async fn join(
    config: &NodeConfig,
    handshake: &Handshake,
) -> Result<Admitted, NodeError> {
    let (node, incarnation) = handshake.hello();
    let deadline = tokio::time::Instant::now() + JOIN_WITHIN;
    let mut next = config.join.clone();
    let mut last_failure = String::from("no answer");
    loop {
        let mut hints = Vec::new();
        for &address in &next {
            let request = PeerRequest::Join {
                node,
                incarnation,
                address: config.address,
            };
            match ask_to_join(address, request, CHANGE_WITHIN * 2).await {
                Ok(PeerResponse::Joined(Ok(admitted))) => {
                    tracing::info!(node, via = %address, "admitted to the cluster");
                    return Ok(admitted);
                }
                Ok(PeerResponse::Joined(Err(JoinRefusal::Refused(reason)))) => {
                    return Err(NodeError::Refused(reason));
                }
                Ok(PeerResponse::Joined(Err(JoinRefusal::NotLeader(leader)))) => {
                    hints.extend(leader);
                    last_failure = format!("{address}: the cluster's metadata has no leader yet");
                }
                Ok(PeerResponse::Joined(Err(JoinRefusal::Unavailable(reason)))) => {
                    last_failure = format!("{address}: {reason}");
                }
                Ok(_) => last_failure = format!("{address} answered another request"),
                Err(error) => last_failure = error.to_string(),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(NodeError::NoOneToJoin(last_failure));
        }
        next = hints
            .into_iter()
            .chain(config.join.iter().copied())
            .collect();
        next.dedup();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
