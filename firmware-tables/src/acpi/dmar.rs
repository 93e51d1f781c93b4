//! DMAR, the DMA Remapping Reporting table (Intel VT-d spec ch. 8; Linux include/acpi/actbl1.h,
//! parsed by drivers/iommu/intel/dmar.c). `acpi_tables` has no DMAR builder, so the bytes are laid
//! out here on `acpi_tables::sdt::Sdt`, which keeps length and checksum right.
//!
//! The unit only remaps interrupts: its registers report CAP.SAGAW = 0, so Linux ignores it for
//! DMA while still using it for IR (DMA translation is the virtio-iommu's job).
//!
//! - Header flags: INTR_REMAP; X2APIC_OPT_OUT clear, so Linux may use x2APIC with EIM.
//! - One DRHD (§8.3) with INCLUDE_PCI_ALL, so MSIs of any future PCI device are remapped by it too.
//! - One IOAPIC device scope (§8.3.1) naming the MADT IOAPIC: Linux turns IR off unless every MADT
//!   IOAPIC has one (`parse_ioapics_under_ir()`, drivers/iommu/intel/irq_remapping.c). Its
//!   bus/devfn is the source-id Linux puts into the IOAPIC's IRTEs.

use acpi_tables::sdt::Sdt;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::DmarDesc;

/// Suggested IOAPIC source-id: bus 0xFF, device 0, function 0. A bus number no PCI device uses,
/// as QEMU's pseudo platform bus (`Q35_PSEUDO_BUS_PLATFORM`, `Q35_PSEUDO_DEVFN_IOAPIC`).
pub const DEFAULT_IOAPIC_SOURCE_ID: u16 = 0xFF00;

const DMAR_REVISION: u8 = 1;
/// Host address width minus one: 48-bit DMA addresses (Linux rejects less than 12 bits).
const DMAR_HOST_ADDRESS_WIDTH: u8 = 48 - 1;
const DMAR_INTR_REMAP: u8 = 1 << 0;
/// Offset of the first remapping structure.
const DMAR_HEADER_LEN: u32 = 48;
const ACPI_DMAR_TYPE_HARDWARE_UNIT: u16 = 0;
const ACPI_DMAR_INCLUDE_ALL: u8 = 1 << 0;
const ACPI_DMAR_SCOPE_TYPE_IOAPIC: u8 = 3;
/// Device scope with one (device, function) path entry.
const DEVICE_SCOPE_LEN: u8 = 6 + 2;
const DRHD_LEN: u16 = 16 + DEVICE_SCOPE_LEN as u16;

/// Builds the DMAR for an IR-only unit; `desc` is already validated.
pub(super) fn build(desc: &DmarDesc) -> Vec<u8> {
    let mut dmar = Sdt::new(
        *b"DMAR",
        DMAR_HEADER_LEN,
        DMAR_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dmar.write_u8(36, DMAR_HOST_ADDRESS_WIDTH);
    dmar.write_u8(37, DMAR_INTR_REMAP);

    let [bus, devfn] = desc.ioapic_source_id.to_be_bytes();
    let mut drhd = Vec::with_capacity(DRHD_LEN.into());
    drhd.extend(ACPI_DMAR_TYPE_HARDWARE_UNIT.to_le_bytes());
    drhd.extend(DRHD_LEN.to_le_bytes());
    drhd.push(ACPI_DMAR_INCLUDE_ALL);
    drhd.push(0); // Size: 2^0 pages of registers.
    drhd.extend(0u16.to_le_bytes()); // PCI segment 0.
    drhd.extend(desc.register_base.to_le_bytes());
    drhd.extend([ACPI_DMAR_SCOPE_TYPE_IOAPIC, DEVICE_SCOPE_LEN, 0, 0]);
    drhd.extend([desc.ioapic_id, bus, devfn >> 3, devfn & 0x7]);
    dmar.append_slice(&drhd);
    dmar.as_slice().to_vec()
}
