//! Decompiles every generated table with ACPICA's `iasl -d` (Debian package `acpica-tools`).
//!
//! A missing `iasl` fails the test: CI has it, and a silent pass would hide broken tables.

use std::path::{Path, PathBuf};
use std::process::Command;

use firmware_tables::{
    build_acpi, AcpiTables, DmarDesc, IoapicDesc, PlatformDescription, PmDesc, SerialDesc,
    VirtioMmioDesc, DEFAULT_IOAPIC_SOURCE_ID,
};

fn mmio(base: u64, irq: u32, endpoint_id: Option<u32>) -> VirtioMmioDesc {
    VirtioMmioDesc {
        base,
        size: 0x1000,
        irq,
        endpoint_id,
    }
}

fn with_iommu() -> PlatformDescription {
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
        pm: PmDesc { io_base: 0x600 },
        virtio_mmio: vec![mmio(0xD000_1000, 6, Some(1)), mmio(0xD000_2000, 7, Some(2))],
        iommu: Some(mmio(0xD000_0000, 5, None)),
        dmar: Some(DmarDesc {
            register_base: 0xFED9_0000,
            ioapic_id: 0,
            ioapic_source_id: DEFAULT_IOAPIC_SOURCE_ID,
        }),
    }
}

fn without_iommu() -> PlatformDescription {
    PlatformDescription {
        virtio_mmio: vec![mmio(0xD000_1000, 6, None), mmio(0xD000_2000, 7, None)],
        iommu: None,
        dmar: None,
        ..with_iommu()
    }
}

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
    let tables = build_acpi(&with_iommu(), 0xE_0000, 0x2_0000).expect("valid description");
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
    let tables = build_acpi(&without_iommu(), 0xE_0000, 0x2_0000).expect("valid description");
    let dir = scratch_dir("plain");
    let dsdt = disassemble_all(&tables, &dir);
    for needle in ["LNRO0005", "PNP0501", "_S5_"] {
        assert!(dsdt.contains(needle), "DSDT.dsl lacks {needle}:\n{dsdt}");
    }
    assert!(!dir.join("VIOT.dat").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
