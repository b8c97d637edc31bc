//! A linearizability checker for histories of reads and writes of registers (one per key),
//! after Wing and Gong with Lowe's memoisation: search for an order of the operations that
//! respects real time (an operation that completed before another began comes first) and in
//! which every read returns the last value written before it. Keys are checked one at a time,
//! which is sound since linearizability is local (Herlihy and Wing).
//!
//! Written here because what it checks is small (a register per key, a few hundred operations)
//! and stateright's checker wants the system as a model; it is tested against histories that
//! are and are not linearizable below.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

/// What a client did to one key, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Wrote a value; `acknowledged`: the store said it was done. An unacknowledged write
    /// (an error or no answer) may or may not have taken effect.
    Write { value: Vec<u8>, acknowledged: bool },
    /// Read a value (`None`: the key was absent).
    Read { value: Option<Vec<u8>> },
}

/// One operation: when it was sent, when its answer came (`None`: never, as far as the client
/// knows), and what it was.
#[derive(Debug, Clone)]
pub struct Operation {
    pub key: Vec<u8>,
    pub invoked: Instant,
    pub completed: Option<Instant>,
    pub action: Action,
}

/// The operations of every client, as they were recorded.
#[derive(Debug, Default)]
pub struct History {
    pub operations: Vec<Operation>,
}

impl History {
    /// Checks every key's operations; `Err` names a key whose history no order explains.
    pub fn check(&self) -> Result<usize, String> {
        let mut by_key: BTreeMap<&[u8], Vec<&Operation>> = BTreeMap::new();
        for operation in &self.operations {
            by_key.entry(&operation.key).or_default().push(operation);
        }
        let mut checked = 0;
        for (key, operations) in by_key {
            if !linearizable(&operations) {
                return Err(format!(
                    "the history of key {:?} is not linearizable: {operations:#?}",
                    String::from_utf8_lossy(key)
                ));
            }
            checked += operations.len();
        }
        Ok(checked)
    }
}

/// An operation as the search sees it: a read must see `value`; an unacknowledged write may be
/// left out; its end is `None` for "no later than the end of time".
struct Step<'a> {
    invoked: Instant,
    completed: Option<Instant>,
    write: bool,
    value: Option<&'a [u8]>,
    required: bool,
}

/// A search's position: the steps placed (the index of the first one not placed, and which are
/// placed from there to the last placed) and the key's value after them.
type Placed<'a> = (usize, Vec<bool>, Option<&'a [u8]>);

/// Whether one key's operations (starting from an absent key) have a linearization.
fn linearizable(operations: &[&Operation]) -> bool {
    // An unacknowledged write whose value no read returned is left out: placed anywhere, it
    // is overwritten before any read (none returns its value), so leaving it out changes no
    // read. Kept, each would be one more choice for the search, which grows with the
    // combinations of such writes pending at once (a run under faults makes hundreds).
    let read: HashSet<&[u8]> = operations
        .iter()
        .filter_map(|operation| match &operation.action {
            Action::Read { value: Some(value) } if operation.completed.is_some() => {
                Some(value.as_slice())
            }
            _ => None,
        })
        .collect();
    let mut steps: Vec<Step<'_>> = operations
        .iter()
        .filter_map(|operation| match &operation.action {
            Action::Write {
                value,
                acknowledged: false,
            } if !read.contains(value.as_slice()) => None,
            Action::Write {
                value,
                acknowledged,
            } => Some(Step {
                invoked: operation.invoked,
                completed: if *acknowledged {
                    operation.completed
                } else {
                    None
                },
                write: true,
                value: Some(value),
                required: *acknowledged,
            }),
            // A read that got no answer says nothing.
            Action::Read { value } => operation.completed.map(|completed| Step {
                invoked: operation.invoked,
                completed: Some(completed),
                write: false,
                value: value.as_deref(),
                required: true,
            }),
        })
        .collect();
    steps.sort_by_key(|step| step.invoked);
    let mut done = vec![false; steps.len()];
    let mut seen = HashSet::new();
    search(&steps, &mut done, None, &mut seen)
}

/// Depth-first: linearize next any operation not yet placed that began before every
/// unplaced operation's end, and whose effect fits `state`.
fn search<'a>(
    steps: &[Step<'a>],
    done: &mut Vec<bool>,
    state: Option<&'a [u8]>,
    seen: &mut HashSet<Placed<'a>>,
) -> bool {
    if steps
        .iter()
        .zip(done.iter())
        .all(|(step, &placed)| placed || !step.required)
    {
        return true;
    }
    // What is placed, from the first step not placed to the last placed: the steps before
    // are all placed, those after none, so this names the set in the window's size.
    let first_open = done.iter().position(|placed| !placed).unwrap_or(done.len());
    let last_placed = done
        .iter()
        .rposition(|placed| *placed)
        .map_or(0, |last| last + 1);
    let window = done[first_open..last_placed.max(first_open)].to_vec();
    if !seen.insert((first_open, window, state)) {
        return false;
    }
    let first_end = steps
        .iter()
        .zip(done.iter())
        .filter(|(_, placed)| !**placed)
        .filter_map(|(step, _)| step.completed)
        .min();
    for index in 0..steps.len() {
        if done[index] {
            continue;
        }
        let step = &steps[index];
        if first_end.is_some_and(|end| step.invoked > end) {
            // Began after some unplaced operation ended: cannot come before it.
            break;
        }
        let next_state = if step.write {
            step.value
        } else if step.value == state {
            state
        } else {
            continue;
        };
        done[index] = true;
        if search(steps, done, next_state, seen) {
            return true;
        }
        done[index] = false;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(base: Instant, from: u64, to: Option<u64>) -> (Instant, Option<Instant>) {
        (
            base + Duration::from_millis(from),
            to.map(|to| base + Duration::from_millis(to)),
        )
    }

    fn op(base: Instant, from: u64, to: Option<u64>, action: Action) -> Operation {
        let (invoked, completed) = at(base, from, to);
        Operation {
            key: b"k".to_vec(),
            invoked,
            completed,
            action,
        }
    }

    fn write(value: &str, acknowledged: bool) -> Action {
        Action::Write {
            value: value.as_bytes().to_vec(),
            acknowledged,
        }
    }

    fn read(value: Option<&str>) -> Action {
        Action::Read {
            value: value.map(|value| value.as_bytes().to_vec()),
        }
    }

    #[test]
    fn a_read_of_an_overwritten_value_after_the_overwrite_is_caught() {
        let base = Instant::now();
        let stale = History {
            operations: vec![
                op(base, 0, Some(1), write("a", true)),
                op(base, 2, Some(3), write("b", true)),
                op(base, 4, Some(5), read(Some("a"))),
            ],
        };
        assert!(stale.check().is_err());
        let concurrent = History {
            operations: vec![
                op(base, 0, Some(1), write("a", true)),
                op(base, 2, Some(6), write("b", true)),
                op(base, 4, Some(5), read(Some("a"))),
            ],
        };
        assert!(concurrent.check().is_ok());
    }

    #[test]
    fn an_unacknowledged_write_may_or_may_not_have_happened_but_not_twice() {
        let base = Instant::now();
        let seen = History {
            operations: vec![
                op(base, 0, Some(1), write("a", true)),
                op(base, 2, None, write("b", false)),
                op(base, 4, Some(5), read(Some("b"))),
                op(base, 6, Some(7), read(Some("b"))),
            ],
        };
        assert!(seen.check().is_ok());
        let unseen = History {
            operations: vec![
                op(base, 0, Some(1), write("a", true)),
                op(base, 2, None, write("b", false)),
                op(base, 4, Some(5), read(Some("a"))),
            ],
        };
        assert!(unseen.check().is_ok());
        let flickers = History {
            operations: vec![
                op(base, 0, Some(1), write("a", true)),
                op(base, 2, None, write("b", false)),
                op(base, 4, Some(5), read(Some("b"))),
                op(base, 6, Some(7), read(Some("a"))),
            ],
        };
        assert!(flickers.check().is_err());
    }

    #[test]
    fn many_unacknowledged_writes_nobody_read_are_checked_at_once() {
        // Each unacknowledged write is pending to the end; searched, the combinations of 24
        // placed or not are 2^24. Left out, the rest is checked at once, and a stale read
        // after them is still caught.
        let base = Instant::now();
        let mut operations = vec![op(base, 0, Some(1), write("a", true))];
        for n in 0..24 {
            operations.push(op(base, 2 + n, None, write(&format!("lost {n}"), false)));
        }
        operations.push(op(base, 30, Some(31), write("b", true)));
        operations.push(op(base, 32, Some(33), read(Some("b"))));
        let fresh = History {
            operations: operations.clone(),
        };
        assert!(fresh.check().is_ok());
        operations.push(op(base, 34, Some(35), read(Some("a"))));
        let stale = History { operations };
        assert!(stale.check().is_err());
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        let base = Instant::now();
        let lost = History {
            operations: vec![
                op(base, 0, Some(1), write("a", true)),
                op(base, 2, Some(3), read(None)),
            ],
        };
        assert!(lost.check().is_err());
    }
}
