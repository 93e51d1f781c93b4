//! ACPI tables: validation, placement in the table region, and the RSDP/XSDT that tie them together.
//!
//! Layout inside `[region_start, region_start + region_size)`: the RSDP first (16-byte aligned,
//! ACPI 6.5 §5.2.5.2), then XSDT, FACP, DSDT, APIC, VIOT (with an IOMMU), DMAR (with a remapping
//! unit) or PVIR (with a PV-IR unit), each 8-byte aligned. Every table size is known before any address is, so addresses are
//! fixed first and the tables that hold addresses (RSDP, XSDT, FADT) are built afterwards.

mod dmar;
mod dsdt;
mod fadt;
mod madt;
mod pvir;
mod viot;

#[cfg(test)]
mod tests;

pub use dmar::DEFAULT_IOAPIC_SOURCE_ID;
pub use fadt::pm;

use acpi_tables::{rsdp::Rsdp, xsdt::XSDT, Aml};

use crate::{PlatformDescription, VirtioMmioDesc};

/// OEM ID written in every table header.
const OEM_ID: [u8; 6] = *b"RVMMIO";
/// OEM table ID written in every table header.
const OEM_TABLE_ID: [u8; 8] = *b"VIOMMUVM";
/// OEM revision written in every table header.
const OEM_REVISION: u32 = 1;

/// Largest vCPU count: APIC IDs must stay below 0xFF, the broadcast ID, to fit Processor Local
/// APIC entries (ACPI 6.5 §5.2.12.2).
const MAX_CPUS: u32 = 254;
/// Local APIC base, also the MSI doorbell window (1 MiB).
pub(crate) const LAPIC_ADDR: u32 = 0xFEE0_0000;
pub(crate) const LAPIC_WINDOW_SIZE: u64 = 0x10_0000;
/// Size of the IOAPIC, DMAR and PVIR register pages.
pub(crate) const REG_PAGE_SIZE: u64 = 0x1000;
/// I/O ports used by a 16550 UART.
pub(crate) const SERIAL_IO_LEN: u16 = 8;

/// Errors from [`build_acpi`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// vCPU count out of range.
    #[error("Invalid vCPU count {0}: must be 1..=254")]
    InvalidCpuCount(u32),
    /// A virtio-mmio window is empty, overflows or does not sit below 4 GiB.
    #[error("Invalid virtio-mmio window at {base:#x} (size {size:#x}): must be non-empty and below 4 GiB")]
    InvalidMmioWindow {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
    },
    /// Two MMIO ranges (virtio-mmio windows, IOAPIC, LAPIC, DMAR or PVIR registers) overlap.
    #[error("MMIO range {first} at {first_base:#x} overlaps {second} at {second_base:#x}")]
    MmioOverlap {
        /// What the lower range is.
        first: &'static str,
        /// Its base.
        first_base: u64,
        /// What the other range is.
        second: &'static str,
        /// Its base.
        second_base: u64,
    },
    /// Two devices were given the same interrupt.
    #[error("IRQ {0} is used by more than one device")]
    DuplicateIrq(u32),
    /// Two endpoints were given the same endpoint ID.
    #[error("Endpoint ID {0} is used by more than one device")]
    DuplicateEndpointId(u32),
    /// An endpoint ID was given without an IOMMU, or to the IOMMU itself.
    #[error("Device at {0:#x} has an endpoint ID but no IOMMU translates it")]
    UnexpectedEndpointId(u64),
    /// More virtio-mmio devices than DSDT device names (`V000`..`VFFF`).
    #[error("Too many virtio-mmio devices: {0}")]
    TooManyDevices(usize),
    /// The PM register block is at port 0, overflows the I/O space or overlaps the serial port.
    #[error("Invalid PM register block at I/O port {0:#x}")]
    InvalidPmPorts(u16),
    /// DMAR register base not 4 KiB aligned or zero.
    #[error("Invalid DMAR register base {0:#x}: must be non-zero and 4 KiB aligned")]
    InvalidDmarBase(u64),
    /// The DMAR IOAPIC scope does not name the MADT's IOAPIC.
    #[error("DMAR IOAPIC ID {dmar} does not match the MADT IOAPIC ID {madt}")]
    DmarIoapicMismatch {
        /// ID in the DMAR description.
        dmar: u8,
        /// ID in the IOAPIC description.
        madt: u8,
    },
    /// PVIR register base not 4 KiB aligned or zero.
    #[error("Invalid PVIR register base {0:#x}: must be non-zero and 4 KiB aligned")]
    InvalidPvirBase(u64),
    /// PVIR flags with reserved bits set.
    #[error("Invalid PVIR flags {0:#x}: only bits 0 and 1 are defined")]
    InvalidPvirFlags(u32),
    /// PVIR handle count out of range.
    #[error("Invalid PVIR handle count {0}: must be 1..=65536")]
    InvalidPvirHandles(u32),
    /// Both a DMAR unit and a PV-IR unit: a platform offers one or the other, never both.
    #[error("A platform has a DMAR remapping unit or a PV-IR unit, not both")]
    DmarAndPvir,
    /// The tables do not fit the region given.
    #[error("ACPI tables need {needed:#x} bytes from {start:#x}, region ends at {end:#x}")]
    RegionTooSmall {
        /// Region start.
        start: u64,
        /// First byte after the region.
        end: u64,
        /// Bytes needed from the region start.
        needed: u64,
    },
}

/// One table, to be written at `addr` in guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableBlob {
    /// Table name: its signature, except `RSDP` for the root pointer (`"RSD PTR "`).
    pub name: [u8; 4],
    /// Guest-physical address.
    pub addr: u64,
    /// Table contents, checksummed.
    pub bytes: Vec<u8>,
}

impl TableBlob {
    /// The name as text, e.g. `"DSDT"`.
    pub fn name_str(&self) -> &str {
        std::str::from_utf8(&self.name).unwrap_or("????")
    }
}

/// The complete set of ACPI tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// Guest-physical address of the RSDP, for `boot_params.acpi_rsdp_addr`.
    pub rsdp_addr: u64,
    /// Every table with its address: RSDP, XSDT, FACP, DSDT, APIC, then VIOT, DMAR, PVIR and MCFG if
    /// any.
    pub blobs: Vec<TableBlob>,
}

impl AcpiTables {
    /// The blob with the given name, if present.
    pub fn blob(&self, name: &[u8; 4]) -> Option<&TableBlob> {
        self.blobs.iter().find(|b| &b.name == name)
    }
}

/// Builds every ACPI table for `desc` and places them in `[region_start, region_start + region_size)`.
///
/// Fails, without panicking, when the description is inconsistent or the tables do not fit.
pub fn build_acpi(
    desc: &PlatformDescription,
    region_start: u64,
    region_size: u64,
) -> Result<AcpiTables, AcpiError> {
    validate(desc)?;

    // Address-independent tables first.
    let dsdt = dsdt::build(desc);
    let madt = madt::build(desc);
    let mut others: Vec<([u8; 4], Vec<u8>)> = vec![(*b"APIC", madt)];
    if let Some(iommu) = &desc.iommu {
        let pci = desc
            .pci
            .as_ref()
            .map_or(&[][..], |p| &p.iommu_endpoints[..]);
        others.push((*b"VIOT", viot::build(iommu, &desc.virtio_mmio, pci)));
    }
    if let Some(dmar) = &desc.dmar {
        others.push((*b"DMAR", dmar::build(dmar)));
    }
    if let Some(pvir) = &desc.pvir {
        others.push((*b"PVIR", pvir::build(pvir)));
    }
    if let Some(pci) = &desc.pci {
        others.push((*b"MCFG", mcfg(pci)));
    }

    // XSDT lists FACP and `others`; FADT has a fixed size.
    let xsdt_len = 36 + 8 * (1 + others.len() as u64);
    let mut sizes = vec![Rsdp::len() as u64, xsdt_len, fadt::len(), dsdt.len() as u64];
    sizes.extend(others.iter().map(|(_, b)| b.len() as u64));
    let addrs = place(region_start, region_size, &sizes)?;
    let [rsdp_addr, xsdt_addr, fadt_addr, dsdt_addr] = [addrs[0], addrs[1], addrs[2], addrs[3]];

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in std::iter::once(fadt_addr).chain(addrs[4..].iter().copied()) {
        xsdt.add_entry(addr);
    }

    let mut blobs = vec![
        blob(*b"RSDP", rsdp_addr, &Rsdp::new(OEM_ID, xsdt_addr)),
        blob(*b"XSDT", xsdt_addr, &xsdt),
        TableBlob {
            name: *b"FACP",
            addr: fadt_addr,
            bytes: fadt::build(desc.pm, dsdt_addr),
        },
        TableBlob {
            name: *b"DSDT",
            addr: dsdt_addr,
            bytes: dsdt,
        },
    ];
    for ((name, bytes), addr) in others.into_iter().zip(addrs[4..].iter().copied()) {
        blobs.push(TableBlob { name, addr, bytes });
    }
    for b in &blobs {
        log::debug!(
            "ACPI table {} at {:#x}, {} bytes",
            b.name_str(),
            b.addr,
            b.bytes.len()
        );
    }
    Ok(AcpiTables { rsdp_addr, blobs })
}

/// MCFG (PCI Firmware spec 3.2 §4.1.2): one ECAM allocation for segment 0.
fn mcfg(pci: &crate::PciHostDesc) -> Vec<u8> {
    let mut t = acpi_tables::mcfg::MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.add_ecam(pci.ecam_base, 0, 0, pci.last_bus);
    let mut bytes = Vec::new();
    t.to_aml_bytes(&mut bytes);
    bytes
}

fn blob(name: [u8; 4], addr: u64, table: &dyn Aml) -> TableBlob {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    TableBlob { name, addr, bytes }
}

/// Addresses for tables of the given sizes: the first 16-byte aligned, the rest 8-byte aligned.
fn place(start: u64, size: u64, sizes: &[u64]) -> Result<Vec<u64>, AcpiError> {
    let end = start.checked_add(size);
    let too_small = |needed: u64| AcpiError::RegionTooSmall {
        start,
        end: end.unwrap_or(u64::MAX),
        needed,
    };
    let mut addrs = Vec::with_capacity(sizes.len());
    let mut next = start;
    for (i, len) in sizes.iter().enumerate() {
        let align = if i == 0 { 16 } else { 8 };
        let addr = next
            .checked_next_multiple_of(align)
            .ok_or(too_small(u64::MAX))?;
        next = addr.checked_add(*len).ok_or(too_small(u64::MAX))?;
        addrs.push(addr);
    }
    match end {
        Some(end) if next <= end => Ok(addrs),
        _ => Err(too_small(next - start)),
    }
}

/// Checks `desc` for consistency; the device-tree builder applies the same rules.
pub(crate) fn validate(desc: &PlatformDescription) -> Result<(), AcpiError> {
    if desc.num_cpus == 0 || desc.num_cpus > MAX_CPUS {
        return Err(AcpiError::InvalidCpuCount(desc.num_cpus));
    }
    if desc.virtio_mmio.len() > dsdt::MAX_VIRTIO_DEVICES {
        return Err(AcpiError::TooManyDevices(desc.virtio_mmio.len()));
    }

    // MMIO: every window non-empty and below 4 GiB (Memory32Fixed), nothing overlapping.
    let mut ranges: Vec<(u64, u64, &'static str)> = vec![
        (u64::from(desc.ioapic.address), REG_PAGE_SIZE, "IOAPIC"),
        (u64::from(LAPIC_ADDR), LAPIC_WINDOW_SIZE, "LAPIC"),
    ];
    let devices = desc.iommu.iter().map(|d| (d, "virtio-iommu"));
    let devices = devices.chain(desc.virtio_mmio.iter().map(|d| (d, "virtio-mmio")));
    for (dev, what) in devices.clone() {
        let fits = dev.size > 0 && dev.base.checked_add(dev.size).is_some_and(|e| e <= 1 << 32);
        if !fits {
            return Err(AcpiError::InvalidMmioWindow {
                base: dev.base,
                size: dev.size,
            });
        }
        ranges.push((dev.base, dev.size, what));
    }
    if let Some(dmar) = &desc.dmar {
        if dmar.register_base == 0 || dmar.register_base % REG_PAGE_SIZE != 0 {
            return Err(AcpiError::InvalidDmarBase(dmar.register_base));
        }
        if dmar.ioapic_id != desc.ioapic.id {
            return Err(AcpiError::DmarIoapicMismatch {
                dmar: dmar.ioapic_id,
                madt: desc.ioapic.id,
            });
        }
        ranges.push((dmar.register_base, REG_PAGE_SIZE, "DMAR"));
    }
    if let Some(pvir) = &desc.pvir {
        if desc.dmar.is_some() {
            return Err(AcpiError::DmarAndPvir);
        }
        if pvir.register_base == 0 || pvir.register_base % REG_PAGE_SIZE != 0 {
            return Err(AcpiError::InvalidPvirBase(pvir.register_base));
        }
        let defined = crate::PVIR_FLAG_IOAPIC_ALL | crate::PVIR_FLAG_PCI_SEGMENT0_ALL;
        if pvir.flags & !defined != 0 {
            return Err(AcpiError::InvalidPvirFlags(pvir.flags));
        }
        if pvir.max_handles == 0 || pvir.max_handles > 1 << 16 {
            return Err(AcpiError::InvalidPvirHandles(pvir.max_handles));
        }
        ranges.push((pvir.register_base, REG_PAGE_SIZE, "PVIR"));
    }
    if let Some(pci) = &desc.pci {
        let ecam_size = (u64::from(pci.last_bus) + 1) << 20;
        ranges.push((pci.ecam_base, ecam_size, "PCI ECAM"));
        ranges.push((pci.mmio32.0, pci.mmio32.1, "PCI MMIO window"));
    }
    ranges.sort_by_key(|r| r.0);
    for pair in ranges.windows(2) {
        let ((a_base, a_size, a), (b_base, _, b)) = (pair[0], pair[1]);
        if a_base.saturating_add(a_size) > b_base {
            return Err(AcpiError::MmioOverlap {
                first: a,
                first_base: a_base,
                second: b,
                second_base: b_base,
            });
        }
    }

    // Interrupts: one device per GSI (edge-triggered and declared Exclusive).
    let mut irqs: Vec<u32> = devices.clone().map(|(d, _)| d.irq).collect();
    irqs.extend(desc.serial.map(|s| s.irq));
    irqs.sort_unstable();
    if let Some(w) = irqs.windows(2).find(|w| w[0] == w[1]) {
        return Err(AcpiError::DuplicateIrq(w[0]));
    }

    // Endpoint IDs: only behind an IOMMU, never on the IOMMU, unique.
    let stray = |d: &VirtioMmioDesc| d.endpoint_id.is_some();
    if let Some(d) = desc.iommu.iter().find(|d| stray(d)) {
        return Err(AcpiError::UnexpectedEndpointId(d.base));
    }
    if desc.iommu.is_none() {
        if let Some(d) = desc.virtio_mmio.iter().find(|d| stray(d)) {
            return Err(AcpiError::UnexpectedEndpointId(d.base));
        }
    }
    let mut ids: Vec<u32> = desc
        .virtio_mmio
        .iter()
        .filter_map(|d| d.endpoint_id)
        .collect();
    if let Some(pci) = &desc.pci {
        if desc.iommu.is_none() && !pci.iommu_endpoints.is_empty() {
            return Err(AcpiError::UnexpectedEndpointId(u64::from(
                pci.iommu_endpoints[0],
            )));
        }
        ids.extend(pci.iommu_endpoints.iter().map(|&b| u32::from(b)));
        let ecam_end = pci.ecam_base + ((u64::from(pci.last_bus) + 1) << 20);
        let (m32, m32_size) = pci.mmio32;
        if pci.ecam_base % (1 << 20) != 0
            || ecam_end > 1 << 32
            || m32_size == 0
            || m32.checked_add(m32_size).is_none_or(|e| e > 1 << 32)
            || pci.mmio64.1 == 0
            || pci.mmio64.0.checked_add(pci.mmio64.1).is_none()
        {
            return Err(AcpiError::InvalidMmioWindow {
                base: pci.ecam_base,
                size: ecam_end - pci.ecam_base,
            });
        }
    }
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(AcpiError::DuplicateEndpointId(w[0]));
    }

    // PM block: non-zero, inside the I/O space, clear of the serial port.
    let pm = desc.pm.io_base;
    let pm_end = u32::from(pm) + u32::from(pm::PM_IO_LEN);
    let hits_serial = desc.serial.is_some_and(|s| {
        let s_end = u32::from(s.io_base) + u32::from(SERIAL_IO_LEN);
        u32::from(pm) < s_end && u32::from(s.io_base) < pm_end
    });
    if pm == 0 || pm_end > 0x1_0000 || hits_serial {
        return Err(AcpiError::InvalidPmPorts(pm));
    }
    Ok(())
}
