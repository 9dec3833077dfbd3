//! Per-replica limits (Kubernetes' "limits"): a cgroup v2 per replica process when the
//! supervisor has a delegated, writable cgroup v2 tree with the needed controllers;
//! otherwise rlimits, which can only bound memory, and coarsely. Which one is in force, and
//! why, is said once in the log and always in `status`.

use std::path::{Path, PathBuf};

use edge_proto::{Limits, LimitsMode};

use crate::config::Resources;

/// How limits are enforced on this machine.
#[derive(Debug, Clone)]
pub enum Limiter {
    /// No limits were configured.
    None,
    /// Each replica process gets a child cgroup of `root`.
    Cgroup { root: PathBuf },
    /// `RLIMIT_DATA` for memory; CPU and pids cannot be bounded this way.
    Rlimit,
}

/// A replica's own cgroup, removed after the process exits.
#[derive(Debug, Clone)]
pub struct CgroupHandle {
    pub dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot apply limits to {replica} (pid {pid}) at {path}: {source}")]
pub struct LimitError {
    pub replica: String,
    pub pid: u32,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl Limiter {
    /// Finds the best way to enforce `resources` here and says what it found.
    pub fn detect(resources: &Resources) -> (Limiter, Limits) {
        if resources.is_empty() {
            return (
                Limiter::None,
                Limits {
                    mode: LimitsMode::None,
                    note: Some("no [resources] configured".into()),
                },
            );
        }
        match delegated_cgroup(resources) {
            Ok(root) => {
                let note = format!("per-replica cgroups under {}", root.display());
                (
                    Limiter::Cgroup { root },
                    Limits {
                        mode: LimitsMode::CgroupV2,
                        note: Some(note),
                    },
                )
            }
            Err(reason) => (
                Limiter::Rlimit,
                Limits {
                    mode: LimitsMode::Rlimit,
                    note: Some(format!(
                        "{reason}; falling back to rlimits: memory_max becomes RLIMIT_DATA (virtual data size), \
                         memory_high, cpu_max and pids_max are not enforced, and OOM kills cannot be told apart"
                    )),
                },
            ),
        }
    }

    /// Puts a freshly started replica under its limits.
    pub fn apply(
        &self,
        resources: &Resources,
        replica: &str,
        generation: u64,
        pid: u32,
    ) -> Result<Option<CgroupHandle>, LimitError> {
        match self {
            Limiter::None => Ok(None),
            Limiter::Cgroup { root } => {
                let dir = root.join(format!("{replica}.{generation}"));
                let fail = |path: &Path, source| LimitError {
                    replica: replica.to_owned(),
                    pid,
                    path: path.to_owned(),
                    source,
                };
                match std::fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(fail(&dir, e)),
                }
                let mut settings: Vec<(&str, String)> = Vec::new();
                if let Some(max) = resources.memory_max {
                    settings.push(("memory.max", max.to_string()));
                    // An OOM kill takes the whole replica, not one of its threads' victims.
                    settings.push(("memory.oom.group", "1".into()));
                    settings.push(("memory.swap.max", "0".into()));
                }
                if let Some(high) = resources.memory_high {
                    settings.push(("memory.high", high.to_string()));
                }
                if let Some((quota, period)) = resources.cpu_max {
                    settings.push(("cpu.max", format!("{quota} {period}")));
                }
                if let Some(pids) = resources.pids_max {
                    settings.push(("pids.max", pids.to_string()));
                }
                for (file, value) in settings {
                    let path = dir.join(file);
                    // memory.swap.max is absent on kernels without swap accounting.
                    if file == "memory.swap.max" && !path.exists() {
                        continue;
                    }
                    std::fs::write(&path, &value).map_err(|e| fail(&path, e))?;
                }
                let procs = dir.join("cgroup.procs");
                std::fs::write(&procs, pid.to_string()).map_err(|e| fail(&procs, e))?;
                Ok(Some(CgroupHandle { dir }))
            }
            Limiter::Rlimit => {
                if let (Some(max), Some(target)) = (
                    resources.memory_max,
                    rustix::process::Pid::from_raw(pid as i32),
                ) {
                    let limit = rustix::process::Rlimit {
                        current: Some(max),
                        maximum: Some(max),
                    };
                    rustix::process::prlimit(Some(target), rustix::process::Resource::Data, limit)
                        .map_err(|e| LimitError {
                            replica: replica.to_owned(),
                            pid,
                            path: PathBuf::from(format!("/proc/{pid}/limits")),
                            source: e.into(),
                        })?;
                }
                Ok(None)
            }
        }
    }
}

impl CgroupHandle {
    /// How many times the kernel's OOM killer acted in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.events"))
            .map(|text| parse_oom_kills(&text))
            .unwrap_or(0)
    }

    /// Removes the (now empty) cgroup.
    pub fn remove(&self) {
        if let Err(error) = std::fs::remove_dir(&self.dir) {
            tracing::debug!(dir = %self.dir.display(), %error, "could not remove a replica cgroup");
        }
    }
}

fn parse_oom_kills(memory_events: &str) -> u64 {
    memory_events
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The supervisor's own cgroup v2 directory, prepared for child cgroups: the supervisor
/// moves itself into a `supervisor` leaf (a cgroup with controllers enabled for its children
/// may hold no processes) and enables the controllers it needs below its cgroup.
fn delegated_cgroup(resources: &Resources) -> Result<PathBuf, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let mounts = std::fs::read_to_string(mountinfo::MOUNTINFO)
        .map_err(|e| format!("cannot read {}: {e}", mountinfo::MOUNTINFO))?;
    let root = cgroup_root(&own, &mounts)?;
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let mut needed = Vec::new();
    if resources.memory_max.is_some() || resources.memory_high.is_some() {
        needed.push("memory");
    }
    if resources.cpu_max.is_some() {
        needed.push("cpu");
    }
    if resources.pids_max.is_some() {
        needed.push("pids");
    }
    let missing: Vec<_> = needed
        .iter()
        .filter(|c| !available.split_whitespace().any(|a| a == **c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the cgroup v2 tree at {} offers no {:?} controller (a cgroup v1 or hybrid host, or no delegation)",
            root.display(),
            missing
        ));
    }
    let leaf = root.join("supervisor");
    let write = |path: &Path, value: &str| {
        std::fs::write(path, value).map_err(|e| {
            format!(
                "{} is not writable ({e}); run under systemd with Delegate=yes",
                path.display()
            )
        })
    };
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(format!(
                "cannot create {} ({e}); run under systemd with Delegate=yes",
                leaf.display()
            ));
        }
    }
    write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
    let enable: Vec<String> = needed.iter().map(|c| format!("+{c}")).collect();
    write(&root.join("cgroup.subtree_control"), &enable.join(" "))?;
    Ok(root)
}

/// This process's cgroup directory: its path in the unified hierarchy (the `0::` line of
/// /proc/self/cgroup, `own`) below the cgroup2 mount point that `mounts` (mountinfo) names.
fn cgroup_root(own: &str, mounts: &str) -> Result<PathBuf, String> {
    let relative = own
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or("this system has no cgroup v2 hierarchy (cgroup v1 only)")?;
    let mount = mountinfo::cgroup2_mount(mounts).ok_or("cgroup v2 is not mounted")?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_read_from_memory_events() {
        let events = "low 0\nhigh 12\nmax 3\noom 1\noom_kill 2\noom_group_kill 1\n";
        assert_eq!(parse_oom_kills(events), 2);
        assert_eq!(parse_oom_kills("low 0\n"), 0);
    }

    #[test]
    fn the_cgroup_root_is_the_own_cgroup_below_the_cgroup2_mount() {
        let own = "0::/system.slice/quote-edge.service\n";
        let info = "25 30 0:22 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n\
                    35 30 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_root(own, info),
            Ok(PathBuf::from(
                "/sys/fs/cgroup/unified/system.slice/quote-edge.service"
            ))
        );
        let v1_only = "25 30 0:22 / /x rw - ext4 /dev/vda rw\n";
        assert_eq!(
            cgroup_root(own, v1_only),
            Err("cgroup v2 is not mounted".into())
        );
        assert!(cgroup_root("1:memory:/x\n", info).is_err());
    }

    #[test]
    fn a_cgroup2_mount_point_with_a_space_is_decoded() {
        // The kernel writes a space in a mount point as `\040`; taken as it stands, the escape
        // would name a directory that does not exist.
        let info = "35 30 0:30 / /run/my\\040cgroup rw,nosuid shared:10 - cgroup2 none rw\n";
        assert_eq!(
            cgroup_root("0::/edge\n", info),
            Ok(PathBuf::from("/run/my cgroup/edge"))
        );
    }

    #[test]
    fn a_replica_cgroup_gets_every_configured_limit_then_the_pid() {
        let root = tempfile::tempdir().unwrap();
        let limiter = Limiter::Cgroup {
            root: root.path().to_owned(),
        };
        let resources = Resources {
            memory_max: Some(64 << 20),
            memory_high: Some(48 << 20),
            cpu_max: Some((50_000, 100_000)),
            pids_max: Some(32),
        };
        let handle = limiter
            .apply(&resources, "replica-1", 7, 4242)
            .unwrap()
            .unwrap();
        let read = |f: &str| std::fs::read_to_string(handle.dir.join(f)).unwrap();
        assert_eq!(handle.dir, root.path().join("replica-1.7"));
        assert_eq!(read("memory.max"), "67108864");
        assert_eq!(read("memory.high"), "50331648");
        assert_eq!(read("memory.oom.group"), "1");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("pids.max"), "32");
        assert_eq!(read("cgroup.procs"), "4242");
    }

    #[test]
    fn no_resources_means_no_limiter() {
        let (limiter, limits) = Limiter::detect(&Resources::default());
        assert!(matches!(limiter, Limiter::None));
        assert_eq!(limits.mode, LimitsMode::None);
    }
}
