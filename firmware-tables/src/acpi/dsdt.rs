//! DSDT (ACPI 6.5 §5.2.11.1): `\_S5_` plus the devices under `\_SB_`, encoded with
//! `acpi_tables::aml`.
//!
//! virtio-mmio devices follow the ACPI binding in Linux drivers/virtio/virtio_mmio.c (`_HID`
//! `LNRO0005`): memory resource 0 is the register window, IRQ 0 the single interrupt. The window
//! is the **first** memory resource because Linux drivers/acpi/viot.c matches an MMIO endpoint by
//! the exact start of that resource, and finds the virtio-iommu as the first ACPI device whose
//! `_CRS` consumes the VIOT node's base (`acpi_resource_consumer()`). Interrupts are edge-triggered:
//! the VMM runs a KVM split irqchip, which has no resample eventfd for level interrupts.

use acpi_tables::{
    aml::{self, Path},
    sdt::Sdt,
    Aml,
};

use super::{pm::S5_SLP_TYP, OEM_ID, OEM_REVISION, OEM_TABLE_ID, SERIAL_IO_LEN};
use crate::{PciHostDesc, PlatformDescription, SerialDesc, VirtioMmioDesc};

/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// Endpoint devices are named `V000`..`VFFF` (`_UID` 1..=4096); the IOMMU is `VIOM` (`_UID` 0).
pub(super) const MAX_VIRTIO_DEVICES: usize = 0x1000;

/// Builds the DSDT; `desc` is already validated (windows below 4 GiB, device count in range).
pub(super) fn build(desc: &PlatformDescription) -> Vec<u8> {
    let mut devices: Vec<Vec<u8>> = Vec::new();
    if let Some(iommu) = &desc.iommu {
        devices.push(virtio_mmio_device("VIOM", 0, iommu));
    }
    for (i, dev) in desc.virtio_mmio.iter().enumerate() {
        devices.push(virtio_mmio_device(&format!("V{i:03X}"), i as u32 + 1, dev));
    }
    if let Some(serial) = &desc.serial {
        devices.push(serial_device(serial));
    }
    if let Some(pci) = &desc.pci {
        devices.push(pci_host_bridge(pci));
        devices.push(ecam_reservation(pci));
    }

    let s5 = aml::Package::new(vec![&S5_SLP_TYP]);
    let mut body = Vec::new();
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    body.extend(aml::Scope::raw("\\_SB_".into(), devices.concat()));

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// `Device (name) { _HID "LNRO0005", _UID, _CCA 1, _CRS { Memory32Fixed, Interrupt } }`.
fn virtio_mmio_device(name: &str, uid: u32, dev: &VirtioMmioDesc) -> Vec<u8> {
    // Validated: base + size <= 4 GiB.
    let window = aml::Memory32Fixed::new(true, dev.base as u32, dev.size as u32);
    let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
    let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
    device_bytes(
        name,
        &[
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &uid),
            // Coherent DMA. Not required on x86, harmless, and needed if the tables are reused
            // on arm64 (CONFIG_ACPI_CCA_REQUIRED).
            &aml::Name::new("_CCA".into(), &aml::ONE),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
}

/// `Device (COM1) { _HID EisaId("PNP0501"), _UID 0, _CRS { IO, Interrupt (edge, high) } }`.
fn serial_device(serial: &SerialDesc) -> Vec<u8> {
    let io = aml::IO::new(serial.io_base, serial.io_base, 0, SERIAL_IO_LEN as u8);
    let irq = aml::Interrupt::new(true, true, false, false, serial.irq);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    device_bytes(
        "COM1",
        &[
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
}

/// `Device (PCI0)`: the PCIe host bridge (`PNP0A08`, compatible `PNP0A03`), segment 0,
/// base bus 0; `_CRS` has the bus range, the config ports 0xCF8-0xCFF, the 32-bit window and
/// the 64-bit window. BARs are assigned inside the windows by the VMM; Linux keeps them.
fn pci_host_bridge(pci: &PciHostDesc) -> Vec<u8> {
    let buses = aml::AddressSpace::new_bus_number(0u16, u16::from(pci.last_bus));
    let ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let (b32, s32) = pci.mmio32;
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        b32 as u32,
        (b32 + s32 - 1) as u32,
        None,
    );
    let (b64, s64) = pci.mmio64;
    let mmio64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        b64,
        b64 + s64 - 1,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&buses, &ports, &mmio32, &mmio64]);
    device_bytes(
        "PCI0",
        &[
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_CCA".into(), &aml::ONE),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
}

/// `Device (MRES)`: a motherboard resource (`PNP0C02`) reserving the ECAM, which Linux
/// requires before it trusts the MCFG (arch/x86/pci/mmconfig-shared.c, `is_acpi_reserved`).
fn ecam_reservation(pci: &PciHostDesc) -> Vec<u8> {
    let size = (u32::from(pci.last_bus) + 1) << 20;
    let ecam = aml::Memory32Fixed::new(false, pci.ecam_base as u32, size);
    let crs = aml::ResourceTemplate::new(vec![&ecam]);
    device_bytes(
        "MRES",
        &[
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ONE),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
}

fn device_bytes(name: &str, children: &[&dyn Aml]) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml::Device::new(Path::new(name), children.to_vec()).to_aml_bytes(&mut bytes);
    bytes
}
