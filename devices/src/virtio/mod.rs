//! Virtio devices and the virtio-MMIO transport (virtio 1.2, §4.2 "Virtio Over MMIO").
//!
//! Pieces and who owns what:
//! - [`VirtioDevice`]: a device model (virtio-blk, virtio-iommu). It knows its queues'
//!   contents, nothing about the transport.
//! - `mmio::MmioTransport`: the register file at the device's 4 KiB window. It negotiates
//!   features, collects queue addresses, and on DRIVER_OK calls [`VirtioDevice::activate`].
//! - [`QueueHandler`]: a device's data plane, from [`VirtioDevice::queue_handler`]. The VMM's
//!   worker calls it without holding the device's control lock, so register accesses (config
//!   space, Status, reset) never wait for a request's I/O.
//! - The VMM: registers one ioeventfd per queue on the QueueNotify register (datamatch = queue
//!   index) and a worker that calls [`QueueHandler::process_queue`] when one fires (and again,
//!   after re-checking its other events, while it reports [`QueueProgress::More`]); gives the
//!   device an irqfd-backed [`InterruptLine`] wrapped in a [`VirtioInterrupt`].
//!
//! Device memory is [`DeviceMemory`]: guest RAM seen through the IOMMU when the device sits
//! behind the virtio-iommu, or straight guest RAM when it doesn't (IOMMU disabled in the
//! wrapper). Every descriptor access is translated and permission-checked in one place.

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::interrupt::InterruptLine;

/// `VIRTIO_F_VERSION_1`: the device is a modern (non-legacy) virtio device.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// `VIRTIO_F_ACCESS_PLATFORM`: the device's DMA goes through the platform IOMMU.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Virtio device ID of an IOMMU.
pub const VIRTIO_ID_IOMMU: u32 = 23;

/// `ISR` bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// `ISR` bit: the configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// The memory a virtio device uses for queues and buffers: guest RAM behind an IOMMU
/// (`vm_memory::IommuMemory`), pass-through when the device does not sit behind one.
pub type DeviceMemory =
    vm_memory::IommuMemory<GuestMemoryMmap, crate::virtio::iommu::EndpointIommu>;

/// `VIRTIO_MSI_NO_VECTOR`: no MSI-X vector assigned (virtio 1.2 §4.1.4.3).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Which MSI-X vector the virtio-pci driver assigned to the configuration change and to each
/// queue (`msix_config`, `queue_msix_vector`), shared by the transport (which writes them) and
/// the device's interrupt (which reads them on every signal, lock-free).
#[derive(Debug)]
pub struct VirtioMsix {
    vectors: Arc<crate::pci::msix::MsixVectors>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
}

impl VirtioMsix {
    /// No vector assigned yet, for `queues` queues.
    pub fn new(vectors: Arc<crate::pci::msix::MsixVectors>, queues: usize) -> Arc<Self> {
        Arc::new(VirtioMsix {
            vectors,
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
        })
    }

    /// The vectors behind.
    pub fn vectors(&self) -> &Arc<crate::pci::msix::MsixVectors> {
        &self.vectors
    }

    /// `msix_config`.
    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::SeqCst)
    }

    /// Sets `msix_config`.
    pub fn set_config_vector(&self, v: u16) {
        self.config_vector.store(v, Ordering::SeqCst);
    }

    /// `queue_msix_vector` of queue `q` (NO_VECTOR for a missing queue).
    pub fn queue_vector(&self, q: usize) -> u16 {
        self.queue_vectors
            .get(q)
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }

    /// Sets `queue_msix_vector` of queue `q`.
    pub fn set_queue_vector(&self, q: usize, v: u16) {
        if let Some(slot) = self.queue_vectors.get(q) {
            slot.store(v, Ordering::SeqCst);
        }
    }

    /// Every assignment back to NO_VECTOR (device reset).
    pub fn reset(&self) {
        self.set_config_vector(VIRTIO_MSI_NO_VECTOR);
        for v in &self.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
    }
}

/// The interrupt a virtio device raises: the interrupt status register (ISR) shared with the
/// transport, plus either one line (virtio-mmio: an irqfd on an IOAPIC pin) or the MSI-X
/// vectors the driver assigned (virtio-pci), one per queue and one for config changes.
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: Option<Arc<dyn InterruptLine>>,
    msix: Option<Arc<VirtioMsix>>,
}

impl std::fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioInterrupt")
            .field("status", &self.status.load(Ordering::Relaxed))
            .field("msix", &self.msix.is_some())
            .finish_non_exhaustive()
    }
}

impl VirtioInterrupt {
    /// Wraps an interrupt line.
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            line: Some(line),
            msix: None,
        }
    }

    /// An interrupt delivered through MSI-X vectors (virtio-pci).
    pub fn with_msix(msix: Arc<VirtioMsix>) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            line: None,
            msix: Some(msix),
        }
    }

    /// Sets `bits` in the ISR and raises the line (virtio-mmio), or the config vector.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Some(line) = &self.line {
            if let Err(e) = line.trigger() {
                crate::guest_warn!("virtio: cannot raise interrupt: {e}");
            }
        } else if let Some(m) = &self.msix {
            m.vectors.trigger(m.config_vector());
        }
    }

    /// Signals a used-buffer notification (queue 0).
    pub fn signal_used_queue(&self) {
        self.signal_queue(0);
    }

    /// Signals a used-buffer notification on queue `index`: its MSI-X vector with virtio-pci
    /// (nothing if the driver assigned none), the ISR and the line with virtio-mmio.
    pub fn signal_queue(&self, index: usize) {
        match &self.msix {
            Some(m) => m.vectors.trigger(m.queue_vector(index)),
            None => self.signal(VIRTIO_MMIO_INT_VRING),
        }
    }

    /// Signals a configuration change.
    pub fn signal_config_change(&self) {
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    /// The ISR value (InterruptStatus register).
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Reads and clears the ISR (virtio-pci's ISR register is read-to-clear).
    pub fn take_status(&self) -> u32 {
        self.status.swap(0, Ordering::SeqCst)
    }

    /// Clears acknowledged ISR bits (InterruptACK register).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("Expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the driver set up.
        got: usize,
    },
    /// A queue is not valid in guest memory.
    #[error("Queue {0} is not valid")]
    InvalidQueue(usize),
}

/// What one call of [`QueueHandler::process_queue`] left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueProgress {
    /// Nothing left to do until the next notification.
    Idle,
    /// The per-call budget ran out with requests still queued: call again (after serving
    /// other events).
    More,
}

/// A device's data plane: processes its queues. Called from the VMM's worker thread with no
/// device lock held; implementations lock their queue state per request, never across I/O.
pub trait QueueHandler: Send + Sync {
    /// Handles a notification on queue `index`: processes a bounded number of requests.
    fn process_queue(&self, index: usize) -> QueueProgress;
}

/// A virtio device model driven by a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of [`VirtioDevice::features`]), at
    /// FEATURES_OK. Returns `false` to refuse them: FEATURES_OK then stays clear and the
    /// driver gives up on the device (virtio 1.2 §3.1.1).
    fn ack_features(&mut self, features: u64) -> bool;
    /// Reads the device-specific configuration space; out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; out-of-range writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device at DRIVER_OK with the driver's queues.
    fn activate(
        &mut self,
        mem: DeviceMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// The device's data plane, for the VMM's worker. Handles share state with the device:
    /// [`VirtioDevice::activate`] and [`VirtioDevice::reset`] take effect on them.
    fn queue_handler(&self) -> Arc<dyn QueueHandler>;
    /// Processes queue `index` until it is empty, on the calling thread (tests, and the
    /// transport's fallback when no worker serves the device).
    fn process_queue(&mut self, index: usize) {
        let handler = self.queue_handler();
        while handler.process_queue(index) == QueueProgress::More {}
    }
    /// Returns the device to its pre-activation state (the driver wrote 0 to Status). Must not
    /// wait for a request's I/O: a request in flight finishes on its own, and its completion
    /// is dropped (the ring it came from belongs to the old driver instance).
    fn reset(&mut self);
}

pub mod block;
#[cfg(any(test, feature = "test-utils"))]
pub mod driver_ring;
pub mod iommu;
pub mod mmio;
pub mod pci;

/// Device memory for a device: through `iommu` when it sits behind the virtio-iommu,
/// straight guest RAM otherwise.
pub fn device_memory(mem: GuestMemoryMmap, iommu: Option<iommu::EndpointIommu>) -> DeviceMemory {
    match iommu {
        Some(i) => vm_memory::IommuMemory::new(mem, i, true, ()),
        None => vm_memory::IommuMemory::new(mem, iommu::EndpointIommu::passthrough(), false, ()),
    }
}

/// Activates `device` at DRIVER_OK with copies of a transport's `queues` (the transport keeps
/// its own for register reads). A queue's own state always converts back: it was built through
/// the same checks. Shared by the virtio-mmio and virtio-pci transports.
pub(crate) fn activate_with_queue_copies(
    device: &Mutex<dyn VirtioDevice>,
    mem: &DeviceMemory,
    queues: &[Queue],
    interrupt: &Arc<VirtioInterrupt>,
) -> Result<(), ActivateError> {
    let queues = queues
        .iter()
        .enumerate()
        .map(|(i, q)| Queue::try_from(q.state()).map_err(|_| ActivateError::InvalidQueue(i)))
        .collect::<Result<Vec<_>, _>>()?;
    crate::sync::lock(device).activate(mem.clone(), queues, interrupt.clone())
}
