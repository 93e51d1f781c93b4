//! vCPU threads: run KVM, dispatch port I/O and MMIO exits to the buses, and report why the
//! VM must stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use devices::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::irq_routing::IoapicEoi;

/// Why the VM stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5 or a KVM shutdown system event).
    PowerOff,
    /// The guest asked for a reboot.
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU.
        cpu: u32,
    },
    /// KVM could not run the guest.
    Fatal(String),
    /// The VMM got SIGINT or SIGTERM.
    Signal(i32),
    /// The guest wrote this byte to the `--debug-exit` port.
    DebugExit(u8),
    /// `--timeout` expired (seconds).
    Timeout(u64),
}

/// Exit status when `--timeout` stops the guest: `timeout(1)`'s, even (so no `--debug-exit`
/// status `(v << 1) | 1` equals it) and below the 128+N of signals.
pub const TIMEOUT_EXIT_CODE: i32 = 124;

impl VmExit {
    /// The process exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::PowerOff => 0,
            VmExit::Reset => 3,
            VmExit::TripleFault { .. } => 4,
            VmExit::Fatal(_) => 5,
            VmExit::Signal(sig) => 128 + sig,
            VmExit::DebugExit(v) => i32::from(devices::debug_exit::debug_exit_status(*v)),
            VmExit::Timeout(_) => TIMEOUT_EXIT_CODE,
        }
    }

    /// One line describing the reason.
    pub fn describe(&self) -> String {
        match self {
            VmExit::PowerOff => "guest powered off".into(),
            VmExit::Reset => {
                "guest requested a reboot; rebooting is not supported, stopping".into()
            }
            VmExit::TripleFault { cpu } => format!("vCPU {cpu} triple-faulted (KVM_EXIT_SHUTDOWN)"),
            VmExit::Fatal(m) => m.clone(),
            VmExit::Signal(sig) => format!("stopped by signal {sig}"),
            VmExit::DebugExit(v) => format!(
                "guest wrote {v:#x} to the debug-exit port: exit status {}",
                devices::debug_exit::debug_exit_status(*v)
            ),
            VmExit::Timeout(secs) => {
                format!("--timeout: the guest was still running after {secs} s, stopped it")
            }
        }
    }
}

/// How vCPU threads report a stop: a channel plus an eventfd that wakes the event loop.
#[derive(Debug, Clone)]
pub struct ExitSender {
    tx: Sender<VmExit>,
    wake: Arc<EventFd>,
}

impl ExitSender {
    /// Wraps a channel and the event loop's wake-up eventfd.
    pub fn new(tx: Sender<VmExit>, wake: Arc<EventFd>) -> Self {
        ExitSender { tx, wake }
    }

    /// Reports a stop reason.
    pub fn send(&self, reason: VmExit) {
        // The receiver only goes away when the VMM is already stopping.
        let _ = self.tx.send(reason);
        if let Err(e) = self.wake.write(1) {
            log::error!("Cannot wake the event loop: {e}");
        }
    }
}

/// Everything a vCPU thread needs besides its fd.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// The interrupt router, for `KVM_EXIT_IOAPIC_EOI`.
    pub eoi: Arc<dyn IoapicEoi>,
    /// Stop reasons go here.
    pub exit: ExitSender,
    /// Set when the VM stops; checked before each KVM_RUN.
    pub stop: Arc<AtomicBool>,
    /// When the first vCPU first entered KVM_RUN (the VMM's start-up cost ends there).
    pub first_run: Arc<std::sync::OnceLock<std::time::Instant>>,
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Run the vCPU again.
    Continue,
    /// Stop the VM for this reason.
    Stop(VmExit),
}

/// Dispatches one exit. Kept free of the fd so it can be tested with synthetic exits.
pub fn handle_exit(cpu: u32, exit: VcpuExit, ctx: &VcpuContext) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !ctx.pio.read(u64::from(port), data) {
                data.fill(0xff);
                log::trace!("Unhandled port read {port:#x}");
            }
        }
        VcpuExit::IoOut(port, data) => {
            if !ctx.pio.write(u64::from(port), data) {
                log::trace!("Unhandled port write {port:#x}");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio.read(addr, data) {
                data.fill(0xff);
                log::debug!("Unhandled MMIO read at {addr:#x}");
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio.write(addr, data) {
                log::debug!("Unhandled MMIO write at {addr:#x}");
            }
        }
        VcpuExit::IoapicEoi(vector) => ctx.eoi.ioapic_eoi(vector),
        VcpuExit::Hlt => {}
        VcpuExit::Shutdown => return ExitAction::Stop(VmExit::TripleFault { cpu }),
        VcpuExit::SystemEvent(kind, _) => {
            return ExitAction::Stop(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                other => VmExit::Fatal(format!("vCPU {cpu}: KVM system event {other}")),
            })
        }
        VcpuExit::FailEntry(reason, hw_cpu) => {
            return ExitAction::Stop(VmExit::Fatal(format!(
                "vCPU {cpu}: KVM entry failed (reason {reason:#x}, host CPU {hw_cpu})"
            )))
        }
        VcpuExit::InternalError => {
            return ExitAction::Stop(VmExit::Fatal(format!("vCPU {cpu}: KVM internal error")))
        }
        other => {
            return ExitAction::Stop(VmExit::Fatal(format!(
                "vCPU {cpu}: unexpected KVM exit {other:?}"
            )))
        }
    }
    ExitAction::Continue
}

/// Describes a KVM internal error with its suberror and the guest RIP, the facts needed to
/// debug an emulation failure.
fn internal_error_details(cpu: u32, fd: &mut VcpuFd) -> String {
    let run = fd.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
    // KVM filled in.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let data: Vec<String> = internal.data[..n]
        .iter()
        .map(|d| format!("{d:#x}"))
        .collect();
    let rip = fd
        .get_regs()
        .map(|r| format!("{:#x}", r.rip))
        .unwrap_or_else(|_| "?".into());
    format!(
        "vCPU {cpu}: KVM internal error, suberror {} (1 = emulation failure), rip {rip}, data [{}]",
        internal.suberror,
        data.join(", ")
    )
}

/// The vCPU thread body: runs until the VM stops.
pub fn run_vcpu(cpu: u32, mut fd: VcpuFd, ctx: VcpuContext) {
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            return;
        }
        ctx.first_run.get_or_init(std::time::Instant::now);
        let action = match fd.run() {
            Ok(VcpuExit::InternalError) => {
                ExitAction::Stop(VmExit::Fatal(internal_error_details(cpu, &mut fd)))
            }
            Ok(exit) => handle_exit(cpu, exit, &ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                ExitAction::Continue
            }
            Err(e) => ExitAction::Stop(VmExit::Fatal(format!("vCPU {cpu}: KVM_RUN failed: {e}"))),
        };
        if let ExitAction::Stop(reason) = action {
            ctx.stop.store(true, Ordering::Release);
            ctx.exit.send(reason);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::sync::Mutex;

    type Writes = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;
    struct Recorder(Writes);
    impl devices::BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    struct NoEoi;
    impl IoapicEoi for NoEoi {
        fn ioapic_eoi(&self, _: u8) {}
    }

    fn context() -> (VcpuContext, Writes) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(Recorder(log.clone()))), 0x3f8, 8)
            .unwrap();
        let (tx, _rx) = channel();
        let ctx = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            eoi: Arc::new(NoEoi),
            exit: ExitSender::new(tx, Arc::new(EventFd::new(0).unwrap())),
            stop: Arc::new(AtomicBool::new(false)),
            first_run: Arc::default(),
        };
        (ctx, log)
    }

    #[test]
    fn port_io_reaches_the_device_at_its_offset() {
        let (ctx, log) = context();
        assert_eq!(
            handle_exit(0, VcpuExit::IoOut(0x3f9, &[7]), &ctx),
            ExitAction::Continue
        );
        assert_eq!(*log.lock().unwrap(), vec![(1, vec![7])]);
        let mut d = [0u8; 1];
        handle_exit(0, VcpuExit::IoIn(0x3fa, &mut d), &ctx);
        assert_eq!(d, [2]);
    }

    #[test]
    fn unclaimed_reads_return_all_ones() {
        let (ctx, _) = context();
        let mut d = [0u8; 4];
        handle_exit(0, VcpuExit::MmioRead(0xdead_0000, &mut d), &ctx);
        assert_eq!(d, [0xff; 4]);
        let mut d = [0u8; 1];
        handle_exit(0, VcpuExit::IoIn(0x80, &mut d), &ctx);
        assert_eq!(d, [0xff]);
    }

    #[test]
    fn triple_fault_and_system_events_stop_the_vm() {
        let (ctx, _) = context();
        assert_eq!(
            handle_exit(1, VcpuExit::Shutdown, &ctx),
            ExitAction::Stop(VmExit::TripleFault { cpu: 1 })
        );
        assert_eq!(
            handle_exit(
                0,
                VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN, &[]),
                &ctx
            ),
            ExitAction::Stop(VmExit::PowerOff)
        );
        assert_eq!(
            handle_exit(
                0,
                VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_RESET, &[]),
                &ctx
            ),
            ExitAction::Stop(VmExit::Reset)
        );
    }

    #[test]
    fn exit_codes_distinguish_reasons() {
        assert_eq!(VmExit::PowerOff.exit_code(), 0);
        assert_ne!(VmExit::Reset.exit_code(), 0);
        assert_ne!(VmExit::TripleFault { cpu: 0 }.exit_code(), 0);
        assert_eq!(VmExit::Signal(15).exit_code(), 143);
    }
}
