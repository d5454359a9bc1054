//! CPU accounting and limits per deployment process.
//!
//! Accounting, best first: a cgroup v2 group (`cpu.stat` `usage_usec`, needs no controller), a
//! cgroup v1 `cpuacct` group (`cpuacct.usage`, ns), else `/proc/<pid>/stat` (utime+stime, in
//! 10 ms ticks; works everywhere, CI included). workerd runs all JS of a process on one thread and
//! an idle process uses no CPU, so a process's CPU is its deployment's CPU.
//!
//! Limits are best-effort and reported: `memory.max`/`cpu.max` (v2, when those controllers are
//! enabled for our subtree) or v1 `memory.limit_in_bytes`/`cpu.cfs_quota_us` where writable.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// USER_HZ: the unit of utime/stime in `/proc/<pid>/stat` (fixed at 100 in Linux's ABI).
const TICKS_PER_SEC: u64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuSourceKind {
    CgroupV2,
    CgroupV1,
    Proc,
}

/// Cgroup use, from config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupMode {
    /// Use cgroups where writable, else `/proc`.
    #[default]
    Auto,
    /// Never touch cgroups: `/proc` accounting, no memory or CPU-share limits.
    Off,
}

/// Where this host lets us create groups, found once at start.
#[derive(Debug, Clone, Default)]
pub struct CgroupRoots {
    /// Our own folder in the v2 hierarchy, if we could create one.
    pub v2: Option<PathBuf>,
    pub v2_memory: bool,
    pub v2_cpu: bool,
    pub v1_cpuacct: Option<PathBuf>,
    pub v1_cpu: Option<PathBuf>,
    pub v1_memory: Option<PathBuf>,
}

/// Resource limits for one deployment process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessLimits {
    pub memory_bytes: Option<u64>,
    /// Share of one core, in percent (e.g. 100 = one full core).
    pub cpu_percent: Option<u32>,
}

/// What a process actually got; kept in the deployment's status and logged.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AppliedLimits {
    pub accounting: Option<CpuSourceKind>,
    pub memory: Option<&'static str>,
    pub cpu_share: Option<&'static str>,
}

fn mounts() -> Vec<(String, String, String)> {
    // (mount point, fs type, super options) from /proc/self/mountinfo
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?.to_owned();
            let mut post = post.split(' ');
            let fstype = post.next()?.to_owned();
            let _source = post.next();
            let opts = post.next().unwrap_or("").to_owned();
            Some((mount_point, fstype, opts))
        })
        .collect()
}

/// Our own group path in a v1 hierarchy (so children nest under any limit we already live in).
fn own_v1_path(controller: &str) -> String {
    fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let _id = parts.next()?;
                let ctrls = parts.next()?;
                let path = parts.next()?;
                ctrls
                    .split(',')
                    .any(|c| c == controller)
                    .then(|| path.to_owned())
            })
        })
        .unwrap_or_else(|| "/".to_owned())
}

fn own_v2_path() -> String {
    fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        })
        .unwrap_or_else(|| "/".to_owned())
}

fn try_make(dir: &Path) -> Option<PathBuf> {
    sweep_stale(dir);
    fs::create_dir_all(dir).ok()?;
    Some(dir.to_owned())
}

/// Kills what is left in a group of a dead supervisor (workerd processes it could not stop),
/// then waits briefly for the group to empty.
fn kill_members(group: &Path) {
    if fs::write(group.join("cgroup.kill"), "1").is_err() {
        for pid in fs::read_to_string(group.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for _ in 0..100 {
        if fs::read_to_string(group.join("cgroup.procs"))
            .map(|p| p.trim().is_empty())
            .unwrap_or(true)
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Removes `tollgate-<pid>` siblings of `dir` left by supervisors that died without cleaning up,
/// killing any workerd process still in them first.
fn sweep_stale(dir: &Path) {
    let Some(parent) = dir.parent() else { return };
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("tollgate-")) else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        if let Ok(children) = fs::read_dir(e.path()) {
            for c in children.flatten() {
                if c.path().is_dir() {
                    kill_members(&c.path());
                    let _ = fs::remove_dir(c.path());
                }
            }
        }
        let _ = fs::remove_dir(e.path());
    }
}

impl CgroupRoots {
    /// Finds writable hierarchies and makes `<group>/<name>` in each. Nothing found is not an
    /// error: accounting falls back to `/proc`.
    pub fn detect(mode: CgroupMode, name: &str) -> CgroupRoots {
        let mut roots = CgroupRoots::default();
        if mode == CgroupMode::Off {
            return roots;
        }
        for (mount, fstype, opts) in mounts() {
            if fstype == "cgroup2" && roots.v2.is_none() {
                // A process may not sit in an inner node of v2 that has controllers enabled, so
                // our folder is a sibling under our parent group when we are not at the root.
                let own = own_v2_path();
                let base = Path::new(&mount).join(own.trim_start_matches('/'));
                let dir = if own == "/" {
                    base.join(name)
                } else {
                    base.parent().map(|p| p.join(name)).unwrap_or(base)
                };
                if let Some(dir) = try_make(&dir) {
                    let enabled =
                        fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
                    // Enable what we can for the per-deployment children.
                    for c in ["cpu", "memory"] {
                        if enabled.split_whitespace().any(|e| e == c) {
                            let _ = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
                        }
                    }
                    let sub =
                        fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
                    roots.v2_cpu = sub.split_whitespace().any(|c| c == "cpu");
                    roots.v2_memory = sub.split_whitespace().any(|c| c == "memory");
                    roots.v2 = Some(dir);
                }
            } else if fstype == "cgroup" {
                for ctrl in opts.split(',') {
                    let slot = match ctrl {
                        "cpuacct" => &mut roots.v1_cpuacct,
                        "cpu" => &mut roots.v1_cpu,
                        "memory" => &mut roots.v1_memory,
                        _ => continue,
                    };
                    if slot.is_none() {
                        let own = own_v1_path(ctrl);
                        let dir = Path::new(&mount)
                            .join(own.trim_start_matches('/'))
                            .join(name);
                        *slot = try_make(&dir);
                    }
                }
            }
        }
        roots
    }

    /// Removes our folders (they must be empty: call after every process is gone).
    pub fn cleanup(&self) {
        for dir in [&self.v2, &self.v1_cpuacct, &self.v1_cpu, &self.v1_memory]
            .into_iter()
            .flatten()
        {
            let _ = fs::remove_dir(dir);
        }
    }

    /// Makes per-process groups named `group` and applies the limits, *before* the process
    /// exists: it joins them itself ([`Jail::procs`]) before running anything, so its module
    /// code and start-up run capped and metered from the first instruction.
    pub fn prepare(&self, group: &str, limits: ProcessLimits) -> Jail {
        let mut applied = AppliedLimits::default();
        let mut groups = Vec::new();
        let mut meter = None;
        // A fresh group per process: one left from an earlier process must not be reused (its
        // usage would be billed again), so an existing empty one is removed first.
        let make = |root: &Path| -> Option<PathBuf> {
            let dir = root.join(group);
            if fs::create_dir(&dir).is_err() {
                fs::remove_dir(&dir).ok()?;
                fs::create_dir(&dir).ok()?;
            }
            dir.join("cgroup.procs").exists().then_some(dir)
        };
        if let Some(dir) = self.v2.as_deref().and_then(make) {
            if let Some(mem) = limits.memory_bytes
                && self.v2_memory
                && fs::write(dir.join("memory.max"), mem.to_string()).is_ok()
            {
                applied.memory = Some("cgroup v2 memory.max");
            }
            if let Some(pct) = limits.cpu_percent
                && self.v2_cpu
                && fs::write(dir.join("cpu.max"), format!("{} 100000", pct as u64 * 1000)).is_ok()
            {
                applied.cpu_share = Some("cgroup v2 cpu.max");
            }
            if fs::read_to_string(dir.join("cpu.stat")).is_ok() {
                meter = Some(CpuMeter::CgroupV2(dir.clone()));
            }
            groups.push(dir);
        }
        if meter.is_none()
            && let Some(dir) = self.v1_cpuacct.as_deref().and_then(make)
        {
            meter = Some(CpuMeter::CgroupV1(dir.clone()));
            groups.push(dir);
        }
        if applied.memory.is_none()
            && let Some(mem) = limits.memory_bytes
            && let Some(dir) = self.v1_memory.as_deref().and_then(make)
        {
            if fs::write(dir.join("memory.limit_in_bytes"), mem.to_string()).is_ok() {
                applied.memory = Some("cgroup v1 memory.limit_in_bytes");
            }
            groups.push(dir);
        }
        if applied.cpu_share.is_none()
            && let Some(pct) = limits.cpu_percent
            && let Some(dir) = self.v1_cpu.as_deref().and_then(make)
        {
            let ok = fs::write(dir.join("cpu.cfs_period_us"), "100000").is_ok()
                && fs::write(
                    dir.join("cpu.cfs_quota_us"),
                    (pct as u64 * 1000).to_string(),
                )
                .is_ok();
            if ok {
                applied.cpu_share = Some("cgroup v1 cpu.cfs_quota_us");
            }
            groups.push(dir);
        }
        // Several controllers may share one mounted hierarchy (v1 `cpu,cpuacct`): join each
        // group once.
        groups.sort();
        groups.dedup();
        Jail {
            groups,
            meter,
            applied,
        }
    }
}

/// Groups (with their limits) made for one process before it starts.
#[derive(Debug)]
pub struct Jail {
    groups: Vec<PathBuf>,
    /// The cgroup meter, if the host gives us one; else the process's own `/proc` counters.
    meter: Option<CpuMeter>,
    applied: AppliedLimits,
}

impl Jail {
    /// The `cgroup.procs` files the process writes its own pid into before it runs anything.
    pub fn procs(&self) -> Vec<PathBuf> {
        self.groups.iter().map(|g| g.join("cgroup.procs")).collect()
    }

    /// Whether process `pid` sits in every group of this jail (read from `/proc/<pid>/cgroup`):
    /// a process outside its accounting group would run unbilled.
    pub fn holds(&self, pid: u32) -> bool {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return self.groups.is_empty();
        };
        let paths: Vec<&str> = text
            .lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .filter(|p| *p != "/")
            .collect();
        self.groups
            .iter()
            .all(|g| paths.iter().any(|p| g.ends_with(p.trim_start_matches('/'))))
    }

    /// CPU used in the groups so far (µs), where a cgroup meters it.
    pub fn cgroup_cpu_us(&self) -> Option<u64> {
        self.meter.as_ref().and_then(|m| m.read_us().ok())
    }

    /// The meter of process `pid`, now running inside the groups, and what held. Its count
    /// starts at the process's first instruction (a fresh group, or the process's own
    /// `/proc` counters), so nothing before the first sample goes unbilled.
    pub fn into_meter(self, pid: u32) -> (CpuMeter, AppliedLimits) {
        let meter = self.meter.unwrap_or(CpuMeter::Proc(pid));
        let mut applied = self.applied;
        applied.accounting = Some(meter.kind());
        (meter.with_groups(self.groups), applied)
    }

    /// Removes the groups of a process that did not start (they must be empty by then).
    pub fn discard(self) {
        for g in &self.groups {
            let _ = fs::remove_dir(g);
        }
    }
}

/// Reads one process's cumulative CPU time.
#[derive(Debug, Clone)]
pub enum CpuMeter {
    CgroupV2(PathBuf),
    CgroupV1(PathBuf),
    Proc(u32),
    /// A meter plus the groups to remove when the process is gone.
    WithGroups(Box<CpuMeter>, Vec<PathBuf>),
}

impl CpuMeter {
    fn with_groups(self, groups: Vec<PathBuf>) -> CpuMeter {
        if groups.is_empty() {
            self
        } else {
            CpuMeter::WithGroups(Box::new(self), groups)
        }
    }

    pub fn kind(&self) -> CpuSourceKind {
        match self {
            CpuMeter::CgroupV2(_) => CpuSourceKind::CgroupV2,
            CpuMeter::CgroupV1(_) => CpuSourceKind::CgroupV1,
            CpuMeter::Proc(_) => CpuSourceKind::Proc,
            CpuMeter::WithGroups(m, _) => m.kind(),
        }
    }

    /// Cumulative CPU time in µs.
    pub fn read_us(&self) -> io::Result<u64> {
        match self {
            CpuMeter::CgroupV2(dir) => {
                let text = fs::read_to_string(dir.join("cpu.stat"))?;
                text.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| io::Error::other("cpu.stat has no usage_usec"))
            }
            CpuMeter::CgroupV1(dir) => {
                let ns: u64 = fs::read_to_string(dir.join("cpuacct.usage"))?
                    .trim()
                    .parse()
                    .map_err(io::Error::other)?;
                Ok(ns / 1000)
            }
            CpuMeter::Proc(pid) => proc_cpu_us(*pid),
            CpuMeter::WithGroups(m, _) => m.read_us(),
        }
    }

    /// Removes the process's groups (after it exited; a group with members cannot be removed).
    pub fn cleanup(&self) {
        if let CpuMeter::WithGroups(_, groups) = self {
            for g in groups {
                let _ = fs::remove_dir(g);
            }
        }
    }
}

/// utime + stime of a process (all its threads, dead ones included) in µs.
pub fn proc_cpu_us(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("malformed /proc/<pid>/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, utime 14, stime 15 (1-based in proc(5)) → indexes 11 and 12.
    let ticks = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| io::Error::other("malformed /proc/<pid>/stat"))
    };
    Ok((ticks(11)? + ticks(12)?) * (1_000_000 / TICKS_PER_SEC))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_meter_reads_this_process() {
        let before = proc_cpu_us(std::process::id()).unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_add(std::hint::black_box(x) ^ 7);
        }
        std::hint::black_box(x);
        let after = proc_cpu_us(std::process::id()).unwrap();
        // 300 ms of spinning on a shared 2-core box gets at least a sixth of that.
        assert!(after - before >= 50_000, "{before} → {after}");
    }
}
