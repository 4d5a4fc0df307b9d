//! CPU time of this machine's processes, from `/proc`, for the benches that
//! say which process a cost lands on (included with `#[path]`; each uses
//! part of it).
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

/// Linux reports CPU time in USER_HZ, 100 a second on every common build.
const TICKS_PER_SECOND: f64 = 100.0;

/// The name under which [`cpu_seconds`] reports the commands this bench ran
/// and waited for (`pg2ch`, `psql`).
pub const OWN_CHILDREN: &str = "commands run by the bench";

/// One process at one moment.
struct Proc {
    name: String,
    /// Its own CPU time (user and system), ticks.
    used: u64,
    /// CPU time of its children it waited for (a postmaster's ended
    /// backends, the bench's commands), ticks.
    reaped: u64,
    /// How long its threads were runnable but waiting for a CPU, ns (from
    /// each thread's `schedstat`).
    waited: u64,
}

/// Every process's CPU counters at one moment, by pid.
pub struct Sample(HashMap<u32, Proc>);

pub fn sample() -> Sample {
    let mut by = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        let waited: u64 = std::fs::read_dir(entry.path().join("task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().nth(1).and_then(|w| w.parse::<u64>().ok()))
            .sum();
        // Fields 14 to 17 of stat (utime, stime, cutime, cstime), counted
        // after the name.
        let name = stat[open + 1..close].to_owned();
        let name = if name.starts_with("kworker") { "kernel workers".to_owned() } else { name };
        by.insert(pid, Proc { name, used: ticks(11) + ticks(12), reaped: ticks(13) + ticks(14), waited });
    }
    Sample(by)
}

/// CPU seconds each process name used between two samples, its processes
/// summed, largest first: each process's own time and that of the children
/// it reaped meanwhile, so a PostgreSQL whose backends ended in between
/// still counts them (through the postmaster). The bench's own time is left
/// out and the commands it ran are reported as [`OWN_CHILDREN`]. A process
/// that started in between counts from zero; one that ended is counted only
/// through its parent.
pub fn cpu_seconds(before: &Sample, after: &Sample) -> Vec<(String, f64)> {
    let own = std::process::id();
    let mut by_name: HashMap<String, u64> = HashMap::new();
    for (pid, p) in &after.0 {
        let (used, reaped) = before.0.get(pid).map_or((0, 0), |b| (b.used, b.reaped));
        let reaped = p.reaped.saturating_sub(reaped);
        if *pid == own {
            *by_name.entry(OWN_CHILDREN.to_owned()).or_default() += reaped;
        } else {
            *by_name.entry(p.name.clone()).or_default() += p.used.saturating_sub(used) + reaped;
        }
    }
    let mut secs: Vec<(String, f64)> =
        by_name.into_iter().filter(|(_, t)| *t > 0).map(|(n, t)| (n, t as f64 / TICKS_PER_SECOND)).collect();
    secs.sort_by(|a, b| b.1.total_cmp(&a.1));
    secs
}

/// Each process name's share of one core between two samples (its own time,
/// summed over its processes), largest first, with how long its threads
/// waited for a CPU per second (ms). A process that started between the
/// samples counts from zero; one that ended, not at all.
pub fn cpu_share(before: &Sample, after: &Sample, over: Duration) -> Vec<(String, f64, f64)> {
    let mut by_name: HashMap<String, (u64, u64)> = HashMap::new();
    for (pid, p) in &after.0 {
        let (bt, bw) = before.0.get(pid).map_or((0, 0), |b| (b.used, b.waited));
        let e = by_name.entry(p.name.clone()).or_default();
        e.0 += p.used.saturating_sub(bt);
        e.1 += p.waited.saturating_sub(bw);
    }
    let secs = over.as_secs_f64();
    let mut shares: Vec<(String, f64, f64)> = by_name
        .into_iter()
        .map(|(name, (used, waited))| (name, used as f64 / TICKS_PER_SECOND / secs * 100.0, waited as f64 / 1e6 / secs))
        .filter(|(_, pct, _)| *pct >= 1.0)
        .collect();
    shares.sort_by(|a, b| b.1.total_cmp(&a.1));
    shares
}
