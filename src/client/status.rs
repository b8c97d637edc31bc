//! `kv cluster status`: the cluster as its nodes report it. The members and their client
//! addresses come from one node's `CLUSTER NODES`; then every member is asked for its
//! `INFO cluster`, and each shard is shown as its leader reports it: term, indexes, and each
//! follower's lag in entries and its last contact with the leader; a shard whose voters are
//! not yet the nodes the layout places it on is a move in progress.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::{Client, ClientError};
use crate::cluster::slot::slots_of;
use crate::protocol::ReplyValue;

/// How long one node has to connect and answer before it is shown as down.
const NODE_WITHIN: Duration = Duration::from_secs(2);

/// One member as `CLUSTER NODES` lists it, and what it said of itself.
struct Member {
    id: u64,
    /// Its client address, if the node that listed it knew it.
    address: Option<String>,
    /// Its `INFO cluster`, if it answered.
    report: Option<NodeReport>,
}

/// A node's `INFO cluster`.
#[derive(Default)]
struct NodeReport {
    shards: u16,
    /// Its line for each shard it holds.
    held: BTreeMap<u16, ShardLine>,
}

/// One `shard_N:` line of `INFO`.
#[derive(Default, Clone)]
struct ShardLine {
    leads: bool,
    term: u64,
    last_log: u64,
    committed: u64,
    applied: u64,
    /// Each follower's matched index and its last contact (as the leader reports them).
    followers: BTreeMap<u64, (u64, String)>,
    /// The shard's voters, as this replica's membership has them.
    voters: Vec<u64>,
    /// The nodes the layout places the shard on.
    placed: Vec<u64>,
}

/// The status of the cluster that `addresses` (tried in turn) belong to, as text.
///
/// # Errors
/// If none of `addresses` answers `CLUSTER NODES`, or the node is not in a cluster.
pub async fn cluster_status(
    addresses: &[String],
    password: Option<&str>,
) -> Result<String, ClientError> {
    let mut listing = None;
    let mut last_error = None;
    for address in addresses {
        match ask(address, password, &[b"CLUSTER", b"NODES"]).await {
            Ok(ReplyValue::Bulk(Some(text))) => {
                listing = Some(String::from_utf8_lossy(&text).into_owned());
                break;
            }
            Ok(ReplyValue::Error(message)) => return Err(ClientError::Server(message)),
            Ok(_) => return Err(ClientError::Server("CLUSTER NODES gave no text".into())),
            Err(error) => last_error = Some(error),
        }
    }
    let Some(listing) = listing else {
        return Err(last_error.unwrap_or_else(|| ClientError::Server("no node given".into())));
    };
    let mut members: Vec<Member> = listing.lines().filter_map(parse_node_line).collect();
    for member in &mut members {
        if let Some(address) = &member.address
            && let Ok(ReplyValue::Bulk(Some(info))) =
                ask(address, password, &[b"INFO", b"cluster"]).await
        {
            member.report = Some(parse_info(&String::from_utf8_lossy(&info)));
        }
    }
    Ok(render(&members))
}

/// How long a change to the membership may take to be answered.
const CHANGE_WITHIN: Duration = Duration::from_secs(15);

/// Sends `request` to the first of `addresses` that answers, and gives its answer as text
/// (for `kv cluster remove-node` and `forget`).
///
/// # Errors
/// If no node answers, or the one that does answers with an error.
pub async fn ask_any(
    addresses: &[String],
    password: Option<&str>,
    request: &[&[u8]],
) -> Result<String, ClientError> {
    let mut last_error = ClientError::Server("no node given".into());
    for address in addresses {
        match ask_within(address, password, request, CHANGE_WITHIN).await {
            Ok(ReplyValue::Error(message)) => return Err(ClientError::Server(message)),
            Ok(ReplyValue::Bulk(Some(text))) => {
                return Ok(String::from_utf8_lossy(&text).into_owned());
            }
            Ok(ReplyValue::Simple(text)) => return Ok(text),
            Ok(other) => return Ok(format!("{other:?}")),
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

/// Connects to `address`, authenticates, and sends one request, all within [`NODE_WITHIN`].
async fn ask(
    address: &str,
    password: Option<&str>,
    request: &[&[u8]],
) -> Result<ReplyValue, ClientError> {
    ask_within(address, password, request, NODE_WITHIN).await
}

/// Connects to `address`, authenticates, and sends one request, all within `within`.
async fn ask_within(
    address: &str,
    password: Option<&str>,
    request: &[&[u8]],
    within: Duration,
) -> Result<ReplyValue, ClientError> {
    let exchange = async {
        let mut client = Client::connect(address).await?;
        if let Some(password) = password {
            client.call(&[b"AUTH", password.as_bytes()]).await?;
        }
        client.call(request).await
    };
    tokio::time::timeout(within, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{address} did not answer within {within:?}"),
            )))
        })
}

/// `<40 hex digits> <ip:port>@<cport> <flags> …` as a member.
fn parse_node_line(line: &str) -> Option<Member> {
    let mut fields = line.split_whitespace();
    let id = u64::from_str_radix(fields.next()?, 16).ok()?;
    let address = fields.next()?.split('@').next()?;
    Some(Member {
        id,
        address: (!address.starts_with(':')).then(|| address.to_owned()),
        report: None,
    })
}

fn parse_info(info: &str) -> NodeReport {
    let mut report = NodeReport::default();
    for line in info.lines() {
        let Some((name, value)) = line.trim_end().split_once(':') else {
            continue;
        };
        if name == "cluster_shards" {
            report.shards = value.parse().unwrap_or(0);
        } else if let Some(shard) = name.strip_prefix("shard_").and_then(|s| s.parse().ok()) {
            report.held.insert(shard, parse_shard_line(value));
        }
    }
    report
}

/// `role=leader,leader=1,term=3,…,matched_2=10,…,last_contact_ms_2=15` as a [`ShardLine`].
fn parse_shard_line(value: &str) -> ShardLine {
    let mut line = ShardLine::default();
    let mut contacts = BTreeMap::new();
    for field in value.split(',') {
        let Some((name, value)) = field.split_once('=') else {
            continue;
        };
        let number = || value.parse().unwrap_or(0);
        match name {
            "role" => line.leads = value == "leader",
            "term" => line.term = number(),
            "last_log" => line.last_log = number(),
            "committed" => line.committed = number(),
            "applied" => line.applied = number(),
            "voters" | "placed" => {
                let nodes = value.split('+').filter_map(|id| id.parse().ok()).collect();
                if name == "voters" {
                    line.voters = nodes;
                } else {
                    line.placed = nodes;
                }
            }
            _ => {
                if let Some(node) = name.strip_prefix("matched_").and_then(|n| n.parse().ok()) {
                    line.followers.insert(node, (number(), String::new()));
                } else if let Some(node) = name
                    .strip_prefix("last_contact_ms_")
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    contacts.insert(node, value.to_owned());
                }
            }
        }
    }
    for (node, (_, contact)) in &mut line.followers {
        if let Some(ago) = contacts.remove(node) {
            *contact = ago;
        }
    }
    line
}

fn render(members: &[Member]) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "nodes");
    for member in members {
        let address = member.address.as_deref().unwrap_or("(address unknown)");
        match &member.report {
            Some(report) => {
                let led = report.held.values().filter(|line| line.leads).count();
                let _ = writeln!(
                    text,
                    "  {:<4} {address:<22} up    leads {led}, follows {}",
                    member.id,
                    report.held.len() - led
                );
            }
            None => {
                let _ = writeln!(text, "  {:<4} {address:<22} down", member.id);
            }
        }
    }
    let shards = members
        .iter()
        .filter_map(|member| member.report.as_ref())
        .map(|report| report.shards)
        .max()
        .unwrap_or(0);
    let _ = writeln!(text, "shards");
    let _ = writeln!(
        text,
        "  {:<6} {:<12} {:<7} {:<6} {:<10} {:<10} followers: entries behind (last contact)",
        "shard", "slots", "leader", "term", "committed", "applied"
    );
    for shard in 0..shards {
        let slots = slots_of(shard, shards);
        let slots = format!("{}-{}", slots.start(), slots.end());
        match leading_line(members, shard) {
            Some((id, line)) => {
                // openraft's replication progress includes the leader's own.
                let followers: Vec<String> = line
                    .followers
                    .iter()
                    .filter(|(node, _)| **node != id)
                    .map(|(node, (matched, contact))| {
                        let behind = line.last_log.saturating_sub(*matched);
                        let contact = match contact.as_str() {
                            "" => String::new(),
                            "never" => " (never)".to_owned(),
                            ago => format!(" ({ago} ms)"),
                        };
                        format!("{node}: {behind}{contact}")
                    })
                    .collect();
                let _ = writeln!(
                    text,
                    "  {shard:<6} {slots:<12} {id:<7} {:<6} {:<10} {:<10} {}",
                    line.term,
                    line.committed,
                    line.applied,
                    followers.join(", ")
                );
            }
            None => {
                let _ = writeln!(
                    text,
                    "  {shard:<6} {slots:<12} none    (no leader: requests for it wait, then TRYAGAIN)"
                );
            }
        }
    }
    let moves: Vec<String> = (0..shards)
        .filter_map(|shard| {
            let (_, line) = leading_line(members, shard)?;
            (line.voters != line.placed).then(|| {
                format!(
                    "  shard {shard}: voters {:?} moving to {:?}",
                    line.voters, line.placed
                )
            })
        })
        .collect();
    if moves.is_empty() {
        let _ = writeln!(text, "moves: none");
    } else {
        let _ = writeln!(text, "moves");
        for line in moves {
            let _ = writeln!(text, "{line}");
        }
    }
    text
}

/// The line of the leader of the highest term that any node reports for `shard`.
fn leading_line(members: &[Member], shard: u16) -> Option<(u64, &ShardLine)> {
    members
        .iter()
        .filter_map(|member| {
            let line = member.report.as_ref()?.held.get(&shard)?;
            line.leads.then_some((member.id, line))
        })
        .max_by_key(|(_, line)| line.term)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaders_line_gives_its_followers_lag() {
        let line = parse_shard_line(
            "role=leader,leader=1,term=3,last_log=20,committed=20,applied=20,matched_1=20,matched_2=20,matched_3=12,last_contact_ms_1=0,last_contact_ms_2=5,last_contact_ms_3=never",
        );
        assert!(line.leads);
        assert_eq!(line.term, 3);
        assert_eq!(line.followers[&2], (20, "5".to_owned()));
        assert_eq!(line.followers[&3], (12, "never".to_owned()));
        let members = vec![
            Member {
                id: 1,
                address: Some("127.0.0.1:4041".into()),
                report: Some(NodeReport {
                    shards: 1,
                    held: BTreeMap::from([(0, line)]),
                }),
            },
            Member {
                id: 2,
                address: None,
                report: None,
            },
        ];
        let text = render(&members);
        assert!(text.contains("up    leads 1, follows 0"), "{text}");
        assert!(text.contains("(address unknown)      down"), "{text}");
        assert!(text.contains(" 2: 0 (5 ms), 3: 8 (never)"), "{text}");
        assert!(
            !text.contains("1: 0"),
            "the leader is not its own follower: {text}"
        );
        assert!(text.contains("0-16383"), "{text}");
    }

    #[test]
    fn node_lines_give_ids_and_addresses() {
        let member = parse_node_line(&format!(
            "{:040x} 127.0.0.1:4042@0 master - 0 0 3 connected 0-5460",
            2
        ))
        .expect("a member");
        assert_eq!(member.id, 2);
        assert_eq!(member.address.as_deref(), Some("127.0.0.1:4042"));
        let unknown = parse_node_line(&format!("{:040x} :0@0 master - 0 0 3 connected", 3))
            .expect("a member");
        assert_eq!(unknown.address, None);
    }
}
