// SPDX-License-Identifier: Apache-2.0

//! PCI: type-0 configuration space, BARs, capabilities, MSI-X and the root complex (one
//! segment, bus 0). No KVM here: the VMM places BARs on its buses and wires MSI-X vectors to
//! GSIs and irqfds.
//!
//! - [`PciConfig`]: the 256-byte type-0 header plus capability list, with per-byte write
//!   masks, so BAR sizing (write all-ones, read back the size mask) and read-only fields follow
//!   the PCI Local Bus spec 3.0 §6.2.5 without special cases; Status bits are RW1C.
//! - [`msix`]: the MSI-X table and PBA (PCI 3.0 §6.8.2), pushing every effective vector
//!   change into an [`msix::MsixSink`] the owner gives it.
//! - [`root`]: the root complex, the legacy 0xCF8/0xCFC mechanism and ECAM.
//! - A function is a [`PciFunction`]: config space accesses, plus accesses to its BARs.
//!
//! Everything here takes guest input at any offset and width without panicking.

pub mod msix;
pub mod root;

/// Config space offsets and bits used here (PCI 3.0 §6.2).
pub mod regs {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: usize = 0x00;
    /// Command register (16 bits).
    pub const COMMAND: usize = 0x04;
    /// Status register (16 bits).
    pub const STATUS: usize = 0x06;
    /// Revision ID.
    pub const REVISION: usize = 0x08;
    /// First BAR.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID.
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Capabilities pointer.
    pub const CAPABILITIES: usize = 0x34;
    /// Interrupt line.
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Command: I/O space enable.
    pub const CMD_IO: u16 = 1 << 0;
    /// Command: memory space enable.
    pub const CMD_MEMORY: u16 = 1 << 1;
    /// Command: bus master enable. Clear: the function must not DMA (nor send MSIs).
    pub const CMD_BUS_MASTER: u16 = 1 << 2;
    /// Command: INTx disable.
    pub const CMD_INTX_DISABLE: u16 = 1 << 10;
    /// Status: capability list present.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// Capability ID: vendor specific.
    pub const CAP_ID_VENDOR: u8 = 0x09;
    /// Capability ID: MSI-X.
    pub const CAP_ID_MSIX: u8 = 0x11;
    /// Capability ID: PCI Express.
    pub const CAP_ID_EXP: u8 = 0x10;
    /// Number of BARs of a type-0 header.
    pub const NUM_BARS: usize = 6;
}

/// Size of the conventional configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Size of a function's configuration space in ECAM (extended space reads as 0).
pub const ECAM_FUNCTION_SIZE: u64 = 4096;

/// Errors when building a configuration space (device-model bugs, not guest input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// A BAR size must be a power of two of at least 16 bytes (memory).
    #[error("BAR {0} size {1:#x} is not a power of two >= 16")]
    BarSize(usize, u64),
    /// A BAR index out of range, or a 64-bit BAR in the last slot, or a slot in use.
    #[error("BAR {0} is not free")]
    BarSlot(usize),
    /// The capability list does not fit in config space.
    #[error("No room for a capability of {0} bytes")]
    CapabilitySpace(usize),
}

/// One BAR the device model declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// Size in bytes (power of two).
    pub size: u64,
    /// 64-bit memory BAR (occupies two slots).
    pub is_64bit: bool,
    /// Prefetchable.
    pub prefetchable: bool,
}

/// A type-0 configuration space; see the [module documentation](self).
#[derive(Clone)]
pub struct PciConfig {
    bytes: [u8; CONFIG_SPACE_SIZE],
    /// Bits the guest may write.
    wmask: [u8; CONFIG_SPACE_SIZE],
    /// Bits the guest clears by writing 1 (Status).
    w1c: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<BarInfo>; regs::NUM_BARS],
    /// Offset of the last capability added (0: none).
    last_cap: usize,
    /// Next free byte for a capability.
    next_cap: usize,
}

impl std::fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfig")
            .field("vendor", &self.read_u16(regs::VENDOR_ID))
            .field("command", &self.command())
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl PciConfig {
    /// A header with the given IDs and class code (`class << 16 | subclass << 8 | prog_if`).
    /// Command starts at 0 (no decoding, no bus mastering). INTx is not provided (pin 0).
    pub fn new(vendor: u16, device: u16, class: u32, subsys_vendor: u16, subsys: u16) -> Self {
        let mut c = PciConfig {
            bytes: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
            w1c: [0; CONFIG_SPACE_SIZE],
            bars: [None; regs::NUM_BARS],
            last_cap: 0,
            next_cap: 0x40,
        };
        c.set_u16(regs::VENDOR_ID, vendor);
        c.set_u16(regs::VENDOR_ID + 2, device);
        c.set_u32(regs::REVISION, (class & 0xff_ffff) << 8 | 1);
        c.set_u16(regs::SUBSYSTEM_VENDOR_ID, subsys_vendor);
        c.set_u16(regs::SUBSYSTEM_ID, subsys);
        // Command: I/O, memory, bus master, INTx disable are writable.
        let cmd = regs::CMD_IO | regs::CMD_MEMORY | regs::CMD_BUS_MASTER | regs::CMD_INTX_DISABLE;
        c.wmask[regs::COMMAND..regs::COMMAND + 2].copy_from_slice(&cmd.to_le_bytes());
        // Status: the error bits are RW1C (bits 15:11, 8).
        c.w1c[regs::STATUS..regs::STATUS + 2].copy_from_slice(&0xf900u16.to_le_bytes());
        // Interrupt line is scratch for the OS.
        c.wmask[regs::INTERRUPT_LINE] = 0xff;
        c
    }

    /// Declares a memory BAR at slot `index` of `info.size` bytes.
    pub fn add_bar(&mut self, index: usize, info: BarInfo) -> Result<(), PciError> {
        if info.size < 16 || !info.size.is_power_of_two() || (!info.is_64bit && info.size > 1 << 31)
        {
            return Err(PciError::BarSize(index, info.size));
        }
        let slots = if info.is_64bit { 2 } else { 1 };
        if index + slots > regs::NUM_BARS
            || self.bars[index].is_some()
            || (index > 0 && self.bars[index - 1].is_some_and(|b| b.is_64bit))
            || (info.is_64bit && self.bars[index + 1].is_some())
        {
            return Err(PciError::BarSlot(index));
        }
        self.bars[index] = Some(info);
        let off = regs::BAR0 + 4 * index;
        let mask = !(info.size - 1);
        let flags = (u32::from(info.is_64bit) << 2) | (u32::from(info.prefetchable) << 3);
        self.set_u32(off, flags);
        self.wmask[off..off + 4].copy_from_slice(&(mask as u32 & !0xf).to_le_bytes());
        if info.is_64bit {
            self.wmask[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        Ok(())
    }

    /// Sets a BAR's address (firmware assignment, before the guest runs).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(info) = self.bars.get(index).copied().flatten() else {
            return;
        };
        let off = regs::BAR0 + 4 * index;
        let flags = self.read_u32(off) & 0xf;
        self.set_u32(off, (addr as u32 & !0xf) | flags);
        if info.is_64bit {
            self.set_u32(off + 4, (addr >> 32) as u32);
        }
    }

    /// The address the guest programmed in BAR `index` (`None`: no such BAR).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let info = self.bars.get(index).copied().flatten()?;
        let off = regs::BAR0 + 4 * index;
        let lo = u64::from(self.read_u32(off) & !0xf);
        let hi = if info.is_64bit {
            u64::from(self.read_u32(off + 4))
        } else {
            0
        };
        Some(hi << 32 | lo)
    }

    /// The declared BAR at `index`.
    pub fn bar(&self, index: usize) -> Option<BarInfo> {
        self.bars.get(index).copied().flatten()
    }

    /// Appends a capability: `body` starts with the ID and a placeholder next pointer (both
    /// filled in here); `wmask` gives the guest-writable bits of the body. Returns its offset.
    pub fn add_capability(&mut self, body: &[u8], wmask: &[u8]) -> Result<usize, PciError> {
        let off = self.next_cap;
        let len = body.len().max(2);
        let end = off + len.next_multiple_of(4);
        if end > CONFIG_SPACE_SIZE || wmask.len() > body.len() {
            return Err(PciError::CapabilitySpace(body.len()));
        }
        self.bytes[off..off + body.len()].copy_from_slice(body);
        self.bytes[off + 1] = 0;
        self.wmask[off..off + wmask.len()].copy_from_slice(wmask);
        self.wmask[off] = 0;
        self.wmask[off + 1] = 0;
        if self.last_cap == 0 {
            self.bytes[regs::CAPABILITIES] = off as u8;
            let status = self.read_u16(regs::STATUS) | regs::STATUS_CAP_LIST;
            self.set_u16(regs::STATUS, status);
        } else {
            self.bytes[self.last_cap + 1] = off as u8;
        }
        self.last_cap = off;
        self.next_cap = end;
        Ok(off)
    }

    /// The Command register.
    pub fn command(&self) -> u16 {
        self.read_u16(regs::COMMAND)
    }

    /// Whether the function may master the bus (DMA, MSI).
    pub fn bus_master(&self) -> bool {
        self.command() & regs::CMD_BUS_MASTER != 0
    }

    /// Whether memory BARs decode.
    pub fn memory_enabled(&self) -> bool {
        self.command() & regs::CMD_MEMORY != 0
    }

    /// A guest read at any offset/width: bytes past the header read as 0 (ECAM extended
    /// space); `data` longer than 4 bytes reads as all-ones.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if data.len() > 4 {
            data.fill(0xff);
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A guest write: only writable bits change, RW1C bits clear. Returns whether any byte
    /// inside the header was addressed (extended space and over-long writes are dropped).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        if data.len() > 4 {
            return false;
        }
        let mut hit = false;
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .filter(|&o| o < CONFIG_SPACE_SIZE)
            else {
                continue;
            };
            hit = true;
            let m = self.wmask[o];
            self.bytes[o] = (self.bytes[o] & !m) | (v & m);
            self.bytes[o] &= !(v & self.w1c[o]);
        }
        hit
    }

    /// Reads a little-endian u16 from the raw bytes (no side effects).
    pub fn read_u16(&self, off: usize) -> u16 {
        match self.bytes.get(off..off + 2) {
            Some(b) => u16::from_le_bytes([b[0], b[1]]),
            None => 0,
        }
    }

    /// Reads a little-endian u32 from the raw bytes.
    pub fn read_u32(&self, off: usize) -> u32 {
        match self.bytes.get(off..off + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }

    /// Sets raw bytes (device side, ignores the write mask).
    pub fn set_u16(&mut self, off: usize, v: u16) {
        if let Some(b) = self.bytes.get_mut(off..off + 2) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Sets raw bytes (device side, ignores the write mask).
    pub fn set_u32(&mut self, off: usize, v: u32) {
        if let Some(b) = self.bytes.get_mut(off..off + 4) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Walks the capability list: `(offset, id)` pairs, at most 48 (loops are cut).
    pub fn capabilities(&self) -> Vec<(usize, u8)> {
        let mut out = Vec::new();
        let mut p = usize::from(self.bytes[regs::CAPABILITIES]) & !3;
        while p >= 0x40 && out.len() < 48 {
            out.push((p, self.bytes[p]));
            p = usize::from(self.bytes[p + 1]) & !3;
        }
        out
    }
}

/// A PCI function on the root bus, as the root complex and the BAR windows see it.
///
/// Offsets and widths come from the guest unchecked: implementations must not panic.
pub trait PciFunction: Send {
    /// A config space read at `offset` (0..4096).
    fn config_read(&mut self, offset: u64, data: &mut [u8]);
    /// A config space write at `offset` (0..4096).
    fn config_write(&mut self, offset: u64, data: &[u8]);
    /// A read inside BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write inside BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// The BARs the function declares, with their firmware-assigned addresses.
    fn bars(&self) -> Vec<(usize, BarInfo, u64)>;
}

/// One BAR of a function on a bus (MMIO): forwards accesses while the guest left the BAR at
/// its assigned address with memory decoding on, answers all-ones otherwise. BARs are not
/// relocated: Linux keeps firmware assignments that fit the host bridge window.
pub struct BarWindow {
    function: std::sync::Arc<std::sync::Mutex<dyn PciFunction>>,
    bar: usize,
}

impl BarWindow {
    /// The window of BAR `bar` of `function`.
    pub fn new(function: std::sync::Arc<std::sync::Mutex<dyn PciFunction>>, bar: usize) -> Self {
        BarWindow { function, bar }
    }
}

impl crate::bus::BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        crate::sync::lock(&self.function).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        crate::sync::lock(&self.function).bar_write(self.bar, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfig {
        let mut c = PciConfig::new(0x1af4, 0x1042, 0x01_0000, 0x1af4, 2);
        c.add_bar(
            0,
            BarInfo {
                size: 0x4000,
                is_64bit: true,
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(
            2,
            BarInfo {
                size: 0x100,
                is_64bit: false,
                prefetchable: false,
            },
        )
        .unwrap();
        c
    }

    fn r32(c: &PciConfig, off: u64) -> u32 {
        let mut b = [0; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn ids_are_read_only() {
        let mut c = cfg();
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        c.write(0, &[0; 4]);
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        assert_eq!(r32(&c, 8) >> 8, 0x01_0000);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask_and_restores() {
        let mut c = cfg();
        c.set_bar_address(0, 0x8_0000_0000);
        assert_eq!(r32(&c, 0x10), 0x4);
        assert_eq!(r32(&c, 0x14), 0x8);
        c.write(0x10, &[0xff; 4]);
        c.write(0x14, &[0xff; 4]);
        assert_eq!(r32(&c, 0x10), 0xffff_c004);
        assert_eq!(r32(&c, 0x14), 0xffff_ffff);
        c.write(0x10, &0u32.to_le_bytes());
        c.write(0x14, &8u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0x8_0000_0000));
        c.write(0x18, &[0xff; 4]);
        assert_eq!(r32(&c, 0x18), 0xffff_ff00);
        // Unused BARs read 0 and stay 0.
        c.write(0x1c, &[0xff; 4]);
        assert_eq!(r32(&c, 0x1c), 0);
        assert_eq!(c.bar_address(5), None);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = cfg();
        let b = |size, is_64bit| BarInfo {
            size,
            is_64bit,
            prefetchable: false,
        };
        assert_eq!(c.add_bar(1, b(0x100, false)), Err(PciError::BarSlot(1)));
        assert_eq!(c.add_bar(5, b(0x100, true)), Err(PciError::BarSlot(5)));
        assert_eq!(
            c.add_bar(3, b(0x300, false)),
            Err(PciError::BarSize(3, 0x300))
        );
        assert_eq!(c.add_bar(9, b(0x100, false)), Err(PciError::BarSlot(9)));
    }

    #[test]
    fn command_and_status_semantics() {
        let mut c = cfg();
        assert!(!c.bus_master() && !c.memory_enabled());
        c.write(4, &[0xff, 0xff]);
        assert_eq!(c.command(), 0x0407);
        assert!(c.bus_master() && c.memory_enabled());
        c.set_u16(regs::STATUS, 0x8010);
        c.write(6, &[0, 0x80]);
        assert_eq!(c.read_u16(regs::STATUS), 0x0010, "RW1C error bit cleared");
    }

    #[test]
    fn capability_walk() {
        let mut c = cfg();
        assert!(c.capabilities().is_empty());
        let a = c
            .add_capability(&[regs::CAP_ID_VENDOR, 0, 8, 1, 0, 0, 0, 0], &[])
            .unwrap();
        let b = c
            .add_capability(&[regs::CAP_ID_MSIX, 0, 0, 0], &[0, 0, 0, 0xc0])
            .unwrap();
        assert_eq!(
            c.capabilities(),
            vec![(a, regs::CAP_ID_VENDOR), (b, regs::CAP_ID_MSIX)]
        );
        assert_ne!(c.read_u16(regs::STATUS) & regs::STATUS_CAP_LIST, 0);
        // The next pointer and ID are read-only.
        c.write(a as u64, &[0xff, 0xff]);
        assert_eq!(c.capabilities().len(), 2);
        assert!(c.add_capability(&[0; 250], &[]).is_err());
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut c = cfg();
        let mut big = [0u8; 8];
        c.read(0, &mut big);
        assert_eq!(big, [0xff; 8]);
        assert!(!c.write(0, &[0; 8]));
        assert!(!c.write(0x1000, &[1]));
        let mut b = [0u8; 4];
        c.read(u64::MAX, &mut b);
        c.read(254, &mut b);
        assert!(c.write(254, &[0xff; 4]));
        c.write(u64::MAX - 1, &[0xff; 4]);
    }
}
