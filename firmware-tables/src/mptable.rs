//! An Intel MultiProcessor Specification 1.4 table ("MP table") agreeing with the MADT.
//!
//! Linux reads the MADT, not this table, when ACPI is there; it still *looks* for an MP
//! floating pointer early in `setup_arch` (`mpparse_find_mptable`): the first KiB of RAM, the
//! KiB at 639 KiB, then all of 0xF0000–0xFFFFF, one `early_memremap`/`early_memunmap` per 16
//! bytes. Without a table the whole scan runs, which costs seconds where the guest kernel's
//! code is emulated. Firecracker and Cloud Hypervisor write one too.
//!
//! [`build_mptable`] lays the floating pointer (16 bytes) at the given address and the
//! configuration table right after it: one processor entry per vCPU (APIC ID = index, as in
//! the MADT; the first is the BSP), one ISA bus, the IOAPIC of the description, an I/O
//! interrupt entry per IOAPIC pin (ISA IRQ n → pin n, conforming polarity and trigger) and the
//! two local interrupt entries (ExtINT on LINT0, NMI on LINT1, the LAPIC set-up the VMM
//! programs). Both structures checksum to zero.

use crate::PlatformDescription;

/// Floating pointer structure length.
pub const MPF_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const ENTRY_LEN: usize = 8;
/// IOAPIC pins described (the VMM's IOAPIC has 24).
pub const MP_IOAPIC_PINS: u8 = 24;
/// Spec revision 1.4.
const SPEC_REV: u8 = 4;
const LAPIC_ADDR: u32 = 0xFEE0_0000;
/// LAPIC version reported (integrated APIC).
const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version reported (as the VMM's IOAPIC's version register).
const IOAPIC_VERSION: u8 = 0x11;

/// Errors from [`build_mptable`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    /// vCPU count out of range (APIC IDs must stay below the broadcast ID 0xFF).
    #[error("Invalid vCPU count {0} for the MP table: must be 1..=254")]
    InvalidCpuCount(u32),
    /// The table would not fit below 4 GiB.
    #[error("MP table at {0:#x} does not fit below 4 GiB")]
    Address(u64),
}

/// Bytes of the floating pointer plus configuration table for `num_cpus`.
pub fn mptable_size(num_cpus: u32) -> usize {
    MPF_LEN
        + HEADER_LEN
        + PROCESSOR_LEN * num_cpus as usize
        + ENTRY_LEN * (2 + usize::from(MP_IOAPIC_PINS) + 2)
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The MP floating pointer at `addr`, followed by the configuration table it points to.
pub fn build_mptable(desc: &PlatformDescription, addr: u64) -> Result<Vec<u8>, MptableError> {
    if desc.num_cpus == 0 || desc.num_cpus > 254 {
        return Err(MptableError::InvalidCpuCount(desc.num_cpus));
    }
    let size = mptable_size(desc.num_cpus) as u64;
    let table_addr = addr + MPF_LEN as u64;
    if addr.checked_add(size).is_none_or(|end| end > 1 << 32) {
        return Err(MptableError::Address(addr));
    }

    let mut t = Vec::with_capacity(size as usize - MPF_LEN);
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&0u16.to_le_bytes()); // base table length, below
    t.push(SPEC_REV);
    t.push(0); // checksum, below
    t.extend_from_slice(b"RVMMIO  "); // OEM ID
    t.extend_from_slice(b"VIOMMUVM    "); // product ID
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&0u16.to_le_bytes()); // entry count, below
    t.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    t.push(0); // extended table checksum
    t.push(0);
    debug_assert_eq!(t.len(), HEADER_LEN);
    let mut entries: u16 = 0;
    for id in 0..desc.num_cpus as u8 {
        t.push(0); // processor
        t.push(id);
        t.push(LAPIC_VERSION);
        t.push(if id == 0 { 0b11 } else { 0b01 }); // enabled, BSP
        t.extend_from_slice(&0x0600u32.to_le_bytes()); // signature: family 6
        t.extend_from_slice(&0x0201u32.to_le_bytes()); // features: FPU, APIC
        t.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    t.extend_from_slice(&[1, 0]); // bus 0
    t.extend_from_slice(b"ISA   ");
    entries += 1;
    let io = desc.ioapic;
    t.extend_from_slice(&[2, io.id, IOAPIC_VERSION, 1]); // IOAPIC, enabled
    t.extend_from_slice(&io.address.to_le_bytes());
    entries += 1;
    for pin in 0..MP_IOAPIC_PINS {
        // I/O interrupt: INT, conforming polarity/trigger, ISA bus 0 IRQ `pin` → pin `pin`.
        t.extend_from_slice(&[3, 0, 0, 0, 0, pin, io.id, pin]);
        entries += 1;
    }
    // Local interrupts to every LAPIC (0xFF): ExtINT on LINT0, NMI on LINT1.
    t.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    t.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    entries += 2;
    let len = t.len() as u16;
    t[4..6].copy_from_slice(&len.to_le_bytes());
    t[34..36].copy_from_slice(&entries.to_le_bytes());
    t[7] = checksum(&t);

    let mut out = Vec::with_capacity(size as usize);
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REV);
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: 0 = a configuration table is present
    out[10] = checksum(&out);
    out.extend_from_slice(&t);
    debug_assert_eq!(out.len() as u64, size);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IoapicDesc, PmDesc};

    fn desc(cpus: u32) -> PlatformDescription {
        PlatformDescription {
            num_cpus: cpus,
            ioapic: IoapicDesc {
                id: 0,
                address: 0xfec0_0000,
                gsi_base: 0,
            },
            serial: None,
            pm: PmDesc { io_base: 0x600 },
            virtio_mmio: vec![],
            iommu: None,
            dmar: None,
            pvir: None,
            pci: None,
        }
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Parses the table back as Linux's mpparse does: (APIC IDs with BSP flag, IOAPIC (id,
    /// address), interrupt entries).
    #[allow(clippy::type_complexity)]
    fn parse(b: &[u8], addr: u64) -> (Vec<(u8, bool)>, Vec<(u8, u32)>, usize) {
        assert_eq!(&b[..4], b"_MP_");
        assert_eq!(sum(&b[..16]), 0, "floating pointer checksum");
        assert_eq!((b[8], b[9], b[11]), (1, 4, 0));
        let ptr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
        let t = &b[(ptr - addr) as usize..];
        assert_eq!(&t[..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(sum(&t[..len]), 0, "configuration table checksum");
        assert_eq!(
            u32::from_le_bytes(t[36..40].try_into().unwrap()),
            LAPIC_ADDR
        );
        let count = u16::from_le_bytes([t[34], t[35]]) as usize;
        let (mut cpus, mut ioapics, mut ints) = (vec![], vec![], 0);
        let mut off = HEADER_LEN;
        for _ in 0..count {
            match t[off] {
                0 => {
                    assert_eq!(t[off + 3] & 1, 1, "enabled");
                    cpus.push((t[off + 1], t[off + 3] & 2 != 0));
                    off += PROCESSOR_LEN;
                }
                2 => {
                    ioapics.push((
                        t[off + 1],
                        u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap()),
                    ));
                    off += ENTRY_LEN;
                }
                1 | 3 | 4 => {
                    ints += usize::from(t[off] != 1);
                    off += ENTRY_LEN;
                }
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(off, len, "entries fill the base table exactly");
        (cpus, ioapics, ints)
    }

    #[test]
    fn checksums_and_contents_agree_with_the_madt() {
        for cpus in [1, 2, 254] {
            let d = desc(cpus);
            let addr = 0x9fc00;
            let b = build_mptable(&d, addr).unwrap();
            assert_eq!(b.len(), mptable_size(cpus));
            let (cpu_ids, ioapics, ints) = parse(&b, addr);
            // The MADT's Processor Local APIC entries: IDs 0..num_cpus, the first boots.
            let want: Vec<(u8, bool)> = (0..cpus as u8).map(|i| (i, i == 0)).collect();
            assert_eq!(cpu_ids, want);
            assert_eq!(ioapics, vec![(d.ioapic.id, d.ioapic.address)]);
            assert_eq!(ints, usize::from(MP_IOAPIC_PINS) + 2);
        }
    }

    #[test]
    fn floating_pointer_points_right_after_itself() {
        let b = build_mptable(&desc(2), 0x9fc00).unwrap();
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 0x9fc10);
    }

    #[test]
    fn bad_descriptions_are_refused() {
        assert_eq!(
            build_mptable(&desc(0), 0x9fc00),
            Err(MptableError::InvalidCpuCount(0))
        );
        assert_eq!(
            build_mptable(&desc(255), 0x9fc00),
            Err(MptableError::InvalidCpuCount(255))
        );
        assert_eq!(
            build_mptable(&desc(1), 0xffff_ff00),
            Err(MptableError::Address(0xffff_ff00))
        );
    }
}
