use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::{
    DmarDesc, IoapicDesc, PmDesc, PvirDesc, SerialDesc, PVIR_FLAG_IOAPIC_ALL,
    PVIR_FLAG_PCI_SEGMENT0_ALL,
};

const REGION_START: u64 = 0xE_0000;
const REGION_SIZE: u64 = 0x2_0000;
const PM_BASE: u16 = 0x600;

fn mmio(base: u64, irq: u32, endpoint_id: Option<u32>) -> VirtioMmioDesc {
    VirtioMmioDesc {
        base,
        size: 0x1000,
        irq,
        endpoint_id,
    }
}

/// 2 vCPUs, serial, a virtio-iommu with two endpoints, and an IR-only DMAR unit.
fn full_desc() -> PlatformDescription {
    PlatformDescription {
        num_cpus: 2,
        ioapic: IoapicDesc {
            id: 0,
            address: 0xFEC0_0000,
            gsi_base: 0,
        },
        serial: Some(SerialDesc {
            io_base: 0x3F8,
            irq: 4,
        }),
        pm: PmDesc { io_base: PM_BASE },
        virtio_mmio: vec![mmio(0xD000_1000, 6, Some(1)), mmio(0xD000_2000, 7, Some(2))],
        iommu: Some(mmio(0xD000_0000, 5, None)),
        dmar: Some(DmarDesc {
            register_base: 0xFED9_0000,
            ioapic_id: 0,
            ioapic_source_id: DEFAULT_IOAPIC_SOURCE_ID,
        }),
        pvir: None,
        pci: None,
    }
}

/// [`full_desc`] plus a PCI host bridge with two functions behind the IOMMU.
fn pci_desc() -> PlatformDescription {
    PlatformDescription {
        pci: Some(crate::PciHostDesc {
            ecam_base: 0xE000_0000,
            last_bus: 0,
            mmio32: (0xC000_0000, 0x1000_0000),
            mmio64: (0x60_0000_0000, 0x20_0000_0000),
            iommu_endpoints: vec![0x08, 0x10],
        }),
        ..full_desc()
    }
}

/// The same platform with neither IOMMU nor DMAR unit.
fn plain_desc() -> PlatformDescription {
    PlatformDescription {
        virtio_mmio: vec![mmio(0xD000_1000, 6, None), mmio(0xD000_2000, 7, None)],
        iommu: None,
        dmar: None,
        ..full_desc()
    }
}

const PVIR: PvirDesc = PvirDesc {
    register_base: 0xFED9_2000,
    flags: PVIR_FLAG_IOAPIC_ALL | PVIR_FLAG_PCI_SEGMENT0_ALL,
    max_handles: 4096,
};

/// [`pci_desc`] with a PV-IR unit instead of the DMAR unit.
fn pvir_desc() -> PlatformDescription {
    PlatformDescription {
        dmar: None,
        pvir: Some(PVIR),
        ..pci_desc()
    }
}

fn build(desc: &PlatformDescription) -> AcpiTables {
    build_acpi(desc, REGION_START, REGION_SIZE).expect("valid description")
}

fn table<'a>(tables: &'a AcpiTables, name: &[u8; 4]) -> &'a [u8] {
    &tables
        .blob(name)
        .unwrap_or_else(|| panic!("no {name:?}"))
        .bytes
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn position(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn every_table_sums_to_zero_and_header_length_matches_blob() {
    for desc in [full_desc(), plain_desc(), pvir_desc()] {
        for blob in build(&desc).blobs.iter().filter(|b| &b.name != b"RSDP") {
            assert_eq!(sum(&blob.bytes), 0, "{} checksum", blob.name_str());
            assert_eq!(
                u32_at(&blob.bytes, 4) as usize,
                blob.bytes.len(),
                "{} length",
                blob.name_str()
            );
            assert_eq!(&blob.bytes[0..4], &blob.name);
        }
    }
}

#[test]
fn rsdp_checksums_are_right_and_it_points_at_xsdt() {
    let tables = build(&full_desc());
    let rsdp = table(&tables, b"RSDP");
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "revision");
    assert_eq!(sum(&rsdp[0..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(sum(rsdp), 0, "extended checksum");
    assert_eq!(u32_at(rsdp, 20) as usize, rsdp.len());
    assert_eq!(u64_at(rsdp, 24), tables.blob(b"XSDT").unwrap().addr);
    assert_eq!(tables.rsdp_addr, tables.blob(b"RSDP").unwrap().addr);
}

#[test]
fn tables_are_aligned_disjoint_and_inside_the_region() {
    let tables = build_acpi(&full_desc(), 0xE_0001, REGION_SIZE - 1).unwrap();
    assert_eq!(tables.rsdp_addr, 0xE_0010, "RSDP rounded up to 16 bytes");
    let mut end = 0xE_0001;
    for blob in &tables.blobs {
        assert_eq!(blob.addr % 8, 0, "{} aligned", blob.name_str());
        assert!(
            blob.addr >= end,
            "{} overlaps its predecessor",
            blob.name_str()
        );
        end = blob.addr + blob.bytes.len() as u64;
    }
    assert!(end <= REGION_START + REGION_SIZE);
}

#[test]
fn xsdt_lists_every_table_except_rsdp_and_dsdt() {
    for desc in [full_desc(), plain_desc(), pvir_desc()] {
        let tables = build(&desc);
        let xsdt = table(&tables, b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|off| u64_at(xsdt, off))
            .collect();
        let expected: Vec<u64> = tables
            .blobs
            .iter()
            .filter(|b| !matches!(&b.name, b"RSDP" | b"XSDT" | b"DSDT"))
            .map(|b| b.addr)
            .collect();
        assert_eq!(entries, expected);
    }
}

#[test]
fn fadt_is_hardware_reduced_and_points_at_dsdt_and_pm_registers() {
    let tables = build(&full_desc());
    let fadt = table(&tables, b"FACP");
    assert_eq!(fadt.len(), 276);
    assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT pointer unused");
    assert_eq!(
        u64_at(fadt, 140),
        tables.blob(b"DSDT").unwrap().addr,
        "X_DSDT"
    );

    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    let iapc_boot_arch = u16_at(fadt, 109);
    assert_eq!(
        iapc_boot_arch & 0b1011,
        0,
        "no legacy devices, no 8042, MSI supported"
    );
    assert_ne!(iapc_boot_arch & (1 << 2), 0, "VGA not present");

    // GAS: System I/O, 8 bits wide, offset 0, byte access, port.
    let gas = |off: usize| {
        (
            fadt[off],
            fadt[off + 1],
            fadt[off + 2],
            fadt[off + 3],
            u64_at(fadt, off + 4),
        )
    };
    let port = |offset: u16| (1, 8, 0, 1, u64::from(PM_BASE + offset));
    assert_eq!(gas(116), port(pm::PM_RESET_REG_OFFSET), "RESET_REG");
    assert_eq!(fadt[128], pm::RESET_VALUE, "RESET_VALUE");
    assert_eq!(
        gas(244),
        port(pm::PM_SLEEP_CONTROL_REG_OFFSET),
        "SLEEP_CONTROL_REG"
    );
    assert_eq!(
        gas(256),
        port(pm::PM_SLEEP_STATUS_REG_OFFSET),
        "SLEEP_STATUS_REG"
    );
}

#[test]
fn s5_sleep_control_value_is_what_linux_writes_for_dsdt_s5() {
    assert_eq!(pm::S5_SLEEP_CONTROL_VALUE, 0x34);
    assert_eq!(pm::RESET_VALUE, 0x1);
    // Name (_S5_, Package (1) { 5 }): NameOp, "_S5_", PackageOp, PkgLength 4, 1 element, BytePrefix 5.
    let dsdt = build(&full_desc()).blob(b"DSDT").unwrap().bytes.clone();
    assert!(contains(
        &dsdt,
        &[
            0x08,
            b'_',
            b'S',
            b'5',
            b'_',
            0x12,
            4,
            1,
            0x0A,
            pm::S5_SLP_TYP
        ]
    ));
}

#[test]
fn madt_has_one_enabled_lapic_per_cpu_and_the_ioapic() {
    for num_cpus in [1, 2, 254] {
        let desc = PlatformDescription {
            num_cpus,
            ioapic: IoapicDesc {
                id: 3,
                address: 0xFEC0_0000,
                gsi_base: 0,
            },
            dmar: None,
            ..full_desc()
        };
        let tables = build(&desc);
        let madt = table(&tables, b"APIC");
        assert_eq!(u32_at(madt, 36), 0xFEE0_0000, "local APIC address");
        assert_eq!(u32_at(madt, 40), 0, "flags: PCAT_COMPAT clear");

        let (mut lapic_ids, mut ioapics) = (Vec::new(), Vec::new());
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                0 => {
                    assert_eq!(madt[off + 2], madt[off + 3], "UID = APIC ID");
                    assert_eq!(u32_at(madt, off + 4), 1, "enabled");
                    lapic_ids.push(u32::from(madt[off + 3]));
                }
                1 => ioapics.push((madt[off + 2], u32_at(madt, off + 4), u32_at(madt, off + 8))),
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapic_ids, (0..num_cpus).collect::<Vec<_>>());
        assert_eq!(ioapics, vec![(3, 0xFEC0_0000, 0)]);
    }
}

#[test]
fn viot_has_the_iommu_node_and_one_endpoint_node_per_endpoint() {
    let mut desc = full_desc();
    // A device without an endpoint ID bypasses the IOMMU and gets no node.
    desc.virtio_mmio.push(mmio(0xD000_3000, 8, None));
    let tables = build(&desc);
    let viot = table(&tables, b"VIOT");
    assert_eq!(u16_at(viot, 36), 3, "node count");
    assert_eq!(u16_at(viot, 38), 48, "node offset");

    let iommu_node = 48;
    assert_eq!(
        (viot[iommu_node], u16_at(viot, iommu_node + 2)),
        (4, 16),
        "virtio-mmio IOMMU node"
    );
    assert_eq!(u64_at(viot, iommu_node + 8), 0xD000_0000);

    let endpoints: Vec<(u32, u64)> = (0..2)
        .map(|i| {
            let node = 64 + 24 * i;
            assert_eq!(
                (viot[node], u16_at(viot, node + 2)),
                (2, 24),
                "MMIO endpoint node"
            );
            assert_eq!(u16_at(viot, node + 16) as usize, iommu_node, "output node");
            (u32_at(viot, node + 4), u64_at(viot, node + 8))
        })
        .collect();
    assert_eq!(endpoints, vec![(1, 0xD000_1000), (2, 0xD000_2000)]);
    assert_eq!(viot.len(), 64 + 48);
}

#[test]
fn viot_bases_are_the_first_memory_resource_of_dsdt_devices() {
    let tables = build(&full_desc());
    let dsdt = table(&tables, b"DSDT");
    for base in [0xD000_0000u32, 0xD000_1000, 0xD000_2000] {
        // "_CRS", BufferOp, PkgLength, BytePrefix + buffer size, then Memory32Fixed (0x86) first.
        let mut crs = vec![0x86, 9, 0, 1];
        crs.extend(base.to_le_bytes());
        crs.extend(0x1000u32.to_le_bytes());
        let at = position(dsdt, &crs).unwrap_or_else(|| panic!("no window {base:#x} in DSDT"));
        assert_eq!(
            &dsdt[at - 8..at - 3],
            b"_CRS\x11",
            "window opens the _CRS buffer"
        );
        assert_eq!(dsdt[at - 2], 0x0A, "BytePrefix");
    }
}

#[test]
fn dsdt_puts_the_iommu_first_and_names_every_device() {
    let dsdt = build(&full_desc()).blob(b"DSDT").unwrap().bytes.clone();
    let viom = position(&dsdt, b"VIOM").unwrap();
    assert!(viom < position(&dsdt, b"V000").unwrap());
    assert!(contains(&dsdt, b"V001"));
    assert!(contains(&dsdt, b"COM1"));
    assert!(contains(&dsdt, b"LNRO0005\0"));
}

#[test]
fn no_viot_without_iommu_and_no_dmar_without_unit() {
    let tables = build(&plain_desc());
    assert!(tables.blob(b"VIOT").is_none());
    assert!(tables.blob(b"DMAR").is_none());
    let names: Vec<&str> = tables.blobs.iter().map(|b| b.name_str()).collect();
    assert_eq!(names, ["RSDP", "XSDT", "FACP", "DSDT", "APIC"]);
}

#[test]
fn dmar_has_one_ir_unit_scoping_the_ioapic() {
    let tables = build(&full_desc());
    let dmar = table(&tables, b"DMAR");
    assert_eq!(dmar[8], 1, "revision");
    assert_eq!(dmar[36], 47, "host address width - 1");
    assert_eq!(dmar[37], 0x1, "INTR_REMAP only");
    assert_eq!(&dmar[38..48], &[0; 10]);
    let drhd = &dmar[48..];
    assert_eq!(drhd.len(), 24);
    assert_eq!(
        (u16_at(drhd, 0), u16_at(drhd, 2)),
        (0, 24),
        "DRHD type and length"
    );
    assert_eq!(
        (drhd[4], drhd[5], u16_at(drhd, 6)),
        (1, 0, 0),
        "INCLUDE_PCI_ALL, size, segment"
    );
    assert_eq!(u64_at(drhd, 8), 0xFED9_0000);
    // IOAPIC scope: type 3, length 8, enumeration ID 0, bus 0xFF, path (0, 0).
    assert_eq!(&drhd[16..24], &[3, 8, 0, 0, 0, 0xFF, 0, 0]);
}

#[test]
fn dmar_scope_encodes_the_source_id_as_bus_device_function() {
    let mut desc = full_desc();
    desc.dmar.as_mut().unwrap().ioapic_source_id = 0x00F5; // 00:1e.5
    let tables = build(&desc);
    assert_eq!(
        &table(&tables, b"DMAR")[48 + 21..48 + 24],
        &[0x00, 0x1E, 0x5]
    );
}

fn err(desc: PlatformDescription) -> AcpiError {
    build_acpi(&desc, REGION_START, REGION_SIZE).expect_err("description must be rejected")
}

#[test]
fn cpu_count_outside_1_to_254_is_rejected() {
    assert_eq!(
        err(PlatformDescription {
            num_cpus: 0,
            ..full_desc()
        }),
        AcpiError::InvalidCpuCount(0)
    );
    assert_eq!(
        err(PlatformDescription {
            num_cpus: 255,
            ..full_desc()
        }),
        AcpiError::InvalidCpuCount(255)
    );
}

#[test]
fn overlapping_or_duplicate_mmio_windows_are_rejected() {
    let mut desc = full_desc();
    desc.virtio_mmio[1].base = 0xD000_1800;
    assert!(matches!(
        err(desc),
        AcpiError::MmioOverlap {
            first_base: 0xD000_1000,
            ..
        }
    ));

    let mut desc = full_desc();
    desc.virtio_mmio[0].base = 0xD000_0000; // the IOMMU's window
    assert!(matches!(err(desc), AcpiError::MmioOverlap { .. }));

    let mut desc = full_desc();
    desc.virtio_mmio[0].base = 0xFEC0_0000;
    assert!(matches!(
        err(desc),
        AcpiError::MmioOverlap {
            first: "IOAPIC",
            ..
        } | AcpiError::MmioOverlap {
            second: "IOAPIC",
            ..
        }
    ));

    let mut desc = full_desc();
    desc.virtio_mmio[0].base = 0xFED9_0000;
    assert!(matches!(err(desc), AcpiError::MmioOverlap { .. }));
}

#[test]
fn empty_or_high_mmio_windows_are_rejected() {
    let mut desc = full_desc();
    desc.virtio_mmio[0].size = 0;
    assert!(matches!(err(desc), AcpiError::InvalidMmioWindow { .. }));

    let mut desc = full_desc();
    desc.virtio_mmio[0].base = 0xFFFF_F800;
    assert!(matches!(err(desc), AcpiError::InvalidMmioWindow { .. }));

    let mut desc = full_desc();
    desc.iommu.as_mut().unwrap().base = u64::MAX - 0x800;
    assert!(matches!(err(desc), AcpiError::InvalidMmioWindow { .. }));
}

#[test]
fn shared_irqs_are_rejected() {
    let mut desc = full_desc();
    desc.virtio_mmio[1].irq = 4; // the serial port's
    assert_eq!(err(desc), AcpiError::DuplicateIrq(4));
}

#[test]
fn endpoint_ids_must_be_unique_and_need_an_iommu() {
    let mut desc = full_desc();
    desc.virtio_mmio[1].endpoint_id = Some(1);
    assert_eq!(err(desc), AcpiError::DuplicateEndpointId(1));

    let mut desc = full_desc();
    desc.iommu = None;
    assert_eq!(err(desc), AcpiError::UnexpectedEndpointId(0xD000_1000));

    let mut desc = full_desc();
    desc.iommu.as_mut().unwrap().endpoint_id = Some(9);
    assert_eq!(err(desc), AcpiError::UnexpectedEndpointId(0xD000_0000));
}

#[test]
fn bad_pm_ports_are_rejected() {
    for io_base in [0, 0x3FE, 0xFFFE] {
        let desc = PlatformDescription {
            pm: PmDesc { io_base },
            ..full_desc()
        };
        assert_eq!(err(desc), AcpiError::InvalidPmPorts(io_base));
    }
}

#[test]
fn bad_dmar_descriptions_are_rejected() {
    let mut desc = full_desc();
    desc.dmar.as_mut().unwrap().register_base = 0xFED9_0800;
    assert_eq!(err(desc), AcpiError::InvalidDmarBase(0xFED9_0800));

    let mut desc = full_desc();
    desc.dmar.as_mut().unwrap().ioapic_id = 1;
    assert_eq!(
        err(desc),
        AcpiError::DmarIoapicMismatch { dmar: 1, madt: 0 }
    );
}

#[test]
fn tables_not_fitting_the_region_are_rejected() {
    let e = build_acpi(&full_desc(), REGION_START, 0x100).unwrap_err();
    assert!(
        matches!(e, AcpiError::RegionTooSmall { start: REGION_START, end: 0xE_0100, needed } if needed > 0x100)
    );

    // So many devices that the DSDT outgrows 128 KiB.
    let mut desc = plain_desc();
    desc.virtio_mmio = (0..0x1000)
        .map(|i| mmio(0x8000_0000 + i * 0x1000, 100 + i as u32, None))
        .collect();
    assert!(matches!(err(desc), AcpiError::RegionTooSmall { .. }));

    // A region wrapping around the address space.
    let e = build_acpi(&full_desc(), u64::MAX - 0x10, 0x2_0000).unwrap_err();
    assert!(matches!(e, AcpiError::RegionTooSmall { .. }));
}

#[test]
fn more_devices_than_dsdt_names_are_rejected() {
    let mut desc = plain_desc();
    desc.virtio_mmio = (0..0x1001)
        .map(|i| mmio(0x8000_0000 + i * 0x1000, 100 + i as u32, None))
        .collect();
    assert_eq!(err(desc), AcpiError::TooManyDevices(0x1001));
}

// ---- `iasl -d` (Debian package acpica-tools) decompiles every generated table. ----
// A missing `iasl` fails the test: CI has it, and a silent pass would hide broken tables.

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fw-tables-iasl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Runs `iasl -d NAME.dat` in `dir`; returns its combined output. Panics on failure.
fn iasl_disassemble(dir: &Path, file: &str) -> String {
    let out = match Command::new("iasl")
        .arg("-d")
        .arg(file)
        .current_dir(dir)
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!(
            "\n\n*** cannot run `iasl` ({e}). Install ACPICA's disassembler: \
             `apt-get install acpica-tools`. CI has it; this test never passes without it. ***\n\n"
        ),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "iasl -d {file} failed ({}):\n{text}",
        out.status
    );
    assert!(
        !text.contains("Error"),
        "iasl -d {file} reported errors:\n{text}"
    );
    text
}

/// Writes every table as `NAME.dat`, disassembles it, and returns the DSDT source.
///
/// The RSDP is skipped: it has no standard table header and `iasl -d` rejects a raw RSDP
/// ("does not contain a valid ACPI table"); the unit tests check its checksums and pointer.
fn disassemble_all(tables: &AcpiTables, dir: &Path) -> String {
    for blob in tables.blobs.iter().filter(|b| &b.name != b"RSDP") {
        let file = format!("{}.dat", blob.name_str());
        std::fs::write(dir.join(&file), &blob.bytes).expect("write table");
        iasl_disassemble(dir, &file);
        let dsl = dir.join(format!("{}.dsl", blob.name_str()));
        assert!(dsl.exists(), "iasl wrote no {}", dsl.display());
    }
    std::fs::read_to_string(dir.join("DSDT.dsl")).expect("read DSDT.dsl")
}

#[test]
fn iasl_disassembles_every_table_with_iommu_and_dmar() {
    let tables = build(&full_desc());
    let dir = scratch_dir("iommu");
    let dsdt = disassemble_all(&tables, &dir);
    for needle in [
        "LNRO0005",
        "PNP0501",
        "_S5_",
        "Memory32Fixed (ReadWrite,",
        "0xD0000000",
    ] {
        assert!(dsdt.contains(needle), "DSDT.dsl lacks {needle}:\n{dsdt}");
    }
    assert!(
        dsdt.find("VIOM").unwrap() < dsdt.find("V000").unwrap(),
        "IOMMU device first"
    );

    // iasl 20200925 (Debian 12) predates VIOT support and dumps only the header; newer ones
    // decode the nodes, and then the bases must show up.
    let viot = std::fs::read_to_string(dir.join("VIOT.dsl")).expect("read VIOT.dsl");
    if !viot.contains("Unknown ACPI table signature") {
        for base in ["D0000000", "D0001000", "D0002000"] {
            assert!(viot.contains(base), "VIOT.dsl lacks base {base}:\n{viot}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn iasl_disassembles_every_table_without_iommu() {
    let tables = build(&plain_desc());
    let dir = scratch_dir("plain");
    let dsdt = disassemble_all(&tables, &dir);
    for needle in ["LNRO0005", "PNP0501", "_S5_"] {
        assert!(dsdt.contains(needle), "DSDT.dsl lacks {needle}:\n{dsdt}");
    }
    assert!(!dir.join("VIOT.dat").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_pci_devices_there_is_no_host_bridge_nor_mcfg() {
    let tables = build(&full_desc());
    assert!(tables.blob(b"MCFG").is_none());
    let dsdt = table(&tables, b"DSDT");
    assert!(!dsdt.windows(4).any(|w| w == b"PCI0"));
}

#[test]
fn pci_host_bridge_mcfg_and_viot_pci_ranges() {
    let tables = build(&pci_desc());
    for b in &tables.blobs {
        assert_eq!(
            b.bytes.iter().fold(0u8, |a, x| a.wrapping_add(*x)),
            0,
            "{}",
            b.name_str()
        );
    }
    let mcfg = table(&tables, b"MCFG");
    assert_eq!(mcfg.len(), 44 + 16);
    assert_eq!(u64_at(mcfg, 44), 0xE000_0000);
    assert_eq!((u16_at(mcfg, 52), mcfg[54], mcfg[55]), (0, 0, 0));
    let viot = table(&tables, b"VIOT");
    assert_eq!(
        u16_at(viot, 36),
        5,
        "IOMMU, two MMIO endpoints, two PCI ranges"
    );
    let mut off = u16_at(viot, 38) as usize;
    let mut ranges = Vec::new();
    let mut iommu_node = 0;
    for _ in 0..5 {
        match viot[off] {
            4 => iommu_node = off,
            1 => ranges.push((
                u32_at(viot, off + 4),
                u16_at(viot, off + 12),
                u16_at(viot, off + 14),
                u16_at(viot, off + 16) as usize,
            )),
            _ => {}
        }
        off += u16_at(viot, off + 2) as usize;
    }
    assert_eq!(
        ranges,
        vec![
            (0x08, 0x08, 0x08, iommu_node),
            (0x10, 0x10, 0x10, iommu_node)
        ]
    );
}

#[test]
fn pci_endpoints_without_iommu_or_clashing_ids_are_refused() {
    let mut desc = pci_desc();
    desc.iommu = None;
    desc.virtio_mmio
        .iter_mut()
        .for_each(|d| d.endpoint_id = None);
    assert!(build_acpi(&desc, REGION_START, REGION_SIZE).is_err());
    let mut desc = pci_desc();
    desc.pci.as_mut().unwrap().iommu_endpoints = vec![2];
    assert!(matches!(
        build_acpi(&desc, REGION_START, REGION_SIZE),
        Err(AcpiError::DuplicateEndpointId(2))
    ));
}

#[test]
fn iasl_disassembles_mcfg_and_the_host_bridge() {
    let tables = build(&pci_desc());
    let dir = scratch_dir("pci");
    let dsdt = disassemble_all(&tables, &dir);
    for needle in [
        "PNP0A08",
        "PNP0A03",
        "PNP0C02",
        "_SEG",
        "_BBN",
        "WordBusNumber",
        "DWordMemory",
        "QWordMemory",
        "0xC0000000",
        "0x0000006000000000",
        "0xE0000000",
    ] {
        assert!(dsdt.contains(needle), "DSDT.dsl lacks {needle}:\n{dsdt}");
    }
    let mcfg = std::fs::read_to_string(dir.join("MCFG.dsl")).expect("read MCFG.dsl");
    assert!(mcfg.contains("00000000E0000000"), "MCFG.dsl:\n{mcfg}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- PVIR (docs/pv-irq-remap.md §1). ----

#[test]
fn pvir_table_has_the_spec_layout() {
    let tables = build(&pvir_desc());
    assert!(tables.blob(b"DMAR").is_none());
    let pvir = table(&tables, b"PVIR");
    assert_eq!(pvir.len(), 56);
    assert_eq!(&pvir[0..4], b"PVIR");
    assert_eq!(u32_at(pvir, 4), 56, "length");
    assert_eq!(pvir[8], 1, "revision");
    assert_eq!(sum(pvir), 0, "checksum");
    assert_eq!(&pvir[10..16], b"RVMMIO");
    assert_eq!(&pvir[16..24], b"VIOMMUVM");
    assert_eq!(u64_at(pvir, 36), 0xFED9_2000, "register page");
    assert_eq!(u32_at(pvir, 44), 0b11, "flags");
    assert_eq!(u32_at(pvir, 48), 4096, "handles");
    assert_eq!(u32_at(pvir, 52), 0, "reserved");
    // Listed in the XSDT, after the VIOT and before the MCFG.
    let names: Vec<&str> = tables.blobs.iter().map(|b| b.name_str()).collect();
    assert_eq!(
        names,
        ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "VIOT", "PVIR", "MCFG"]
    );
    let xsdt = table(&tables, b"XSDT");
    let addr = tables.blob(b"PVIR").unwrap().addr;
    assert!((36..xsdt.len())
        .step_by(8)
        .any(|off| u64_at(xsdt, off) == addr));
    // Other flag values and counts are carried as given.
    let desc = PlatformDescription {
        pvir: Some(PvirDesc {
            register_base: 0x1_0000_0000,
            flags: PVIR_FLAG_PCI_SEGMENT0_ALL,
            max_handles: 1 << 16,
        }),
        ..pvir_desc()
    };
    let tables = build(&desc);
    let pvir = table(&tables, b"PVIR");
    assert_eq!(u64_at(pvir, 36), 0x1_0000_0000);
    assert_eq!(u32_at(pvir, 44), 0b10);
    assert_eq!(u32_at(pvir, 48), 0x1_0000);
    assert_eq!(sum(pvir), 0);
}

#[test]
fn pvir_leaves_the_other_tables_unchanged() {
    let with = build(&pvir_desc());
    let without = build(&PlatformDescription {
        pvir: None,
        ..pvir_desc()
    });
    assert!(without.blob(b"PVIR").is_none());
    for name in [b"DSDT", b"APIC", b"VIOT", b"MCFG"] {
        assert_eq!(
            table(&with, name),
            table(&without, name),
            "{}",
            std::str::from_utf8(name).unwrap()
        );
    }
    assert_eq!(
        table(&with, b"XSDT").len(),
        table(&without, b"XSDT").len() + 8
    );
}

#[test]
fn pvir_description_is_checked() {
    let err = |pvir: PvirDesc, dmar: bool| {
        let mut desc = pvir_desc();
        desc.pvir = Some(pvir);
        if dmar {
            desc.dmar = full_desc().dmar;
        }
        build_acpi(&desc, REGION_START, REGION_SIZE).unwrap_err()
    };
    assert_eq!(err(PVIR, true), AcpiError::DmarAndPvir);
    for base in [0, 0xFED9_2004, 0xFED9_2800] {
        let pvir = PvirDesc {
            register_base: base,
            ..PVIR
        };
        assert_eq!(err(pvir, false), AcpiError::InvalidPvirBase(base));
    }
    for flags in [1 << 2, 1 << 31, !0] {
        let pvir = PvirDesc { flags, ..PVIR };
        assert_eq!(err(pvir, false), AcpiError::InvalidPvirFlags(flags));
    }
    for max_handles in [0, (1 << 16) + 1, u32::MAX] {
        let pvir = PvirDesc {
            max_handles,
            ..PVIR
        };
        assert_eq!(err(pvir, false), AcpiError::InvalidPvirHandles(max_handles));
    }
    // Its page must not overlap another MMIO range.
    let pvir = PvirDesc {
        register_base: 0xFEC0_0000,
        ..PVIR
    };
    assert!(matches!(
        err(pvir, false),
        AcpiError::MmioOverlap {
            first: "IOAPIC",
            second: "PVIR",
            ..
        } | AcpiError::MmioOverlap {
            first: "PVIR",
            second: "IOAPIC",
            ..
        }
    ));
}

#[test]
fn iasl_hex_dumps_the_unknown_pvir_table() {
    let tables = build(&pvir_desc());
    let dir = scratch_dir("pvir");
    disassemble_all(&tables, &dir);
    let pvir = std::fs::read_to_string(dir.join("PVIR.dsl")).expect("read PVIR.dsl");
    assert!(pvir.contains("\"PVIR\""), "PVIR.dsl:\n{pvir}");
    assert!(
        pvir.contains("00000038"),
        "length 56 in the header:\n{pvir}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
