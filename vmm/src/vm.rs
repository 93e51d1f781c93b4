//! The boot recipe, in order: KVM → memory → irqchip → devices → ACPI → kernel → vCPUs →
//! event loop. [`run`] reads as that checklist; each step is a small function.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arch::cpuid::{filter_cpuid, VcpuTopology};
use arch::layout;
use arch::regs;
use devices::marker::Marker;
use devices::remap::{RemapStats, RemapUnit};
use devices::{
    AcpiPm, Bus, DebugExit, ExitSignal, Ioapic, PvIrq, PvIrqConfig, PvIrqStats, Serial, I8042,
};
use firmware_tables::{
    DmarDesc, IoapicDesc, PlatformDescription, PmDesc, PvirDesc, SerialDesc, PVIR_FLAG_IOAPIC_ALL,
    PVIR_FLAG_PCI_SEGMENT0_ALL,
};
use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::config::{Firmware, VmConfig};
use crate::device_manager::{DeviceManager, DevicePlan, DeviceStats};
use crate::event_loop::{self, EventLoopError};
use crate::fdt::{self, FdtSetupError};
use crate::interrupts::{
    InterruptCounters, InterruptError, InterruptManager, InterruptStats, IrqfdLine, ParkedPoller,
};
use crate::irq_routing::{IoapicBus, IrqRouter, RemapBus};
use crate::kernel::{self, KernelError};
use crate::marks::{CounterFn, MarkRecorder, MarkReport, RecorderSink};
use crate::overhead::{self, CpuClocks, Overhead, ProcSampler};
use crate::remapper::InterruptRemapper;
use crate::seccomp::{self, SeccompError, ThreadKind};
use crate::vcpu::{run_vcpu, ExitSender, VcpuContext, VmExit};

/// `KVM_CAP_X2APIC_API` flags: 32-bit destination IDs in MSI routes and no broadcast quirk.
const X2APIC_API_FLAGS: u64 = (kvm_bindings::KVM_X2APIC_API_USE_32BIT_IDS
    | kvm_bindings::KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK) as u64;
/// Address of the 3-page TSS region KVM needs on Intel hosts (just below the BIOS area at 4 GiB).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors while building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm can't be opened.
    #[error("Cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A required KVM capability is missing.
    #[error("KVM lacks {0:?}, which this VMM needs")]
    MissingCap(Cap),
    /// A KVM ioctl failed.
    #[error("KVM call failed: {what}")]
    Kvm {
        /// What we were doing.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory allocation failed.
    #[error("Cannot allocate {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    /// Device creation failed.
    #[error("Cannot create devices")]
    Devices(#[source] crate::device_manager::DeviceError),
    /// Interrupt setup failed.
    #[error("Cannot set up interrupts")]
    Interrupts(#[source] InterruptError),
    /// A device could not be placed on a bus.
    #[error("Cannot register a device on the bus")]
    Bus(#[source] devices::BusError),
    /// ACPI table generation failed.
    #[error("Cannot build ACPI tables")]
    Acpi(#[source] firmware_tables::AcpiError),
    /// MP table generation failed.
    #[error("Cannot build the MP table")]
    Mptable(#[source] firmware_tables::MptableError),
    /// Writing the ACPI tables failed.
    #[error("Cannot write ACPI tables into guest memory")]
    WriteAcpi(#[source] vm_memory::GuestMemoryError),
    /// Dumping tables failed.
    #[error("Cannot write ACPI table dump {0}")]
    DumpTables(std::path::PathBuf, #[source] std::io::Error),
    /// Device-tree setup failed.
    #[error("Cannot set up the device tree")]
    Fdt(#[source] FdtSetupError),
    /// Kernel loading failed.
    #[error("Cannot load the guest kernel")]
    Kernel(#[source] KernelError),
    /// The power-management exit signal could not be created.
    #[error("Cannot create the power-off signal")]
    ExitSignal(#[source] devices::ExitSignalError),
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A vCPU thread could not be spawned (or could not install its seccomp filter).
    #[error("Cannot start a vCPU thread")]
    Spawn(#[source] SeccompError),
    /// A seccomp filter could not be built or installed.
    #[error("Cannot set up the main thread's seccomp filter")]
    Seccomp(#[source] SeccompError),
    /// The signal handler for kicking vCPUs can't be installed.
    #[error("Cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The event loop failed.
    #[error("Event loop failed")]
    EventLoop(#[source] EventLoopError),
    /// /proc/self files for the overhead figures can't be opened.
    #[error("Cannot open /proc/self for the overhead figures")]
    Overhead(#[source] std::io::Error),
    /// Writing the statistics file failed.
    #[error("Cannot write statistics to {0}")]
    Stats(std::path::PathBuf, #[source] std::io::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// What the run ended with, plus the numbers the VMM reports.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why the VM stopped.
    pub exit: VmExit,
    /// Interrupt counters at the end.
    pub interrupts: InterruptCounters,
    /// Triggers of the serial port's interrupt line.
    pub serial_irqs: u64,
    /// IOAPIC redirection-table writes and EOIs.
    pub ioapic: devices::IoapicStats,
    /// Virtio device counters.
    pub devices: DeviceStats,
    /// Interrupt-remapping unit counters, with `--iommu` / `--iommu=intremap`.
    pub remap: Option<RemapStats>,
    /// PV-IR counters, with `--iommu=pvremap` / `--iommu=dma,pvremap`.
    pub pvirq: Option<PvIrqStats>,
    /// IOAPIC messages left without a route because they were blocked.
    pub irqs_blocked: u64,
    /// Wall time from VMM start to stop.
    pub elapsed: Duration,
    /// Guest accesses handled by the VMM, per device (every one is a VM exit to userspace).
    pub exits: ExitCounts,
    /// Guest-written marks with counter snapshots, and the boot time.
    pub marks: MarkReport,
    /// The VMM's own cost (start-up, memory, threads, CPU).
    pub overhead: Overhead,
}

/// Exits that reached the VMM, per bus device.
#[derive(Debug, Clone, Default)]
pub struct ExitCounts {
    /// MMIO exits per device.
    pub mmio: Vec<devices::bus::BusExits>,
    /// Port I/O exits per device.
    pub pio: Vec<devices::bus::BusExits>,
    /// MMIO accesses no device claimed.
    pub mmio_unclaimed: u64,
    /// Port accesses no device claimed.
    pub pio_unclaimed: u64,
}

/// Serial output: written straight through to stdout so prompts without a newline show.
struct ConsoleOut;

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Creates a VM with split irqchip (and the x2APIC API when KVM has it).
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    for cap in [
        Cap::Irqfd,
        Cap::IrqRouting,
        Cap::SplitIrqchip,
        Cap::Ioeventfd,
        Cap::SignalMsi,
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(cap));
        }
    }
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    if let Err(e) = vm.set_tss_address(KVM_TSS_ADDRESS) {
        log::warn!("KVM_SET_TSS_ADDR failed ({e}); continuing");
    }
    // Split irqchip: LAPICs in KVM, IOAPIC in userspace, GSIs 0..24 reserved for its pins.
    let split = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
        args: [u64::from(layout::IOAPIC_PINS), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&split)
        .map_err(kvm_err("KVM_ENABLE_CAP(SPLIT_IRQCHIP)"))?;
    if kvm.check_extension(Cap::X2ApicApi) {
        let x2apic = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X2APIC_API,
            args: [X2APIC_API_FLAGS, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&x2apic)
            .map_err(kvm_err("KVM_ENABLE_CAP(X2APIC_API)"))?;
    }
    Ok(vm)
}

/// Allocates `size` bytes of guest RAM laid out around the MMIO hole and registers it.
pub fn create_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap, VmError> {
    let ranges: Vec<_> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory(size >> 20, e))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("an mmap region always has a host address");
        // Back guest RAM with transparent huge pages where the host allows it (as QEMU and
        // Cloud Hypervisor do): fewer host page faults and TLB misses for the guest.
        // SAFETY: the range is exactly this region's own anonymous mapping; MADV_HUGEPAGE only
        // changes how the kernel backs it and never invalidates its contents.
        let rc = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            log::debug!(
                "madvise(MADV_HUGEPAGE) failed: {}",
                std::io::Error::last_os_error()
            );
        }
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the host range belongs to `mem`, an mmap that outlives the VM: `run` keeps
        // `mem` alive until every vCPU thread is joined and the VmFd is dropped.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(mem)
}

/// PV-IR handles per VM. Handles cost no KVM route (a route belongs to a source, and there
/// are at most `GSI_MSI_END + 1` of those); 256 covers every IOAPIC pin plus the MSI-X
/// vectors of the PCI functions.
pub const PV_IRQ_MAX_HANDLES: u16 = 256;

/// What PV-IR covers: our IOAPIC's pins, the PCI functions of `plan`, the vCPUs' APIC IDs
/// (vCPU index = APIC ID, see `arch::cpuid`).
pub fn pv_irq_config(cfg: &VmConfig, plan: &DevicePlan) -> PvIrqConfig {
    PvIrqConfig {
        ioapic_id: layout::IOAPIC_ID,
        // Lossless: 24 pins.
        ioapic_pins: layout::IOAPIC_PINS as u8,
        pci_requesters: plan.pci_requesters(),
        apic_ids: (0..cfg.cpus).collect(),
        max_handles: PV_IRQ_MAX_HANDLES,
    }
}

/// The platform description the firmware tables are built from.
fn platform(cfg: &VmConfig, dm: &DeviceManager) -> PlatformDescription {
    PlatformDescription {
        num_cpus: cfg.cpus,
        ioapic: IoapicDesc {
            id: layout::IOAPIC_ID,
            address: layout::IOAPIC_START as u32,
            gsi_base: 0,
        },
        serial: Some(SerialDesc {
            io_base: layout::SERIAL_PORT,
            irq: layout::SERIAL_IRQ,
        }),
        pm: PmDesc {
            io_base: layout::PM_PORT,
        },
        virtio_mmio: dm.endpoint_descs(),
        iommu: dm.iommu_desc(),
        dmar: cfg.iommu_intremap.then_some(DmarDesc {
            register_base: layout::DMAR_START,
            ioapic_id: layout::IOAPIC_ID,
            ioapic_source_id: layout::IOAPIC_SOURCE_ID,
        }),
        // PV-IR instead of DMAR (never both): every IOAPIC pin and every PCI function.
        pvir: cfg.iommu_pvremap.then_some(PvirDesc {
            register_base: layout::PVIR_START,
            flags: PVIR_FLAG_IOAPIC_ALL | PVIR_FLAG_PCI_SEGMENT0_ALL,
            max_handles: u32::from(PV_IRQ_MAX_HANDLES),
        }),
        pci: dm.pci_host_desc(),
    }
}

fn write_acpi(cfg: &VmConfig, dm: &DeviceManager, mem: &GuestMemoryMmap) -> Result<u64, VmError> {
    let tables =
        firmware_tables::build_acpi(&platform(cfg, dm), layout::ACPI_START, layout::ACPI_SIZE)
            .map_err(VmError::Acpi)?;
    for blob in &tables.blobs {
        mem.write_slice(&blob.bytes, GuestAddress(blob.addr))
            .map_err(VmError::WriteAcpi)?;
        log::debug!(
            "acpi: wrote {} ({} bytes) at {:#x}",
            blob.name_str(),
            blob.bytes.len(),
            blob.addr
        );
    }
    if let Some(dir) = &cfg.dump_tables {
        std::fs::create_dir_all(dir).map_err(|e| VmError::DumpTables(dir.clone(), e))?;
        for blob in &tables.blobs {
            let path = dir.join(format!("{}.dat", blob.name_str()));
            std::fs::write(&path, &blob.bytes).map_err(|e| VmError::DumpTables(path, e))?;
        }
    }
    Ok(tables.rsdp_addr)
}

/// Writes the MP table that agrees with the MADT (ACPI mode): Linux's search for one stops at
/// [`layout::MPTABLE_START`] instead of scanning the BIOS area 16 bytes at a time.
fn write_mptable(cfg: &VmConfig, dm: &DeviceManager, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    let bytes = firmware_tables::build_mptable(&platform(cfg, dm), layout::MPTABLE_START)
        .map_err(VmError::Mptable)?;
    debug_assert!(bytes.len() as u64 <= layout::MPTABLE_MAX_SIZE);
    mem.write_slice(&bytes, GuestAddress(layout::MPTABLE_START))
        .map_err(VmError::WriteAcpi)?;
    log::debug!(
        "mptable: wrote {} bytes at {:#x}",
        bytes.len(),
        layout::MPTABLE_START
    );
    Ok(())
}

fn configure_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    id: u32,
    cfg: &VmConfig,
    boot: Option<kernel::BootEntry>,
) -> Result<(), VmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    filter_cpuid(
        cpuid.as_mut_slice(),
        VcpuTopology {
            cpu_id: id as u8,
            cpu_count: cfg.cpus as u8,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        },
    );
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    regs::set_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;

    // Application processors keep their reset state: the guest starts them with INIT/SIPI
    // through its LAPIC, which KVM emulates.
    let Some(boot) = boot else { return Ok(()) };
    let entries = regs::boot_msrs();
    let msrs = Msrs::from_entries(&entries).expect("the boot MSR list is far below the FAM limit");
    let written = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if written != entries.len() {
        log::warn!(
            "KVM accepted {written} of {} boot MSRs (first refused: {:#x})",
            entries.len(),
            entries[written].index
        );
    }
    vcpu.set_fpu(&regs::boot_fpu())
        .map_err(kvm_err("KVM_SET_FPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    regs::boot_sregs(&mut sregs, boot.protocol);
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs::boot_regs(boot.protocol, boot.entry))
        .map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(())
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Stops the vCPU threads: sets the stop flag and signals each thread until it leaves
/// KVM_RUN (a signal that lands just before KVM_RUN is repeated by the next round).
fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<Option<()>>>) {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut threads = threads;
    while !threads.is_empty() && Instant::now() < deadline {
        for t in &threads {
            let _ = t.kill(SIGRTMIN());
        }
        std::thread::sleep(Duration::from_millis(10));
        let (done, running): (Vec<_>, Vec<_>) = threads.into_iter().partition(|t| t.is_finished());
        for t in done {
            let _ = t.join();
        }
        threads = running;
    }
    if !threads.is_empty() {
        log::warn!("{} vCPU thread(s) did not stop in time", threads.len());
    }
}

/// Builds the VM described by `cfg`, runs it until it stops, and reports why.
pub fn run(cfg: &VmConfig) -> Result<RunOutcome, VmError> {
    if cfg.seccomp != seccomp::SeccompMode::Off {
        seccomp::prepare_process();
    }
    let started = Instant::now();
    // Built first: a broken rule is a set-up error before anything runs.
    let vcpu_filter = seccomp::filter(ThreadKind::Vcpu, cfg.seccomp).map_err(VmError::Seccomp)?;
    let main_filter = seccomp::filter(ThreadKind::Main, cfg.seccomp).map_err(VmError::Seccomp)?;
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let vm = Arc::new(create_vm(&kvm)?);
    let mem = create_memory(&vm, cfg.mem_size)?;

    // Interrupts: an (empty) routing table first, then irqfds.
    let interrupts = Arc::new(InterruptManager::new(
        vm.clone(),
        layout::IOAPIC_PINS,
        (layout::GSI_MSI_START, layout::GSI_MSI_END),
    ));
    interrupts.init_routing().map_err(VmError::Interrupts)?;

    // Devices.
    let exit_wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?);
    let (exit_tx, exit_rx) = channel();
    let exit_rx = Arc::new(Mutex::new(exit_rx));
    let exit = ExitSender::new(exit_tx, exit_wake.clone());
    let remapper: Option<Box<dyn InterruptRemapper>> = if cfg.iommu_intremap {
        Some(Box::new(RemapUnit::new(mem.clone())))
    } else if cfg.iommu_pvremap {
        let plan = DevicePlan::new(cfg).map_err(VmError::Devices)?;
        Some(Box::new(PvIrq::new(pv_irq_config(cfg, &plan), mem.clone())))
    } else {
        None
    };
    let router = IrqRouter::with_remapper(
        Ioapic::new(layout::IOAPIC_ID),
        remapper,
        interrupts.clone(),
        layout::IOAPIC_SOURCE_ID,
    );
    let mut mmio = Bus::new();
    mmio.insert_named(
        "ioapic",
        Arc::new(Mutex::new(IoapicBus(router.clone()))),
        layout::IOAPIC_START,
        layout::IOAPIC_SIZE,
    )
    .map_err(VmError::Bus)?;
    if cfg.iommu_intremap {
        mmio.insert_named(
            "dmar",
            Arc::new(Mutex::new(RemapBus(router.clone()))),
            layout::DMAR_START,
            layout::DMAR_SIZE,
        )
        .map_err(VmError::Bus)?;
        log::info!("Interrupt remapping unit at {:#x}", layout::DMAR_START);
    } else if cfg.iommu_pvremap {
        // The same router entry points: the router has exactly one remapper.
        mmio.insert_named(
            "pvir",
            Arc::new(Mutex::new(RemapBus(router.clone()))),
            layout::PVIR_START,
            layout::PVIR_SIZE,
        )
        .map_err(VmError::Bus)?;
        log::info!(
            "PV-IR (paravirtual interrupt remapping) at {:#x}",
            layout::PVIR_START
        );
    }
    let serial_line: Arc<IrqfdLine> = interrupts
        .irqfd_line(layout::SERIAL_IRQ)
        .map_err(VmError::Interrupts)?;
    let serial = Arc::new(Mutex::new(Serial::new(
        serial_line.clone(),
        Box::new(ConsoleOut),
    )));
    let mut pio = Bus::new();
    pio.insert_named("serial", serial.clone(), u64::from(layout::SERIAL_PORT), 8)
        .map_err(VmError::Bus)?;
    let power = ExitSignal::new().map_err(VmError::ExitSignal)?;
    pio.insert_named(
        "acpi-pm",
        Arc::new(Mutex::new(AcpiPm::new(power.clone()))),
        u64::from(layout::PM_PORT),
        devices::pm::PM_REG_LEN,
    )
    .map_err(VmError::Bus)?;
    pio.insert_named(
        "i8042",
        Arc::new(Mutex::new(I8042::new(power.clone()))),
        u64::from(layout::I8042_PORT),
        devices::i8042::I8042_PORT_LEN,
    )
    .map_err(VmError::Bus)?;
    let marks = MarkRecorder::new(started);
    pio.insert_named(
        "marker",
        Arc::new(Mutex::new(Marker::new(Box::new(RecorderSink(
            marks.clone(),
        ))))),
        u64::from(layout::MARKER_PORT),
        u64::from(layout::MARKER_PORT_LEN),
    )
    .map_err(VmError::Bus)?;
    if cfg.debug_exit {
        pio.insert_named(
            "debug-exit",
            Arc::new(Mutex::new(DebugExit::new(power.clone()))),
            u64::from(devices::debug_exit::DEBUG_EXIT_PORT),
            devices::debug_exit::DEBUG_EXIT_PORT_LEN,
        )
        .map_err(VmError::Bus)?;
    }
    if cfg.firmware == Firmware::Dt {
        fdt::add_poweroff(&mut mmio, &power).map_err(VmError::Fdt)?;
    }

    let mut dm = DeviceManager::new(cfg, &vm, &mem, &mut mmio, &mut pio, &interrupts, &router)
        .map_err(VmError::Devices)?;

    // Firmware tables (ACPI, or a device tree) and kernel.
    let (rsdp, setup_data) = match cfg.firmware {
        Firmware::Acpi => {
            write_mptable(cfg, &dm, &mem)?;
            (write_acpi(cfg, &dm, &mem)?, None)
        }
        Firmware::Dt => {
            let desc = platform(cfg, &dm);
            let dtb = fdt::write(&desc, &mem, cfg.dump_tables.as_ref()).map_err(VmError::Fdt)?;
            (0, Some(dtb))
        }
    };
    let boot = kernel::load(cfg, &mem, rsdp, setup_data).map_err(VmError::Kernel)?;
    kernel::write_boot_tables(&mem, boot.protocol).map_err(VmError::Kernel)?;

    let cpu_clocks = Arc::new(CpuClocks::default());
    let mut counters = mark_counters(&interrupts, &mmio, &pio, &cpu_clocks);
    counters.extend(dm.mark_counters());
    marks.set_counters(counters);
    // Guest RAM, excluded from the VMM's resident memory.
    let guest_ram: Vec<(u64, u64)> = mem
        .iter()
        .filter_map(|r| {
            r.get_host_address(vm_memory::MemoryRegionAddress(0))
                .ok()
                .map(|h| (h as u64, r.len()))
        })
        .collect();
    let sampler = Arc::new(ProcSampler::open(guest_ram).map_err(VmError::Overhead)?);
    let mid_boot: Arc<OnceLock<overhead::Sample>> = Arc::default();
    {
        let (mid_boot, sampler) = (mid_boot.clone(), sampler.clone());
        marks.set_on_init(Box::new(move || {
            if let Ok(s) = sampler.sample() {
                let _ = mid_boot.set(s);
            }
        }));
    }
    // Clones share the exit counters.
    let (mmio_counts, pio_counts) = (mmio.clone(), pio.clone());

    // vCPUs.
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(VmError::Signal)?;
    let stop = Arc::new(AtomicBool::new(false));
    let ctx = VcpuContext {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        eoi: router.clone(),
        exit: exit.clone(),
        stop: stop.clone(),
        first_run: Arc::default(),
    };
    let mut vcpus = Vec::new();
    for id in 0..cfg.cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        configure_vcpu(&kvm, &fd, id, cfg, (id == 0).then_some(boot))?;
        vcpus.push(fd);
    }
    let mut threads = Vec::new();
    for (id, fd) in vcpus.into_iter().enumerate() {
        let ctx = ctx.clone();
        let t = seccomp::spawn(format!("vcpu{id}"), vcpu_filter.clone(), move || {
            run_vcpu(id as u32, fd, ctx)
        })
        .map_err(VmError::Spawn)?;
        threads.push(t);
    }
    cpu_clocks.set_vcpus(&threads);
    log::info!("Started {} vCPU(s) after {:?}", cfg.cpus, started.elapsed());

    let parked = Arc::new(Mutex::new(ParkedPoller::new(interrupts.clone())));
    let timeout = cfg
        .timeout
        .map(|after| event_loop::Timeout { after, started });
    // Every other thread runs and has its own filter: the main thread's goes on right before
    // the event loop (threads spawned after this would inherit it).
    let reason = event_loop::run(
        exit_wake,
        exit_rx.clone(),
        serial.clone(),
        power,
        parked,
        timeout,
        main_filter.as_ref(),
    )
    .map_err(VmError::EventLoop);
    // Sampled while every thread is still there.
    let at_exit = sampler.sample().ok();
    let cpu = cpu_clocks.split_ms();
    let mid = mid_boot.get().copied();
    let overhead = Overhead {
        first_kvm_run_ms: ctx
            .first_run
            .get()
            .map(|t| t.duration_since(started).as_millis() as u64),
        rss_mid_boot_kib: mid.map(|s| s.rss_kib),
        threads_mid_boot: mid.map(|s| s.threads),
        rss_exit_kib: at_exit.map(|s| s.rss_kib),
        threads: at_exit.map(|s| s.threads),
        cpu_vcpu_ms: cpu.map(|c| c.0),
        cpu_vmm_ms: cpu.map(|c| c.1),
    };
    stop_vcpus(&stop, threads);
    dm.stop();
    let reason = reason?;
    drain_reason(&exit_rx);

    let (ioapic_stats, irqs_blocked, remap_stats, pvirq_stats) = {
        let router = devices::sync::lock(&router);
        (
            router.ioapic_stats(),
            router.blocked(),
            router.remap_stats(),
            router.pvirq_stats(),
        )
    };
    Ok(RunOutcome {
        exit: reason,
        interrupts: interrupts.counters(),
        serial_irqs: serial_line.triggers(),
        ioapic: ioapic_stats,
        devices: dm.stats(),
        remap: remap_stats,
        pvirq: pvirq_stats,
        irqs_blocked,
        elapsed: started.elapsed(),
        exits: ExitCounts {
            mmio: mmio_counts.exits(),
            pio: pio_counts.exits(),
            mmio_unclaimed: mmio_counts.unclaimed(),
            pio_unclaimed: pio_counts.unclaimed(),
        },
        marks: marks.report(),
        overhead,
    })
}

/// The counters each guest mark snapshots: interrupt delivery and routing, and every
/// device's exits (atomics only: marks are taken on a vCPU).
fn mark_counters(
    interrupts: &Arc<InterruptManager>,
    mmio: &Bus,
    pio: &Bus,
    cpu: &Arc<CpuClocks>,
) -> Vec<(String, CounterFn)> {
    let mut out: Vec<(String, CounterFn)> = Vec::new();
    let stats = interrupts.stats();
    for (name, pick) in [
        (
            "irqfd_triggers",
            (|s: &InterruptStats| &s.irqfd_triggers) as fn(&InterruptStats) -> &AtomicU64,
        ),
        ("signal_msi", |s| &s.signal_msi),
        ("ioapic_eoi_exits", |s| &s.ioapic_eoi_exits),
        ("routing_updates", |s| &s.routing_updates),
        ("routes_rebuilt", |s| &s.routes_rebuilt),
        ("blocked_requests", |s| &s.blocked_requests),
        ("fault_events", |s| &s.fault_events),
    ] {
        let s = stats.clone();
        out.push((
            name.into(),
            Box::new(move || pick(&s).load(Ordering::Relaxed)),
        ));
    }
    // CPU time of the VMM's threads (clock_gettime/getrusage: no lock, no file).
    let c = cpu.clone();
    out.push((
        "cpu_ms.vcpus".into(),
        Box::new(move || c.split_ms().map_or(0, |c| c.0)),
    ));
    let c = cpu.clone();
    out.push((
        "cpu_ms.vmm".into(),
        Box::new(move || c.split_ms().map_or(0, |c| c.1)),
    ));
    for (bus, prefix) in [(mmio, "mmio_exits"), (pio, "pio_exits")] {
        for (name, n) in bus.exit_counters() {
            out.push((
                format!("{prefix}.{name}"),
                Box::new(move || n.load(Ordering::Relaxed)),
            ));
        }
    }
    out
}

fn drain_reason(rx: &Mutex<Receiver<VmExit>>) {
    let rx = devices::sync::lock(rx);
    while let Ok(r) = rx.try_recv() {
        log::debug!("Further stop reason after the first: {r:?}");
    }
}
