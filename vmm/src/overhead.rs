//! The VMM's own cost, for `--stats-json` `overhead`: VMM start → first `KVM_RUN`, resident
//! memory without guest RAM (from `/proc/self/smaps`), thread count, and CPU time of the VMM's
//! threads (from `/proc/self/task/*/stat`), split into vCPU threads (which include the time
//! the guest itself runs) and the others (device workers, event loop).

use std::io;
use std::time::Instant;

use serde::Serialize;

/// One sample of the process.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Sample {
    /// Resident KiB outside guest RAM.
    pub rss_kib: u64,
    /// Threads of the process.
    pub threads: u64,
}

/// The `overhead` object of `--stats-json`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Overhead {
    /// VMM start → the boot vCPU's first `KVM_RUN`, ms.
    pub first_kvm_run_ms: Option<u64>,
    /// Resident KiB outside guest RAM when the guest's init mark came (mid-boot).
    pub rss_mid_boot_kib: Option<u64>,
    /// Threads then.
    pub threads_mid_boot: Option<u64>,
    /// Resident KiB outside guest RAM when the VM stopped (vCPU threads still there).
    pub rss_exit_kib: Option<u64>,
    /// Threads then.
    pub threads: Option<u64>,
    /// CPU time of the vCPU threads (guest execution included), ms.
    pub cpu_vcpu_ms: Option<u64>,
    /// CPU time of every other thread (device workers, event loop, main), ms.
    pub cpu_vmm_ms: Option<u64>,
}

/// Milliseconds since `start`.
pub fn ms_since(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// Resident KiB of every mapping in `smaps` except those inside one of `excluded`
/// (host virtual `(start, len)` ranges: guest RAM).
pub fn rss_excluding(smaps: &str, excluded: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    let mut skip = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                skip = excluded
                    .iter()
                    .any(|&(s, len)| a >= s && b <= s.saturating_add(len));
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            if !skip {
                total += rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// Samples this process.
pub fn sample(excluded: &[(u64, u64)]) -> io::Result<Sample> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let threads = std::fs::read_dir("/proc/self/task")?.count() as u64;
    Ok(Sample {
        rss_kib: rss_excluding(&smaps, excluded),
        threads,
    })
}

/// CPU ms of (vCPU threads, other threads), from `/proc/self/task/*/stat`.
pub fn thread_cpu_ms() -> io::Result<(u64, u64)> {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let (mut vcpu, mut other) = (0, 0);
    for entry in std::fs::read_dir("/proc/self/task")? {
        let Ok(stat) = std::fs::read_to_string(entry?.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        if let Some((name, ticks)) = parse_stat(&stat) {
            let ms = ticks * 1000 / hz;
            if name.starts_with("vcpu") {
                vcpu += ms;
            } else {
                other += ms;
            }
        }
    }
    Ok((vcpu, other))
}

/// (comm, utime + stime ticks) of a `/proc/.../stat` line.
fn parse_stat(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = &stat[open + 1..close];
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the name: state is field 3 of stat(5); utime is 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_skips_mappings_inside_guest_ram() {
        let smaps = "\
00400000-00500000 r-xp 00000000 08:01 1 /vmm
Size:               1024 kB
Rss:                 300 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Rss:              262144 kB
7f0020000000-7f0020001000 rw-p 00000000 00:00 0
Rss:                   4 kB
";
        assert_eq!(rss_excluding(smaps, &[]), 300 + 262_144 + 4);
        assert_eq!(
            rss_excluding(smaps, &[(0x7f00_0000_0000, 0x1000_0000)]),
            304
        );
    }

    #[test]
    fn stat_lines_give_name_and_ticks() {
        let l = "1234 (vcpu0) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0 100";
        assert_eq!(parse_stat(l), Some(("vcpu0", 300)));
        let l = "1 (a (b) c) R 1 2 3 4 5 6 7 8 9 10 1 2 0 0";
        assert_eq!(parse_stat(l), Some(("a (b) c", 3)));
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(&[]).unwrap();
        assert!(s.rss_kib > 0 && s.threads >= 1);
        thread_cpu_ms().unwrap();
    }
}
