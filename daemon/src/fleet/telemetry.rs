//! Process and box figures for the telemetry stream, read from /proc and statvfs.

use std::time::Instant;

/// CPU time of this process at one instant, to turn two readings into a percentage.
pub struct CpuSample {
    at: Instant,
    ticks: u64,
}

/// Clock ticks per second as /proc reports them (USER_HZ, 100 on every Linux architecture).
const USER_HZ: f64 = 100.0;

pub fn cpu_sample() -> Option<CpuSample> {
    Some(CpuSample {
        at: Instant::now(),
        ticks: cpu_ticks()?,
    })
}

/// CPU time this process has used, user and system, in seconds.
pub fn cpu_seconds() -> Option<f64> {
    Some(cpu_ticks()? as f64 / USER_HZ)
}

/// CPU time another process has used itself (its children not counted): benches measure the
/// daemon and its broker by it.
pub fn cpu_seconds_of(pid: u32) -> Option<f64> {
    Some(ticks_in(&format!("/proc/{pid}/stat"))? as f64 / USER_HZ)
}

fn cpu_ticks() -> Option<u64> {
    ticks_in("/proc/self/stat")
}

fn ticks_in(stat_path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the command name, which is in parentheses and may itself hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Percent of one core used between two samples.
pub fn cpu_percent(before: &CpuSample, after: &CpuSample) -> f64 {
    let wall = after.at.duration_since(before.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    let cpu = after.ticks.saturating_sub(before.ticks) as f64 / USER_HZ;
    (cpu / wall * 1000.0).round() / 10.0
}

/// Resident set size in bytes.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub use crate::store::disk_free_bytes;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn readings_are_plausible() {
        let rss = rss_bytes().unwrap();
        // The same reading, through this process's id.
        let (own, by_pid) = (
            cpu_seconds().unwrap(),
            cpu_seconds_of(std::process::id()).unwrap(),
        );
        assert!(by_pid >= own && by_pid - own < 1.0, "{own} {by_pid}");
        assert!(cpu_seconds_of(u32::MAX).is_none());
        assert!(rss > 1024 * 1024, "{rss}");
        assert!(disk_free_bytes(Path::new("/")).unwrap() > 0);
        let a = cpu_sample().unwrap();
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed().as_millis() < 50 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let b = cpu_sample().unwrap();
        let pct = cpu_percent(&a, &b);
        assert!((0.0..=200.0).contains(&pct), "{pct} {x}");
    }
}
