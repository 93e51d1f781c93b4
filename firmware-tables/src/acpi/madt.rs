//! MADT ("APIC", ACPI 6.5 §5.2.12), read by Linux in arch/x86/kernel/acpi/boot.c.
//!
//! - Flags are 0: PCAT_COMPAT is clear because there is no 8259 PIC.
//! - One Processor Local APIC entry (§5.2.12.2) per vCPU, enabled, UID = APIC ID = index. IDs stay
//!   below 255, so Local x2APIC entries (§5.2.12.12, not offered by `acpi_tables` 0.2.1) are not
//!   needed; Linux accepts either.
//! - One I/O APIC entry (§5.2.12.3).
//! - No Interrupt Source Override (§5.2.12.5). There is no PIT or PIC to remap, and the FADT says
//!   hardware-reduced, so Linux installs no legacy PIC and maps no ISA IRQs by default. Every GSI
//!   the guest uses is declared with its trigger and polarity in the DSDT `_CRS` (the serial port's
//!   IRQ 4 included: identity-mapped, edge, active-high), which is all Linux needs.

use acpi_tables::{
    madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT},
    Aml,
};

use super::{LAPIC_ADDR, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::PlatformDescription;

/// Builds the MADT; `desc` is already validated (`num_cpus` <= 254).
pub(super) fn build(desc: &PlatformDescription) -> Vec<u8> {
    let lapic = LocalInterruptController::Address(LAPIC_ADDR);
    let mut madt = MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, lapic);
    for id in 0..desc.num_cpus as u8 {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    let ioapic = desc.ioapic;
    madt.add_structure(IoApic::new(ioapic.id, ioapic.address, ioapic.gsi_base));
    let mut bytes = Vec::new();
    madt.to_aml_bytes(&mut bytes);
    bytes
}
