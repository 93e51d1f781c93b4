//! Programs the remapping unit through its registers as Linux's intel_setup_irq_remapping()
//! does. Shared by the remapping KVM test and the route-latency benchmark.

#![allow(dead_code)]

use devices::remap::regs::{
    DMAR_GCMD_REG, DMAR_IQA_REG, DMAR_IQT_REG, DMAR_IRTA_REG, DMA_GCMD_IRE, DMA_GCMD_QIE,
    DMA_GCMD_SIRTP,
};
use devices::{BusDevice, MsiMessage};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Writes a 32-bit register.
pub fn w32(dev: &mut dyn BusDevice, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}

/// Writes a 64-bit register.
pub fn w64(dev: &mut dyn BusDevice, off: u64, v: u64) {
    dev.write(off, &v.to_le_bytes());
}

/// Reads a 32-bit register.
pub fn r32(dev: &mut dyn BusDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Reads a 64-bit register.
pub fn r64(dev: &mut dyn BusDevice, off: u64) -> u64 {
    let mut b = [0u8; 8];
    dev.read(off, &mut b);
    u64::from_le_bytes(b)
}

/// Queued invalidation on (queue at `iq_base`, one 4 KiB page), an x2APIC-format table of 256
/// entries at `irt_base` latched with SIRTP, then remapping enabled.
pub fn enable_remapping(regs: &mut dyn BusDevice, irt_base: u64, iq_base: u64) {
    w64(regs, DMAR_IQT_REG, 0);
    w64(regs, DMAR_IQA_REG, iq_base);
    w32(regs, DMAR_GCMD_REG, DMA_GCMD_QIE);
    // EIME (bit 11): x2APIC destinations; S = 7: 2^(7+1) entries.
    w64(regs, DMAR_IRTA_REG, irt_base | 1 << 11 | 7);
    w32(regs, DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_SIRTP);
    w32(regs, DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_IRE);
}

/// An IRTE: present, fixed delivery, physical destination APIC ID 0, `vector`.
pub fn irte(vector: u8) -> u128 {
    1 | u128::from(vector) << 16
}

/// Writes IRTE `index` of the table at `irt_base`: [`irte`]`(vector)` with the full
/// requester ID `sid` verified (SVT = 1, SQ = 0).
pub fn write_irte(mem: &GuestMemoryMmap, irt_base: u64, index: u16, vector: u8, sid: u16) {
    let entry = irte(vector) | u128::from(sid) << 64 | 1u128 << 82;
    mem.write_obj(entry, GuestAddress(irt_base + 16 * u64::from(index)))
        .unwrap();
}

/// Remappable-format MSI for IRTE `index` (handle in address bits 19:5 and 2, SHV = 0).
pub fn remappable(index: u16) -> MsiMessage {
    let h = u64::from(index);
    MsiMessage {
        address: 0xfee0_0000 | (h & 0x7fff) << 5 | 1 << 4 | (h >> 15) << 2,
        data: 0,
    }
}
