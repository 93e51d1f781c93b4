use std::collections::BTreeMap;
use std::process::Command;

use super::*;
use crate::{build_acpi, DmarDesc, IoapicDesc, PmDesc, SerialDesc, DEFAULT_IOAPIC_SOURCE_ID};

// ---- A small DTB reader (devicetree specification v0.4, chapter 5), for the checks. ----

const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

#[derive(Debug, Default)]
struct Node {
    name: String,
    props: BTreeMap<String, Vec<u8>>,
    children: Vec<Node>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

/// Parses a DTB; panics (this is a test) on anything malformed.
fn parse(dtb: &[u8]) -> Node {
    assert_eq!(be32(dtb, 0), FDT_MAGIC, "bad magic");
    assert_eq!(be32(dtb, 4) as usize, dtb.len(), "totalsize");
    assert_eq!(be32(dtb, 20), 17, "version");
    let (off_struct, off_strings) = (be32(dtb, 8) as usize, be32(dtb, 12) as usize);
    let (size_strings, size_struct) = (be32(dtb, 32) as usize, be32(dtb, 36) as usize);
    assert!(off_struct + size_struct <= dtb.len() && off_strings + size_strings <= dtb.len());
    // Memory reservation block: must be just the terminating empty entry.
    let rsv = be32(dtb, 16) as usize;
    assert_eq!(&dtb[rsv..rsv + 16], &[0u8; 16], "no memory reservations");
    let strings = &dtb[off_strings..off_strings + size_strings];
    let string_at = |off: usize| {
        let end = strings[off..].iter().position(|&c| c == 0).unwrap();
        String::from_utf8(strings[off..off + end].to_vec()).unwrap()
    };
    let s = &dtb[off_struct..off_struct + size_struct];
    let mut pos = 0;
    let mut stack: Vec<Node> = Vec::new();
    let mut root = None;
    loop {
        let token = be32(s, pos);
        pos += 4;
        match token {
            FDT_BEGIN_NODE => {
                let end = s[pos..].iter().position(|&c| c == 0).unwrap();
                let name = String::from_utf8(s[pos..pos + end].to_vec()).unwrap();
                pos = (pos + end + 1).next_multiple_of(4);
                stack.push(Node {
                    name,
                    ..Default::default()
                });
            }
            FDT_END_NODE => {
                let node = stack.pop().expect("END_NODE without BEGIN_NODE");
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => root = Some(node),
                }
            }
            FDT_PROP => {
                let (len, nameoff) = (be32(s, pos) as usize, be32(s, pos + 4) as usize);
                pos += 8;
                let value = s[pos..pos + len].to_vec();
                pos = (pos + len).next_multiple_of(4);
                let node = stack.last_mut().expect("property outside a node");
                assert!(
                    node.props.insert(string_at(nameoff), value).is_none(),
                    "duplicate property"
                );
            }
            FDT_NOP => {}
            FDT_END => break,
            t => panic!("bad token {t:#x}"),
        }
    }
    assert!(stack.is_empty(), "unclosed node");
    root.expect("no root node")
}

impl Node {
    fn child(&self, name: &str) -> &Node {
        self.children
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no node {name} under {:?}", self.name))
    }
    fn find(&self, path: &str) -> &Node {
        path.trim_start_matches('/')
            .split('/')
            .filter(|p| !p.is_empty())
            .fold(self, |n, p| n.child(p))
    }
    fn prop(&self, name: &str) -> &[u8] {
        self.props
            .get(name)
            .unwrap_or_else(|| panic!("{} has no {name}", self.name))
    }
    fn has(&self, name: &str) -> bool {
        self.props.contains_key(name)
    }
    fn cells(&self, name: &str) -> Vec<u32> {
        let v = self.prop(name);
        assert_eq!(v.len() % 4, 0, "{name} is not a cell list");
        v.chunks(4).map(|c| be32(c, 0)).collect()
    }
    fn u32(&self, name: &str) -> u32 {
        let c = self.cells(name);
        assert_eq!(c.len(), 1, "{name}");
        c[0]
    }
    fn str(&self, name: &str) -> &str {
        let v = self.prop(name);
        assert_eq!(v.last(), Some(&0), "{name} is not a string");
        std::str::from_utf8(&v[..v.len() - 1]).unwrap()
    }
    /// `reg` of a node under a 2/2-cell parent as (base, size) pairs.
    fn reg64(&self) -> Vec<(u64, u64)> {
        let c = self.cells("reg");
        assert_eq!(c.len() % 4, 0);
        c.chunks(4)
            .map(|c| {
                (
                    u64::from(c[0]) << 32 | u64::from(c[1]),
                    u64::from(c[2]) << 32 | u64::from(c[3]),
                )
            })
            .collect()
    }
    /// Every node in the tree with its path.
    fn walk<'a>(&'a self, path: &str, out: &mut Vec<(String, &'a Node)>) {
        out.push((path.to_owned(), self));
        for c in &self.children {
            c.walk(&format!("{}/{}", path.trim_end_matches('/'), c.name), out);
        }
    }
    fn by_phandle(&self, phandle: u32) -> &Node {
        let mut all = Vec::new();
        self.walk("/", &mut all);
        let hits: Vec<_> = all
            .into_iter()
            .filter(|(_, n)| n.has("phandle") && n.u32("phandle") == phandle)
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "phandle {phandle} must name exactly one node"
        );
        hits[0].1
    }
}

// ---- Descriptions ----

fn mmio(base: u64, irq: u32, endpoint_id: Option<u32>) -> VirtioMmioDesc {
    VirtioMmioDesc {
        base,
        size: 0x1000,
        irq,
        endpoint_id,
    }
}

/// 2 vCPUs, serial, a virtio-iommu with one endpoint behind it and one disk that bypasses it.
fn desc() -> PlatformDescription {
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
        virtio_mmio: vec![mmio(0xD000_1000, 6, Some(1)), mmio(0xD000_2000, 7, None)],
        iommu: Some(mmio(0xD000_0000, 5, None)),
        dmar: None,
        pvir: None,
        pci: None,
    }
}

const POWEROFF: PowerOffDesc = PowerOffDesc {
    base: 0xFED9_1000,
    size: 0x1000,
    offset: 0,
    value: 1,
};

fn build(desc: &PlatformDescription) -> Node {
    parse(&build_fdt(desc, Some(&POWEROFF)).expect("valid description"))
}

/// (endpoint ID, window base) of every VIOT MMIO endpoint node (type 2) for `desc`.
fn viot_endpoints(desc: &PlatformDescription) -> Vec<(u32, u64)> {
    let tables = build_acpi(desc, 0xE_0000, 0x2_0000).unwrap();
    let viot = &tables.blob(b"VIOT").expect("VIOT").bytes;
    let u16_at = |o: usize| u16::from_le_bytes([viot[o], viot[o + 1]]) as usize;
    let (count, mut off) = (u16_at(36), u16_at(38));
    let mut eps = Vec::new();
    for _ in 0..count {
        if viot[off] == 2 {
            eps.push((
                u32::from_le_bytes(viot[off + 4..off + 8].try_into().unwrap()),
                u64::from_le_bytes(viot[off + 8..off + 16].try_into().unwrap()),
            ));
        }
        off += u16_at(off + 2);
    }
    eps
}

// ---- The tree ----

#[test]
fn root_has_compatible_cells_and_the_ioapic_as_interrupt_parent() {
    let root = build(&desc());
    assert_eq!(root.name, "");
    assert_eq!(root.str("compatible"), ROOT_COMPATIBLE);
    assert_eq!(
        (root.u32("#address-cells"), root.u32("#size-cells")),
        (2, 2)
    );
    let parent = root.by_phandle(root.u32("interrupt-parent"));
    assert_eq!(parent.str("compatible"), "intel,ce4100-ioapic");
    assert!(parent.has("interrupt-controller"));
    assert_eq!(parent.u32("#interrupt-cells"), 2);
    assert_eq!(parent.reg64(), vec![(0xFEC0_0000, 0x1000)]);
}

#[test]
fn cpus_are_numbered_by_apic_id() {
    let root = build(&PlatformDescription {
        num_cpus: 3,
        ..desc()
    });
    let cpus = root.child("cpus");
    assert_eq!(
        (cpus.u32("#address-cells"), cpus.u32("#size-cells")),
        (1, 0)
    );
    let regs: Vec<_> = cpus
        .children
        .iter()
        .map(|c| (c.name.as_str(), c.u32("reg")))
        .collect();
    assert_eq!(regs, vec![("cpu@0", 0), ("cpu@1", 1), ("cpu@2", 2)]);
    assert!(cpus.children.iter().all(|c| c.str("device_type") == "cpu"));
}

#[test]
fn lapic_is_in_virtual_wire_mode_at_the_madt_address() {
    let root = build(&desc());
    let lapic = root.child("interrupt-controller@fee00000");
    assert_eq!(lapic.str("compatible"), "intel,ce4100-lapic");
    assert_eq!(lapic.reg64(), vec![(u64::from(LAPIC_ADDR), 0x1000)]);
    assert!(lapic.has("intel,virtual-wire-mode") && lapic.has("interrupt-controller"));
}

#[test]
fn serial_is_an_isa_io_port_with_edge_interrupt_and_the_stdout_path() {
    let root = build(&desc());
    let isa = root.child("isa@0");
    assert_eq!(isa.str("compatible"), "isa");
    assert_eq!((isa.u32("#address-cells"), isa.u32("#size-cells")), (2, 1));
    // <I/O 0> (child, 2 cells) -> <0 0> (root, 2 cells), 64 KiB (child size, 1 cell).
    assert_eq!(isa.cells("ranges"), vec![1, 0, 0, 0, 0x1_0000]);
    let uart = isa.child("serial@i3f8");
    assert_eq!(uart.str("compatible"), "ns16550a");
    assert_eq!(uart.cells("reg"), vec![1, 0x3F8, 8]);
    assert_eq!(uart.cells("interrupts"), vec![4, IRQ_TYPE_EDGE_RISING]);
    assert_eq!(uart.u32("clock-frequency"), SERIAL_CLOCK_HZ);
    // stdout-path -> alias -> the UART node.
    let stdout = root.child("chosen").str("stdout-path");
    let (alias, options) = stdout.split_once(':').unwrap();
    assert_eq!(options, "115200n8");
    let path = root.child("aliases").str(alias);
    assert!(std::ptr::eq(root.find(path), uart), "{path}");
}

#[test]
fn without_serial_there_is_no_isa_node_and_no_stdout_path() {
    let root = build(&PlatformDescription {
        serial: None,
        ..desc()
    });
    assert!(root
        .children
        .iter()
        .all(|c| !["isa@0", "chosen", "aliases"].contains(&c.name.as_str())));
}

#[test]
fn iommu_and_endpoints_match_the_viot() {
    let d = desc();
    let root = build(&d);
    let iommu = root.child("iommu@d0000000");
    assert_eq!(iommu.str("compatible"), "virtio,mmio");
    assert_eq!(iommu.reg64(), vec![(0xD000_0000, 0x1000)]);
    assert_eq!(iommu.cells("interrupts"), vec![5, IRQ_TYPE_EDGE_RISING]);
    assert_eq!(iommu.u32("#iommu-cells"), 1);
    assert!(!iommu.has("iommus"));

    // Every endpoint with `iommus` names the IOMMU node and the ID the VIOT gives its base.
    let mut from_dt = Vec::new();
    for dev in root
        .children
        .iter()
        .filter(|c| c.name.starts_with("virtio_mmio@"))
    {
        assert_eq!(dev.str("compatible"), "virtio,mmio");
        assert!(dev.has("dma-coherent"));
        let (base, size) = dev.reg64()[0];
        let planned = d.virtio_mmio.iter().find(|m| m.base == base).unwrap();
        assert_eq!(size, planned.size);
        assert_eq!(
            dev.cells("interrupts"),
            vec![planned.irq, IRQ_TYPE_EDGE_RISING]
        );
        assert_eq!(dev.name, format!("virtio_mmio@{base:x}"));
        if dev.has("iommus") {
            let spec = dev.cells("iommus");
            assert_eq!(spec.len(), 2, "one #iommu-cells cell");
            assert!(std::ptr::eq(root.by_phandle(spec[0]), iommu));
            from_dt.push((spec[1], base));
        } else {
            assert_eq!(planned.endpoint_id, None, "{} lost its iommus", dev.name);
        }
    }
    assert_eq!(from_dt, viot_endpoints(&d));
    assert_eq!(from_dt, vec![(1, 0xD000_1000)]);
    // Tree order: the IOMMU before its endpoints.
    let names: Vec<_> = root.children.iter().map(|c| c.name.as_str()).collect();
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(pos("iommu@d0000000") < pos("virtio_mmio@d0001000"));
}

#[test]
fn without_iommu_no_endpoint_has_iommus() {
    let root = build(&PlatformDescription {
        virtio_mmio: vec![mmio(0xD000_0000, 5, None)],
        iommu: None,
        ..desc()
    });
    let mut all = Vec::new();
    root.walk("/", &mut all);
    assert!(all
        .iter()
        .all(|(_, n)| !n.has("iommus") && !n.has("#iommu-cells")));
    assert!(root.child("virtio_mmio@d0000000").has("interrupts"));
}

#[test]
fn poweroff_pair_names_the_syscon_register() {
    let root = build(&desc());
    let off = root.child("poweroff");
    assert_eq!(off.str("compatible"), "syscon-poweroff");
    assert_eq!((off.u32("offset"), off.u32("value")), (0, 1));
    let syscon = root.by_phandle(off.u32("regmap"));
    assert_eq!(syscon.name, "syscon@fed91000");
    assert_eq!(syscon.str("compatible"), "syscon");
    assert_eq!(syscon.reg64(), vec![(0xFED9_1000, 0x1000)]);
    let none = parse(&build_fdt(&desc(), None).unwrap());
    assert!(none.children.iter().all(|c| c.name != "poweroff"));
}

#[test]
fn phandles_are_unique_and_every_reference_resolves() {
    let root = build(&desc());
    let mut all = Vec::new();
    root.walk("/", &mut all);
    let mut refs = vec![root.u32("interrupt-parent")];
    for (_, n) in &all {
        if n.has("iommus") {
            refs.push(n.cells("iommus")[0]);
        }
        if n.has("regmap") {
            refs.push(n.u32("regmap"));
        }
    }
    assert_eq!(refs.len(), 3);
    for r in refs {
        root.by_phandle(r); // exactly one node
    }
}

// ---- Bad descriptions are refused, never panicked on ----

#[test]
fn interrupt_remapping_is_refused() {
    let d = PlatformDescription {
        dmar: Some(DmarDesc {
            register_base: 0xFED9_0000,
            ioapic_id: 0,
            ioapic_source_id: DEFAULT_IOAPIC_SOURCE_ID,
        }),
        ..desc()
    };
    assert_eq!(build_fdt(&d, None), Err(FdtError::InterruptRemapping));
    // PV-IR is enumerated by an ACPI table too.
    let d = PlatformDescription {
        pvir: Some(crate::PvirDesc {
            register_base: 0xFED9_2000,
            flags: crate::PVIR_FLAG_IOAPIC_ALL,
            max_handles: 256,
        }),
        ..desc()
    };
    assert_eq!(build_fdt(&d, None), Err(FdtError::InterruptRemapping));
}

#[test]
fn descriptions_the_acpi_builder_refuses_are_refused() {
    let cases = [
        PlatformDescription {
            num_cpus: 0,
            ..desc()
        },
        PlatformDescription {
            num_cpus: 255,
            ..desc()
        },
        PlatformDescription {
            virtio_mmio: vec![mmio(0xD000_0000, 6, Some(1))],
            ..desc()
        },
        PlatformDescription {
            virtio_mmio: vec![mmio(0xD000_1000, 5, Some(1))],
            ..desc()
        },
        PlatformDescription {
            virtio_mmio: vec![mmio(0xD000_1000, 6, Some(1)), mmio(0xD000_2000, 7, Some(1))],
            ..desc()
        },
        PlatformDescription {
            iommu: None,
            ..desc()
        },
        PlatformDescription {
            virtio_mmio: vec![mmio(u64::MAX - 0xfff, 6, None)],
            ..desc()
        },
    ];
    for d in cases {
        let err = build_fdt(&d, Some(&POWEROFF)).unwrap_err();
        assert!(matches!(err, FdtError::Platform(_)), "{err:?} for {d:?}");
        assert_eq!(
            err,
            FdtError::Platform(build_acpi(&d, 0xE_0000, 0x2_0000).unwrap_err())
        );
    }
}

#[test]
fn dt_only_rules_are_enforced() {
    let d = PlatformDescription {
        ioapic: IoapicDesc {
            gsi_base: 8,
            ..desc().ioapic
        },
        ..desc()
    };
    assert_eq!(build_fdt(&d, None), Err(FdtError::IoapicGsiBase(8)));
    let d = PlatformDescription {
        virtio_mmio: vec![mmio(0xD000_1000, 24, Some(1))],
        ..desc()
    };
    assert_eq!(build_fdt(&d, None), Err(FdtError::IrqOutOfRange(24)));
    for bad in [
        PowerOffDesc {
            size: 0,
            ..POWEROFF
        },
        PowerOffDesc {
            base: 0xFED9_1004,
            ..POWEROFF
        },
        PowerOffDesc {
            offset: 2,
            ..POWEROFF
        },
        PowerOffDesc {
            offset: 0xffc + 4,
            ..POWEROFF
        },
        PowerOffDesc {
            base: !0xfff_u64,
            ..POWEROFF
        },
    ] {
        assert!(
            matches!(
                build_fdt(&desc(), Some(&bad)),
                Err(FdtError::InvalidPowerOff { .. })
            ),
            "{bad:?}"
        );
    }
    for (base, what) in [
        (0xFEC0_0000, "IOAPIC"),
        (0xFEE0_0000, "LAPIC"),
        (0xD000_0000, "virtio-iommu"),
        (0xD000_2000, "virtio-mmio"),
    ] {
        let p = PowerOffDesc { base, ..POWEROFF };
        assert!(
            matches!(
                build_fdt(&desc(), Some(&p)),
                Err(FdtError::PowerOffOverlap { what: w, .. }) if w == what
            ),
            "{base:#x}"
        );
    }
}

// ---- `dtc -I dtb -O dts` (Debian package device-tree-compiler) decompiles it cleanly. ----
// A missing `dtc` fails the test: CI has it, and a silent pass would hide a broken tree.

/// Decompiles `dtb` with dtc; returns the source. Panics on failure or on any warning.
fn dtc_decompile(dtb: &[u8]) -> String {
    let path = std::env::temp_dir().join(format!("fw-tables-dtc-{}.dtb", std::process::id()));
    std::fs::write(&path, dtb).unwrap();
    let out = Command::new("dtc")
        .args(["-I", "dtb", "-O", "dts"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "\n\n*** cannot run `dtc` ({e}). Install the device-tree compiler: \
                 `apt-get install device-tree-compiler`. CI has it; this test never passes \
                 without it. ***\n\n"
            )
        });
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dtc failed: {stderr}");
    assert!(stderr.trim().is_empty(), "dtc warnings:\n{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn dtc_decompiles_the_tree_without_warnings() {
    let dts = dtc_decompile(&build_fdt(&desc(), Some(&POWEROFF)).unwrap());
    for needle in [
        "compatible = \"vmm,x86-virt\";",
        "iommu@d0000000 {",
        "#iommu-cells = <0x01>;",
        "virtio_mmio@d0001000 {",
        "iommus = <0x02 0x01>;",
        "serial@i3f8 {",
        "compatible = \"syscon-poweroff\";",
    ] {
        assert!(dts.contains(needle), "{needle:?} missing from\n{dts}");
    }
}
