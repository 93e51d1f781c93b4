//! The device tree (DTB) for the same platform, for x86 Linux booted with `SETUP_DTB`.
//!
//! Built with `vm-fdt` from the [`PlatformDescription`] the ACPI tables come from, after the
//! same validation ([`crate::acpi`]'s rules), so the two descriptions cannot disagree: the
//! VIOT's endpoint IDs are the `iommus` specifiers here, the MADT's IOAPIC and LAPIC are the
//! `intel,ce4100-*` nodes, the DSDT's `LNRO0005` windows and interrupts are the `virtio,mmio`
//! nodes. Layout (what Linux 6.12's arch/x86/kernel/devicetree.c and drivers/of/ parse):
//!
//! ```text
//! / { compatible = "vmm,x86-virt"; #address-cells = <2>; #size-cells = <2>;
//!     interrupt-parent = <&ioapic>;
//!     chosen { stdout-path = "serial0:115200n8"; };
//!     aliases { serial0 = "/isa@0/serial@i3f8"; };
//!     cpus { cpu@N { device_type = "cpu"; reg = <APIC ID>; }; };
//!     interrupt-controller@fee00000 { compatible = "intel,ce4100-lapic"; ... };
//!     ioapic: interrupt-controller@fec00000 { compatible = "intel,ce4100-ioapic";
//!                                             #interrupt-cells = <2>; ... };
//!     isa@0 { compatible = "isa"; ranges = <I/O 0..64K>;
//!           serial@i3f8 { compatible = "ns16550a"; reg = <1 0x3f8 8>; interrupts = <4 3>; }; };
//!     viommu: iommu@d0000000 { compatible = "virtio,mmio"; #iommu-cells = <1>; ... };
//!     virtio_mmio@d0001000 { compatible = "virtio,mmio"; iommus = <&viommu 1>; ... };
//!     pmctl: syscon@fed91000 { compatible = "syscon"; reg = <...>; };
//!     poweroff { compatible = "syscon-poweroff"; regmap = <&pmctl>; offset; value; };
//! };
//! ```
//!
//! Interrupt specifiers are `<pin type>`, type 3 = edge rising / active high (devicetree.c
//! `of_ioapic_type`), like the ACPI descriptions (every device interrupt is edge, active high).
//! The tree has nothing for interrupt remapping (no DT binding for VT-d on x86): a description
//! with a DMAR unit is refused.

#[cfg(test)]
mod tests;

use vm_fdt::FdtWriter;

use crate::acpi::{self, AcpiError, LAPIC_ADDR, REG_PAGE_SIZE, SERIAL_IO_LEN};
use crate::{PlatformDescription, VirtioMmioDesc};

/// Root `compatible`: Linux only parses the tree's CPUs and interrupt controllers when the
/// root has one (include/linux/of.h `of_have_populated_dt`).
pub const ROOT_COMPATIBLE: &str = "vmm,x86-virt";
/// Pins of the IOAPIC (its interrupt specifiers name pins, not GSIs).
pub const IOAPIC_PINS: u32 = 24;
/// Interrupt type cell: edge-triggered, rising (active high).
pub const IRQ_TYPE_EDGE_RISING: u32 = 3;
/// Input clock of the 16550 (the standard 1.8432 MHz): Linux's 8250_of needs it, there is no
/// clock provider.
pub const SERIAL_CLOCK_HZ: u32 = 1_843_200;
/// `phandle` of the IOAPIC node (the root's `interrupt-parent`).
pub const PHANDLE_IOAPIC: u32 = 1;
/// `phandle` of the virtio-iommu node (what every `iommus` names).
pub const PHANDLE_IOMMU: u32 = 2;
/// `phandle` of the power-off syscon node.
pub const PHANDLE_POWEROFF_SYSCON: u32 = 3;
/// The ISA bridge node: its base name must be `isa`; the unit address is its `ranges` base.
const ISA_NODE: &str = "isa@0";
/// Width of the power-off register: syscon's default `reg-io-width`.
const POWEROFF_REG_WIDTH: u64 = 4;

/// A 32-bit MMIO register that powers the machine off when `value` is written at `offset`,
/// described as a `syscon` + `syscon-poweroff` pair (Linux drivers/power/reset/
/// syscon-poweroff.c: a 32-bit read, then a write of `value`; the register must not read back
/// `value`). The DT counterpart of the ACPI PM registers ([`crate::PmDesc`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerOffDesc {
    /// Guest-physical base of the register window (4 KiB aligned).
    pub base: u64,
    /// Window size in bytes (normally 0x1000).
    pub size: u64,
    /// Offset of the register in the window (4-byte aligned).
    pub offset: u32,
    /// Value that requests power-off.
    pub value: u32,
}

/// Errors from [`build_fdt`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FdtError {
    /// The description breaks a rule the ACPI tables have too.
    #[error("Invalid platform description")]
    Platform(#[from] AcpiError),
    /// The description has an interrupt-remapping unit (DMAR or PV-IR), which only ACPI can
    /// describe.
    #[error(
        "Interrupt remapping needs the ACPI DMAR or PVIR table; a device tree cannot describe it"
    )]
    InterruptRemapping,
    /// The description has a PCI host bridge: x86 Linux ignores DT PCI hosts and `iommu-map`.
    #[error("PCI devices cannot be described by the device tree on x86")]
    Pci,
    /// The IOAPIC does not start at GSI 0: DT interrupt specifiers name its pins.
    #[error("IOAPIC GSI base {0} is not supported in a device tree (must be 0)")]
    IoapicGsiBase(u32),
    /// An interrupt is not one of the IOAPIC's pins.
    #[error("IRQ {0} is not an IOAPIC pin (0..{IOAPIC_PINS})")]
    IrqOutOfRange(u32),
    /// The power-off window is empty, unaligned or does not hold its register.
    #[error("Invalid power-off register window at {base:#x} (size {size:#x}, offset {offset:#x})")]
    InvalidPowerOff {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
        /// Register offset.
        offset: u32,
    },
    /// The power-off window overlaps another MMIO range.
    #[error("Power-off register window at {base:#x} overlaps {what} at {other_base:#x}")]
    PowerOffOverlap {
        /// Power-off window base.
        base: u64,
        /// What it overlaps.
        what: &'static str,
        /// Base of that range.
        other_base: u64,
    },
    /// vm-fdt refused the tree.
    #[error("Cannot write the device tree")]
    Writer(#[from] vm_fdt::Error),
}

/// Builds the DTB for `desc`, with the power-off register pair when `poweroff` is given.
///
/// Fails, without panicking, when the description is inconsistent (the ACPI builder's rules
/// plus the DT-only ones in [`FdtError`]).
pub fn build_fdt(
    desc: &PlatformDescription,
    poweroff: Option<&PowerOffDesc>,
) -> Result<Vec<u8>, FdtError> {
    validate(desc, poweroff)?;

    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", ROOT_COMPATIBLE)?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", PHANDLE_IOAPIC)?;

    if let Some(serial) = &desc.serial {
        let path = format!("/{ISA_NODE}/{}", serial_node_name(serial.io_base));
        let chosen = fdt.begin_node("chosen")?;
        fdt.property_string("stdout-path", "serial0:115200n8")?;
        fdt.end_node(chosen)?;
        let aliases = fdt.begin_node("aliases")?;
        fdt.property_string("serial0", &path)?;
        fdt.end_node(aliases)?;
    }

    // CPUs: `reg` is the local APIC ID (Documentation/devicetree/bindings/x86/ce4100.txt).
    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 1)?;
    fdt.property_u32("#size-cells", 0)?;
    for id in 0..desc.num_cpus {
        let cpu = fdt.begin_node(&format!("cpu@{id:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_u32("reg", id)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;

    // Local APIC: without `intel,virtual-wire-mode` Linux assumes PIC mode.
    let lapic = fdt.begin_node(&format!("interrupt-controller@{LAPIC_ADDR:x}"))?;
    fdt.property_string("compatible", "intel,ce4100-lapic")?;
    fdt.property_array_u64("reg", &[u64::from(LAPIC_ADDR), REG_PAGE_SIZE])?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 2)?;
    fdt.property_u32("#address-cells", 0)?;
    fdt.property_null("intel,virtual-wire-mode")?;
    fdt.end_node(lapic)?;

    let address = u64::from(desc.ioapic.address);
    let ioapic = fdt.begin_node(&format!("interrupt-controller@{address:x}"))?;
    fdt.property_string("compatible", "intel,ce4100-ioapic")?;
    fdt.property_array_u64("reg", &[address, REG_PAGE_SIZE])?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 2)?;
    fdt.property_u32("#address-cells", 0)?;
    fdt.property_phandle(PHANDLE_IOAPIC)?;
    fdt.end_node(ioapic)?;

    // The UART sits under a node named `isa` (drivers/of/address.c `of_bus_isa_match`, which
    // compares the name before the `@`; the unit address keeps dtc quiet about `ranges`), whose
    // addresses are <space offset>, space bit 0 = I/O, mapped 1:1 onto port numbers.
    if let Some(serial) = &desc.serial {
        let isa = fdt.begin_node(ISA_NODE)?;
        fdt.property_string("compatible", "isa")?;
        fdt.property_u32("#address-cells", 2)?;
        fdt.property_u32("#size-cells", 1)?;
        fdt.property_array_u32("ranges", &[1, 0, 0, 0, 0x1_0000])?;
        let uart = fdt.begin_node(&serial_node_name(serial.io_base))?;
        fdt.property_string("compatible", "ns16550a")?;
        fdt.property_array_u32(
            "reg",
            &[1, u32::from(serial.io_base), u32::from(SERIAL_IO_LEN)],
        )?;
        fdt.property_array_u32("interrupts", &[serial.irq, IRQ_TYPE_EDGE_RISING])?;
        fdt.property_u32("clock-frequency", SERIAL_CLOCK_HZ)?;
        fdt.end_node(uart)?;
        fdt.end_node(isa)?;
    }

    // The IOMMU first: Linux creates platform devices in tree order.
    if let Some(iommu) = &desc.iommu {
        virtio_mmio_node(&mut fdt, "iommu", iommu, |fdt| {
            fdt.property_u32("#iommu-cells", 1)?;
            fdt.property_phandle(PHANDLE_IOMMU)
        })?;
    }
    for dev in &desc.virtio_mmio {
        virtio_mmio_node(&mut fdt, "virtio_mmio", dev, |fdt| match dev.endpoint_id {
            // The endpoint ID is the single `#iommu-cells` cell (virtio-iommu.c viommu_of_xlate).
            Some(id) => fdt.property_array_u32("iommus", &[PHANDLE_IOMMU, id]),
            None => Ok(()),
        })?;
    }

    if let Some(p) = poweroff {
        let syscon = fdt.begin_node(&format!("syscon@{:x}", p.base))?;
        fdt.property_string("compatible", "syscon")?;
        fdt.property_array_u64("reg", &[p.base, p.size])?;
        fdt.property_u32("reg-io-width", POWEROFF_REG_WIDTH as u32)?;
        fdt.property_phandle(PHANDLE_POWEROFF_SYSCON)?;
        fdt.end_node(syscon)?;
        let off = fdt.begin_node("poweroff")?;
        fdt.property_string("compatible", "syscon-poweroff")?;
        fdt.property_u32("regmap", PHANDLE_POWEROFF_SYSCON)?;
        fdt.property_u32("offset", p.offset)?;
        fdt.property_u32("value", p.value)?;
        fdt.end_node(off)?;
    }

    fdt.end_node(root)?;
    let dtb = fdt.finish()?;
    log::debug!("device tree: {} bytes", dtb.len());
    Ok(dtb)
}

/// `serial@i3f8`: the ISA binding's unit address for I/O space.
fn serial_node_name(io_base: u16) -> String {
    format!("serial@i{io_base:x}")
}

/// `NAME@base { compatible = "virtio,mmio"; reg; interrupts; dma-coherent; extra }`.
fn virtio_mmio_node(
    fdt: &mut FdtWriter,
    name: &str,
    dev: &VirtioMmioDesc,
    extra: impl FnOnce(&mut FdtWriter) -> Result<(), vm_fdt::Error>,
) -> Result<(), FdtError> {
    let node = fdt.begin_node(&format!("{name}@{:x}", dev.base))?;
    fdt.property_string("compatible", "virtio,mmio")?;
    fdt.property_array_u64("reg", &[dev.base, dev.size])?;
    fdt.property_array_u32("interrupts", &[dev.irq, IRQ_TYPE_EDGE_RISING])?;
    fdt.property_null("dma-coherent")?;
    extra(fdt)?;
    fdt.end_node(node)?;
    Ok(())
}

fn validate(desc: &PlatformDescription, poweroff: Option<&PowerOffDesc>) -> Result<(), FdtError> {
    acpi::validate(desc)?;
    if desc.dmar.is_some() || desc.pvir.is_some() {
        return Err(FdtError::InterruptRemapping);
    }
    if desc.pci.is_some() {
        return Err(FdtError::Pci);
    }
    if desc.ioapic.gsi_base != 0 {
        return Err(FdtError::IoapicGsiBase(desc.ioapic.gsi_base));
    }
    let devices = desc.iommu.iter().chain(&desc.virtio_mmio);
    let irqs = devices
        .clone()
        .map(|d| d.irq)
        .chain(desc.serial.map(|s| s.irq));
    for irq in irqs {
        if irq >= IOAPIC_PINS {
            return Err(FdtError::IrqOutOfRange(irq));
        }
    }
    let Some(p) = poweroff else { return Ok(()) };
    let fits = p.size > 0
        && p.base % REG_PAGE_SIZE == 0
        && u64::from(p.offset) % POWEROFF_REG_WIDTH == 0
        && u64::from(p.offset) + POWEROFF_REG_WIDTH <= p.size
        && p.base.checked_add(p.size).is_some();
    if !fits {
        return Err(FdtError::InvalidPowerOff {
            base: p.base,
            size: p.size,
            offset: p.offset,
        });
    }
    let mut others = vec![
        (u64::from(desc.ioapic.address), REG_PAGE_SIZE, "IOAPIC"),
        (u64::from(LAPIC_ADDR), acpi::LAPIC_WINDOW_SIZE, "LAPIC"),
    ];
    others.extend(desc.iommu.iter().map(|d| (d.base, d.size, "virtio-iommu")));
    others.extend(
        desc.virtio_mmio
            .iter()
            .map(|d| (d.base, d.size, "virtio-mmio")),
    );
    for (base, size, what) in others {
        if p.base < base.saturating_add(size) && base < p.base + p.size {
            return Err(FdtError::PowerOffOverlap {
                base: p.base,
                what,
                other_base: base,
            });
        }
    }
    Ok(())
}
