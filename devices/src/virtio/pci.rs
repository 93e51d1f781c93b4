// SPDX-License-Identifier: Apache-2.0

//! The virtio-pci modern transport (virtio 1.2 §4.1), MSI-X only (no INTx, no legacy BAR).
//!
//! One PCI function: vendor 0x1AF4, device 0x1040 + virtio ID, revision 1. One 64-bit memory
//! BAR (BAR 0, [`BAR_SIZE`]) holds every structure the capabilities point at:
//!
//! ```text
//!  0x0000 common configuration   (VIRTIO_PCI_CAP_COMMON_CFG)
//!  0x1000 ISR status              (VIRTIO_PCI_CAP_ISR_CFG; read-to-clear, unused with MSI-X)
//!  0x2000 device configuration    (VIRTIO_PCI_CAP_DEVICE_CFG)
//!  0x3000 queue notify            (VIRTIO_PCI_CAP_NOTIFY_CFG; queue q at +4*q)
//!  0x4000 MSI-X table, 0x5000 PBA (MSI-X capability)
//! ```
//!
//! plus the PCI configuration access capability (`VIRTIO_PCI_CAP_PCI_CFG`), a window into
//! the BAR through config space.
//!
//! # How the VMM wires it
//!
//! - Creates [`MsixVectors`] with one line (irqfd) per queue plus one for configuration
//!   changes ([`VirtioPciTransport::vector_count`]) and an [`MsixSink`] that turns vector
//!   changes into KVM routes; the transport owns the [`MsixTable`].
//! - Registers one ioeventfd per queue at `bar + NOTIFY_OFFSET + 4 * q` (any width), and a
//!   worker that runs [`VirtioPciTransport::queue_handler`] when one fires; hands the
//!   eventfds to [`VirtioPciTransport::set_queue_notifiers`].
//! - Puts BAR 0 on the MMIO bus at its assigned address ([`crate::pci::BarWindow`]) and the
//!   function on the [`crate::pci::root::PciRoot`].
//!
//! **Bus master off ⇒ no DMA**: the handler the worker runs does nothing while the Command
//! register's bus-master bit is clear, DRIVER_OK does not activate the device then, and the
//! queues are kicked when the bit is set again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{
    activate_with_queue_copies, DeviceMemory, QueueHandler, QueueProgress, VirtioDevice,
    VirtioInterrupt, VirtioMsix, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MSI_NO_VECTOR,
};
use crate::pci::msix::{self, MsixSink, MsixTable, MsixVectors};
use crate::pci::{regs, BarInfo, PciConfig, PciError, PciFunction};
use crate::sync::lock;
use crate::{guest_debug, guest_warn};

/// Vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device ID.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Common configuration in BAR 0.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Length of the common configuration (up to `queue_device`).
pub const COMMON_LEN: u64 = 0x38;
/// ISR in BAR 0.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device configuration in BAR 0.
pub const DEVICE_OFFSET: u64 = 0x2000;
/// Length of the device configuration window.
pub const DEVICE_LEN: u64 = 0x1000;
/// Queue notify area in BAR 0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// `notify_off_multiplier`: queue `q` is notified at `NOTIFY_OFFSET + q * 4`.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// Length of the notify area.
pub const NOTIFY_LEN: u64 = 0x1000;
/// MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// MSI-X PBA in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;

/// `cfg_type` values of `struct virtio_pci_cap`.
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

/// Device status bits (§2.1), as in virtio-mmio.
use super::mmio::{
    DEVICE_ACKNOWLEDGE, DEVICE_DRIVER, DEVICE_DRIVER_OK, DEVICE_FAILED, DEVICE_FEATURES_OK,
    DEVICE_NEEDS_RESET,
};

/// Errors when building the function (device-model bugs).
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The configuration space could not be laid out.
    #[error("Cannot lay out the PCI configuration space")]
    Config(#[source] PciError),
    /// The vector count does not match the queues.
    #[error("Need {expected} MSI-X vectors, got {got}")]
    Vectors {
        /// Queues + 1.
        expected: usize,
        /// Vectors given.
        got: usize,
    },
}

/// Runs the device's handler only while the function may master the bus.
struct GatedHandler {
    inner: Arc<dyn QueueHandler>,
    bus_master: Arc<AtomicBool>,
}

impl QueueHandler for GatedHandler {
    fn process_queue(&self, index: usize) -> QueueProgress {
        if !self.bus_master.load(Ordering::SeqCst) {
            guest_debug!("virtio-pci: queue {index} kicked with bus mastering off; no DMA");
            return QueueProgress::Idle;
        }
        self.inner.process_queue(index)
    }
}

/// A virtio device on PCI; see the [module documentation](self).
pub struct VirtioPciTransport {
    config: PciConfig,
    msix_cap: usize,
    cfg_cap: usize,
    bar_addr: u64,
    device: Arc<Mutex<dyn VirtioDevice>>,
    handler: Arc<GatedHandler>,
    bus_master: Arc<AtomicBool>,
    mem: DeviceMemory,
    interrupt: Arc<VirtioInterrupt>,
    assign: Arc<VirtioMsix>,
    msix: MsixTable,
    device_type: u32,
    device_features: u64,
    queues: Vec<Queue>,
    queue_select: u16,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u8,
    activated: bool,
    config_generation: u8,
    notifiers: Vec<Arc<EventFd>>,
}

impl std::fmt::Debug for VirtioPciTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

/// `struct virtio_pci_cap` (+ a trailing u32 for the notify and PCI-config caps).
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut c = vec![regs::CAP_ID_VENDOR, 0, len, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        c.extend_from_slice(&x.to_le_bytes());
    }
    c
}

impl VirtioPciTransport {
    /// Vectors a device with `queues` queues needs: one per queue plus configuration.
    pub fn vector_count(queues: usize) -> usize {
        queues + 1
    }

    /// Wraps `device` as a PCI function whose BAR 0 is assigned at `bar_addr`. `vectors` must
    /// hold [`Self::vector_count`] lines; `sink` receives the MSI-X vector changes.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: DeviceMemory,
        vectors: Arc<MsixVectors>,
        sink: Arc<dyn MsixSink>,
        bar_addr: u64,
    ) -> Result<Self, VirtioPciError> {
        let (device_type, device_features, sizes, handler) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.features(),
                d.queue_max_sizes().to_vec(),
                d.queue_handler(),
            )
        };
        let expected = Self::vector_count(sizes.len());
        if vectors.count() != expected {
            return Err(VirtioPciError::Vectors {
                expected,
                got: vectors.count(),
            });
        }
        let queues = sizes
            .iter()
            .map(|&m| {
                Queue::new(m).unwrap_or_else(|_| Queue::new(256).expect("256 is a valid size"))
            })
            .collect();
        let id = VIRTIO_PCI_DEVICE_ID_BASE + (device_type as u16 & 0xff);
        // Class: mass storage (SCSI, as QEMU's virtio-blk-pci) or "other".
        let class = if device_type == super::VIRTIO_ID_BLOCK {
            0x01_0000
        } else {
            0xff_0000
        };
        let mut config =
            PciConfig::new(VIRTIO_PCI_VENDOR_ID, id, class, VIRTIO_PCI_VENDOR_ID, 0x40);
        let e = VirtioPciError::Config;
        config
            .add_bar(
                0,
                BarInfo {
                    size: BAR_SIZE,
                    is_64bit: true,
                    prefetchable: false,
                },
            )
            .map_err(e)?;
        config.set_bar_address(0, bar_addr);
        for (t, off, len, extra) in [
            (CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LEN, None),
            (
                CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                NOTIFY_LEN,
                Some(NOTIFY_MULTIPLIER),
            ),
            (CAP_ISR_CFG, ISR_OFFSET, 1, None),
            (CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_LEN, None),
        ] {
            config
                .add_capability(&virtio_cap(t, off, len, extra), &[])
                .map_err(e)?;
        }
        // PCI configuration access: bar, offset, length and data are the driver's.
        let mut wmask = vec![0u8; 20];
        wmask[4] = 0xff;
        wmask[8..20].fill(0xff);
        let cfg_cap = config
            .add_capability(&virtio_cap(CAP_PCI_CFG, 0, 0, Some(0)), &wmask)
            .map_err(e)?;
        let (body, mask) = msix::capability(
            vectors.count(),
            0,
            MSIX_TABLE_OFFSET as u32,
            0,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap = config.add_capability(&body, &mask).map_err(e)?;

        let assign = VirtioMsix::new(vectors.clone(), sizes.len());
        let bus_master = Arc::new(AtomicBool::new(false));
        Ok(VirtioPciTransport {
            config,
            msix_cap,
            cfg_cap,
            bar_addr,
            handler: Arc::new(GatedHandler {
                inner: handler,
                bus_master: bus_master.clone(),
            }),
            bus_master,
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::with_msix(assign.clone())),
            assign,
            msix: MsixTable::new(vectors, sink),
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
        })
    }

    /// The data plane for the VMM's worker: the device's, gated on bus mastering.
    pub fn queue_handler(&self) -> Arc<dyn QueueHandler> {
        self.handler.clone()
    }

    /// Number of queues (one ioeventfd each).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The worker's notify eventfds, one per queue.
    pub fn set_queue_notifiers(&mut self, notifiers: Vec<Arc<EventFd>>) {
        self.notifiers = notifiers;
    }

    /// The MSI-X vectors.
    pub fn vectors(&self) -> &Arc<MsixVectors> {
        self.msix.vectors()
    }

    /// Whether the device was activated.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The configuration space (tests).
    pub fn pci_config(&self) -> &PciConfig {
        &self.config
    }

    /// Device status.
    pub fn status(&self) -> u8 {
        self.status
    }

    fn kick_all(&self) {
        for fd in &self.notifiers {
            if let Err(e) = fd.write(1) {
                guest_warn!("virtio-pci: cannot kick a queue: {e}");
            }
        }
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(usize::from(self.queue_select));
        let v: u64 = match offset {
            0x00 => u64::from(self.device_features_select),
            0x04 => match self.device_features_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_features_select),
            0x0c => match self.driver_features_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.assign.config_vector()),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size())),
            0x1a => u64::from(self.assign.queue_vector(usize::from(self.queue_select))),
            0x1c => q.map_or(0, |q| u64::from(q.ready())),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map_or(0, |q| q.desc_table()),
            0x24 => q.map_or(0, |q| q.desc_table() >> 32),
            0x28 => q.map_or(0, |q| q.avail_ring()),
            0x2c => q.map_or(0, |q| q.avail_ring() >> 32),
            0x30 => q.map_or(0, |q| q.used_ring()),
            0x34 => q.map_or(0, |q| q.used_ring() >> 32),
            _ => {
                guest_debug!("virtio-pci: common config read at {offset:#x}");
                0
            }
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        match (offset, data.len()) {
            (0x00, 4) => self.device_features_select = v as u32,
            (0x08, 4) => self.driver_features_select = v as u32,
            (0x0c, 4) => self.write_driver_features(v as u32),
            (0x10, 2) => self.assign.set_config_vector(self.checked_vector(v as u16)),
            (0x14, 1) => self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) => {
                if let Some(q) = self.queue_for_write() {
                    if q.try_set_size(v as u16).is_err() {
                        guest_debug!("virtio-pci: invalid queue size {v}; ignored");
                    }
                }
            }
            (0x1a, 2) => {
                let vector = self.checked_vector(v as u16);
                self.assign
                    .set_queue_vector(usize::from(self.queue_select), vector);
            }
            (0x1c, 2) => {
                if let Some(q) = self.queue_for_write() {
                    // Writing 0 is not allowed (§4.1.4.3.2); only 1 enables.
                    if v == 1 {
                        q.set_ready(true);
                    }
                }
            }
            (0x20..=0x37, 4) | (0x20 | 0x28 | 0x30, 8) => self.write_queue_address(offset, data),
            _ => guest_debug!(
                "virtio-pci: {}-byte common config write at {offset:#x} ignored",
                data.len()
            ),
        }
    }

    /// A vector the table has, else NO_VECTOR (the driver reads it back to see the refusal).
    fn checked_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.vectors().count() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn queue_for_write(&mut self) -> Option<&mut Queue> {
        if self.status & DEVICE_DRIVER_OK as u8 != 0 {
            guest_debug!("virtio-pci: queue register written after DRIVER_OK; ignored");
            return None;
        }
        let q = self.queues.get_mut(usize::from(self.queue_select))?;
        (!q.ready()).then_some(q)
    }

    fn write_queue_address(&mut self, offset: u64, data: &[u8]) {
        let Some(q) = self.queue_for_write() else {
            return;
        };
        let field = offset & !0x7;
        let old = match field {
            0x20 => q.desc_table(),
            0x28 => q.avail_ring(),
            _ => q.used_ring(),
        };
        let new = match data.len() {
            8 => u64::from_le_bytes(data.try_into().expect("8 bytes")),
            _ => {
                let v = u64::from(u32::from_le_bytes(data.try_into().expect("4 bytes")));
                if offset & 4 != 0 {
                    (old & 0xffff_ffff) | (v << 32)
                } else {
                    (old & !0xffff_ffff) | v
                }
            }
        };
        let r = match field {
            0x20 => q.try_set_desc_table_address(GuestAddress(new)),
            0x28 => q.try_set_avail_ring_address(GuestAddress(new)),
            _ => q.try_set_used_ring_address(GuestAddress(new)),
        };
        if let Err(e) = r {
            guest_debug!("virtio-pci: queue address {new:#x} ignored: {e}");
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & DEVICE_FEATURES_OK as u8 != 0 {
            guest_debug!("virtio-pci: driver features written after FEATURES_OK; ignored");
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => guest_debug!("virtio-pci: driver features select out of range"),
        }
    }

    /// The status state machine (§3.1.1), as virtio-mmio's.
    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let (value, old) = (u32::from(value), u32::from(self.status));
        let new_bits = value & !old & !DEVICE_NEEDS_RESET;
        let mut status = old;
        if new_bits & DEVICE_FAILED != 0 {
            status |= DEVICE_FAILED;
        }
        if old & (DEVICE_NEEDS_RESET | DEVICE_FAILED) != 0 {
            self.status = status as u8;
            return;
        }
        if new_bits & DEVICE_ACKNOWLEDGE != 0 {
            status |= DEVICE_ACKNOWLEDGE;
        }
        if new_bits & DEVICE_DRIVER != 0 && status & DEVICE_ACKNOWLEDGE != 0 {
            status |= DEVICE_DRIVER;
        }
        if new_bits & DEVICE_FEATURES_OK != 0
            && status & DEVICE_DRIVER != 0
            && self.features_acceptable()
            && lock(&self.device).ack_features(self.driver_features)
        {
            status |= DEVICE_FEATURES_OK;
        }
        if new_bits & DEVICE_DRIVER_OK != 0 && status & DEVICE_FEATURES_OK != 0 {
            status |= DEVICE_DRIVER_OK;
            self.status = status as u8;
            self.activate();
            return;
        }
        self.status = status as u8;
    }

    fn features_acceptable(&self) -> bool {
        let ok = self.driver_features & !self.device_features == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
        if !ok {
            guest_debug!(
                "virtio-pci: driver features {:#x} refused",
                self.driver_features
            );
        }
        ok
    }

    fn activate(&mut self) {
        if !self.bus_master.load(Ordering::SeqCst) {
            guest_warn!("virtio-pci: DRIVER_OK with bus mastering off; device not started");
            self.fail();
            return;
        }
        let result =
            activate_with_queue_copies(&self.device, &self.mem, &self.queues, &self.interrupt);
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                guest_warn!(
                    "virtio-pci: device type {} failed to activate: {e}",
                    self.device_type
                );
                self.fail();
            }
        }
    }

    fn fail(&mut self) {
        self.status |= DEVICE_NEEDS_RESET as u8;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Device reset: device, queues, feature state, vector assignments. The MSI-X table is
    /// PCI function state and survives a virtio reset.
    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.assign.reset();
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.take_status();
    }

    fn notify(&mut self, offset: u64) {
        let q = (offset / u64::from(NOTIFY_MULTIPLIER)) as usize;
        if !self.activated || q >= self.queues.len() {
            guest_debug!("virtio-pci: notify of queue {q} ignored");
            return;
        }
        if let Some(fd) = self.notifiers.get(q) {
            if let Err(e) = fd.write(1) {
                guest_warn!("virtio-pci: cannot kick queue {q}: {e}");
            }
            return;
        }
        while self.handler.process_queue(q) == QueueProgress::More {}
    }

    fn bar_decodes(&self) -> bool {
        self.config.memory_enabled() && self.config.bar_address(0) == Some(self.bar_addr)
    }

    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + 0x1000 => self.common_read(o, data),
            o if (ISR_OFFSET..ISR_OFFSET + 0x1000).contains(&o) => {
                data.fill(0);
                // A zero-length read neither reads nor clears the ISR.
                if let (ISR_OFFSET, Some(b)) = (o, data.first_mut()) {
                    *b = self.interrupt.take_status() as u8;
                }
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                lock(&self.device).read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.table_read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                self.msix.pba_read(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + 0x1000 => self.common_write(o, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                lock(&self.device).write_config(o - DEVICE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                self.notify(o - NOTIFY_OFFSET)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.table_write(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                self.msix.pba_write(o - MSIX_PBA_OFFSET, data)
            }
            _ => guest_debug!("virtio-pci: write at BAR offset {offset:#x} ignored"),
        }
    }

    /// The PCI configuration access capability's window: (bar, offset, length).
    fn cfg_window(&self) -> (u8, u64, usize) {
        let c = self.cfg_cap;
        (
            self.config.read_u32(c + 4) as u8,
            u64::from(self.config.read_u32(c + 8)),
            self.config.read_u32(c + 12) as usize,
        )
    }
}

fn overlaps(offset: u64, len: usize, start: usize, field: usize) -> bool {
    offset < (start + field) as u64 && offset + len as u64 > start as u64
}

impl PciFunction for VirtioPciTransport {
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        let data_off = self.cfg_cap + 16;
        if overlaps(offset, data.len(), data_off, 4) && offset == data_off as u64 {
            let (bar, off, len) = self.cfg_window();
            if bar == 0 && matches!(len, 1 | 2 | 4) && len <= data.len() {
                let mut buf = [0u8; 4];
                self.bar0_read(off, &mut buf[..len]);
                data.fill(0);
                data[..len].copy_from_slice(&buf[..len]);
                return;
            }
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        if !self.config.write(offset, data) {
            return;
        }
        let len = data.len();
        if overlaps(offset, len, regs::COMMAND, 2) {
            let on = self.config.bus_master();
            let was = self.bus_master.swap(on, Ordering::SeqCst);
            if on && !was && self.activated {
                // Requests queued while mastering was off.
                self.kick_all();
            }
        }
        if overlaps(offset, len, self.msix_cap + 2, 2) {
            let ctrl = self.config.read_u16(self.msix_cap + 2);
            self.msix.set_control(ctrl);
        }
        let data_off = self.cfg_cap + 16;
        if offset == data_off as u64 {
            let (bar, off, wlen) = self.cfg_window();
            if bar == 0 && matches!(wlen, 1 | 2 | 4) && wlen <= len {
                let bytes = data[..wlen].to_vec();
                self.bar0_write(off, &bytes);
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 || !self.bar_decodes() || data.len() > 8 {
            data.fill(0xff);
            return;
        }
        self.bar0_read(offset, data);
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 || !self.bar_decodes() || data.len() > 8 {
            guest_debug!("virtio-pci: BAR write at {offset:#x} while not decoding; dropped");
            return;
        }
        self.bar0_write(offset, data);
    }

    fn bars(&self) -> Vec<(usize, BarInfo, u64)> {
        self.config
            .bar(0)
            .map(|b| vec![(0, b, self.bar_addr)])
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::{CountingLine, InterruptLine};
    use crate::pci::msix::{MsixVectorUpdate, MSIX_CTRL_ENABLE};
    use crate::virtio::block::Block;
    use crate::virtio::device_memory;
    use vm_memory::GuestMemoryMmap;

    const BAR: u64 = 0xc000_0000;

    #[derive(Default)]
    struct Sink(Mutex<Vec<Vec<MsixVectorUpdate>>>);
    impl MsixSink for Sink {
        fn vectors_changed(&self, u: &[MsixVectorUpdate]) {
            self.0.lock().unwrap().push(u.to_vec());
        }
    }

    struct Fixture {
        t: VirtioPciTransport,
        lines: Vec<Arc<CountingLine>>,
        sink: Arc<Sink>,
        _file: std::path::PathBuf,
    }

    fn fixture() -> Fixture {
        let path = std::env::temp_dir().join(format!(
            "vpci-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let block = Block::new(file, false, "t".into(), false)
            .unwrap()
            .with_queues(2);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let lines: Vec<Arc<CountingLine>> = (0..3).map(|_| Arc::new(CountingLine::new())).collect();
        let vectors = MsixVectors::new(
            lines
                .iter()
                .map(|l| l.clone() as Arc<dyn InterruptLine>)
                .collect(),
        );
        let sink = Arc::new(Sink::default());
        let t = VirtioPciTransport::new(
            Arc::new(Mutex::new(block)),
            device_memory(mem, None),
            vectors,
            sink.clone(),
            BAR,
        )
        .unwrap();
        Fixture {
            t,
            lines,
            sink,
            _file: path,
        }
    }

    fn cfg_w(t: &mut VirtioPciTransport, off: u64, v: &[u8]) {
        t.config_write(off, v);
    }
    fn bar_w(t: &mut VirtioPciTransport, off: u64, v: &[u8]) {
        t.bar_write(0, off, v);
    }
    fn bar_r32(t: &mut VirtioPciTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn bar_r16(t: &mut VirtioPciTransport, off: u64) -> u16 {
        let mut b = [0u8; 2];
        t.bar_read(0, off, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn identity_capabilities_and_bar() {
        let f = fixture();
        let c = f.t.pci_config();
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.read_u32(8) >> 8, 0x01_0000);
        let caps = c.capabilities();
        let types: Vec<u8> = caps
            .iter()
            .filter(|(_, id)| *id == regs::CAP_ID_VENDOR)
            .map(|(o, _)| c.read_u32(*o) as u8)
            .collect();
        assert_eq!(caps.len(), 6);
        assert_eq!(caps[5].1, regs::CAP_ID_MSIX);
        let _ = types;
        assert_eq!(c.bar_address(0), Some(BAR));
    }

    #[test]
    fn bar_does_not_decode_until_memory_enabled() {
        let mut f = fixture();
        assert_eq!(bar_r32(&mut f.t, 0x12), 0xffff_ffff);
        cfg_w(&mut f.t, 4, &regs::CMD_MEMORY.to_le_bytes());
        assert_eq!(bar_r16(&mut f.t, 0x12), 2, "num_queues");
        // Moved BAR: no longer decodes at the assigned address.
        cfg_w(&mut f.t, 0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(bar_r16(&mut f.t, 0x12), 0xffff);
    }

    fn bring_up(f: &mut Fixture) {
        cfg_w(
            &mut f.t,
            4,
            &(regs::CMD_MEMORY | regs::CMD_BUS_MASTER).to_le_bytes(),
        );
        bar_w(&mut f.t, 0x14, &[DEVICE_ACKNOWLEDGE as u8]);
        bar_w(
            &mut f.t,
            0x14,
            &[(DEVICE_ACKNOWLEDGE | DEVICE_DRIVER) as u8],
        );
        bar_w(&mut f.t, 0x08, &1u32.to_le_bytes());
        bar_w(&mut f.t, 0x0c, &1u32.to_le_bytes());
        bar_w(
            &mut f.t,
            0x14,
            &[(DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK) as u8],
        );
        assert_ne!(f.t.status() & DEVICE_FEATURES_OK as u8, 0);
        for q in 0..2u16 {
            bar_w(&mut f.t, 0x16, &q.to_le_bytes());
            bar_w(&mut f.t, 0x18, &16u16.to_le_bytes());
            let base = 0x1000 * (u64::from(q) + 1) * 4;
            bar_w(&mut f.t, 0x20, &(base as u32).to_le_bytes());
            bar_w(&mut f.t, 0x24, &0u32.to_le_bytes());
            bar_w(&mut f.t, 0x28, &(base + 0x1000).to_le_bytes());
            bar_w(&mut f.t, 0x30, &(base + 0x2000).to_le_bytes());
            bar_w(&mut f.t, 0x1a, &(q + 1).to_le_bytes());
            assert_eq!(bar_r16(&mut f.t, 0x1a), q + 1);
            bar_w(&mut f.t, 0x1c, &1u16.to_le_bytes());
        }
        bar_w(&mut f.t, 0x10, &0u16.to_le_bytes());
        bar_w(&mut f.t, 0x14, &[0x0f]);
    }

    #[test]
    fn common_config_state_machine_activates_with_vectors() {
        let mut f = fixture();
        bring_up(&mut f);
        assert!(f.t.is_activated());
        assert_eq!(bar_r32(&mut f.t, 0x14) & 0xff, 0x0f);
        // Queue registers are frozen after DRIVER_OK.
        bar_w(&mut f.t, 0x16, &0u16.to_le_bytes());
        bar_w(&mut f.t, 0x18, &2u16.to_le_bytes());
        assert_eq!(bar_r16(&mut f.t, 0x18), 16);
        // Reset returns vector assignments to NO_VECTOR and the status to 0.
        bar_w(&mut f.t, 0x14, &[0]);
        assert!(!f.t.is_activated());
        assert_eq!(bar_r16(&mut f.t, 0x1a), VIRTIO_MSI_NO_VECTOR);
        assert_eq!(bar_r16(&mut f.t, 0x10), VIRTIO_MSI_NO_VECTOR);
    }

    #[test]
    fn out_of_range_vectors_read_back_no_vector() {
        let mut f = fixture();
        cfg_w(&mut f.t, 4, &regs::CMD_MEMORY.to_le_bytes());
        bar_w(&mut f.t, 0x10, &7u16.to_le_bytes());
        assert_eq!(bar_r16(&mut f.t, 0x10), VIRTIO_MSI_NO_VECTOR);
        bar_w(&mut f.t, 0x10, &2u16.to_le_bytes());
        assert_eq!(bar_r16(&mut f.t, 0x10), 2);
    }

    #[test]
    fn driver_ok_without_bus_master_does_not_start_the_device() {
        let mut f = fixture();
        bring_up(&mut f);
        assert!(f.t.is_activated());
        let mut g = fixture();
        cfg_w(&mut g.t, 4, &regs::CMD_MEMORY.to_le_bytes());
        for s in [1u8, 3, 0xb, 0xf] {
            if s == 0xb {
                bar_w(&mut g.t, 0x08, &1u32.to_le_bytes());
                bar_w(&mut g.t, 0x0c, &1u32.to_le_bytes());
            }
            bar_w(&mut g.t, 0x14, &[s]);
        }
        assert!(!g.t.is_activated());
        assert_ne!(g.t.status() & DEVICE_NEEDS_RESET as u8, 0);
        // And a handler with mastering off does nothing.
        assert_eq!(g.t.queue_handler().process_queue(0), QueueProgress::Idle);
    }

    #[test]
    fn msix_enable_in_config_space_reaches_the_table() {
        let mut f = fixture();
        cfg_w(&mut f.t, 4, &regs::CMD_MEMORY.to_le_bytes());
        bar_w(
            &mut f.t,
            MSIX_TABLE_OFFSET + 16,
            &0xfee0_0000u32.to_le_bytes(),
        );
        bar_w(&mut f.t, MSIX_TABLE_OFFSET + 24, &0x41u32.to_le_bytes());
        bar_w(&mut f.t, MSIX_TABLE_OFFSET + 28, &0u32.to_le_bytes());
        assert!(f.sink.0.lock().unwrap().is_empty());
        let cap = f.t.msix_cap as u64;
        cfg_w(&mut f.t, cap + 2, &(MSIX_CTRL_ENABLE | 2).to_le_bytes());
        assert_eq!(f.sink.0.lock().unwrap().len(), 1);
        f.t.vectors().trigger(1);
        assert_eq!(f.lines[1].triggers(), 1);
        // Table size is read-only.
        assert_eq!(f.t.pci_config().read_u16(f.t.msix_cap + 2) & 0x7ff, 2);
    }

    /// fuzz/regressions/virtio_pci/crash-9960e0e3 (and pci_config/crash-92433988): a
    /// zero-length BAR read at the ISR indexed `data[0]` and panicked.
    #[test]
    fn fuzz_virtio_pci_crash_9960e0e3_zero_length_isr_read() {
        let mut f = fixture();
        cfg_w(&mut f.t, 4, &regs::CMD_MEMORY.to_le_bytes());
        f.t.interrupt.signal(VIRTIO_MMIO_INT_CONFIG);
        f.t.bar_read(0, ISR_OFFSET, &mut []);
        let mut b = [0u8; 1];
        f.t.bar_read(0, ISR_OFFSET, &mut b);
        assert_eq!(
            u32::from(b[0]),
            VIRTIO_MMIO_INT_CONFIG,
            "the empty read did not clear the ISR"
        );
        f.t.bar_read(0, ISR_OFFSET, &mut b);
        assert_eq!(b[0], 0, "read to clear");
    }

    #[test]
    fn pci_cfg_capability_reaches_bar0() {
        let mut f = fixture();
        let c = f.t.cfg_cap as u64;
        cfg_w(&mut f.t, c + 4, &[0]);
        cfg_w(&mut f.t, c + 8, &0x12u32.to_le_bytes());
        cfg_w(&mut f.t, c + 12, &2u32.to_le_bytes());
        let mut d = [0u8; 4];
        f.t.config_read(c + 16, &mut d);
        assert_eq!(
            u16::from_le_bytes([d[0], d[1]]),
            2,
            "num_queues through config space"
        );
    }
}
