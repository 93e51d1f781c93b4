//! VIOT, the Virtual I/O Translation Table (ACPI 6.4 and later; Linux include/acpi/actbl3.h),
//! built with `acpi_tables::viot` and read by Linux drivers/acpi/viot.c.
//!
//! One virtio-mmio IOMMU node (type 4) at the IOMMU's window base, then one MMIO endpoint node
//! (type 2) per virtio-mmio device that has an endpoint ID, with its window base, which is also
//! the start of its DSDT `_CRS` memory resource (Linux matches on that exact address), then one
//! PCI range node (type 1) per PCI function behind the IOMMU, covering just its BDF, whose
//! endpoint ID is the BDF (acpi_tables writes `endpoint_start` = first BDF). Nodes start at
//! offset 48.
//!
//! The header revision is the crate's, 1; the spec table says 0. Linux (viot.c, 5.14 to at least
//! 6.12) never reads the revision, so it is left alone.

use acpi_tables::{
    viot::{MmioEndpoint, PciDevice, PciRange, VirtIoMmioIommu, VIOT},
    Aml,
};

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::VirtioMmioDesc;

/// Builds the VIOT for `iommu`, the endpoints among `devices` and the PCI functions
/// `pci_bdfs` (one PCI range node each, endpoint ID = BDF, segment 0).
pub(super) fn build(
    iommu: &VirtioMmioDesc,
    devices: &[VirtioMmioDesc],
    pci_bdfs: &[u16],
) -> Vec<u8> {
    let mut viot = VIOT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let iommu_node = viot.add_virtio_mmio_iommu(VirtIoMmioIommu::new(iommu.base));
    for dev in devices {
        if let Some(id) = dev.endpoint_id {
            viot.add_mmio_endpoint(MmioEndpoint::new(id, dev.base, &iommu_node));
        }
    }
    for &bdf in pci_bdfs {
        let d = || {
            PciDevice::new(
                0,
                (bdf >> 8) as u8,
                ((bdf >> 3) & 0x1f) as u8,
                (bdf & 7) as u8,
            )
        };
        viot.add_pci_range(PciRange::new(d(), d(), &iommu_node));
    }
    let mut bytes = Vec::new();
    viot.to_aml_bytes(&mut bytes);
    bytes
}
