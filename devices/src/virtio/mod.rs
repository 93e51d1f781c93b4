//! Virtio devices and the virtio-MMIO transport (virtio 1.2, §4.2 "Virtio Over MMIO").
//!
//! Pieces and who owns what:
//! - [`VirtioDevice`]: a device model (virtio-blk, virtio-iommu). It knows its queues'
//!   contents, nothing about the transport.
//! - `mmio::MmioTransport`: the register file at the device's 4 KiB window. It negotiates
//!   features, collects queue addresses, and on DRIVER_OK calls [`VirtioDevice::activate`].
//! - The VMM: registers one ioeventfd per queue on the QueueNotify register (datamatch = queue
//!   index) and a worker that calls [`VirtioDevice::process_queue`] when one fires; gives the
//!   device an irqfd-backed [`InterruptLine`] wrapped in a [`VirtioInterrupt`].
//!
//! Device memory is [`DeviceMemory`]: guest RAM seen through the IOMMU when the device sits
//! behind the virtio-iommu, or straight guest RAM when it doesn't (IOMMU disabled in the
//! wrapper). Every descriptor access is translated and permission-checked in one place.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

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

/// The interrupt a virtio-mmio device raises: the interrupt status register (ISR) shared with
/// the transport, plus the line (an irqfd in the VMM).
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: Arc<dyn InterruptLine>,
}

impl std::fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioInterrupt")
            .field("status", &self.status.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl VirtioInterrupt {
    /// Wraps an interrupt line.
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Sets `bits` in the ISR and raises the line.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            log::warn!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// Signals a used-buffer notification.
    pub fn signal_used_queue(&self) {
        self.signal(VIRTIO_MMIO_INT_VRING);
    }

    /// Signals a configuration change.
    pub fn signal_config_change(&self) {
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    /// The ISR value (InterruptStatus register).
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
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
    /// A device-specific failure.
    #[error("Device activation failed: {0}")]
    Device(String),
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
    /// FEATURES_OK.
    fn ack_features(&mut self, features: u64);
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
    /// Handles a notification on queue `index` (its ioeventfd fired).
    fn process_queue(&mut self, index: usize);
    /// Returns the device to its pre-activation state (the driver wrote 0 to Status).
    fn reset(&mut self);
}

pub mod block;
pub mod iommu;
pub mod mmio;

/// Device memory for a device: through `iommu` when it sits behind the virtio-iommu,
/// straight guest RAM otherwise.
pub fn device_memory(mem: GuestMemoryMmap, iommu: Option<iommu::EndpointIommu>) -> DeviceMemory {
    match iommu {
        Some(i) => vm_memory::IommuMemory::new(mem, i, true, ()),
        None => vm_memory::IommuMemory::new(mem, iommu::EndpointIommu::passthrough(), false, ()),
    }
}
