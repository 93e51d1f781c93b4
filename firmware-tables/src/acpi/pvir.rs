//! PVIR, the enumeration table of PV-IR, the paravirtual interrupt-remapping interface
//! (`docs/pv-irq-remap.md` §1). Not an ACPI-defined table (the signature is not reserved): a
//! kernel without the PV-IR driver ignores it, and `iasl -d` hex-dumps it. Laid out on
//! `acpi_tables::sdt::Sdt`, which keeps length and checksum right.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 36 | header, revision 1 |
//! | 36 | 8 | register page base |
//! | 44 | 4 | flags ([`PVIR_FLAG_IOAPIC_ALL`](crate::PVIR_FLAG_IOAPIC_ALL), [`PVIR_FLAG_PCI_SEGMENT0_ALL`](crate::PVIR_FLAG_PCI_SEGMENT0_ALL)) |
//! | 48 | 4 | number of handles |
//! | 52 | 4 | reserved |

use acpi_tables::sdt::Sdt;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::PvirDesc;

const PVIR_REVISION: u8 = 1;
/// Length of the whole table.
pub(super) const PVIR_LEN: u32 = 56;

/// Builds the PVIR; `desc` is already validated.
pub(super) fn build(desc: &PvirDesc) -> Vec<u8> {
    let mut pvir = Sdt::new(
        *b"PVIR",
        PVIR_LEN,
        PVIR_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    pvir.write_u64(36, desc.register_base);
    pvir.write_u32(44, desc.flags);
    pvir.write_u32(48, desc.max_handles);
    pvir.write_u32(52, 0);
    pvir.as_slice().to_vec()
}
