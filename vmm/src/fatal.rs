//! What happens when a VMM thread panics: the VM stops.
//!
//! A panic means a bug: some invariant did not hold, possibly half-way through an update of
//! state other threads rely on (IOMMU mappings, interrupt routes). Letting the panicking thread
//! disappear while the others go on would leave a VM with a dead device or vCPU, and an IOMMU
//! deciding on half-applied state. So [`install_panic_hook`] makes every panic, on any
//! thread, print one line (`vmm: fatal: thread 'NAME' panicked at FILE:LINE: MESSAGE`) and end
//! the process with [`EXIT_PANIC`]. Release and dev builds also set `panic = "abort"`
//! (workspace `Cargo.toml`), so nothing unwinds past the hook; locks are never recovered
//! from poisoning (`devices::sync`).

use std::panic::PanicHookInfo;

/// Process exit status after a panic in any VMM thread.
pub const EXIT_PANIC: i32 = 6;

/// The one-line report for a panic.
pub fn describe(info: &PanicHookInfo<'_>) -> String {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    let payload = info.payload();
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    let at = info
        .location()
        .map(|l| format!(" at {}:{}", l.file(), l.line()))
        .unwrap_or_default();
    let msg = msg.replace(['\n', '\r'], " ");
    format!("vmm: fatal: thread '{name}' panicked{at}: {msg}")
}

/// Makes any panic end the process with one line on stderr and [`EXIT_PANIC`].
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("{}", describe(info));
        // Not process::exit: other threads keep running during exit handlers and could
        // touch guest state; the kernel closes every fd (KVM, disks) for us.
        // SAFETY: _exit takes no pointers and never returns.
        unsafe { libc::_exit(EXIT_PANIC) }
    }));
}
