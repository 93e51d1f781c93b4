//! Creates the virtio-mmio devices: the virtio-iommu (first window) and the disks behind it,
//! places each on the MMIO bus with its window and IOAPIC pin, wires QueueNotify to KVM
//! ioeventfds and the interrupt to an irqfd, and describes them for the firmware tables.

use std::fs::OpenOptions;
use std::sync::{Arc, Mutex};

use arch::layout;
use devices::virtio::block::{Block, BlockStats};
use devices::virtio::iommu::device::EVENT_QUEUE;
use devices::virtio::iommu::{IommuStats, VirtioIommu};
use devices::virtio::mmio::{MmioTransport, VIRTIO_MMIO_QUEUE_NOTIFY};
use devices::virtio::{device_memory, VirtioDevice, VirtioInterrupt};
use devices::Bus;
use firmware_tables::VirtioMmioDesc;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::VmConfig;
use crate::interrupts::{InterruptError, InterruptManager, IrqfdLine};
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
    /// A disk image could not be opened.
    #[error("Cannot open disk image {0}")]
    OpenDisk(std::path::PathBuf, #[source] std::io::Error),
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
    workers: Vec<Worker>,
    /// Keeps the ioeventfds registered for the VM's lifetime.
    _ioeventfds: Vec<Arc<EventFd>>,
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

/// Where the next virtio-mmio device goes.
struct Slot {
    index: u32,
    base: u64,
    irq: u32,
}

fn slot(index: u32) -> Result<Slot, DeviceError> {
    let base = layout::virtio_mmio_base(index).ok_or(DeviceError::NoSlot(index))?;
    let irq = layout::virtio_mmio_irq(index).ok_or(DeviceError::NoSlot(index))?;
    Ok(Slot { index, base, irq })
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
            workers: Vec::new(),
            _ioeventfds: Vec::new(),
        };
        let mut next = 0;
        if cfg.iommu_dma {
            let s = slot(next)?;
            next += 1;
            let iommu = Arc::new(Mutex::new(VirtioIommu::new().map_err(DeviceError::Iommu)?));
            let fault_fd = Arc::new(
                iommu
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .fault_eventfd()
                    .try_clone()
                    .map_err(DeviceError::EventFd)?,
            );
            let dev: Arc<Mutex<dyn VirtioDevice>> = iommu.clone();
            // The IOMMU's own queues live in guest-physical memory.
            dm.attach(
                &s,
                "viommu",
                dev,
                device_memory(mem.clone(), None),
                vec![(fault_fd, EVENT_QUEUE)],
                vm,
                mmio,
                interrupts,
            )?;
            log::info!("virtio-iommu at {:#x}, IRQ {}", s.base, s.irq);
            dm.iommu_desc = Some(VirtioMmioDesc {
                base: s.base,
                size: layout::VIRTIO_MMIO_WINDOW,
                irq: s.irq,
                endpoint_id: None,
            });
            dm.iommu = Some(iommu);
        }
        for (i, disk) in cfg.disks.iter().enumerate() {
            let s = slot(next)?;
            next += 1;
            let file = OpenOptions::new()
                .read(true)
                .write(!disk.read_only)
                .open(&disk.path)
                .map_err(|e| DeviceError::OpenDisk(disk.path.clone(), e))?;
            // Endpoint ID = the device's slot index: the same number goes into the VIOT node.
            let endpoint = match (&dm.iommu, disk.iommu) {
                (Some(iommu), true) => Some(
                    iommu
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .endpoint(s.index),
                ),
                _ => None,
            };
            let behind_iommu = endpoint.is_some();
            let block = Block::new(file, disk.read_only, format!("vmm-disk{i}"), behind_iommu)
                .map_err(|e| DeviceError::Block(disk.path.clone(), e))?;
            let block = Arc::new(Mutex::new(block));
            let dev: Arc<Mutex<dyn VirtioDevice>> = block.clone();
            dm.attach(
                &s,
                &format!("vblk{i}"),
                dev,
                device_memory(mem.clone(), endpoint),
                Vec::new(),
                vm,
                mmio,
                interrupts,
            )?;
            log::info!(
                "virtio-blk {} at {:#x}, IRQ {}{}",
                disk.path.display(),
                s.base,
                s.irq,
                if behind_iommu {
                    format!(", endpoint {}", s.index)
                } else {
                    String::new()
                }
            );
            dm.disk_descs.push(VirtioMmioDesc {
                base: s.base,
                size: layout::VIRTIO_MMIO_WINDOW,
                irq: s.irq,
                endpoint_id: behind_iommu.then_some(s.index),
            });
            dm.disks.push(block);
        }
        Ok(dm)
    }

    #[allow(clippy::too_many_arguments)]
    fn attach(
        &mut self,
        s: &Slot,
        name: &str,
        dev: Arc<Mutex<dyn VirtioDevice>>,
        dev_mem: devices::virtio::DeviceMemory,
        extra: Vec<Notifier>,
        vm: &VmFd,
        mmio: &mut Bus,
        interrupts: &InterruptManager,
    ) -> Result<(), DeviceError> {
        let line = interrupts
            .irqfd_line(s.irq)
            .map_err(DeviceError::Interrupt)?;
        let interrupt = Arc::new(VirtioInterrupt::new(line.clone()));
        self.lines.push(line);
        let transport = MmioTransport::new(dev.clone(), dev_mem, interrupt);
        let queues = transport.queue_count();
        mmio.insert(
            Arc::new(Mutex::new(transport)),
            s.base,
            layout::VIRTIO_MMIO_WINDOW,
        )
        .map_err(DeviceError::Bus)?;
        let mut notifiers = Vec::new();
        let notify = s.base + VIRTIO_MMIO_QUEUE_NOTIFY;
        for q in 0..queues {
            let fd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?);
            // A 32-bit write of the queue index to QueueNotify signals this eventfd inside KVM.
            vm.register_ioevent(fd.as_ref(), &IoEventAddress::Mmio(notify), q as u32)
                .map_err(|e| DeviceError::IoEvent(notify, e))?;
            self._ioeventfds.push(fd.clone());
            notifiers.push((fd, q));
        }
        notifiers.extend(extra);
        let worker = Worker::spawn(name.to_owned(), dev, notifiers).map_err(DeviceError::Worker)?;
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
            iommu: self
                .iommu
                .as_ref()
                .map(|i| i.lock().unwrap_or_else(|e| e.into_inner()).stats()),
            disks: self
                .disks
                .iter()
                .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).stats())
                .collect(),
            virtio_irqs: self.lines.iter().map(|l| l.triggers()).sum(),
        }
    }

    /// Stops the worker threads.
    pub fn stop(&mut self) {
        for w in self.workers.drain(..) {
            w.stop();
        }
    }
}
