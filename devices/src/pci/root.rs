// SPDX-License-Identifier: Apache-2.0

//! The PCI root complex: segment 0, bus 0, function 0 of each of 32 slots, reached through
//! the legacy configuration mechanism #1 (ports 0xCF8 address / 0xCFC data) and ECAM
//! (PCIe 4.0 §7.2.2: `bus << 20 | device << 15 | function << 12 | register`).
//!
//! Empty slots, other functions and other buses read as all-ones (no device) and ignore
//! writes, as a real bus does for a master abort.

use std::sync::{Arc, Mutex};

use super::{PciFunction, ECAM_FUNCTION_SIZE};
use crate::bus::BusDevice;
use crate::guest_debug;
use crate::sync::lock;

/// Slots on bus 0.
pub const PCI_SLOTS: usize = 32;
/// Ports of the legacy mechanism: address at +0, data at +4..+8.
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// Bytes of ECAM one bus occupies.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// Errors when building the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciRootError {
    /// The slot is outside 1..32 or taken.
    #[error("PCI slot {0} is not free")]
    SlotTaken(usize),
}

/// Bus 0: the functions by slot.
#[derive(Default)]
pub struct PciRoot {
    slots: Vec<Option<Arc<Mutex<dyn PciFunction>>>>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_some())
            .collect();
        f.debug_struct("PciRoot").field("slots", &used).finish()
    }
}

impl PciRoot {
    /// An empty bus.
    pub fn new() -> Self {
        PciRoot {
            slots: (0..PCI_SLOTS).map(|_| None).collect(),
        }
    }

    /// Puts `function` in `slot` (function 0). Slot 0 is left empty (no host-bridge function).
    pub fn add(
        &mut self,
        slot: usize,
        function: Arc<Mutex<dyn PciFunction>>,
    ) -> Result<(), PciRootError> {
        match self.slots.get_mut(slot) {
            Some(s @ None) if slot > 0 => {
                *s = Some(function);
                Ok(())
            }
            _ => Err(PciRootError::SlotTaken(slot)),
        }
    }

    fn function(&self, bus: u64, dev: u64, func: u64) -> Option<&Arc<Mutex<dyn PciFunction>>> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(dev as usize)?.as_ref()
    }

    /// A config read of `bus:dev.func` at `reg`.
    pub fn config_read(&self, bus: u64, dev: u64, func: u64, reg: u64, data: &mut [u8]) {
        match self.function(bus, dev, func) {
            Some(f) => lock(f).config_read(reg, data),
            None => data.fill(0xff),
        }
    }

    /// A config write of `bus:dev.func` at `reg`.
    pub fn config_write(&self, bus: u64, dev: u64, func: u64, reg: u64, data: &[u8]) {
        if let Some(f) = self.function(bus, dev, func) {
            lock(f).config_write(reg, data);
        }
    }
}

/// Decodes an ECAM offset into (bus, device, function, register).
fn ecam_decode(offset: u64) -> (u64, u64, u64, u64) {
    (
        offset >> 20,
        (offset >> 15) & 0x1f,
        (offset >> 12) & 0x7,
        offset & (ECAM_FUNCTION_SIZE - 1),
    )
}

/// Config accesses that cross a dword are split by nobody: refuse them.
fn in_one_dword(reg: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && (reg % 4) + len as u64 <= 4
}

/// The ECAM window (bus 0 only) on the MMIO bus.
#[derive(Debug)]
pub struct PciEcam(pub Arc<PciRoot>);

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg) = ecam_decode(offset);
        if !in_one_dword(reg, data.len()) {
            guest_debug!("pci: {}-byte ECAM read at {offset:#x}", data.len());
            data.fill(0xff);
            return;
        }
        self.0.config_read(bus, dev, func, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, dev, func, reg) = ecam_decode(offset);
        if !in_one_dword(reg, data.len()) {
            guest_debug!("pci: {}-byte ECAM write at {offset:#x}", data.len());
            return;
        }
        self.0.config_write(bus, dev, func, reg, data);
    }
}

/// Configuration mechanism #1 on the I/O bus, at 0xCF8 (8 ports).
#[derive(Debug)]
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    /// The mechanism over `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// (bus, dev, func, reg) of the current address for a data access at `data_offset`, or
    /// `None` while the enable bit is clear.
    fn target(&self, data_offset: u64) -> Option<(u64, u64, u64, u64)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let a = u64::from(self.address);
        Some((
            (a >> 16) & 0xff,
            (a >> 11) & 0x1f,
            (a >> 8) & 0x7,
            (a & 0xfc) + data_offset,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset - 4) {
                Some((b, d, f, r)) if in_one_dword(r, data.len()) => {
                    self.root.config_read(b, d, f, r, data)
                }
                _ => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & !3
            }
            4..=7 => {
                if let Some((b, d, f, r)) = self.target(offset - 4) {
                    if in_one_dword(r, data.len()) {
                        self.root.config_write(b, d, f, r, data);
                    }
                }
            }
            _ => guest_debug!("pci: {}-byte write at config port +{offset}", data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{BarInfo, PciConfig};

    struct Dummy(PciConfig);

    impl PciFunction for Dummy {
        fn config_read(&mut self, offset: u64, data: &mut [u8]) {
            self.0.read(offset, data);
        }
        fn config_write(&mut self, offset: u64, data: &[u8]) {
            self.0.write(offset, data);
        }
        fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
        fn bars(&self) -> Vec<(usize, BarInfo, u64)> {
            Vec::new()
        }
    }

    fn root() -> Arc<PciRoot> {
        let mut r = PciRoot::new();
        let f = Arc::new(Mutex::new(Dummy(PciConfig::new(0x1af4, 0x1042, 0, 0, 0))));
        r.add(3, f).unwrap();
        Arc::new(r)
    }

    #[test]
    fn ecam_reaches_slot_and_empty_slots_read_ones() {
        let mut e = PciEcam(root());
        let mut b = [0u8; 4];
        e.read(3 << 15, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1042_1af4);
        e.read(4 << 15, &mut b);
        assert_eq!(b, [0xff; 4]);
        e.read(1 << 20 | 3 << 15, &mut b);
        assert_eq!(b, [0xff; 4], "bus 1 does not exist");
        e.read(3 << 15 | 1 << 12, &mut b);
        assert_eq!(b, [0xff; 4], "function 1 does not exist");
        let mut w = [0u8; 2];
        e.read(3 << 15 | 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1042);
        e.read(3 << 15 | 3, &mut w);
        assert_eq!(w, [0xff; 2], "crosses a dword");
    }

    #[test]
    fn legacy_mechanism_needs_the_enable_bit() {
        let mut io = PciConfigIo::new(root());
        let mut b = [0u8; 4];
        io.write(0, &(3u32 << 11).to_le_bytes());
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        io.write(0, &(0x8000_0000u32 | 3 << 11).to_le_bytes());
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000 | 3 << 11);
        io.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1042_1af4);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1042);
        io.write(4 + 4, &[0xff, 0xff]);
        io.write(0, &[1]);
        io.read(2, &mut w);
    }

    #[test]
    fn slots_are_checked() {
        let mut r = PciRoot::new();
        let f = || -> Arc<Mutex<dyn PciFunction>> {
            Arc::new(Mutex::new(Dummy(PciConfig::new(1, 2, 0, 0, 0))))
        };
        assert!(r.add(0, f()).is_err());
        assert!(r.add(32, f()).is_err());
        r.add(1, f()).unwrap();
        assert_eq!(r.add(1, f()), Err(PciRootError::SlotTaken(1)));
    }
}
