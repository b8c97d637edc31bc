//! How much CPU the server may use, decided where it runs: the cores it may run on and any
//! cgroup CPU quota (a container limited to a fraction of a core).
//!
//! Worker threads: one per core the process may run on but one, at least one, and no more than
//! the quota's whole cores. The core left over is for what sends the requests and carries
//! them: the kernel's network stack and, on a laptop or a test box, the clients themselves;
//! Redis's advice for its I/O threads is the same (four cores: two or three threads). One
//! worker answers more than a million requests a second, so a small machine loses little by
//! it, and a busy worker that shares its core with the load generator loses more
//! (docs/performance.md has the measurements). Under a quota the other processes are not
//! billed to it: every whole core of it may be a worker.
//!
//! Busy polling spends CPU while it waits: under a quota that CPU is billed and taken from
//! requests, so it is on only when the quota leaves a core beyond the workers'.
//!
//! Read by hand: std's `available_parallelism` folds the affinity mask and the quota into one
//! rounded figure, and no well-kept crate exposes the two (`num_cpus` rounds too). Only files
//! the kernel documents are read: `Cpus_allowed_list` in `/proc/self/status`, cgroup v2's
//! `cpu.max` and v1's `cpu.cfs_quota_us`/`cpu.cfs_period_us`, on the process's cgroup and each
//! of its ancestors (the smallest quota binds).

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

/// The CPU this process may use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuBudget {
    /// Cores the process may run on (its CPU affinity), at least one.
    pub cores: usize,
    /// The cgroup CPU quota in cores (`0.5`: half of one core's time), if one is set.
    pub quota: Option<f64>,
}

impl CpuBudget {
    /// Reads this process's budget from the kernel.
    pub fn of_this_process() -> Self {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let cores = status
            .lines()
            .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
            .and_then(|list| count_cpus(list.trim()))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, NonZeroUsize::get));
        Self {
            cores: cores.max(1),
            quota: quota_cores(&cgroups, Path::new("/sys/fs/cgroup")),
        }
    }

    /// Worker threads by default: a core left for the network and the clients, at least one,
    /// at most the quota's whole cores.
    pub fn workers(&self) -> usize {
        let spare_one = self.cores.saturating_sub(1).max(1);
        let quota = self
            .quota
            .map_or(usize::MAX, |quota| quota.floor() as usize);
        spare_one.min(quota).max(1)
    }

    /// Whether `workers` threads may busy-poll: not when a quota would bill the polling to
    /// the requests (it must leave a whole core beyond the workers).
    pub fn allows_busy_polling(&self, workers: usize) -> bool {
        self.quota.is_none_or(|quota| quota >= workers as f64 + 1.0)
    }

    /// The budget in words, for the start-up log.
    pub fn describe(&self) -> String {
        let cores = match self.cores {
            1 => "1 core".to_owned(),
            n => format!("{n} cores"),
        };
        match self.quota {
            Some(quota) => format!("of {cores}, under a CPU quota of {quota:.2} cores"),
            None => format!("of {cores}"),
        }
    }
}

/// The number of CPUs in a kernel CPU list such as `0-3,8,10-11`.
fn count_cpus(list: &str) -> Option<usize> {
    let mut count = 0;
    for range in list.split(',').filter(|range| !range.is_empty()) {
        count += match range.split_once('-') {
            Some((first, last)) => {
                let (first, last): (usize, usize) = (first.parse().ok()?, last.parse().ok()?);
                last.checked_sub(first)? + 1
            }
            None => {
                range.parse::<usize>().ok()?;
                1
            }
        };
    }
    (count > 0).then_some(count)
}

/// The smallest CPU quota, in cores, over the cgroups listed in `cgroups` (the text of
/// `/proc/self/cgroup`) and their ancestors, under the cgroup file systems at `root`.
fn quota_cores(cgroups: &str, root: &Path) -> Option<f64> {
    let mut smallest: Option<f64> = None;
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        let quota = if id == "0" && controllers.is_empty() {
            // v2: one hierarchy, mounted at the root (or at `unified` beside v1's).
            [root.to_path_buf(), root.join("unified")]
                .into_iter()
                .filter(|mount| mount.join("cgroup.controllers").exists())
                .find_map(|mount| smallest_along(&mount, relative, read_cpu_max))
        } else if controllers.split(',').any(|controller| controller == "cpu") {
            // v1: the cpu controller's own hierarchy, often mounted together with cpuacct.
            ["cpu", "cpu,cpuacct", "cpuacct,cpu"]
                .into_iter()
                .map(|name| root.join(name))
                .find(|mount| mount.is_dir())
                .and_then(|mount| smallest_along(&mount, relative, read_cfs_quota))
        } else {
            None
        };
        if let Some(quota) = quota {
            smallest = Some(smallest.map_or(quota, |other| other.min(quota)));
        }
    }
    smallest
}

/// The smallest quota `read` finds in the cgroup at `mount`/`relative` and its ancestors up to
/// `mount`. Inside a container the listed path may not exist under the mount (no cgroup
/// namespace): the ancestors that do are read.
fn smallest_along(mount: &Path, relative: &str, read: fn(&Path) -> Option<f64>) -> Option<f64> {
    let mut directory: PathBuf = mount.join(relative);
    let mut smallest: Option<f64> = None;
    loop {
        if let Some(quota) = read(&directory) {
            smallest = Some(smallest.map_or(quota, |other| other.min(quota)));
        }
        if directory.as_path() == mount || !directory.pop() {
            return smallest;
        }
    }
}

/// cgroup v2: `cpu.max` holds `$MAX $PERIOD`, `max` for no limit.
fn read_cpu_max(directory: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(directory.join("cpu.max")).ok()?;
    let mut fields = text.split_whitespace();
    let quota: f64 = fields.next()?.parse().ok()?;
    let period: f64 = fields.next()?.parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// cgroup v1: `cpu.cfs_quota_us` (-1 for no limit) over `cpu.cfs_period_us`.
fn read_cfs_quota(directory: &Path) -> Option<f64> {
    let read = |name: &str| -> Option<f64> {
        std::fs::read_to_string(directory.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let quota = read("cpu.cfs_quota_us")?;
    let period = read("cpu.cfs_period_us")?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("directory");
        std::fs::write(path, text).expect("file");
    }

    #[test]
    fn v2_quota_is_the_smallest_along_the_path() {
        let root = tempfile::tempdir().expect("temporary directory");
        write(&root.path().join("cgroup.controllers"), "cpu memory");
        write(&root.path().join("kube/cpu.max"), "150000 100000\n");
        write(&root.path().join("kube/pod/cpu.max"), "max 100000\n");
        let quota = quota_cores("0::/kube/pod\n", root.path());
        assert_eq!(quota, Some(1.5));
        // No quota anywhere: none.
        write(&root.path().join("kube/cpu.max"), "max 100000\n");
        assert_eq!(quota_cores("0::/kube/pod\n", root.path()), None);
    }

    #[test]
    fn v1_quota_is_read_from_the_cpu_hierarchy() {
        let root = tempfile::tempdir().expect("temporary directory");
        let group = root.path().join("cpu,cpuacct/docker/abc");
        write(&group.join("cpu.cfs_quota_us"), "50000\n");
        write(&group.join("cpu.cfs_period_us"), "100000\n");
        write(&root.path().join("cpu,cpuacct/cpu.cfs_quota_us"), "-1\n");
        write(
            &root.path().join("cpu,cpuacct/cpu.cfs_period_us"),
            "100000\n",
        );
        let cgroups = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n";
        assert_eq!(quota_cores(cgroups, root.path()), Some(0.5));
        // A path that is not under the mount (a container without a cgroup namespace): the
        // root's unlimited quota is all there is.
        assert_eq!(quota_cores("3:cpu,cpuacct:/elsewhere\n", root.path()), None);
    }

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpus("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpus("0"), Some(1));
        assert_eq!(count_cpus(""), None);
        assert_eq!(count_cpus("3-1"), None);
        assert_eq!(count_cpus("x"), None);
    }

    #[test]
    fn workers_leave_a_core_and_stay_within_the_quota() {
        let budget = |cores, quota| CpuBudget { cores, quota };
        assert_eq!(budget(1, None).workers(), 1);
        assert_eq!(budget(2, None).workers(), 1);
        assert_eq!(budget(16, None).workers(), 15);
        // A quota is the process's own: all of its whole cores may work.
        assert_eq!(budget(64, Some(4.0)).workers(), 4);
        assert_eq!(budget(64, Some(2.5)).workers(), 2);
        assert_eq!(budget(2, Some(0.5)).workers(), 1);
        assert_eq!(budget(2, Some(8.0)).workers(), 1);
    }

    #[test]
    fn a_quota_without_a_spare_core_turns_busy_polling_off() {
        let half = CpuBudget {
            cores: 1,
            quota: Some(0.5),
        };
        assert!(!half.allows_busy_polling(half.workers()));
        let unlimited = CpuBudget {
            cores: 8,
            quota: None,
        };
        assert!(unlimited.allows_busy_polling(unlimited.workers()));
        let roomy = CpuBudget {
            cores: 4,
            quota: Some(3.0),
        };
        assert!(roomy.allows_busy_polling(2));
        assert!(!roomy.allows_busy_polling(3));
    }
}
