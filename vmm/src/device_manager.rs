//! Creates the virtio devices: the virtio-iommu (first virtio-mmio window) and the disks
//! behind it — on virtio-mmio (a window and an IOAPIC pin each) or on virtio-pci (a slot on
//! bus 0, BAR 0 in the 32-bit PCI window, MSI-X vectors through [`crate::pci`]) — wires
//! queue notifications to KVM ioeventfds and interrupts to irqfds, and describes them for the
//! firmware tables.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arch::layout;
use devices::pci::root::PciRoot;
use devices::pci::BarWindow;
use devices::sync::lock;
use devices::virtio::block::{Block, BlockStats};
use devices::virtio::iommu::device::EVENT_QUEUE;
use devices::virtio::iommu::{IommuStats, VirtioIommu};
use devices::virtio::mmio::{MmioTransport, TransportCounters, VIRTIO_MMIO_QUEUE_NOTIFY};
use devices::virtio::pci::{VirtioPciTransport, BAR_SIZE, NOTIFY_MULTIPLIER, NOTIFY_OFFSET};
use devices::virtio::{device_memory, DeviceMemory, VirtioDevice, VirtioInterrupt};
use devices::Bus;
use firmware_tables::{PciHostDesc, VirtioMmioDesc};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::VmConfig;
use crate::interrupts::{InterruptError, InterruptManager, IrqfdLine};
use crate::irq_routing::IrqRouter;
use crate::marks::CounterFn;
use crate::pci::{MsixResources, PciSetupError};
use crate::seccomp::{self, Filter, SeccompError, ThreadKind};
use crate::worker::{Notifier, Worker, WorkerError};

/// Errors while creating devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No virtio-mmio window or IRQ pin left.
    #[error("No virtio-mmio slot left for device {0}")]
    NoSlot(u32),
    /// The IOMMU could not be created.
    #[error("Cannot create the virtio-iommu")]
    Iommu(#[source] devices::virtio::iommu::VirtioIommuError),
    /// The opened disk image could not be handed to the device (`dup` failed).
    #[error("Cannot duplicate the handle of disk image {0}")]
    DiskHandle(std::path::PathBuf, #[source] std::io::Error),
    /// The block device could not be created.
    #[error("Cannot create the block device for {0}")]
    Block(
        std::path::PathBuf,
        #[source] devices::virtio::block::BlockError,
    ),
    /// Interrupt setup failed.
    #[error("Cannot set up the device interrupt")]
    Interrupt(#[source] InterruptError),
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM refused an ioeventfd.
    #[error("Cannot register the QueueNotify ioeventfd at {0:#x}")]
    IoEvent(u64, #[source] kvm_ioctls::Error),
    /// The device window overlaps something.
    #[error("Cannot place the device on the MMIO bus")]
    Bus(#[source] devices::BusError),
    /// The worker thread could not start.
    #[error("Cannot start the device worker")]
    Worker(#[source] WorkerError),
    /// A worker's seccomp filter could not be built.
    #[error("Cannot build a device worker's seccomp filter")]
    Seccomp(#[source] SeccompError),
    /// A PCI function or the root complex could not be set up.
    #[error("Cannot set up PCI device {0}")]
    Pci(String, #[source] PciSetupError),
    /// The virtio-pci transport could not be built.
    #[error("Cannot build the virtio-pci transport")]
    VirtioPci(#[source] devices::virtio::pci::VirtioPciError),
    /// No PCI slot or BAR space left.
    #[error("No PCI slot left for disk {0}")]
    NoPciSlot(usize),
}

/// Where one virtio-pci disk goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciDiskPlan {
    /// Slot on bus 0 (function 0); the BDF is `slot << 3`.
    pub slot: usize,
    /// BAR 0's address in the 32-bit PCI window.
    pub bar: u64,
    /// Behind the virtio-iommu (endpoint ID = BDF).
    pub behind_iommu: bool,
}

/// The virtio devices of a VM and the threads serving them.
pub struct DeviceManager {
    iommu: Option<Arc<Mutex<VirtioIommu>>>,
    iommu_desc: Option<VirtioMmioDesc>,
    disks: Vec<Arc<Mutex<Block>>>,
    /// The bus name each disk's exits are reported under, in `--disk` order.
    disk_names: Vec<String>,
    disk_descs: Vec<VirtioMmioDesc>,
    pci_disks: Vec<PciDiskPlan>,
    /// Per PCI disk: its name and MSI-X vectors.
    pci_counted: Vec<(String, MsixResources)>,
    lines: Vec<Arc<IrqfdLine>>,
    /// Per attached device, the counters marks snapshot.
    counted: Vec<CountedDevice>,
    workers: Vec<Worker>,
    /// Keeps the ioeventfds registered for the VM's lifetime.
    _ioeventfds: Vec<Arc<EventFd>>,
}

/// The live counters of one attached device.
struct CountedDevice {
    name: String,
    line: Arc<IrqfdLine>,
    transport: Arc<TransportCounters>,
}

/// Counters of the virtio devices.
#[derive(Debug, Default, Clone)]
pub struct DeviceStats {
    /// The virtio-iommu's counters.
    pub iommu: Option<IommuStats>,
    /// Each disk's counters, in `--disk` order.
    pub disks: Vec<BlockStats>,
    /// Interrupts raised by the virtio devices (irqfd writes).
    pub virtio_irqs: u64,
    /// Each disk's bus name (`diskN` on virtio-mmio, `pci-diskN` on virtio-pci).
    pub disk_names: Vec<String>,
}

/// One device to put on the bus: where, under which name, and with which extra notifiers.
struct AttachSpec<'a> {
    /// Its window and pin.
    slot: &'a VirtioMmioDesc,
    /// The worker thread's name.
    name: String,
    /// The name its register exits are reported under (`--stats-json`, marks).
    bus_name: String,
    dev: Arc<Mutex<dyn VirtioDevice>>,
    /// The memory the device sees (through the IOMMU or not).
    mem: DeviceMemory,
    /// Eventfds besides the queues' the worker waits on.
    extra: Vec<Notifier>,
    /// The worker's seccomp filter.
    filter: Option<Filter>,
}

/// The VM-side resources a PCI function needs.
struct PciEnv<'a> {
    vm: &'a VmFd,
    mmio: &'a mut Bus,
    root: &'a mut PciRoot,
    interrupts: &'a Arc<InterruptManager>,
    router: &'a Arc<Mutex<IrqRouter>>,
    /// The worker's seccomp filter.
    filter: Option<Filter>,
}

/// The VM-side resources every attached device needs.
struct AttachEnv<'a> {
    vm: &'a VmFd,
    mmio: &'a mut Bus,
    interrupts: &'a InterruptManager,
}

/// The window and pin of virtio-mmio slot `index`.
fn slot(index: u32, endpoint_id: Option<u32>) -> Result<VirtioMmioDesc, DeviceError> {
    Ok(VirtioMmioDesc {
        base: layout::virtio_mmio_base(index).ok_or(DeviceError::NoSlot(index))?,
        size: layout::VIRTIO_MMIO_WINDOW,
        irq: layout::virtio_mmio_irq(index).ok_or(DeviceError::NoSlot(index))?,
        endpoint_id,
    })
}

/// Where each virtio-mmio device goes: computed from the configuration alone, used both to
/// place the devices and to describe them in the firmware tables, so the two always agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    /// The virtio-iommu's window and pin (slot 0), when DMA translation is on.
    pub iommu: Option<VirtioMmioDesc>,
    /// Each virtio-mmio disk's window, pin and endpoint ID (its slot index, when behind the
    /// IOMMU), in `--disk` order.
    pub disks: Vec<VirtioMmioDesc>,
    /// Each virtio-pci disk's slot and BAR, in `--disk` order.
    pub pci_disks: Vec<PciDiskPlan>,
}

impl DevicePlan {
    /// Plans the slots for `cfg`: the IOMMU first, then the disks in `--disk` order.
    pub fn new(cfg: &VmConfig) -> Result<Self, DeviceError> {
        let mut next = 0;
        let mut iommu = None;
        if cfg.iommu_dma {
            iommu = Some(slot(next, None)?);
            next += 1;
        }
        let mut disks = Vec::new();
        let mut pci_disks = Vec::new();
        for (i, disk) in cfg.disks.iter().enumerate() {
            if disk.pci {
                let n = pci_disks.len();
                let bar = layout::PCI_MMIO_START + n as u64 * BAR_SIZE;
                if n + 1 >= devices::pci::root::PCI_SLOTS
                    || bar + BAR_SIZE > layout::PCI_MMIO_START + layout::PCI_MMIO_SIZE
                {
                    return Err(DeviceError::NoPciSlot(i));
                }
                pci_disks.push(PciDiskPlan {
                    slot: n + 1,
                    bar,
                    behind_iommu: iommu.is_some() && disk.iommu,
                });
                continue;
            }
            let endpoint_id = (iommu.is_some() && disk.iommu).then_some(next);
            disks.push(slot(next, endpoint_id)?);
            next += 1;
        }
        Ok(DevicePlan {
            iommu,
            disks,
            pci_disks,
        })
    }

    /// The requester IDs (BDFs on segment 0) of the PCI functions that raise MSIs: the
    /// sources PV-IR lets allocate handles.
    pub fn pci_requesters(&self) -> Vec<u16> {
        self.pci_disks
            .iter()
            .map(|p| crate::pci::bdf(p.slot))
            .collect()
    }
}

impl DeviceManager {
    /// Creates the IOMMU (when DMA translation is on) and the disks, and starts their workers.
    pub fn new(
        cfg: &VmConfig,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        mmio: &mut Bus,
        pio: &mut Bus,
        interrupts: &Arc<InterruptManager>,
        router: &Arc<Mutex<IrqRouter>>,
    ) -> Result<Self, DeviceError> {
        let mut dm = DeviceManager {
            iommu: None,
            iommu_desc: None,
            disks: Vec::new(),
            disk_names: Vec::new(),
            disk_descs: Vec::new(),
            pci_disks: Vec::new(),
            pci_counted: Vec::new(),
            lines: Vec::new(),
            counted: Vec::new(),
            workers: Vec::new(),
            _ioeventfds: Vec::new(),
        };
        let plan = DevicePlan::new(cfg)?;
        let filter = |kind| seccomp::filter(kind, cfg.seccomp).map_err(DeviceError::Seccomp);
        if let Some(d) = plan.iommu {
            let iommu = Arc::new(Mutex::new(VirtioIommu::new().map_err(DeviceError::Iommu)?));
            let fault_fd = Arc::new(
                lock(&iommu)
                    .fault_eventfd()
                    .try_clone()
                    .map_err(DeviceError::EventFd)?,
            );
            let dev: Arc<Mutex<dyn VirtioDevice>> = iommu.clone();
            // The IOMMU's own queues live in guest-physical memory.
            dm.attach(
                AttachSpec {
                    slot: &d,
                    name: "viommu".into(),
                    bus_name: "virtio-iommu".into(),
                    dev,
                    mem: device_memory(mem.clone(), None),
                    extra: vec![(fault_fd, EVENT_QUEUE)],
                    filter: filter(ThreadKind::IommuWorker)?,
                },
                AttachEnv {
                    vm,
                    mmio: &mut *mmio,
                    interrupts,
                },
            )?;
            log::info!("virtio-iommu at {:#x}, IRQ {}", d.base, d.irq);
            dm.iommu_desc = Some(d);
            dm.iommu = Some(iommu);
        }
        let block_filter = filter(ThreadKind::BlockWorker)?;
        let mut mmio_plans = plan.disks.iter();
        let mut pci_plans = plan.pci_disks.iter();
        let mut root = PciRoot::new();
        for (i, disk) in cfg.disks.iter().enumerate() {
            // Opened once, when the configuration was checked.
            let file = disk
                .image
                .file()
                .map_err(|e| DeviceError::DiskHandle(disk.path.clone(), e))?;
            if disk.pci {
                let p = *pci_plans.next().expect("planned per PCI disk");
                dm.attach_pci_disk(
                    i,
                    disk,
                    file,
                    p,
                    mem,
                    PciEnv {
                        filter: block_filter.clone(),
                        vm,
                        mmio: &mut *mmio,
                        root: &mut root,
                        interrupts,
                        router,
                    },
                )?;
                continue;
            }
            let d = mmio_plans.next().expect("planned per MMIO disk");
            // The endpoint ID (the device's slot index) is the number in its VIOT node.
            let endpoint = match (&dm.iommu, d.endpoint_id) {
                (Some(iommu), Some(id)) => Some(lock(iommu).endpoint(id)),
                _ => None,
            };
            let behind_iommu = endpoint.is_some();
            let block = Block::new(file, disk.read_only, format!("vmm-disk{i}"), behind_iommu)
                .map_err(|e| DeviceError::Block(disk.path.clone(), e))?;
            let block = Arc::new(Mutex::new(block));
            let dev: Arc<Mutex<dyn VirtioDevice>> = block.clone();
            dm.attach(
                AttachSpec {
                    slot: d,
                    name: format!("vblk{i}"),
                    bus_name: format!("disk{i}"),
                    dev,
                    mem: device_memory(mem.clone(), endpoint),
                    extra: Vec::new(),
                    filter: block_filter.clone(),
                },
                AttachEnv {
                    vm,
                    mmio: &mut *mmio,
                    interrupts,
                },
            )?;
            log::info!(
                "virtio-blk {} at {:#x}, IRQ {}{}",
                disk.path.display(),
                d.base,
                d.irq,
                d.endpoint_id
                    .map(|e| format!(", endpoint {e}"))
                    .unwrap_or_default()
            );
            dm.disk_descs.push(*d);
            dm.disks.push(block);
            dm.disk_names.push(format!("disk{i}"));
        }
        if !dm.pci_disks.is_empty() {
            crate::pci::place_root(root, mmio, pio)
                .map_err(|e| DeviceError::Pci("root complex".into(), e))?;
        }
        Ok(dm)
    }

    /// A virtio-blk disk on virtio-pci: its MSI-X vectors (queues + config), the transport
    /// in its slot, BAR 0 on the MMIO bus as `pci-diskN`, one ioeventfd per queue on the
    /// notify area, and a worker.
    fn attach_pci_disk(
        &mut self,
        i: usize,
        disk: &crate::config::DiskConfig,
        file: std::fs::File,
        p: PciDiskPlan,
        mem: &GuestMemoryMmap,
        env: PciEnv<'_>,
    ) -> Result<(), DeviceError> {
        let bdf = crate::pci::bdf(p.slot);
        let endpoint = match (&self.iommu, p.behind_iommu) {
            (Some(iommu), true) => Some(lock(iommu).endpoint(u32::from(bdf))),
            _ => None,
        };
        let behind_iommu = endpoint.is_some();
        let block = Block::new(file, disk.read_only, format!("vmm-disk{i}"), behind_iommu)
            .map_err(|e| DeviceError::Block(disk.path.clone(), e))?
            .with_queues(disk.queues);
        let queues = usize::from(disk.queues);
        let block = Arc::new(Mutex::new(block));
        let dev: Arc<Mutex<dyn VirtioDevice>> = block.clone();
        let name = format!("pci-disk{i}");
        let msix = crate::pci::msix_vectors(
            VirtioPciTransport::vector_count(queues),
            bdf,
            env.interrupts,
            env.router,
        )
        .map_err(|e| DeviceError::Pci(name.clone(), e))?;
        let mut transport = VirtioPciTransport::new(
            dev,
            device_memory(mem.clone(), endpoint),
            msix.vectors.clone(),
            msix.sink.clone(),
            p.bar,
        )
        .map_err(DeviceError::VirtioPci)?;
        let mut notifiers = Vec::new();
        for q in 0..transport.queue_count() {
            let fd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?);
            let addr = p.bar + NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_MULTIPLIER);
            // Any write (Linux writes the 16-bit queue index) to the queue's own notify
            // address signals this eventfd inside KVM.
            env.vm
                .register_ioevent(fd.as_ref(), &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|e| DeviceError::IoEvent(addr, e))?;
            self._ioeventfds.push(fd.clone());
            notifiers.push((fd, q));
        }
        transport.set_queue_notifiers(notifiers.iter().map(|(fd, _)| fd.clone()).collect());
        let handler = transport.queue_handler();
        let function = Arc::new(Mutex::new(transport));
        env.root
            .add(p.slot, function.clone())
            .map_err(|_| DeviceError::NoPciSlot(i))?;
        env.mmio
            .insert_named(
                &name,
                Arc::new(Mutex::new(BarWindow::new(function, 0))),
                p.bar,
                BAR_SIZE,
            )
            .map_err(DeviceError::Bus)?;
        let worker = Worker::spawn(format!("vblk{i}"), handler, notifiers, env.filter)
            .map_err(DeviceError::Worker)?;
        self.workers.push(worker);
        log::info!(
            "virtio-blk {} on PCI 0000:00:{:02x}.0, BAR0 {:#x}, {queues} queue(s), MSI-X GSIs {:?}{}",
            disk.path.display(),
            p.slot,
            p.bar,
            msix.gsis(),
            if behind_iommu {
                format!(", endpoint {bdf:#x}")
            } else {
                String::new()
            }
        );
        self.pci_counted.push((name.clone(), msix));
        self.pci_disks.push(p);
        self.disks.push(block);
        self.disk_names.push(name);
        Ok(())
    }

    /// The PCI host bridge, if the VM has PCI devices.
    pub fn pci_host_desc(&self) -> Option<PciHostDesc> {
        if self.pci_disks.is_empty() {
            return None;
        }
        Some(PciHostDesc {
            ecam_base: layout::PCI_ECAM_START,
            last_bus: 0,
            mmio32: (layout::PCI_MMIO_START, layout::PCI_MMIO_SIZE),
            mmio64: (layout::PCI_MMIO64_START, layout::PCI_MMIO64_SIZE),
            iommu_endpoints: self
                .pci_disks
                .iter()
                .filter(|p| p.behind_iommu && self.iommu.is_some())
                .map(|p| crate::pci::bdf(p.slot))
                .collect(),
        })
    }

    fn attach(&mut self, spec: AttachSpec<'_>, env: AttachEnv<'_>) -> Result<(), DeviceError> {
        let AttachSpec {
            slot: s,
            name,
            bus_name,
            dev,
            mem: dev_mem,
            extra,
            filter,
        } = spec;
        let line = env
            .interrupts
            .irqfd_line(s.irq)
            .map_err(DeviceError::Interrupt)?;
        let interrupt = Arc::new(VirtioInterrupt::new(line.clone()));
        self.lines.push(line);
        let handler = lock(&dev).queue_handler();
        let mut transport = MmioTransport::new(dev, dev_mem, interrupt);
        let queues = transport.queue_count();
        let mut notifiers = Vec::new();
        let notify = s.base + VIRTIO_MMIO_QUEUE_NOTIFY;
        for q in 0..queues {
            let fd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?);
            // A 32-bit write of the queue index to QueueNotify signals this eventfd inside KVM.
            env.vm
                .register_ioevent(fd.as_ref(), &IoEventAddress::Mmio(notify), q as u32)
                .map_err(|e| DeviceError::IoEvent(notify, e))?;
            self._ioeventfds.push(fd.clone());
            notifiers.push((fd, q));
        }
        transport.set_queue_notifiers(notifiers.iter().map(|(fd, _)| fd.clone()).collect());
        self.counted.push(CountedDevice {
            name: bus_name.clone(),
            line: self.lines.last().cloned().expect("line pushed above"),
            transport: transport.counters(),
        });
        env.mmio
            .insert_named(
                &bus_name,
                Arc::new(Mutex::new(transport)),
                s.base,
                layout::VIRTIO_MMIO_WINDOW,
            )
            .map_err(DeviceError::Bus)?;
        notifiers.extend(extra);
        let worker =
            Worker::spawn(name, handler, notifiers, filter).map_err(DeviceError::Worker)?;
        self.workers.push(worker);
        Ok(())
    }

    /// The IOMMU's window, for the DSDT and VIOT.
    pub fn iommu_desc(&self) -> Option<VirtioMmioDesc> {
        self.iommu_desc
    }

    /// The endpoints' windows, for the DSDT and VIOT.
    pub fn endpoint_descs(&self) -> Vec<VirtioMmioDesc> {
        self.disk_descs.clone()
    }

    /// Current counters.
    pub fn stats(&self) -> DeviceStats {
        DeviceStats {
            iommu: self.iommu.as_ref().map(|i| lock(i).stats()),
            disks: self.disks.iter().map(|d| lock(d).stats()).collect(),
            virtio_irqs: self.lines.iter().map(|l| l.triggers()).sum::<u64>()
                + self
                    .pci_counted
                    .iter()
                    .flat_map(|(_, m)| m.lines.iter())
                    .map(|l| l.triggers())
                    .sum::<u64>(),
            disk_names: self.disk_names.clone(),
        }
    }

    /// Counters a guest mark snapshots, per device: `irqs.NAME` (irqfd writes),
    /// `NAME.isr_reads`, `NAME.interrupt_acks`, and for disks `NAME.requests`. None waits
    /// for I/O (the disk counters' lock is never held across it).
    pub fn mark_counters(&self) -> Vec<(String, CounterFn)> {
        let mut out: Vec<(String, CounterFn)> = Vec::new();
        for d in &self.counted {
            let line = d.line.clone();
            out.push((
                format!("irqs.{}", d.name),
                Box::new(move || line.triggers()),
            ));
            let t = d.transport.clone();
            out.push((
                format!("{}.isr_reads", d.name),
                Box::new(move || t.isr_reads.load(Ordering::Relaxed)),
            ));
            let t = d.transport.clone();
            out.push((
                format!("{}.interrupt_acks", d.name),
                Box::new(move || t.interrupt_acks.load(Ordering::Relaxed)),
            ));
        }
        if let Some(iommu) = &self.iommu {
            use devices::virtio::iommu::protocol::{VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_T_UNMAP};
            for (name, t) in [
                ("iommu.map", VIRTIO_IOMMU_T_MAP),
                ("iommu.unmap", VIRTIO_IOMMU_T_UNMAP),
            ] {
                let iommu = iommu.clone();
                // The counters' locks are never held across a request's I/O.
                out.push((
                    name.into(),
                    Box::new(move || lock(&iommu).stats().requests_of(t)),
                ));
            }
        }
        for (name, msix) in &self.pci_counted {
            for (v, line) in msix.lines.iter().enumerate() {
                let line = line.clone();
                out.push((
                    format!("irqs.{name}.v{v}"),
                    Box::new(move || line.triggers()),
                ));
            }
            let lines = msix.lines.clone();
            out.push((
                format!("irqs.{name}"),
                Box::new(move || lines.iter().map(|l| l.triggers()).sum()),
            ));
            let vectors = msix.vectors.clone();
            out.push((
                format!("{name}.msix_pending_sets"),
                Box::new(move || vectors.pending_sets()),
            ));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let disk = disk.clone();
            out.push((
                format!("disk{i}.requests"),
                Box::new(move || {
                    // The device lock is never held across I/O.
                    let s = lock(&disk).stats();
                    s.reads + s.writes + s.flushes + s.get_id + s.unsupported
                }),
            ));
        }
        out
    }

    /// Stops the worker threads.
    pub fn stop(&mut self) {
        for w in self.workers.drain(..) {
            w.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;

    fn config(iommu: bool, disks: &[bool]) -> VmConfig {
        VmConfig {
            kernel: "k".into(),
            kernel_format: crate::config::KernelFormat::Elf,
            initrd: None,
            cmdline: String::new(),
            cpus: 2,
            mem_size: 256 << 20,
            dump_tables: None,
            firmware: crate::config::Firmware::Acpi,
            iommu_dma: iommu,
            iommu_intremap: false,
            iommu_pvremap: false,
            debug_exit: false,
            timeout: None,
            disks: disks
                .iter()
                .map(|&behind| DiskConfig {
                    path: "d".into(),
                    image: crate::config::DiskImage::new(std::fs::File::open("/dev/null").unwrap()),
                    read_only: false,
                    iommu: behind,
                    pci: false,
                    queues: 1,
                })
                .collect(),
            stats: false,
            stats_json: None,
            seccomp: crate::config::SeccompMode::Off,
        }
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn plan_puts_the_iommu_first_and_numbers_endpoints_by_slot() {
        let plan = DevicePlan::new(&config(true, &[true, false, true])).unwrap();
        let iommu = plan.iommu.unwrap();
        assert_eq!(
            (iommu.base, iommu.irq),
            (layout::VIRTIO_MMIO_START, layout::VIRTIO_IRQ_START)
        );
        let eps: Vec<_> = plan.disks.iter().map(|d| d.endpoint_id).collect();
        assert_eq!(eps, vec![Some(1), None, Some(3)]);
        assert_eq!(
            plan.disks[2].base,
            layout::VIRTIO_MMIO_START + 3 * layout::VIRTIO_MMIO_WINDOW
        );
        assert_eq!(plan.disks[2].irq, layout::VIRTIO_IRQ_START + 3);
    }

    #[test]
    fn pci_disks_take_slots_and_bars_not_mmio_windows() {
        let mut cfg = config(true, &[true, true, true]);
        cfg.disks[0].pci = true;
        cfg.disks[2].pci = true;
        cfg.disks[2].iommu = false;
        let plan = DevicePlan::new(&cfg).unwrap();
        assert_eq!(plan.disks.len(), 1);
        assert_eq!(plan.disks[0].endpoint_id, Some(1), "MMIO slots stay dense");
        assert_eq!(
            plan.pci_disks,
            vec![
                PciDiskPlan {
                    slot: 1,
                    bar: layout::PCI_MMIO_START,
                    behind_iommu: true
                },
                PciDiskPlan {
                    slot: 2,
                    bar: layout::PCI_MMIO_START + BAR_SIZE,
                    behind_iommu: false
                },
            ]
        );
        assert_eq!(crate::pci::bdf(plan.pci_disks[1].slot), 0x10);
    }

    #[test]
    fn without_iommu_no_endpoint_ids() {
        let plan = DevicePlan::new(&config(false, &[false])).unwrap();
        assert!(plan.iommu.is_none());
        assert_eq!(plan.disks[0].endpoint_id, None);
        assert_eq!(plan.disks[0].base, layout::VIRTIO_MMIO_START);
    }

    /// The VIOT built for the planned devices: one virtio-mmio IOMMU node at the IOMMU's base
    /// and one MMIO endpoint node per device behind it, whose base and endpoint ID match the
    /// device's window (Linux matches the base against the device's first _CRS memory range).
    #[test]
    fn viot_nodes_match_the_planned_devices() {
        let cfg = config(true, &[true, false, true]);
        let plan = DevicePlan::new(&cfg).unwrap();
        let desc = firmware_tables::PlatformDescription {
            num_cpus: 2,
            ioapic: firmware_tables::IoapicDesc {
                id: 0,
                address: layout::IOAPIC_START as u32,
                gsi_base: 0,
            },
            serial: None,
            pm: firmware_tables::PmDesc {
                io_base: layout::PM_PORT,
            },
            virtio_mmio: plan.disks.clone(),
            iommu: plan.iommu,
            dmar: None,
            pvir: None,
            pci: None,
        };
        let tables =
            firmware_tables::build_acpi(&desc, layout::ACPI_START, layout::ACPI_SIZE).unwrap();
        let viot = &tables.blob(b"VIOT").expect("VIOT with --iommu").bytes;
        let (count, first) = (u16_at(viot, 36) as usize, u16_at(viot, 38) as usize);
        assert_eq!(count, 3, "one IOMMU node and two endpoint nodes");
        let mut off = first;
        let mut iommu_node = None;
        let mut endpoints = Vec::new();
        for _ in 0..count {
            let (kind, len) = (viot[off], u16_at(viot, off + 2) as usize);
            match kind {
                4 => {
                    assert_eq!(u64_at(viot, off + 8), plan.iommu.unwrap().base);
                    iommu_node = Some(off);
                }
                2 => endpoints.push((
                    u32_at(viot, off + 4),
                    u64_at(viot, off + 8),
                    u16_at(viot, off + 16) as usize,
                )),
                other => panic!("unexpected VIOT node type {other}"),
            }
            off += len;
        }
        assert_eq!(off, viot.len());
        let iommu_node = iommu_node.expect("virtio-mmio IOMMU node");
        let expected: Vec<_> = plan
            .disks
            .iter()
            .filter_map(|d| d.endpoint_id.map(|id| (id, d.base, iommu_node)))
            .collect();
        assert_eq!(endpoints, expected);
    }
}
