//! The guest physical memory map and interrupt numbering: every fixed address lives here.
//!
//! ```text
//! 0x0000_0000 - 0x0009_FBFF  low RAM: GDT, page tables, zero page / PVH info, cmdline
//! 0x0009_FC00 - 0x000F_FFFF  reserved (MP table at 0x9_FC00, ACPI tables at 0xE_0000)
//! 0x0010_0000 - 0xBFFF_FFFF  RAM (kernel at 1 MiB, initrd at the top of low RAM)
//! 0xC000_0000 - 0xFFFF_FFFF  MMIO hole: PCI window, virtio-mmio windows, IOAPIC, DMAR,
//!                            power-off register (device-tree mode), LAPIC
//! 0x1_0000_0000 -            RAM above the hole
//! ```

/// Start of the GDT written for the boot vCPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) IDT written for the boot vCPU.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = PVH_INFO_START + 0x40;
/// PVH memory map table.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux zero page (`struct boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, then one PDPT, then one PD (first 1 GiB, 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept: Linux x86 `COMMAND_LINE_SIZE`.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// `setup_data` chain of the 64-bit boot protocol (`boot_params.hdr.setup_data`): in
/// device-tree mode one `SETUP_DTB` entry, page-aligned in low RAM.
pub const SETUP_DATA_START: u64 = 0x30000;
/// Most bytes of the `setup_data` chain: Linux maps a `SETUP_DTB` entry with one
/// `early_memremap`, at most 256 KiB (arch/x86/kernel/devicetree.c).
pub const SETUP_DATA_MAX_SIZE: u64 = 0x40000;
/// Start of the extended BIOS data area: low RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// MP table (floating pointer, then the configuration table; `firmware_tables::mptable`):
/// at 639 KiB, the second place Linux scans, so its scan stops there. Reserved in the E820
/// map (from [`EBDA_START`]); at most [`MPTABLE_MAX_SIZE`] bytes, below the ACPI tables.
pub const MPTABLE_START: u64 = 639 * 1024;
/// Largest MP table: 16 + 44 + 20 per vCPU (254) + 8 per bus, IOAPIC, 24 pins, 2 LINTs.
pub const MPTABLE_MAX_SIZE: u64 = 16 + 44 + 20 * 254 + 8 * 28;
/// ACPI tables region (RSDP first): the legacy BIOS area, not RAM in the E820 map.
pub const ACPI_START: u64 = 0xe0000;
/// Size of the ACPI tables region.
pub const ACPI_SIZE: u64 = 0x20000;
/// Start of high memory: the kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the MMIO hole below 4 GiB; RAM below the hole ends here (3 GiB).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End (exclusive) of the MMIO hole: RAM continues at 4 GiB.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Size of the MMIO hole.
pub const MMIO_HOLE_SIZE: u64 = MMIO_HOLE_END - MMIO_HOLE_START;

/// 32-bit PCI MMIO window (reserved for the PCI host bridge).
pub const PCI_MMIO_START: u64 = 0xc000_0000;
/// Size of the 32-bit PCI MMIO window.
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// virtio-mmio windows: the IOMMU first, then the endpoints; outside every PCI window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of the whole virtio-mmio area.
pub const VIRTIO_MMIO_SIZE: u64 = 0x100_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// PCI ECAM (MCFG) area.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM area.
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// ECAM bytes bus 0 uses (the only bus): what the MCFG and the bus decode.
pub const PCI_ECAM_BUS0_SIZE: u64 = 0x10_0000;
/// 64-bit PCI MMIO window, above the largest RAM (256 GiB + the 1 GiB hole shift) and
/// inside a 39-bit physical address space. Described in the host bridge's `_CRS`; the VMM
/// assigns BARs in the 32-bit window.
pub const PCI_MMIO64_START: u64 = 0x60_0000_0000;
/// Size of the 64-bit PCI MMIO window (ends at 512 GiB).
pub const PCI_MMIO64_SIZE: u64 = 0x20_0000_0000;
/// The legacy PCI configuration mechanism #1: address at 0xCF8, data at 0xCFC.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// Userspace IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Size of the IOAPIC register window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// DMAR-like interrupt-remapping unit registers.
pub const DMAR_START: u64 = 0xfed9_0000;
/// Size of the remapping unit's register window.
pub const DMAR_SIZE: u64 = 0x1000;
/// MMIO power-off register page for device-tree guests (`syscon-poweroff`), right after DMAR.
pub const POWEROFF_START: u64 = 0xfed9_1000;
/// Size of the power-off register window.
pub const POWEROFF_SIZE: u64 = 0x1000;
/// PV-IR (paravirtual interrupt remapping) register page, right after the power-off page
/// (docs/pv-irq-remap.md §2; the ACPI `PVIR` table points here).
pub const PVIR_START: u64 = 0xfed9_2000;
/// Size of the PV-IR register page.
pub const PVIR_SIZE: u64 = 0x1000;
/// Local APIC (in KVM) and the MSI doorbell window.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Size of the MSI doorbell window reserved in every endpoint's PROBE answer.
pub const MSI_WINDOW_SIZE: u64 = 0x10_0000;

/// IOAPIC ID (also in the MADT and the DMAR device scope).
pub const IOAPIC_ID: u8 = 0;
/// Requester ID (bus 0xFF, devfn 0, as QEMU's) of the IOAPIC's interrupts: the DMAR device
/// scope announces it and the interrupt router checks IRTEs against it. One value for both.
pub const IOAPIC_SOURCE_ID: u16 = 0xff00;
/// Number of IOAPIC pins; GSIs `0..IOAPIC_PINS` are the pins and are reserved for the
/// userspace IOAPIC when KVM's split irqchip is enabled.
pub const IOAPIC_PINS: u32 = 24;
/// First GSI handed out for MSI routes.
pub const GSI_MSI_START: u32 = IOAPIC_PINS;
/// Last GSI (inclusive): kvm-bindings' `KvmIrqRouting` holds at most 1024 entries.
pub const GSI_MSI_END: u32 = 1023;

/// COM1 16550 UART base port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1 IRQ (an IOAPIC pin).
pub const SERIAL_IRQ: u32 = 4;
/// First IOAPIC pin for virtio-mmio devices; each device gets one pin, edge-triggered.
pub const VIRTIO_IRQ_START: u32 = 5;
/// i8042 keyboard controller command port (only its CPU-reset command is modelled).
pub const I8042_PORT: u16 = 0x60;
/// ACPI hardware-reduced power management registers (reset, sleep control, sleep status).
pub const PM_PORT: u16 = 0x600;
/// Marker register (4 ports, `devices::marker`): a guest write of a 32-bit mark ID snapshots
/// the VMM's counters; mark 1 is "init reached" (boot time). Not described by any firmware
/// table: only the test guest's agent knows it.
pub const MARKER_PORT: u16 = 0x640;
/// Ports the marker register occupies.
pub const MARKER_PORT_LEN: u16 = 4;

/// Smallest guest memory we accept: the kernel, its initrd and the early allocator must fit.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest guest memory we accept (256 GiB): well inside a 39-bit guest physical address
/// space, the smallest that current CPUs report.
pub const MAX_MEMORY: u64 = 256 << 30;
/// Most vCPUs: APIC IDs must fit an xAPIC MADT entry and an 8-bit MSI destination.
pub const MAX_CPUS: u32 = 254;

/// Guest RAM as `(start, size)` ranges for `size` bytes of memory: below the MMIO hole
/// first, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

/// Base of the `index`-th virtio-mmio window.
pub fn virtio_mmio_base(index: u32) -> Option<u64> {
    let off = u64::from(index).checked_mul(VIRTIO_MMIO_WINDOW)?;
    (off < VIRTIO_MMIO_SIZE).then_some(VIRTIO_MMIO_START + off)
}

/// IOAPIC pin of the `index`-th virtio-mmio device.
pub fn virtio_mmio_irq(index: u32) -> Option<u32> {
    let irq = VIRTIO_IRQ_START.checked_add(index)?;
    (irq < IOAPIC_PINS).then_some(irq)
}

// Relations between the constants, checked at compile time.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
const _: () = assert!(ACPI_START >= EBDA_START && ACPI_START + ACPI_SIZE == HIMEM_START);
const _: () =
    assert!(MPTABLE_START == EBDA_START && MPTABLE_START + MPTABLE_MAX_SIZE <= ACPI_START);
const _: () = assert!(SERIAL_IRQ < VIRTIO_IRQ_START && VIRTIO_IRQ_START < IOAPIC_PINS);
const _: () = assert!(GSI_MSI_START == IOAPIC_PINS && GSI_MSI_END < 1024);
const _: () = assert!(MIN_MEMORY < MMIO_HOLE_START && MAX_MEMORY > MMIO_HOLE_END);
const _: () = assert!(
    SETUP_DATA_START.is_multiple_of(0x1000)
        && SETUP_DATA_START >= CMDLINE_START + CMDLINE_MAX_SIZE as u64
        && SETUP_DATA_START + SETUP_DATA_MAX_SIZE <= EBDA_START
);
// The power-off page: outside the virtio-mmio area and the PCI windows, below the LAPIC.
const _: () = assert!(
    POWEROFF_START.is_multiple_of(0x1000)
        && POWEROFF_START >= VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE
        && POWEROFF_START >= PCI_ECAM_START + PCI_ECAM_SIZE
        && POWEROFF_START + POWEROFF_SIZE <= LAPIC_START
);
// The PV-IR page: after the DMAR and power-off pages, outside the PCI windows, below the LAPIC.
const _: () = assert!(
    PVIR_START.is_multiple_of(0x1000)
        && PVIR_START >= DMAR_START + DMAR_SIZE
        && PVIR_START >= POWEROFF_START + POWEROFF_SIZE
        && PVIR_START >= PCI_ECAM_START + PCI_ECAM_SIZE
        && PVIR_START + PVIR_SIZE <= LAPIC_START
);
const _: () = assert!(MMIO_HOLE_END + MAX_MEMORY <= PCI_MMIO64_START);
const _: () = assert!(PCI_MMIO64_START + PCI_MMIO64_SIZE <= 1 << 39);
const _: () = assert!(PCI_ECAM_BUS0_SIZE <= PCI_ECAM_SIZE);

#[cfg(test)]
mod tests {
    use super::*;

    fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.0 + b.1 && b.0 < a.0 + a.1
    }

    #[test]
    fn low_memory_structures_do_not_overlap() {
        let regions = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x20),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (SETUP_DATA_START, SETUP_DATA_MAX_SIZE),
        ];
        for (i, a) in regions.iter().enumerate() {
            assert!(a.0 + a.1 <= EBDA_START, "{a:x?} is above low RAM");
            for b in &regions[i + 1..] {
                assert!(!overlaps(*a, *b), "{a:x?} overlaps {b:x?}");
            }
        }
    }

    #[test]
    fn mmio_regions_sit_in_the_hole_and_do_not_overlap() {
        let regions = [
            (PCI_MMIO_START, PCI_MMIO_SIZE),
            (VIRTIO_MMIO_START, VIRTIO_MMIO_SIZE),
            (PCI_ECAM_START, PCI_ECAM_SIZE),
            (IOAPIC_START, IOAPIC_SIZE),
            (DMAR_START, DMAR_SIZE),
            (PVIR_START, PVIR_SIZE),
            (POWEROFF_START, POWEROFF_SIZE),
            (LAPIC_START, MSI_WINDOW_SIZE),
        ];
        for (i, a) in regions.iter().enumerate() {
            assert!(a.0 >= MMIO_HOLE_START && a.0 + a.1 <= MMIO_HOLE_END);
            for b in &regions[i + 1..] {
                assert!(!overlaps(*a, *b), "{a:x?} overlaps {b:x?}");
            }
        }
        assert_eq!(ACPI_START + ACPI_SIZE, HIMEM_START);
    }

    #[test]
    fn ram_ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, 1 << 30)]);
        assert_eq!(r.iter().map(|r| r.1).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn virtio_windows_and_irqs_are_bounded() {
        assert_eq!(virtio_mmio_base(0), Some(VIRTIO_MMIO_START));
        assert_eq!(virtio_mmio_base(1), Some(VIRTIO_MMIO_START + 0x1000));
        assert_eq!(virtio_mmio_base(4096), None);
        assert_eq!(virtio_mmio_irq(0), Some(VIRTIO_IRQ_START));
        assert_eq!(virtio_mmio_irq(IOAPIC_PINS - VIRTIO_IRQ_START), None);
    }
}
