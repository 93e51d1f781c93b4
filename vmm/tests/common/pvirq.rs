//! Drives PV-IR as its guest driver does (docs/pv-irq-remap.md): 64-byte request blocks in
//! guest memory, one `REQUEST` register write each. Shared by the PV-IR KVM test and the
//! route-latency benchmark.

#![allow(dead_code)]

use devices::pvirq::regs::{
    req, CTRL_ENABLE, OP_ALLOC, OP_CLEAR, OP_FREE, OP_SET, REG_CTRL, REG_REQUEST, REQUEST_SIZE,
    SOURCE_IOAPIC, SOURCE_PCI,
};
use devices::{BusDevice, MsiMessage};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `status` the guest pre-sets before each request.
pub const PENDING: u16 = 0xffff;

/// The guest's side: the register page (through the router) and one request block.
pub struct PvDriver<'a> {
    pub regs: &'a mut dyn BusDevice,
    pub mem: &'a GuestMemoryMmap,
    /// Guest-physical address of the request block (64-byte aligned).
    pub block: u64,
}

impl PvDriver<'_> {
    /// Turns remapping on (`CTRL.ENABLE`).
    pub fn enable(&mut self) {
        self.regs.write(REG_CTRL, &CTRL_ENABLE.to_le_bytes());
    }

    /// Writes `fields` (offset, bytes) into a zeroed block with status `PENDING`, issues it
    /// and returns the status the VMM wrote back.
    pub fn request(&mut self, fields: &[(usize, &[u8])]) -> u16 {
        self.write_block(fields);
        self.kick();
        self.status()
    }

    /// Writes `fields` (offset, bytes) into a zeroed block with status `PENDING`.
    pub fn write_block(&mut self, fields: &[(usize, &[u8])]) {
        let mut block = [0u8; REQUEST_SIZE];
        for (at, bytes) in fields {
            block[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        block[req::STATUS..req::STATUS + 2].copy_from_slice(&PENDING.to_le_bytes());
        self.mem
            .write_slice(&block, GuestAddress(self.block))
            .unwrap();
    }

    /// The `REQUEST` write of the block (one VM exit in a real guest).
    pub fn kick(&mut self) {
        self.regs.write(REG_REQUEST, &self.block.to_le_bytes());
    }

    /// The block's `status`.
    pub fn status(&self) -> u16 {
        self.u16_at(req::STATUS)
    }

    /// Writes the block of a `SET` of `handle` to (`vector`, `dest`), not yet issued.
    pub fn set_block(&mut self, handle: u16, vector: u8, dest: u32) {
        self.write_block(&[
            (req::OP, &OP_SET.to_le_bytes()),
            (req::HANDLE, &handle.to_le_bytes()),
            (req::DEST, &dest.to_le_bytes()),
            (req::VECTOR, &[vector]),
        ]);
    }

    fn u16_at(&self, at: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.block + at as u64))
            .unwrap()
    }

    fn u32_at(&self, at: usize) -> u32 {
        self.mem
            .read_obj(GuestAddress(self.block + at as u64))
            .unwrap()
    }

    /// `ALLOC` of one handle for (`source_type`, `hi`, `lo`): (status, handle, message).
    fn alloc(&mut self, source_type: u8, hi: u16, lo: u16, count: u16) -> (u16, u16, MsiMessage) {
        let status = self.request(&[
            (req::OP, &OP_ALLOC.to_le_bytes()),
            (req::SOURCE_TYPE, &[source_type]),
            (req::COUNT, &count.to_le_bytes()),
            (req::SOURCE_HI, &hi.to_le_bytes()),
            (req::SOURCE_LO, &lo.to_le_bytes()),
        ]);
        let msg = MsiMessage {
            address: u64::from(self.u32_at(req::ADDRESS_HI)) << 32
                | u64::from(self.u32_at(req::ADDRESS_LO)),
            data: self.u32_at(req::DATA),
        };
        (status, self.u16_at(req::HANDLE), msg)
    }

    /// `ALLOC` of a handle for IOAPIC `ioapic_id` pin `pin`: (status, handle, message).
    pub fn alloc_pin(&mut self, ioapic_id: u8, pin: u8) -> (u16, u16, MsiMessage) {
        self.alloc(SOURCE_IOAPIC, ioapic_id.into(), pin.into(), 1)
    }

    /// `ALLOC` of `count` handles for PCI requester `rid` on segment 0.
    pub fn alloc_pci(&mut self, rid: u16, count: u16) -> (u16, u16, MsiMessage) {
        self.alloc(SOURCE_PCI, 0, rid, count)
    }

    /// `SET` `handle` to (`vector`, `dest`).
    pub fn set(&mut self, handle: u16, vector: u8, dest: u32) -> u16 {
        self.set_block(handle, vector, dest);
        self.kick();
        self.status()
    }

    /// `CLEAR` `handle`.
    pub fn clear(&mut self, handle: u16) -> u16 {
        self.request(&[
            (req::OP, &OP_CLEAR.to_le_bytes()),
            (req::HANDLE, &handle.to_le_bytes()),
        ])
    }

    /// `FREE` the block of `count` handles at `handle`.
    pub fn free(&mut self, handle: u16, count: u16) -> u16 {
        self.request(&[
            (req::OP, &OP_FREE.to_le_bytes()),
            (req::HANDLE, &handle.to_le_bytes()),
            (req::COUNT, &count.to_le_bytes()),
        ])
    }
}

/// The IOAPIC redirection entry (unmasked, edge) that sends the remappable-format `msg`, as
/// Linux's IOAPIC driver builds it from an ALLOC answer: handle\[14:0\] in bits 63:49, the
/// format bit 48, handle\[15\] in bit 11, the data byte in the vector field.
pub fn rte_for(msg: MsiMessage) -> u64 {
    let handle = (msg.address >> 5) & 0x7fff | ((msg.address >> 2) & 1) << 15;
    (handle & 0x7fff) << 49 | 1 << 48 | (handle >> 15) << 11 | u64::from(msg.data & 0xff)
}

/// Programs IOAPIC `pin` with `rte` through the IOAPIC window (IOREGSEL/IOWIN).
pub fn program_pin(ioapic: &mut dyn BusDevice, pin: u32, rte: u64) {
    for (reg, val) in [
        (0x10 + 2 * pin, rte as u32),
        (0x11 + 2 * pin, (rte >> 32) as u32),
    ] {
        ioapic.write(0x00, &reg.to_le_bytes());
        ioapic.write(0x10, &val.to_le_bytes());
    }
}
