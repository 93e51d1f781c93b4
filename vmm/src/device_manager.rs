//! Creates the virtio-mmio devices: the virtio-iommu (first window) and the disks behind it,
//! places each on the MMIO bus with its window and IOAPIC pin, wires QueueNotify to KVM
//! ioeventfds and the interrupt to an irqfd, and describes them for the firmware tables.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arch::layout;
use devices::sync::lock;
use devices::virtio::block::{Block, BlockStats};
use devices::virtio::iommu::device::EVENT_QUEUE;
use devices::virtio::iommu::{IommuStats, VirtioIommu};
use devices::virtio::mmio::{MmioTransport, TransportCounters, VIRTIO_MMIO_QUEUE_NOTIFY};
use devices::virtio::{device_memory, DeviceMemory, VirtioDevice, VirtioInterrupt};
use devices::Bus;
use firmware_tables::VirtioMmioDesc;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::VmConfig;
use crate::interrupts::{InterruptError, InterruptManager, IrqfdLine};
use crate::marks::CounterFn;
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
}

/// The virtio devices of a VM and the threads serving them.
pub struct DeviceManager {
    iommu: Option<Arc<Mutex<VirtioIommu>>>,
    iommu_desc: Option<VirtioMmioDesc>,
    disks: Vec<Arc<Mutex<Block>>>,
    disk_descs: Vec<VirtioMmioDesc>,
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
    /// Each disk's window, pin and endpoint ID (its slot index, when behind the IOMMU).
    pub disks: Vec<VirtioMmioDesc>,
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
        for disk in &cfg.disks {
            let endpoint_id = (iommu.is_some() && disk.iommu).then_some(next);
            disks.push(slot(next, endpoint_id)?);
            next += 1;
        }
        Ok(DevicePlan { iommu, disks })
    }
}

impl DeviceManager {
    /// Creates the IOMMU (when DMA translation is on) and the disks, and starts their workers.
    pub fn new(
        cfg: &VmConfig,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        mmio: &mut Bus,
        interrupts: &InterruptManager,
    ) -> Result<Self, DeviceError> {
        let mut dm = DeviceManager {
            iommu: None,
            iommu_desc: None,
            disks: Vec::new(),
            disk_descs: Vec::new(),
            lines: Vec::new(),
            counted: Vec::new(),
            workers: Vec::new(),
            _ioeventfds: Vec::new(),
        };
        let plan = DevicePlan::new(cfg)?;
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
        for (i, (disk, d)) in cfg.disks.iter().zip(&plan.disks).enumerate() {
            // Opened once, when the configuration was checked.
            let file = disk
                .image
                .file()
                .map_err(|e| DeviceError::DiskHandle(disk.path.clone(), e))?;
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
        }
        Ok(dm)
    }

    fn attach(&mut self, spec: AttachSpec<'_>, env: AttachEnv<'_>) -> Result<(), DeviceError> {
        let AttachSpec {
            slot: s,
            name,
            bus_name,
            dev,
            mem: dev_mem,
            extra,
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
        let worker = Worker::spawn(name, handler, notifiers).map_err(DeviceError::Worker)?;
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
            virtio_irqs: self.lines.iter().map(|l| l.triggers()).sum(),
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
                // Brief: the counters' locks are never held across a request's I/O.
                out.push((
                    name.into(),
                    Box::new(move || lock(&iommu).stats().requests_of(t)),
                ));
            }
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let disk = disk.clone();
            out.push((
                format!("disk{i}.requests"),
                Box::new(move || {
                    // Brief: the device lock is never held across I/O.
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
            debug_exit: false,
            timeout: None,
            disks: disks
                .iter()
                .map(|&behind| DiskConfig {
                    path: "d".into(),
                    image: crate::config::DiskImage::new(std::fs::File::open("/dev/null").unwrap()),
                    read_only: false,
                    iommu: behind,
                })
                .collect(),
            stats: false,
            stats_json: None,
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
