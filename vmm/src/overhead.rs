//! The VMM's own cost, for `--stats-json` `overhead`: VMM start → first `KVM_RUN`, resident
//! memory without guest RAM (from `/proc/self/smaps`), thread count, and CPU time of the VMM's
//! threads (CPU-time clocks and `getrusage`), split into vCPU threads (which include the time
//! the guest itself runs) and the others (device workers, event loop).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::thread::JoinHandleExt;
use std::sync::OnceLock;
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

/// Reads this process's `/proc/self/smaps` and `/proc/self/status` through files opened once,
/// at set-up: sampling later makes no `openat` (threads run under seccomp filters that do not
/// allow it), only positioned reads from offset 0, which `/proc` files answer afresh.
#[derive(Debug)]
pub struct ProcSampler {
    smaps: File,
    status: File,
    /// Guest RAM (host virtual start, length), excluded from the VMM's resident memory.
    excluded: Vec<(u64, u64)>,
}

impl ProcSampler {
    /// Opens the files; `excluded` are the guest RAM mappings.
    pub fn open(excluded: Vec<(u64, u64)>) -> io::Result<Self> {
        Ok(ProcSampler {
            smaps: File::open("/proc/self/smaps")?,
            status: File::open("/proc/self/status")?,
            excluded,
        })
    }

    /// Samples this process.
    pub fn sample(&self) -> io::Result<Sample> {
        let smaps = read_all_at(&self.smaps)?;
        let status = read_all_at(&self.status)?;
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Ok(Sample {
            rss_kib: rss_excluding(&smaps, &self.excluded),
            threads,
        })
    }
}

/// The whole text of a `/proc` file, read with `pread` from offset 0.
fn read_all_at(f: &File) -> io::Result<String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read_at(&mut buf, out.len() as u64)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// CPU time of the vCPU threads (through their CPU-time clocks) and of the rest of the process
/// (`getrusage` minus the vCPUs): no file is read, so any thread may ask.
#[derive(Debug, Default)]
pub struct CpuClocks {
    vcpus: OnceLock<Vec<libc::clockid_t>>,
}

impl CpuClocks {
    /// Records the vCPU threads' CPU clocks (once, after they were spawned).
    pub fn set_vcpus<T>(&self, threads: &[std::thread::JoinHandle<T>]) {
        let clocks = threads
            .iter()
            .filter_map(|t| {
                let mut id: libc::clockid_t = 0;
                // SAFETY: the pthread_t is a live thread of ours (its JoinHandle is borrowed);
                // `id` is a valid out pointer.
                let rc = unsafe { libc::pthread_getcpuclockid(t.as_pthread_t(), &mut id) };
                (rc == 0).then_some(id)
            })
            .collect();
        let _ = self.vcpus.set(clocks);
    }

    /// (vCPU threads, everything else) in ms; `None` before the vCPUs were recorded.
    pub fn split_ms(&self) -> Option<(u64, u64)> {
        let clocks = self.vcpus.get()?;
        let mut vcpu_ns: u128 = 0;
        for &c in clocks {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid out pointer; a clock of an exited thread fails (EINVAL).
            if unsafe { libc::clock_gettime(c, &mut ts) } == 0 {
                vcpu_ns += ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128;
            }
        }
        // SAFETY: an all-zero rusage is valid; getrusage fills it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid out pointer.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
            return None;
        }
        let tv_us = |t: libc::timeval| t.tv_sec as u128 * 1_000_000 + t.tv_usec as u128;
        let total_ms = (tv_us(ru.ru_utime) + tv_us(ru.ru_stime)) / 1000;
        let vcpu_ms = vcpu_ns / 1_000_000;
        Some((vcpu_ms as u64, total_ms.saturating_sub(vcpu_ms) as u64))
    }
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
    fn this_process_can_be_sampled_twice_through_the_same_files() {
        let p = ProcSampler::open(Vec::new()).unwrap();
        let a = p.sample().unwrap();
        let b = p.sample().unwrap();
        assert!(a.rss_kib > 0 && a.threads >= 1 && b.rss_kib > 0);
    }

    #[test]
    fn cpu_split_counts_a_busy_thread_as_vcpu_time() {
        let clocks = CpuClocks::default();
        assert_eq!(clocks.split_ms(), None, "no vCPUs recorded yet");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let busy = std::thread::spawn(move || {
            // Spin until this thread itself has used 30 ms of CPU (however loaded the host).
            let own_ms = || {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: `ts` is a valid out pointer.
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
            };
            while own_ms() < 30 {
                std::hint::black_box(0u64);
            }
            done_tx.send(()).unwrap();
            rx.recv().ok();
        });
        done_rx.recv().unwrap();
        clocks.set_vcpus(std::slice::from_ref(&busy));
        let (vcpu, _) = clocks.split_ms().unwrap();
        assert!(vcpu >= 20, "busy thread's CPU time {vcpu} ms");
        tx.send(()).unwrap();
        busy.join().unwrap();
    }
}
