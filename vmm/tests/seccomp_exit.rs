//! A device worker that makes a system call outside its allowlist kills the VMM with SIGSYS
//! (`--seccomp=on`), or is only logged (`--seccomp=log`).
//!
//! A seccomp kill ends the process, so each case re-runs this test binary as a child
//! (`SECCOMP_CHILD=<case>`) and checks how the child ended.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::Arc;

use devices::virtio::{QueueHandler, QueueProgress};
use vmm::seccomp::{filter, SeccompMode, ThreadKind};
use vmm::worker::Worker;
use vmm_sys_util::eventfd::EventFd;

/// A device data plane that opens a socket, as a device model taken over by the guest might.
struct SocketOpener;

impl QueueHandler for SocketOpener {
    fn process_queue(&self, _: usize) -> QueueProgress {
        // SAFETY: socket(2) takes no pointers; the fd (if any) is closed right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        eprintln!("socket returned {fd}");
        if fd >= 0 {
            // SAFETY: `fd` is the socket just opened and owned by nobody else.
            unsafe { libc::close(fd) };
            // Reached only when the call was allowed: tell the parent.
            std::process::exit(42);
        }
        std::process::exit(43)
    }
}

/// A vCPU-filtered thread that allocates and frees large buffers, as the overhead sampler
/// does on a vCPU: glibc's free() then trims the thread's arena. `prepare` = call
/// `prepare_process` first (the VMM does).
fn child_frees(prepare: bool) -> ! {
    vmm::fatal::install_panic_hook();
    if prepare {
        vmm::seccomp::prepare_process();
    }
    let t = vmm::seccomp::spawn(
        "vcpu0".into(),
        filter(ThreadKind::Vcpu, SeccompMode::On).unwrap(),
        || {
            // Below the mmap threshold, so in the thread's arena; freed together they leave
            // a top chunk far above the trim threshold.
            for _ in 0..4 {
                let bufs: Vec<Vec<u8>> = (0..32).map(|n| vec![n as u8; 100 << 10]).collect();
                std::hint::black_box(&bufs);
                drop(bufs);
            }
        },
    )
    .unwrap();
    let _ = t.join();
    std::process::exit(42)
}

/// The child's body: a real virtio-blk worker thread with its real filter, kicked once.
fn child(mode: SeccompMode) -> ! {
    vmm::fatal::install_panic_hook();
    let kick = Arc::new(EventFd::new(0).unwrap());
    let _worker = Worker::spawn(
        "vblk0".into(),
        Arc::new(SocketOpener),
        vec![(kick.clone(), 0)],
        filter(ThreadKind::BlockWorker, mode).unwrap(),
    )
    .unwrap();
    kick.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(20));
    std::process::exit(0)
}

fn run_child(case: &str) -> std::process::ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env("SECCOMP_CHILD", case)
        .status()
        .expect("re-run the test binary")
}

/// Not a test on its own: the entry point of the child processes.
#[test]
fn child_entry() {
    match std::env::var("SECCOMP_CHILD").as_deref() {
        Ok("on") => child(SeccompMode::On),
        Ok("log") => child(SeccompMode::Log),
        Ok("frees") => child_frees(true),
        Ok("frees-unprepared") => child_frees(false),
        _ => {}
    }
}

#[test]
fn forbidden_call_in_a_device_worker_kills_the_vmm_with_sigsys() {
    let status = run_child("on");
    assert_eq!(status.code(), None, "{status:?}");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
    // What a shell reports: 128 + 31.
    assert_eq!(128 + status.signal().unwrap(), 159);
}

#[test]
fn with_seccomp_log_the_forbidden_call_goes_through() {
    let status = run_child("log");
    assert_eq!(status.code(), Some(42), "{status:?}");
}

/// Regression: a vCPU was killed by SIGSYS when glibc's free() trimmed its arena and opened
/// /proc/sys/vm/overcommit_memory; `prepare_process` turns that trimming off.
#[test]
fn freeing_large_buffers_under_a_filter_does_not_make_glibc_open_files() {
    let status = run_child("frees");
    assert_eq!(status.code(), Some(42), "{status:?}");
    // And the hazard is real: without it the same thread dies.
    let status = run_child("frees-unprepared");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
}
