//! Who a node is on disk, and who its peers were: a node whose data directory was wiped is
//! refused instead of rejoining under its old id.
//!
//! Raft takes a node's log and vote to be durable. A node that acknowledged entries and comes
//! back empty under the same id can vote a stale candidate in and so lose writes a majority
//! had acknowledged (openraft's documentation on data loss says the same). So each data
//! directory gets an incarnation, a random number written once when the directory is first
//! used, and each node keeps the incarnation of every peer it has talked to, as first seen.
//! Two nodes exchange theirs when a peer connection opens ([`Handshake`]); a peer that comes
//! back with another incarnation is refused, both ways, so it neither votes nor takes entries.
//! A node that starts on a new data directory asks its peers first and stops with the reason
//! if one refuses it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::placement::NodeId;

/// The file that names a data directory's node and incarnation.
const IDENTITY_FILE: &str = "node-identity";
/// The file of the peers' incarnations, as first seen.
const PEERS_FILE: &str = "peer-incarnations";

/// Why a node's identity could not be read or kept.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing one of the files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A file that is not what kv writes.
    #[error("{0}: not a file kv wrote (edited or damaged)")]
    Malformed(PathBuf),
    /// The data directory belongs to another node.
    #[error(
        "the data directory {directory} belongs to node {owner}, not node {asked}: give each node its own"
    )]
    AnotherNode {
        /// The directory.
        directory: PathBuf,
        /// The node it was made for.
        owner: NodeId,
        /// The node started on it.
        asked: NodeId,
    },
}

/// A node's side of the peer handshake: its own identity and the incarnations of the peers it
/// has seen.
#[derive(Debug)]
pub struct Handshake {
    node: NodeId,
    incarnation: u64,
    /// The cluster's members: the only ids a peer may introduce itself by, so that whatever
    /// reaches the cluster port cannot grow the file of peers.
    members: parking_lot::RwLock<BTreeSet<NodeId>>,
    /// Whether the incarnation was made at this start (a new or wiped data directory).
    fresh: bool,
    peers_path: PathBuf,
    peers: parking_lot::Mutex<BTreeMap<NodeId, u64>>,
    /// When a refusal was last logged: a refused node tries again and again, and the log
    /// tells of it at most every [`TELL_REFUSALS_EVERY`].
    refusal_told: parking_lot::Mutex<Option<std::time::Instant>>,
}

/// How often refusals, given or met, are logged.
const TELL_REFUSALS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Handshake {
    /// Reads node `node`'s identity from `data_dir`, making one if there is none; peers are
    /// taken only under the ids of `members`.
    ///
    /// # Errors
    /// If the files cannot be read or written, are damaged, or name another node.
    pub fn open(
        data_dir: &Path,
        node: NodeId,
        members: impl IntoIterator<Item = NodeId>,
    ) -> Result<Self, IdentityError> {
        std::fs::create_dir_all(data_dir).map_err(io_error(data_dir))?;
        let identity_path = data_dir.join(IDENTITY_FILE);
        let (incarnation, fresh) = match read_optional(&identity_path)? {
            Some(text) => {
                let fields = parse_fields(&text).ok_or_else(|| malformed(&identity_path))?;
                let (Some(&owner), Some(&incarnation)) =
                    (fields.get("node"), fields.get("incarnation"))
                else {
                    return Err(malformed(&identity_path));
                };
                if owner != node {
                    return Err(IdentityError::AnotherNode {
                        directory: data_dir.to_path_buf(),
                        owner,
                        asked: node,
                    });
                }
                (incarnation, false)
            }
            None => {
                // Never zero, so that no default value can pass for one.
                let incarnation = fastrand::u64(1..);
                write_durably(
                    &identity_path,
                    &format!("node={node}\nincarnation={incarnation}\n"),
                )?;
                (incarnation, true)
            }
        };
        let peers_path = data_dir.join(PEERS_FILE);
        let peers = match read_optional(&peers_path)? {
            Some(text) => text
                .lines()
                .map(|line| {
                    let (node, incarnation) = line.split_once(' ')?;
                    Some((node.parse().ok()?, incarnation.parse().ok()?))
                })
                .collect::<Option<BTreeMap<_, _>>>()
                .ok_or_else(|| malformed(&peers_path))?,
            None => BTreeMap::new(),
        };
        Ok(Self {
            node,
            incarnation,
            members: parking_lot::RwLock::new(members.into_iter().collect()),
            fresh,
            peers_path,
            peers: parking_lot::Mutex::new(peers),
            refusal_told: parking_lot::Mutex::new(None),
        })
    }

    /// This node's id and incarnation, as it introduces itself.
    #[must_use]
    pub fn hello(&self) -> (NodeId, u64) {
        (self.node, self.incarnation)
    }

    /// Takes peers under the ids of `members` from now on (the layout's members as they
    /// change), and no other.
    pub fn set_members(&self, members: impl IntoIterator<Item = NodeId>) {
        *self.members.write() = members.into_iter().collect();
    }

    /// Whether a refusal should be logged now (none was in the last [`TELL_REFUSALS_EVERY`]).
    pub fn refusals_to_tell(&self) -> bool {
        let mut told = self.refusal_told.lock();
        let tell = told.is_none_or(|at| at.elapsed() >= TELL_REFUSALS_EVERY);
        if tell {
            *told = Some(std::time::Instant::now());
        }
        tell
    }

    /// Whether this start made the data directory's incarnation.
    #[must_use]
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// Whether `peer`, introducing itself with `incarnation`, is the node this one knew under
    /// that id. One never seen is taken, and kept on disk before it is answered.
    ///
    /// # Errors
    /// The reason, for the log and the peer, when it is not; or if the peer cannot be kept.
    pub fn admit(&self, peer: NodeId, incarnation: u64) -> Result<(), String> {
        if peer == self.node || !self.members.read().contains(&peer) {
            return Err(format!(
                "node {peer} is not a member of node {}'s cluster",
                self.node
            ));
        }
        let mut peers = self.peers.lock();
        match peers.get(&peer) {
            Some(&known) if known == incarnation => Ok(()),
            Some(_) => Err(format!(
                "node {peer}'s data directory is not the one node {} knew (it was wiped or \
                 replaced): rejoining under the same id could lose acknowledged writes; restore \
                 its data directory, or forget it (`kv cluster forget {peer}`) and join a new \
                 node under a new id",
                self.node
            )),
            None => {
                peers.insert(peer, incarnation);
                let text: String = peers
                    .iter()
                    .map(|(node, incarnation)| format!("{node} {incarnation}\n"))
                    .collect();
                write_durably(&self.peers_path, &text).map_err(|error| {
                    peers.remove(&peer);
                    format!("node {} cannot record its peers: {error}", self.node)
                })
            }
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn malformed(path: &Path) -> IdentityError {
    IdentityError::Malformed(path.to_path_buf())
}

fn read_optional(path: &Path) -> Result<Option<String>, IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// `name=number` lines.
fn parse_fields(text: &str) -> Option<BTreeMap<&str, u64>> {
    text.lines()
        .map(|line| {
            let (name, value) = line.split_once('=')?;
            Some((name, value.parse().ok()?))
        })
        .collect()
}

/// Replaces `path` with `text` so that a crash leaves the old file or the new, synced.
pub(super) fn write_durably(path: &Path, text: &str) -> Result<(), IdentityError> {
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary).map_err(io_error(&temporary))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_error(&temporary))?;
    std::fs::rename(&temporary, path).map_err(io_error(path))?;
    let directory = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(directory)
        .and_then(|directory| directory.sync_all())
        .map_err(io_error(directory))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_made_once_and_kept() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let first = Handshake::open(directory.path(), 3, [1, 2, 3]).expect("made");
        assert!(first.is_fresh());
        let again = Handshake::open(directory.path(), 3, [1, 2, 3]).expect("read");
        assert!(!again.is_fresh());
        assert_eq!(again.hello(), first.hello());
        assert_ne!(first.hello().1, 0);
        // Another node's directory is refused.
        let error = Handshake::open(directory.path(), 4, [1, 2, 3]).expect_err("another node's");
        assert!(
            error.to_string().contains("belongs to node 3, not node 4"),
            "{error}"
        );
    }

    #[test]
    fn a_peer_is_known_by_its_first_incarnation_across_restarts() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let node = Handshake::open(directory.path(), 1, [1, 2, 3]).expect("made");
        node.admit(2, 77).expect("first seen");
        node.admit(2, 77).expect("the same again");
        let reopened = Handshake::open(directory.path(), 1, [1, 2, 3]).expect("read");
        reopened.admit(2, 77).expect("still known");
        let refusal = reopened.admit(2, 78).expect_err("another incarnation");
        assert!(refusal.contains("node 2's data directory"), "{refusal}");
        assert!(refusal.contains("wiped"), "{refusal}");
        reopened.admit(3, 5).expect("another peer");
        // Ids outside the cluster, and its own, are refused and not kept.
        assert!(reopened.admit(9, 1).is_err());
        assert!(reopened.admit(1, 1).is_err());
        let text = std::fs::read_to_string(directory.path().join(PEERS_FILE)).expect("file");
        assert_eq!(text, "2 77\n3 5\n");
    }

    #[test]
    fn damaged_files_are_said_to_be_so() {
        let directory = tempfile::tempdir().expect("temporary directory");
        std::fs::write(directory.path().join(IDENTITY_FILE), "node=x\n").expect("written");
        let error = Handshake::open(directory.path(), 1, [1, 2, 3]).expect_err("damaged");
        assert!(error.to_string().contains("not a file kv wrote"), "{error}");
    }
}
