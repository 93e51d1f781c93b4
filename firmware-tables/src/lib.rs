//! Firmware tables for the VMM's x86_64 platform, computed from a plain description.
//!
//! The VMM fills a [`PlatformDescription`] from what it allocated (CPUs, IOAPIC, serial port,
//! PM registers, virtio-mmio windows, the virtio-iommu) and calls [`build_acpi`]. It gets back
//! byte blobs with their guest-physical addresses, writes each one into guest memory and passes
//! [`AcpiTables::rsdp_addr`] in the boot protocol (`boot_params.acpi_rsdp_addr`).
//!
//! For a device-tree boot it calls [`build_fdt`] on the same description instead: one DTB for
//! the guest's `SETUP_DTB` entry, with the same CPUs, IOAPIC, serial port, virtio-mmio windows
//! and endpoint IDs (the VIOT's IDs are the `iommus` specifiers).
//!
//! This crate knows nothing about KVM or device models; it only turns numbers into bytes.
//! The encoding itself (AML, RSDP, XSDT, FADT, MADT, VIOT) comes from the rust-vmm
//! `acpi_tables` crate; DMAR and PVIR, which it lacks, are laid out here on top of
//! `acpi_tables::sdt::Sdt`.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod acpi;
pub mod fdt;
pub mod mptable;

pub use acpi::pm;
pub use acpi::{build_acpi, AcpiError, AcpiTables, TableBlob, DEFAULT_IOAPIC_SOURCE_ID};
pub use fdt::{build_fdt, FdtError, PowerOffDesc};
pub use mptable::{build_mptable, MptableError};

/// Plain description of the platform the guest should see; no KVM or device types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformDescription {
    /// Number of vCPUs, 1..=254. Their APIC IDs (and ACPI processor UIDs) are `0..num_cpus`.
    pub num_cpus: u32,
    /// The (userspace) IOAPIC.
    pub ioapic: IoapicDesc,
    /// 16550 serial port, described in the DSDT as a `PNP0501` device.
    pub serial: Option<SerialDesc>,
    /// Hardware-reduced ACPI power-management registers (reset, sleep control, sleep status).
    pub pm: PmDesc,
    /// virtio-mmio endpoint devices, each described in the DSDT as a `LNRO0005` device.
    pub virtio_mmio: Vec<VirtioMmioDesc>,
    /// The virtio-iommu (also a `LNRO0005` device). When present, a VIOT is emitted.
    pub iommu: Option<VirtioMmioDesc>,
    /// An interrupt-remapping-only VT-d unit. When present, a DMAR is emitted.
    pub dmar: Option<DmarDesc>,
    /// A PV-IR (paravirtual interrupt remapping) unit. When present, a PVIR table is emitted.
    /// A platform has at most one of `dmar` and `pvir`.
    pub pvir: Option<PvirDesc>,
    /// The PCI host bridge, only when the VM has PCI devices: a DSDT `PNP0A08` device, an
    /// MCFG, and the ECAM reserved as a motherboard resource. `None` emits none of them.
    pub pci: Option<PciHostDesc>,
}

/// A PCI host bridge: segment 0, buses `0..=last_bus`, ECAM and two MMIO windows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciHostDesc {
    /// ECAM base (1 MiB per bus), 1 MiB-aligned, below 4 GiB.
    pub ecam_base: u64,
    /// Last bus number (ECAM covers `0..=last_bus`).
    pub last_bus: u8,
    /// 32-bit MMIO window `(base, size)` for BARs; below 4 GiB.
    pub mmio32: (u64, u64),
    /// 64-bit MMIO window `(base, size)` above RAM.
    pub mmio64: (u64, u64),
    /// Functions behind the virtio-iommu, by BDF (`bus << 8 | devfn`): each is a VIOT PCI
    /// range node whose endpoint ID is the BDF. Only with an IOMMU.
    pub iommu_endpoints: Vec<u16>,
}

/// An IOAPIC as listed in the MADT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoapicDesc {
    /// IOAPIC ID.
    pub id: u8,
    /// MMIO base address (normally 0xFEC0_0000).
    pub address: u32,
    /// First GSI served by this IOAPIC (normally 0).
    pub gsi_base: u32,
}

/// A 16550-compatible serial port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SerialDesc {
    /// First of its 8 I/O ports (normally 0x3F8).
    pub io_base: u16,
    /// Its GSI, edge-triggered and active-high (normally 4).
    pub irq: u32,
}

/// Where the hardware-reduced ACPI PM registers live; see [`pm`] for the layout and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmDesc {
    /// First of the [`pm::PM_IO_LEN`] I/O ports. Must not be 0 (Linux reads 0 as "absent").
    pub io_base: u16,
}

/// One virtio-mmio transport window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDesc {
    /// Guest-physical base of the register window; must lie below 4 GiB.
    pub base: u64,
    /// Window size in bytes (normally 0x1000).
    pub size: u64,
    /// GSI of the device's interrupt, declared edge-triggered and active-high.
    pub irq: u32,
    /// Endpoint ID behind the virtio-iommu (VIOT type-2 node), or `None` for a device that
    /// bypasses the IOMMU. Must be `None` for the IOMMU itself and when there is no IOMMU.
    pub endpoint_id: Option<u32>,
}

/// [`PvirDesc::flags`] bit 0: every IOAPIC in the MADT is behind the PV-IR unit.
pub const PVIR_FLAG_IOAPIC_ALL: u32 = 1 << 0;
/// [`PvirDesc::flags`] bit 1: every PCI function of segment 0 is behind the PV-IR unit.
pub const PVIR_FLAG_PCI_SEGMENT0_ALL: u32 = 1 << 1;

/// A PV-IR unit (`docs/pv-irq-remap.md`), enumerated by the ACPI `PVIR` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvirDesc {
    /// 4 KiB-aligned, non-zero base of its register page (normally 0xFED9_2000).
    pub register_base: u64,
    /// [`PVIR_FLAG_IOAPIC_ALL`] | [`PVIR_FLAG_PCI_SEGMENT0_ALL`]; other bits are reserved.
    pub flags: u32,
    /// Number of handles (the unit's `MAX_HANDLES`), 1..=65536.
    pub max_handles: u32,
}

/// A VT-d remapping unit used only for interrupt remapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmarDesc {
    /// 4 KiB-aligned, non-zero base of its register page (normally 0xFED9_0000).
    pub register_base: u64,
    /// APIC ID of the IOAPIC in its device scope; must equal [`IoapicDesc::id`].
    pub ioapic_id: u8,
    /// PCI source-id (`bus << 8 | devfn`) the IOAPIC's interrupts carry; Linux writes it into
    /// every IOAPIC IRTE for source validation. [`DEFAULT_IOAPIC_SOURCE_ID`] is the suggestion.
    pub ioapic_source_id: u16,
}
