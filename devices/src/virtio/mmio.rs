// SPDX-License-Identifier: Apache-2.0

//! The virtio-MMIO transport, version 2 ("modern") only (virtio 1.2, §4.2.2).
//!
//! [`MmioTransport`] is the register file at a device's 4 KiB window. It negotiates features,
//! collects the driver's queue configuration, and on DRIVER_OK hands the queues to
//! [`VirtioDevice::activate`] together with the device's [`DeviceMemory`].
//!
//! # How the VMM wires it
//!
//! - Put the transport on the MMIO bus at `base`, length [`VIRTIO_MMIO_WINDOW_SIZE`].
//! - For each queue `i` in `0..transport.queue_count()`, register a KVM ioeventfd at
//!   `base + VIRTIO_MMIO_QUEUE_NOTIFY`, 4 bytes, datamatch `i as u32`, and have a worker run
//!   the device's [`QueueHandler`](super::QueueHandler) (`device.queue_handler()`) when it
//!   fires; hand the eventfds to [`MmioTransport::set_queue_notifiers`]. Notifications then
//!   never leave the kernel on the vCPU side, and a QueueNotify write that does reach the
//!   transport just signals the eventfd. Without notifiers (tests) such a write processes the
//!   queue on the calling thread.
//! - The device's interrupt is a [`VirtioInterrupt`] over an irqfd; the transport shares it to
//!   serve InterruptStatus / InterruptACK.
//!
//! The worker never holds the device's mutex (the data plane has its own, per-request
//! locking), so the register accesses that take it (config space, FEATURES_OK, DRIVER_OK,
//! reset) never wait for a request's I/O, and neither do the ISR accesses queued behind them
//! on the bus. (virtio-iommu's `bypass` write and reset do wait for in-flight endpoint
//! requests; see `virtio::iommu::device`.)
//!
//! Queue addresses written by the driver are I/O virtual addresses when the device sits behind
//! the IOMMU. The transport does not interpret them; the device checks them against its
//! [`DeviceMemory`] in `activate`, where translation and permissions apply.
//!
//! # Guest-facing behaviour
//!
//! Registers below [`VIRTIO_MMIO_CONFIG`] take 32-bit aligned accesses only, as the spec requires
//! of drivers; other widths, unaligned offsets and unknown registers read as 0 and ignore writes.
//! The device-specific configuration space at [`VIRTIO_MMIO_CONFIG`] and above takes any width.
//! Nothing the guest writes can panic the transport.

use std::sync::{Arc, Mutex};

use log::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{
    activate_with_queue_copies, DeviceMemory, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};
use crate::bus::BusDevice;
use crate::sync::lock;
// Guest-triggerable lines: `debug!` is the rate-limited `guest_debug!`.
use crate::{guest_debug as debug, guest_warn};

/// Size of a virtio-mmio window (registers plus configuration space).
pub const VIRTIO_MMIO_WINDOW_SIZE: u64 = 0x1000;

/// `MagicValue`: "virt" in little endian.
pub const VIRTIO_MMIO_MAGIC_VALUE: u64 = 0x000;
/// `Version`: 2 for the modern (non-legacy) interface.
pub const VIRTIO_MMIO_VERSION: u64 = 0x004;
/// `DeviceID`: the virtio device type.
pub const VIRTIO_MMIO_DEVICE_ID: u64 = 0x008;
/// `VendorID`.
pub const VIRTIO_MMIO_VENDOR_ID: u64 = 0x00c;
/// `DeviceFeatures`: 32 bits of the offered features, selected by `DeviceFeaturesSel`.
pub const VIRTIO_MMIO_DEVICE_FEATURES: u64 = 0x010;
/// `DeviceFeaturesSel`.
pub const VIRTIO_MMIO_DEVICE_FEATURES_SEL: u64 = 0x014;
/// `DriverFeatures`: 32 bits of the accepted features, selected by `DriverFeaturesSel`.
pub const VIRTIO_MMIO_DRIVER_FEATURES: u64 = 0x020;
/// `DriverFeaturesSel`.
pub const VIRTIO_MMIO_DRIVER_FEATURES_SEL: u64 = 0x024;
/// `QueueSel`: the queue the queue registers below refer to.
pub const VIRTIO_MMIO_QUEUE_SEL: u64 = 0x030;
/// `QueueNumMax`: maximum size of the selected queue, 0 if it does not exist.
pub const VIRTIO_MMIO_QUEUE_NUM_MAX: u64 = 0x034;
/// `QueueNum`: size of the selected queue.
pub const VIRTIO_MMIO_QUEUE_NUM: u64 = 0x038;
/// `QueueReady`.
pub const VIRTIO_MMIO_QUEUE_READY: u64 = 0x044;
/// `QueueNotify`: the driver writes a queue index here. The VMM catches these writes with one
/// ioeventfd per queue (datamatch = queue index).
pub const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x050;
/// `InterruptStatus`: the ISR.
pub const VIRTIO_MMIO_INTERRUPT_STATUS: u64 = 0x060;
/// `InterruptACK`: clears ISR bits.
pub const VIRTIO_MMIO_INTERRUPT_ACK: u64 = 0x064;
/// `Status`: the device status (§2.1).
pub const VIRTIO_MMIO_STATUS: u64 = 0x070;
/// `QueueDescLow`: descriptor table address, low half.
pub const VIRTIO_MMIO_QUEUE_DESC_LOW: u64 = 0x080;
/// `QueueDescHigh`.
pub const VIRTIO_MMIO_QUEUE_DESC_HIGH: u64 = 0x084;
/// `QueueDriverLow`: available ring address, low half.
pub const VIRTIO_MMIO_QUEUE_AVAIL_LOW: u64 = 0x090;
/// `QueueDriverHigh`.
pub const VIRTIO_MMIO_QUEUE_AVAIL_HIGH: u64 = 0x094;
/// `QueueDeviceLow`: used ring address, low half.
pub const VIRTIO_MMIO_QUEUE_USED_LOW: u64 = 0x0a0;
/// `QueueDeviceHigh`.
pub const VIRTIO_MMIO_QUEUE_USED_HIGH: u64 = 0x0a4;
/// `SHMSel`: shared memory region selector.
pub const VIRTIO_MMIO_SHM_SEL: u64 = 0x0ac;
/// `SHMLenLow`: all-ones when the selected region does not exist.
pub const VIRTIO_MMIO_SHM_LEN_LOW: u64 = 0x0b0;
/// `SHMLenHigh`.
pub const VIRTIO_MMIO_SHM_LEN_HIGH: u64 = 0x0b4;
/// `SHMBaseLow`.
pub const VIRTIO_MMIO_SHM_BASE_LOW: u64 = 0x0b8;
/// `SHMBaseHigh`.
pub const VIRTIO_MMIO_SHM_BASE_HIGH: u64 = 0x0bc;
/// `ConfigGeneration`: changes whenever the device configuration changes.
pub const VIRTIO_MMIO_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const VIRTIO_MMIO_CONFIG: u64 = 0x100;

/// The value of `MagicValue`: "virt".
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The value of `Version`: the modern interface.
pub const MMIO_VERSION: u32 = 2;
/// The value of `VendorID`: "QEMU" in little endian, the value QEMU and several other VMMs
/// report. Linux reads it but matches drivers on the device ID only.
pub const MMIO_VENDOR_ID: u32 = 0x554D_4551;

/// Device status bit: the guest found the device.
pub const DEVICE_ACKNOWLEDGE: u32 = 0x01;
/// Device status bit: the guest knows how to drive the device.
pub const DEVICE_DRIVER: u32 = 0x02;
/// Device status bit: the driver is set up and ready to drive the device.
pub const DEVICE_DRIVER_OK: u32 = 0x04;
/// Device status bit: feature negotiation is complete (cleared by the device on refusal).
pub const DEVICE_FEATURES_OK: u32 = 0x08;
/// Device status bit: the device hit an error it cannot recover from without a reset.
pub const DEVICE_NEEDS_RESET: u32 = 0x40;
/// Device status bit: the guest gave up on the device.
pub const DEVICE_FAILED: u32 = 0x80;

/// Guest accesses to the registers every completion interrupt costs (Linux's `vm_interrupt`
/// reads InterruptStatus, then writes InterruptACK): the figure that says how much of a
/// virtio-mmio device's data path reaches the VMM.
#[derive(Debug, Default)]
pub struct TransportCounters {
    /// InterruptStatus reads.
    pub isr_reads: std::sync::atomic::AtomicU64,
    /// InterruptACK writes.
    pub interrupt_acks: std::sync::atomic::AtomicU64,
}

/// The register file of one virtio-mmio device; see the [module documentation](self).
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    counters: Arc<TransportCounters>,
    /// The memory the device sees; cloned into `activate`.
    mem: DeviceMemory,
    interrupt: Arc<VirtioInterrupt>,

    // Cached at construction so that register reads never wait for the device lock, which a
    // worker holds while it processes a queue. A device's type, queue sizes and offered
    // features do not change over its life.
    device_type: u32,
    device_features: u64,

    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    config_generation: u32,
    /// The worker's QueueNotify eventfds, one per queue, if a worker serves the device.
    notifiers: Vec<Arc<EventFd>>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("activated", &self.activated)
            .field("config_generation", &self.config_generation)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Wraps `device`. `mem` is the memory the device will use (guest RAM through or around the
    /// IOMMU) and is handed to [`VirtioDevice::activate`]; `interrupt` is the device's interrupt,
    /// shared with the device so the transport can serve the ISR registers.
    ///
    /// A queue whose maximum size is not a power of two in `1..=32768` (a bug in the device
    /// model) is offered with the largest valid size below it, and a warning is logged.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: DeviceMemory,
        interrupt: Arc<VirtioInterrupt>,
    ) -> MmioTransport {
        let (device_type, device_features, queue_max_sizes) = {
            let d = lock(&device);
            (d.device_type(), d.features(), d.queue_max_sizes().to_vec())
        };
        let queues = queue_max_sizes
            .iter()
            .enumerate()
            .map(|(i, &max)| {
                Queue::new(max).unwrap_or_else(|_| {
                    // A device-model bug, not a guest one: offer the largest valid size below.
                    let fixed = valid_queue_size(max);
                    warn!(
                        "virtio-mmio: device type {device_type} queue {i}: max size {max} is not \
                         a power of two in 1..=32768; offering {fixed}"
                    );
                    Queue::new(fixed).expect("valid_queue_size returns a valid size")
                })
            })
            .collect();
        MmioTransport {
            device,
            counters: Arc::default(),
            mem,
            interrupt,
            device_type,
            device_features,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            config_generation: 0,
            notifiers: Vec::new(),
        }
    }

    /// The eventfds a worker waits on, one per queue in queue order (the ones registered as
    /// ioeventfds). A QueueNotify write that reaches the transport signals them instead of
    /// processing the queue on the vCPU thread.
    pub fn set_queue_notifiers(&mut self, notifiers: Vec<Arc<EventFd>>) {
        self.notifiers = notifiers;
    }

    /// The interrupt-register access counters (shared; they keep counting).
    pub fn counters(&self) -> Arc<TransportCounters> {
        self.counters.clone()
    }

    /// Number of queues the device has (one ioeventfd each).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The device behind the transport, for the VMM's queue workers.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// Whether the driver set DRIVER_OK and the device activated successfully.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device status register as the driver sees it.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The current configuration generation.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// Tells the driver the device configuration changed: bumps `ConfigGeneration` and raises a
    /// configuration-change interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    /// The selected queue, if it exists and its registers may still be written (before
    /// DRIVER_OK, §4.2.2.2).
    fn selected_queue_for_write(&mut self, offset: u64) -> Option<&mut Queue> {
        if self.status & DEVICE_DRIVER_OK != 0 {
            debug!("virtio-mmio: queue register {offset:#x} written after DRIVER_OK; ignored");
            return None;
        }
        let sel = self.queue_select;
        let queue = self.queues.get_mut(sel as usize);
        if queue.is_none() {
            debug!("virtio-mmio: queue register {offset:#x} written for missing queue {sel}");
        }
        queue
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_type,
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => {
                self.counters
                    .isr_reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.interrupt.status()
            }
            VIRTIO_MMIO_STATUS => self.status,
            // The address registers are write-only in the spec; reading them back is harmless
            // and helps debugging.
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.selected_queue().map_or(0, |q| q.desc_table() as u32)
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.desc_table() >> 32) as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.selected_queue().map_or(0, |q| q.avail_ring() as u32)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.avail_ring() >> 32) as u32),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.selected_queue().map_or(0, |q| q.used_ring() as u32),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.used_ring() >> 32) as u32),
            // No shared memory regions: a length of all-ones means "no such region" (Linux
            // `vm_get_shm_region`).
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.selected_queue_for_write(offset) {
                    // Only a power of two in 1..=QueueNumMax (§2.7); anything else is ignored.
                    let size = u16::try_from(value).ok();
                    if size.is_none_or(|s| q.try_set_size(s).is_err()) {
                        debug!("virtio-mmio: invalid queue size {value}; ignored");
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected_queue_for_write(offset) {
                    q.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_address(offset, value),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.counters
                    .interrupt_acks
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.interrupt.ack(value)
            }
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => debug!(
                "virtio-mmio: write of {value:#x} to unknown or read-only register {offset:#x}"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & DEVICE_FEATURES_OK != 0 {
            debug!("virtio-mmio: DriverFeatures written after FEATURES_OK; ignored");
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel => debug!("virtio-mmio: DriverFeatures written with select {sel}; ignored"),
        }
    }

    /// Replaces one half of one of the selected queue's three addresses. The addresses are
    /// IOVAs when the device sits behind the IOMMU: only alignment is checked here.
    fn write_queue_address(&mut self, offset: u64, value: u32) {
        let Some(q) = self.selected_queue_for_write(offset) else {
            return;
        };
        let high = offset & 0x4 != 0;
        let merge = |old: u64| {
            if high {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            }
        };
        let result = match offset & !0x4 {
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                q.try_set_desc_table_address(GuestAddress(merge(q.desc_table())))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                q.try_set_avail_ring_address(GuestAddress(merge(q.avail_ring())))
            }
            _ => q.try_set_used_ring_address(GuestAddress(merge(q.used_ring()))),
        };
        if let Err(e) = result {
            debug!("virtio-mmio: queue address {value:#x} at {offset:#x} ignored: {e}");
        }
    }

    fn notify(&mut self, value: u32) {
        let index = value as usize;
        if !self.activated || index >= self.queues.len() {
            debug!(
                "virtio-mmio: notification for queue {value} ignored (activated: {})",
                self.activated
            );
            return;
        }
        // Normally an ioeventfd catches this write in KVM. Otherwise kick the worker; without
        // one, process the queue here (without the device lock, like a worker).
        if let Some(fd) = self.notifiers.get(index) {
            if let Err(e) = fd.write(1) {
                guest_warn!("virtio-mmio: cannot kick queue {index}: {e}");
            }
            return;
        }
        let handler = lock(&self.device).queue_handler();
        while handler.process_queue(index) == super::QueueProgress::More {}
    }

    /// The device status state machine (§3.1.1). The driver sets bits one step at a time;
    /// bits it did not earn (out of order) are dropped, bits it clears without a full reset
    /// are kept, and DEVICE_NEEDS_RESET belongs to the device.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if old & !value & !DEVICE_NEEDS_RESET != 0 {
            debug!(
                "virtio-mmio: driver cleared status bits ({old:#x} -> {value:#x}) without a reset; \
                 kept"
            );
        }
        let new_bits = value & !old & 0xff & !DEVICE_NEEDS_RESET;
        let mut status = old;

        if new_bits & DEVICE_FAILED != 0 {
            status |= DEVICE_FAILED;
        }
        if old & (DEVICE_NEEDS_RESET | DEVICE_FAILED) != 0 {
            // Only a reset gets the device going again.
            if new_bits & !DEVICE_FAILED != 0 {
                debug!("virtio-mmio: status {value:#x} ignored until the device is reset");
            }
            self.status = status;
            return;
        }
        if new_bits & DEVICE_ACKNOWLEDGE != 0 {
            status |= DEVICE_ACKNOWLEDGE;
        }
        if new_bits & DEVICE_DRIVER != 0 {
            if status & DEVICE_ACKNOWLEDGE != 0 {
                status |= DEVICE_DRIVER;
            } else {
                debug!("virtio-mmio: DRIVER set before ACKNOWLEDGE; ignored");
            }
        }
        if new_bits & DEVICE_FEATURES_OK != 0 {
            if status & DEVICE_DRIVER == 0 {
                debug!("virtio-mmio: FEATURES_OK set before DRIVER; ignored");
            } else if self.features_acceptable()
                && lock(&self.device).ack_features(self.driver_features)
            {
                status |= DEVICE_FEATURES_OK;
            }
            // On refusal FEATURES_OK stays clear: the driver reads it back and gives up.
        }
        if new_bits & DEVICE_DRIVER_OK != 0 {
            if status & DEVICE_FEATURES_OK == 0 {
                debug!("virtio-mmio: DRIVER_OK set before FEATURES_OK; ignored");
            } else {
                status |= DEVICE_DRIVER_OK;
                self.status = status;
                self.activate();
                return;
            }
        }
        let dropped = new_bits & !status;
        if dropped & !(DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK | DEVICE_DRIVER_OK)
            != 0
        {
            debug!("virtio-mmio: unknown status bits {dropped:#x} ignored");
        }
        self.status = status;
    }

    fn features_acceptable(&self) -> bool {
        let unknown = self.driver_features & !self.device_features;
        if unknown != 0 {
            debug!(
                "virtio-mmio: driver accepted features {unknown:#x} the device did not offer; \
                 FEATURES_OK refused"
            );
            return false;
        }
        if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            debug!(
                "virtio-mmio: driver did not accept VERSION_1 (legacy driver); FEATURES_OK refused"
            );
            return false;
        }
        true
    }

    fn activate(&mut self) {
        let result =
            activate_with_queue_copies(&self.device, &self.mem, &self.queues, &self.interrupt);
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                guest_warn!(
                    "virtio-mmio: device type {} failed to activate: {e}",
                    self.device_type
                );
                self.status |= DEVICE_NEEDS_RESET;
                self.interrupt.signal(VIRTIO_MMIO_INT_CONFIG);
            }
        }
    }

    /// Device reset (Status written with 0, §2.4): the device, the queues, feature selection
    /// and the ISR go back to their initial state. ConfigGeneration is kept.
    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt
            .ack(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= VIRTIO_MMIO_CONFIG {
            lock(&self.device).read_config(offset - VIRTIO_MMIO_CONFIG, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                *bytes = self.read_register(offset).to_le_bytes()
            }
            Ok(bytes) => {
                debug!("virtio-mmio: unaligned read at {offset:#x}");
                bytes.fill(0);
            }
            Err(_) => {
                debug!(
                    "virtio-mmio: {}-byte read at {offset:#x}; only 32-bit is allowed",
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= VIRTIO_MMIO_CONFIG {
            lock(&self.device).write_config(offset - VIRTIO_MMIO_CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_register(offset, u32::from_le_bytes(bytes))
            }
            _ => debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored; only aligned 32-bit is allowed",
                data.len()
            ),
        }
    }
}

/// The largest power of two in `1..=32768` not above `max` (1 for 0).
fn valid_queue_size(max: u16) -> u16 {
    const MAX_QUEUE_SIZE: u16 = 32768;
    match max.min(MAX_QUEUE_SIZE) {
        0 => 1,
        m => 1 << (15 - m.leading_zeros()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingLine;
    use crate::virtio::{device_memory, ActivateError};
    use vm_memory::GuestMemoryMmap;

    const FAKE_DEVICE_TYPE: u32 = 42;
    /// VERSION_1, ACCESS_PLATFORM and a device-specific bit 3.
    const FAKE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << 33) | (1 << 3);

    /// (size, ready, desc, avail, used) of a queue handed to `activate`.
    type QueueSetup = (u16, bool, u64, u64, u64);

    /// Records what the transport asks of it.
    #[derive(Default)]
    struct FakeDevice {
        config: [u8; 8],
        acked_features: Option<u64>,
        activated_with: Option<Vec<QueueSetup>>,
        fail_activate: bool,
        resets: usize,
        processed: Arc<Mutex<Vec<usize>>>,
    }

    struct FakeHandler(Arc<Mutex<Vec<usize>>>);

    impl crate::virtio::QueueHandler for FakeHandler {
        fn process_queue(&self, index: usize) -> crate::virtio::QueueProgress {
            lock(&self.0).push(index);
            crate::virtio::QueueProgress::Idle
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            FAKE_DEVICE_TYPE
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            FAKE_FEATURES
        }
        fn ack_features(&mut self, features: u64) -> bool {
            self.acked_features = Some(features);
            true
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = usize::try_from(offset)
                    .ok()
                    .and_then(|o| self.config.get(o + i))
                    .copied()
                    .unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = usize::try_from(offset)
                    .ok()
                    .and_then(|o| self.config.get_mut(o + i))
                {
                    *slot = *b;
                }
            }
        }
        fn activate(
            &mut self,
            _mem: DeviceMemory,
            queues: Vec<Queue>,
            _interrupt: Arc<VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::InvalidQueue(0));
            }
            self.activated_with = Some(
                queues
                    .iter()
                    .map(|q| {
                        (
                            q.size(),
                            q.ready(),
                            q.desc_table(),
                            q.avail_ring(),
                            q.used_ring(),
                        )
                    })
                    .collect(),
            );
            Ok(())
        }
        fn queue_handler(&self) -> Arc<dyn crate::virtio::QueueHandler> {
            Arc::new(FakeHandler(self.processed.clone()))
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated_with = None;
            self.acked_features = None;
        }
    }

    struct Fixture {
        transport: MmioTransport,
        device: Arc<Mutex<FakeDevice>>,
        line: Arc<CountingLine>,
        interrupt: Arc<VirtioInterrupt>,
    }

    fn fixture() -> Fixture {
        let device = Arc::new(Mutex::new(FakeDevice::default()));
        let line = Arc::new(CountingLine::new());
        let interrupt = Arc::new(VirtioInterrupt::new(line.clone()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let transport =
            MmioTransport::new(device.clone(), device_memory(mem, None), interrupt.clone());
        Fixture {
            transport,
            device,
            line,
            interrupt,
        }
    }

    fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn write_driver_features(t: &mut MmioTransport, features: u64) {
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK, as Linux does (cumulative status writes).
    fn negotiate(t: &mut MmioTransport, features: u64) {
        write32(t, VIRTIO_MMIO_STATUS, DEVICE_ACKNOWLEDGE);
        write32(t, VIRTIO_MMIO_STATUS, DEVICE_ACKNOWLEDGE | DEVICE_DRIVER);
        write_driver_features(t, features);
        write32(
            t,
            VIRTIO_MMIO_STATUS,
            DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        write32(t, VIRTIO_MMIO_QUEUE_SEL, index);
        write32(t, VIRTIO_MMIO_QUEUE_NUM, size);
        write32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base as u32);
        write32(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, (base >> 32) as u32);
        write32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
        write32(
            t,
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            ((base + 0x1000) >> 32) as u32,
        );
        write32(t, VIRTIO_MMIO_QUEUE_USED_LOW, (base + 0x2000) as u32);
        write32(
            t,
            VIRTIO_MMIO_QUEUE_USED_HIGH,
            ((base + 0x2000) >> 32) as u32,
        );
        write32(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    const ALL_OK: u32 = DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK | DEVICE_DRIVER_OK;

    /// Negotiates, sets up both queues and writes DRIVER_OK.
    fn bring_up(t: &mut MmioTransport) {
        negotiate(t, FAKE_FEATURES);
        setup_queue(t, 0, 16, 0x1_0000_0000);
        setup_queue(t, 1, 4, 0x4000);
        write32(t, VIRTIO_MMIO_STATUS, ALL_OK);
    }

    #[test]
    fn identification_registers() {
        let mut f = fixture();
        let t = &mut f.transport;
        assert_eq!(read32(t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read32(t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read32(t, VIRTIO_MMIO_DEVICE_ID), FAKE_DEVICE_TYPE);
        assert_eq!(read32(t, VIRTIO_MMIO_VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(t.queue_count(), 2);
        assert!(!t.is_activated());
        assert_eq!(lock(&t.device()).device_type(), FAKE_DEVICE_TYPE);
    }

    #[test]
    fn device_features_are_selected_in_32_bit_halves() {
        let mut f = fixture();
        let t = &mut f.transport;
        assert_eq!(read32(t, VIRTIO_MMIO_DEVICE_FEATURES), FAKE_FEATURES as u32);
        write32(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            read32(t, VIRTIO_MMIO_DEVICE_FEATURES),
            (FAKE_FEATURES >> 32) as u32
        );
        write32(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(read32(t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
    }

    #[test]
    fn features_ok_acks_the_64_bit_driver_features() {
        let mut f = fixture();
        let accepted = (1 << VIRTIO_F_VERSION_1) | (1 << 3);
        negotiate(&mut f.transport, accepted);
        assert_eq!(
            read32(&mut f.transport, VIRTIO_MMIO_STATUS),
            DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK
        );
        assert_eq!(f.device.lock().unwrap().acked_features, Some(accepted));
    }

    #[test]
    fn features_ok_refused_without_version_1() {
        let mut f = fixture();
        negotiate(&mut f.transport, 1 << 3);
        assert_eq!(
            read32(&mut f.transport, VIRTIO_MMIO_STATUS),
            DEVICE_ACKNOWLEDGE | DEVICE_DRIVER
        );
        assert_eq!(f.device.lock().unwrap().acked_features, None);
    }

    #[test]
    fn features_ok_refused_for_features_not_offered() {
        let mut f = fixture();
        negotiate(&mut f.transport, (1 << VIRTIO_F_VERSION_1) | (1 << 5));
        assert_eq!(
            read32(&mut f.transport, VIRTIO_MMIO_STATUS) & DEVICE_FEATURES_OK,
            0
        );
        // DRIVER_OK without FEATURES_OK does not activate.
        write32(&mut f.transport, VIRTIO_MMIO_STATUS, ALL_OK);
        assert!(!f.transport.is_activated());
        assert!(f.device.lock().unwrap().activated_with.is_none());
    }

    #[test]
    fn driver_features_are_frozen_after_features_ok() {
        let mut f = fixture();
        negotiate(&mut f.transport, FAKE_FEATURES);
        write_driver_features(&mut f.transport, 1 << VIRTIO_F_VERSION_1);
        assert_eq!(f.transport.driver_features, FAKE_FEATURES);
    }

    #[test]
    fn status_steps_out_of_order_are_dropped() {
        let mut f = fixture();
        let t = &mut f.transport;
        // DRIVER without ACKNOWLEDGE.
        write32(t, VIRTIO_MMIO_STATUS, DEVICE_DRIVER);
        assert_eq!(read32(t, VIRTIO_MMIO_STATUS), 0);
        // Everything at once: ACKNOWLEDGE and DRIVER are earned in order, FEATURES_OK is
        // checked (no features accepted: refused), DRIVER_OK then lacks FEATURES_OK.
        write32(t, VIRTIO_MMIO_STATUS, ALL_OK);
        assert_eq!(
            read32(t, VIRTIO_MMIO_STATUS),
            DEVICE_ACKNOWLEDGE | DEVICE_DRIVER
        );
        assert!(!t.is_activated());
        // Clearing bits without a reset is ignored.
        write32(t, VIRTIO_MMIO_STATUS, DEVICE_ACKNOWLEDGE);
        assert_eq!(
            read32(t, VIRTIO_MMIO_STATUS),
            DEVICE_ACKNOWLEDGE | DEVICE_DRIVER
        );
    }

    #[test]
    fn queue_setup_then_driver_ok_activates_with_the_queue_addresses() {
        let mut f = fixture();
        let t = &mut f.transport;
        write32(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(read32(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        assert_eq!(read32(t, VIRTIO_MMIO_QUEUE_READY), 0);
        write32(t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(read32(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);

        bring_up(t);
        assert!(t.is_activated());
        assert_eq!(read32(t, VIRTIO_MMIO_STATUS), ALL_OK);
        assert_eq!(
            f.device.lock().unwrap().activated_with,
            Some(vec![
                (16, true, 0x1_0000_0000, 0x1_0000_1000, 0x1_0000_2000),
                (4, true, 0x4000, 0x5000, 0x6000),
            ])
        );
        // The queue registers still read back after DRIVER_OK.
        write32(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(read32(t, VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(read32(t, VIRTIO_MMIO_QUEUE_DESC_HIGH), 1);
        assert_eq!(read32(t, VIRTIO_MMIO_QUEUE_USED_LOW), 0x2000);
    }

    #[test]
    fn queue_registers_are_read_only_after_driver_ok() {
        let mut f = fixture();
        let t = &mut f.transport;
        bring_up(t);
        write32(t, VIRTIO_MMIO_QUEUE_SEL, 1);
        write32(t, VIRTIO_MMIO_QUEUE_NUM, 8);
        write32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);
        write32(t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(t.queues[1].size(), 4);
        assert_eq!(t.queues[1].desc_table(), 0x4000);
        assert!(t.queues[1].ready());
    }

    #[test]
    fn invalid_queue_sizes_and_addresses_are_ignored() {
        let mut f = fixture();
        let t = &mut f.transport;
        write32(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        for bad in [0, 3, 32, 0x1_0010] {
            write32(t, VIRTIO_MMIO_QUEUE_NUM, bad);
            assert_eq!(t.queues[0].size(), 16, "size {bad}");
        }
        write32(t, VIRTIO_MMIO_QUEUE_NUM, 2);
        assert_eq!(t.queues[0].size(), 2);
        // The descriptor table must be 16-byte aligned.
        write32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1008);
        assert_eq!(t.queues[0].desc_table(), 0);
    }

    #[test]
    fn missing_queue_reads_zero_max_and_ignores_writes() {
        let mut f = fixture();
        let t = &mut f.transport;
        write32(t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(read32(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        assert_eq!(read32(t, VIRTIO_MMIO_QUEUE_READY), 0);
        setup_queue(t, u32::MAX, 4, 0x8000);
        assert_eq!(read32(t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(t.queues.iter().all(|q| !q.ready()));
    }

    #[test]
    fn failed_activation_sets_needs_reset_and_raises_config_interrupt() {
        let mut f = fixture();
        f.device.lock().unwrap().fail_activate = true;
        bring_up(&mut f.transport);
        assert!(!f.transport.is_activated());
        assert_eq!(
            read32(&mut f.transport, VIRTIO_MMIO_STATUS),
            ALL_OK | DEVICE_NEEDS_RESET
        );
        assert_eq!(
            read32(&mut f.transport, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(f.line.triggers(), 1);
        // Nothing but a reset moves it on; the device-owned bit survives driver writes.
        write32(&mut f.transport, VIRTIO_MMIO_STATUS, ALL_OK);
        assert_eq!(
            read32(&mut f.transport, VIRTIO_MMIO_STATUS),
            ALL_OK | DEVICE_NEEDS_RESET
        );
        write32(&mut f.transport, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn reset_returns_everything_to_initial_state() {
        let mut f = fixture();
        bring_up(&mut f.transport);
        f.interrupt.signal_used_queue();
        let t = &mut f.transport;
        write32(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        write32(t, VIRTIO_MMIO_STATUS, 0);

        assert!(!t.is_activated());
        assert_eq!(read32(t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(read32(t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(read32(t, VIRTIO_MMIO_DEVICE_FEATURES), FAKE_FEATURES as u32);
        assert_eq!(t.driver_features, 0);
        for q in &t.queues {
            assert!(!q.ready());
            assert_eq!(q.size(), q.max_size());
            assert_eq!(q.desc_table(), 0);
        }
        let dev = f.device.lock().unwrap();
        assert_eq!(dev.resets, 1);
        assert!(dev.activated_with.is_none());
        drop(dev);
        // And the device can be brought up again.
        bring_up(&mut f.transport);
        assert!(f.transport.is_activated());
    }

    #[test]
    fn failed_status_is_kept_until_reset() {
        let mut f = fixture();
        let t = &mut f.transport;
        write32(t, VIRTIO_MMIO_STATUS, DEVICE_ACKNOWLEDGE);
        write32(t, VIRTIO_MMIO_STATUS, DEVICE_ACKNOWLEDGE | DEVICE_FAILED);
        write32(
            t,
            VIRTIO_MMIO_STATUS,
            DEVICE_ACKNOWLEDGE | DEVICE_FAILED | DEVICE_DRIVER,
        );
        assert_eq!(
            read32(t, VIRTIO_MMIO_STATUS),
            DEVICE_ACKNOWLEDGE | DEVICE_FAILED
        );
    }

    #[test]
    fn interrupt_status_reads_and_acks_the_isr() {
        let mut f = fixture();
        f.interrupt.signal_used_queue();
        f.interrupt.signal_config_change();
        let t = &mut f.transport;
        assert_eq!(
            read32(t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );
        write32(t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(
            read32(t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        // InterruptStatus is read-only.
        write32(t, VIRTIO_MMIO_INTERRUPT_STATUS, 0);
        assert_eq!(
            read32(t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
    }

    #[test]
    fn config_changed_bumps_generation_and_signals() {
        let mut f = fixture();
        assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_CONFIG_GENERATION), 0);
        f.transport.config_changed();
        assert_eq!(read32(&mut f.transport, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        assert_eq!(f.transport.config_generation(), 1);
        assert_eq!(f.interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(f.line.triggers(), 1);
    }

    #[test]
    fn config_space_is_delegated_at_any_width() {
        let mut f = fixture();
        let t = &mut f.transport;
        t.write(VIRTIO_MMIO_CONFIG + 1, &[0xaa, 0xbb]);
        t.write(VIRTIO_MMIO_CONFIG + 7, &[0xcc]);
        assert_eq!(
            f.device.lock().unwrap().config,
            [0, 0xaa, 0xbb, 0, 0, 0, 0, 0xcc]
        );
        let mut byte = [0u8; 1];
        t.read(VIRTIO_MMIO_CONFIG + 2, &mut byte);
        assert_eq!(byte, [0xbb]);
        let mut quad = [0xffu8; 8];
        t.read(VIRTIO_MMIO_CONFIG, &mut quad);
        assert_eq!(quad, [0, 0xaa, 0xbb, 0, 0, 0, 0, 0xcc]);
        // Past the device's config: zeros, from the device's own bounds check.
        let mut far = [0xffu8; 4];
        t.read(VIRTIO_MMIO_WINDOW_SIZE - 4, &mut far);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn bad_widths_and_offsets_read_zero_and_ignore_writes() {
        let mut f = fixture();
        let t = &mut f.transport;
        for len in [1usize, 2, 3, 8] {
            let mut data = vec![0xffu8; len];
            t.read(VIRTIO_MMIO_MAGIC_VALUE, &mut data);
            assert!(data.iter().all(|&b| b == 0), "{len}-byte read");
            t.write(VIRTIO_MMIO_STATUS, &vec![1u8; len]);
        }
        assert_eq!(read32(t, VIRTIO_MMIO_STATUS), 0);
        // Unaligned 32-bit access.
        assert_eq!(read32(t, VIRTIO_MMIO_MAGIC_VALUE + 1), 0);
        write32(t, VIRTIO_MMIO_STATUS + 2, DEVICE_ACKNOWLEDGE);
        assert_eq!(read32(t, VIRTIO_MMIO_STATUS), 0);
        // Unknown and write-only registers read 0; read-only ones ignore writes.
        for offset in [
            0x018,
            0x040,
            0x0f8,
            VIRTIO_MMIO_QUEUE_NOTIFY,
            VIRTIO_MMIO_QUEUE_NUM,
        ] {
            assert_eq!(read32(t, offset), 0, "{offset:#x}");
        }
        write32(t, VIRTIO_MMIO_MAGIC_VALUE, 0);
        write32(t, VIRTIO_MMIO_QUEUE_NUM_MAX, 2);
        assert_eq!(read32(t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(read32(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        // Every offset and width in and past the window, without a panic.
        for offset in (0..0x1100).step_by(3).chain([u64::MAX - 3, u64::MAX]) {
            for len in [0usize, 1, 2, 4, 8] {
                let mut data = vec![0u8; len];
                t.read(offset, &mut data);
                t.write(offset, &data);
            }
        }
    }

    #[test]
    fn no_shared_memory_regions() {
        let mut f = fixture();
        let t = &mut f.transport;
        write32(t, VIRTIO_MMIO_SHM_SEL, 0);
        assert_eq!(read32(t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        assert_eq!(read32(t, VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
    }

    #[test]
    fn queue_notify_without_ioeventfd_processes_the_queue() {
        let mut f = fixture();
        // Before activation: ignored.
        write32(&mut f.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        bring_up(&mut f.transport);
        write32(&mut f.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        write32(&mut f.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 2);
        write32(&mut f.transport, VIRTIO_MMIO_QUEUE_NOTIFY, u32::MAX);
        assert_eq!(*lock(&f.device.lock().unwrap().processed), vec![1]);
    }

    #[test]
    fn invalid_device_queue_sizes_are_rounded_down() {
        assert_eq!(valid_queue_size(0), 1);
        assert_eq!(valid_queue_size(1), 1);
        assert_eq!(valid_queue_size(300), 256);
        assert_eq!(valid_queue_size(u16::MAX), 32768);
    }
}
