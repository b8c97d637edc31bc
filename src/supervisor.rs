//! Starting tasks, noticing how they ended, and the restart policy.
//!
//! Two supervisors, as in the guide:
//! - [`BucketSupervisor`] (the guide's `DynamicSupervisor` with `restart: :temporary`) starts
//!   buckets and never restarts them: a bucket that crashed is gone with its data, and the
//!   registry, which monitors it, forgets its name. Reviving it empty behind the user's back
//!   would be silent data loss.
//! - [`supervise_one_for_all`] (the guide's `KV.Supervisor`, `:one_for_all`) restarts the
//!   registry loop *together with* the buckets it owned: the buckets live inside the loop's
//!   bucket supervisor, so when the loop dies they are aborted with it and the new loop starts
//!   with none of them (a durable registry reloads them from disk as new buckets). There is
//!   never a registry pointing at buckets it does not own.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;

use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::Instant;

use crate::config::RestartIntensity;

/// How a supervised task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// It returned: stopped on request, or its work was done.
    Normal,
    /// It panicked; the panic's message, if it had one.
    Panicked(String),
    /// It was aborted from outside (its supervisor stopped).
    Aborted,
}

impl ExitReason {
    fn from_join_error(error: JoinError) -> Self {
        match error.try_into_panic() {
            Ok(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|text| (*text).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic without a message".to_owned());
                Self::Panicked(message)
            }
            Err(_) => Self::Aborted,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Normal => f.write_str("stopped"),
            Self::Panicked(message) => write!(f, "crashed: {message}"),
            Self::Aborted => f.write_str("aborted"),
        }
    }
}

/// A child task's end, as its monitor hears of it (the guide's `:DOWN` message).
#[derive(Debug)]
pub struct ChildExit {
    /// The task that ended.
    pub task: Id,
    /// Why.
    pub reason: ExitReason,
}

/// Starts temporary children and reports each one's end. Dropping it aborts every child.
#[derive(Default)]
pub struct BucketSupervisor {
    children: JoinSet<()>,
}

impl BucketSupervisor {
    /// Spawns `child`; its end will be reported by [`next_exit`](Self::next_exit).
    pub fn start_child(&mut self, child: impl Future<Output = ()> + Send + 'static) -> Id {
        self.children.spawn(child).id()
    }

    /// Children started and not yet reported as ended.
    #[must_use]
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// The next child to end; `None` at once if there are no children.
    pub async fn next_exit(&mut self) -> Option<ChildExit> {
        let result = self.children.join_next_with_id().await?;
        Some(match result {
            Ok((task, ())) => ChildExit {
                task,
                reason: ExitReason::Normal,
            },
            Err(error) => ChildExit {
                task: error.id(),
                reason: ExitReason::from_join_error(error),
            },
        })
    }
}

/// Counts restarts in a sliding window and says when there have been too many.
#[derive(Debug)]
pub struct RestartWindow {
    intensity: RestartIntensity,
    recent: VecDeque<Instant>,
}

impl RestartWindow {
    /// An empty window for `intensity`.
    #[must_use]
    pub fn new(intensity: RestartIntensity) -> Self {
        Self {
            intensity,
            recent: VecDeque::with_capacity(intensity.max_restarts + 1),
        }
    }

    /// Records a restart at `now`; returns `false` when it is one too many and the supervisor
    /// should give up.
    pub fn allow(&mut self, now: Instant) -> bool {
        while self
            .recent
            .front()
            .is_some_and(|&then| now.duration_since(then) > self.intensity.period)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        self.recent.len() <= self.intensity.max_restarts
    }
}

/// A group of tasks that [`supervise_one_for_all`] starts, and restarts, as one.
pub trait ChildGroup: Send + 'static {
    /// Starts the group; returns its main task, or `None` when there is nothing to start for.
    fn start(&mut self) -> Option<tokio::task::JoinHandle<()>>;
    /// Called after the main task ended, however it ended, before any restart.
    fn clean_up(&mut self);
}

/// Watches `first`, the group's running main task, and restarts the group whenever that task
/// panics, until it returns normally, is aborted, `start` declines, or it fails more often
/// than `intensity` allows.
pub async fn supervise_one_for_all(
    mut group: impl ChildGroup,
    first: Option<tokio::task::JoinHandle<()>>,
    intensity: RestartIntensity,
) {
    let mut window = RestartWindow::new(intensity);
    let mut running = first;
    while let Some(main_task) = running {
        let reason = match main_task.await {
            Ok(()) => ExitReason::Normal,
            Err(error) => ExitReason::from_join_error(error),
        };
        group.clean_up();
        let ExitReason::Panicked(message) = reason else {
            break;
        };
        if !window.allow(Instant::now()) {
            tracing::error!(
                %message,
                max_restarts = intensity.max_restarts,
                period = ?intensity.period,
                "registry failed too often; giving up"
            );
            break;
        }
        tracing::error!(%message, "registry crashed; restarting it with its buckets");
        running = group.start();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_window_allows_max_restarts_then_refuses() {
        let intensity = RestartIntensity {
            max_restarts: 2,
            period: Duration::from_secs(5),
        };
        let mut window = RestartWindow::new(intensity);
        let start = Instant::now();
        assert!(window.allow(start));
        assert!(window.allow(start + Duration::from_secs(1)));
        assert!(!window.allow(start + Duration::from_secs(2)));
    }

    #[test]
    fn restarts_older_than_the_period_are_forgotten() {
        let intensity = RestartIntensity {
            max_restarts: 1,
            period: Duration::from_secs(5),
        };
        let mut window = RestartWindow::new(intensity);
        let start = Instant::now();
        assert!(window.allow(start));
        assert!(window.allow(start + Duration::from_secs(6)));
        assert!(!window.allow(start + Duration::from_secs(7)));
    }

    #[tokio::test]
    async fn the_supervisor_reports_how_children_ended() {
        let mut supervisor = BucketSupervisor::default();
        let normal = supervisor.start_child(async {});
        let panicked = supervisor.start_child(async { panic!("boom") });
        let mut exits = Vec::new();
        while let Some(exit) = supervisor.next_exit().await {
            exits.push(exit);
        }
        exits.sort_by_key(|exit| exit.task != normal);
        assert_eq!(exits[0].task, normal);
        assert_eq!(exits[0].reason, ExitReason::Normal);
        assert_eq!(exits[1].task, panicked);
        assert_eq!(exits[1].reason, ExitReason::Panicked("boom".into()));
    }
}
