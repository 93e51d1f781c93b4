//! System-call filters per VMM thread (seccomp-bpf, built with rust-vmm's `seccompiler`).
//! Each thread kind gets the smallest allowlist that lets it do its job once the VM is built:
//! the main thread (event loop, stop, statistics), the vCPU threads (`KVM_RUN` and the few
//! VM ioctls an exit handler needs), the virtio-blk workers (epoll, eventfds, positioned disk
//! I/O) and the virtio-iommu worker (epoll and eventfds only). `ioctl` is allowed only for the
//! listed KVM request numbers, `mmap`/`mprotect` only without `PROT_EXEC`, `openat` only as
//! `File::create` does it (the main thread's `--stats-json`), and `fcntl`, `socket`, `execve`,
//! `clone` and everything else are never allowed. A thread installs its filter first thing
//! after it starts (the main thread: after every other thread was spawned, right before the
//! event loop), before it runs guest-influenced code. With [`SeccompMode::On`] a call outside
//! the list kills the whole process with SIGSYS (`SECCOMP_RET_KILL_PROCESS`: exit status
//! 128 + 31 = 159 in a shell); with [`SeccompMode::Log`] the kernel logs the call (audit
//! `type=1326`, see `dmesg`) and lets it through.

use std::collections::BTreeMap;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{kvm_irq_routing, kvm_irqfd, kvm_msi, kvm_regs};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

pub use crate::config::SeccompMode;

/// The KVM ioctl type (`KVMIO` in `linux/kvm.h`).
const KVMIO: u32 = 0xAE;

const fn kvm_ioctl(dir: u32, nr: u32, size: usize) -> u64 {
    ioctl_expr(dir, KVMIO, nr, size as u32) as u64
}

/// `KVM_RUN`.
pub const KVM_RUN: u64 = kvm_ioctl(_IOC_NONE, 0x80, 0);
/// `KVM_GET_REGS` (the guest RIP in an internal-error report).
pub const KVM_GET_REGS: u64 = kvm_ioctl(_IOC_READ, 0x81, std::mem::size_of::<kvm_regs>());
/// `KVM_SET_GSI_ROUTING`.
pub const KVM_SET_GSI_ROUTING: u64 =
    kvm_ioctl(_IOC_WRITE, 0x6a, std::mem::size_of::<kvm_irq_routing>());
/// `KVM_IRQFD` (parking and unparking an interrupt source).
pub const KVM_IRQFD: u64 = kvm_ioctl(_IOC_WRITE, 0x76, std::mem::size_of::<kvm_irqfd>());
/// `KVM_SIGNAL_MSI` (the remapping unit's fault and completion events).
pub const KVM_SIGNAL_MSI: u64 = kvm_ioctl(_IOC_WRITE, 0xa5, std::mem::size_of::<kvm_msi>());

/// The kinds of VMM thread, each with its own allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM is built: event loop, stopping the VM, statistics.
    Main,
    /// A vCPU thread (`vcpuN`).
    Vcpu,
    /// A virtio-blk device worker (`vblkN`).
    BlockWorker,
    /// The virtio-iommu device worker (`viommu`).
    IommuWorker,
}

/// Every thread kind, for tests and documentation.
pub const THREAD_KINDS: [ThreadKind; 4] = [
    ThreadKind::Main,
    ThreadKind::Vcpu,
    ThreadKind::BlockWorker,
    ThreadKind::IommuWorker,
];

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be built (a bug in the rules).
    #[error("Cannot build the seccomp filter for {0:?} threads")]
    Build(ThreadKind, #[source] seccompiler::Error),
    /// The kernel refused the filter.
    #[error("Cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
    /// The thread could not be spawned.
    #[error("Cannot spawn thread {0}")]
    Spawn(String, #[source] std::io::Error),
    /// The thread ended before reporting whether its filter is installed.
    #[error("Thread {0} ended before installing its seccomp filter")]
    Vanished(String),
}

/// A compiled filter, shared by the threads of one kind.
pub type Filter = Arc<BpfProgram>;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .expect("argument indices below 6 are valid")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("rules here have at least one condition")
}

/// `ioctl` with one of `requests` as its request number.
fn ioctls(requests: &[u64]) -> Vec<SeccompRule> {
    requests
        .iter()
        .map(|&r| rule(vec![cond(1, SeccompCmpOp::Eq, r)]))
        .collect()
}

/// Argument `arg` (a `prot` value) without `PROT_EXEC`: no new executable memory.
fn no_exec(arg: u8) -> Vec<SeccompRule> {
    vec![rule(vec![cond(
        arg,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )])]
}

/// What every thread needs: memory allocation (never executable), locks, eventfd and log
/// writes, signal returns (vCPU kicks, SIGINT/SIGTERM land on any thread), closing what it
/// owns, and ending itself or the process (the panic hook's `_exit`).
fn common() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules = BTreeMap::new();
    for nr in [
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_getrandom,
        libc::SYS_clock_gettime,
        // Overhead figures: pread of the /proc/self files opened at set-up, and the
        // process's CPU time (vmm/src/overhead.rs).
        libc::SYS_pread64,
        libc::SYS_getrusage,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ] {
        rules.insert(nr, Vec::new());
    }
    rules.insert(libc::SYS_mmap, no_exec(2));
    rules.insert(libc::SYS_mprotect, no_exec(2));
    // Rust's `OwnedFd` drop checks in debug builds that the fd is open (`F_GETFD`).
    rules.insert(
        libc::SYS_fcntl,
        vec![rule(vec![cond(1, SeccompCmpOp::Eq, libc::F_GETFD as u64)])],
    );
    rules
}

/// The allowlist of a thread kind: syscall number → rules (empty = any arguments).
pub fn rules(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules = common();
    let mut allow = |nrs: &[i64]| {
        for &nr in nrs {
            rules.insert(nr, Vec::new());
        }
    };
    match kind {
        ThreadKind::Main => {
            allow(&[
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                // Stopping the vCPUs: kick each with a signal, wait in between.
                libc::SYS_getpid,
                libc::SYS_gettid,
                libc::SYS_tgkill,
                libc::SYS_clock_nanosleep,
                libc::SYS_nanosleep,
            ]);
            rules.insert(
                libc::SYS_ioctl,
                ioctls(&[KVM_SIGNAL_MSI, KVM_IRQFD, KVM_SET_GSI_ROUTING]),
            );
            // `--stats-json PATH`: File::create, nothing else.
            let create = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC) as u64;
            rules.insert(
                libc::SYS_openat,
                vec![rule(vec![cond(2, SeccompCmpOp::Eq, create)])],
            );
        }
        ThreadKind::Vcpu => {
            rules.insert(
                libc::SYS_ioctl,
                ioctls(&[
                    KVM_RUN,
                    KVM_GET_REGS,
                    KVM_SET_GSI_ROUTING,
                    KVM_IRQFD,
                    KVM_SIGNAL_MSI,
                ]),
            );
        }
        ThreadKind::BlockWorker => {
            allow(&[
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_lseek,
                libc::SYS_fdatasync,
            ]);
        }
        ThreadKind::IommuWorker => {
            allow(&[libc::SYS_epoll_wait, libc::SYS_epoll_pwait]);
        }
    }
    rules
}

/// Makes the C library stay inside the allowlists. glibc's `free()` may trim a thread arena's
/// heap, and the first time it does it reads `/proc/sys/vm/overcommit_memory` (`openat`), which
/// no filtered thread may do: a vCPU freeing a 64 KiB buffer was killed by SIGSYS exactly so.
/// A fixed `M_TRIM_THRESHOLD` that is never reached turns heap trimming off (large blocks are
/// still `mmap`ed and `munmap`ed). Call once, before any filter is installed.
pub fn prepare_process() {
    // SAFETY: mallopt only changes allocator tunables; no pointers.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) };
}

/// Compiles the filter of `kind` for `mode`; `None` with [`SeccompMode::Off`].
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<Option<Filter>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::On => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let f = SeccompFilter::new(
        rules(kind),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind, seccompiler::Error::Backend(e)))?;
    let prog: BpfProgram = f
        .try_into()
        .map_err(|e| SeccompError::Build(kind, seccompiler::Error::Backend(e)))?;
    Ok(Some(Arc::new(prog)))
}

/// Installs `filter` on the calling thread (nothing with `None`). Irrevocable.
pub fn apply(filter: Option<&Filter>) -> Result<(), SeccompError> {
    match filter {
        Some(f) => seccompiler::apply_filter(f).map_err(SeccompError::Install),
        None => Ok(()),
    }
}

/// Spawns thread `name` that installs `filter` before running `body`, and returns once the
/// filter is in place (or the error why it is not: then `body` never runs).
pub fn spawn<F, T>(
    name: String,
    filter: Option<Filter>,
    body: F,
) -> Result<JoinHandle<Option<T>>, SeccompError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let installed = apply(filter.as_ref());
            let ok = installed.is_ok();
            let _ = tx.send(installed);
            ok.then(body)
        })
        .map_err(|e| SeccompError::Spawn(name.clone(), e))?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => Err(SeccompError::Vanished(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_for_x86_64_in_both_modes() {
        for kind in THREAD_KINDS {
            for mode in [SeccompMode::On, SeccompMode::Log] {
                let f = filter(kind, mode).unwrap().expect("a filter when not off");
                assert!(
                    !f.is_empty() && f.len() < 4096,
                    "{kind:?}: {} insns",
                    f.len()
                );
            }
            assert!(filter(kind, SeccompMode::Off).unwrap().is_none());
        }
    }

    #[test]
    fn kvm_ioctl_numbers_match_linux() {
        // Values from linux/kvm.h as printed by a C program (and by strace).
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_SIGNAL_MSI, 0x4020_aea5);
    }

    #[test]
    fn dangerous_calls_are_in_no_allowlist() {
        for kind in THREAD_KINDS {
            let r = rules(kind);
            for nr in [
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_execve,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_open,
                libc::SYS_ptrace,
                libc::SYS_mount,
            ] {
                assert!(!r.contains_key(&nr), "{kind:?} allows syscall {nr}");
            }
            // ioctl and fcntl only with argument filters.
            for nr in [libc::SYS_ioctl, libc::SYS_fcntl] {
                if let Some(rules) = r.get(&nr) {
                    assert!(!rules.is_empty(), "{kind:?} allows syscall {nr} unfiltered");
                }
            }
        }
        assert!(!rules(ThreadKind::IommuWorker).contains_key(&libc::SYS_ioctl));
        assert!(!rules(ThreadKind::BlockWorker).contains_key(&libc::SYS_ioctl));
    }

    #[test]
    fn spawn_installs_the_filter_before_the_body_runs() {
        let f = filter(ThreadKind::IommuWorker, SeccompMode::Log).unwrap();
        let h = spawn("sec-test".into(), f, || {
            std::fs::read_to_string("/proc/thread-self/status").unwrap()
        })
        .unwrap();
        let status = h.join().unwrap().unwrap();
        assert!(status.contains("Seccomp:\t2"), "{status}");
    }
}
