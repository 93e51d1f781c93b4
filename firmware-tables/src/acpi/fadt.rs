//! FADT ("FACP") for a hardware-reduced ACPI platform (ACPI 6.5 §5.2.9, §4.1 "Hardware-Reduced
//! ACPI"), and the PM register values the VMM's PM device must agree with.

use acpi_tables::{
    fadt::{FADTBuilder, Flags, FADT},
    gas::{AccessSize, AddressSpace, GAS},
    Aml,
};

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::PmDesc;

pub mod pm {
    //! The hardware-reduced PM register block at [`crate::PmDesc::io_base`] and the values the guest writes.
    //!
    //! Three 8-bit System I/O registers:
    //!
    //! | Port | Register (FADT field) | Guest writes |
    //! |---|---|---|
    //! | `io_base + PM_RESET_REG_OFFSET` | `RESET_REG` | [`RESET_VALUE`] to reset (reboot) |
    //! | `io_base + PM_SLEEP_CONTROL_REG_OFFSET` | `SLEEP_CONTROL_REG` | [`S5_SLEEP_CONTROL_VALUE`] to power off |
    //! | `io_base + PM_SLEEP_STATUS_REG_OFFSET` | `SLEEP_STATUS_REG` | [`WAK_STS`] (write-1-to-clear) before sleeping |
    //!
    //! Linux powers off in `acpi_hw_extended_sleep()` (drivers/acpi/acpica/hwesleep.c): it writes
    //! `WAK_STS` to the status register, then `(SLP_TYP << 2) & 0x1C | SLP_EN` to the control register
    //! with SLP_TYP taken from the DSDT `\_S5_` package, then polls the status register for `WAK_STS`.
    //! It only offers ACPI power-off at all when both sleep registers have non-zero addresses
    //! (`acpi_sleep_state_supported()`, drivers/acpi/sleep.c). Reboot goes through `acpi_reboot()`
    //! (drivers/acpi/reboot.c) and `acpi_reset()`, which write `RESET_VALUE` to `RESET_REG`.

    /// Number of I/O ports in the block.
    pub const PM_IO_LEN: u16 = 3;
    /// Offset of the reset register.
    pub const PM_RESET_REG_OFFSET: u16 = 0;
    /// Offset of the sleep control register.
    pub const PM_SLEEP_CONTROL_REG_OFFSET: u16 = 1;
    /// Offset of the sleep status register.
    pub const PM_SLEEP_STATUS_REG_OFFSET: u16 = 2;

    /// Value written to the reset register to reset the platform (FADT `RESET_VALUE`).
    pub const RESET_VALUE: u8 = 0x1;

    /// SLP_TYP for S5 (soft off), the only element of the DSDT `\_S5_` package.
    pub const S5_SLP_TYP: u8 = 5;
    /// Bit position of SLP_TYP in the sleep control register (ACPI 6.5 §4.8.3.7).
    pub const SLP_TYP_SHIFT: u8 = 2;
    /// SLP_EN bit of the sleep control register.
    pub const SLP_EN: u8 = 1 << 5;
    /// The byte Linux writes to the sleep control register to power off: `5 << 2 | SLP_EN` = 0x34.
    pub const S5_SLEEP_CONTROL_VALUE: u8 = (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN;
    /// WAK_STS bit of the sleep status register (ACPI 6.5 §4.8.3.7, Sleep Status Register).
    pub const WAK_STS: u8 = 1 << 7;
}

/// IA-PC boot architecture flags (ACPI 6.5 §5.2.9.3). Cleared on purpose: LEGACY_DEVICES and
/// 8042 (no ISA/LPC devices, no keyboard controller) and MSI_NOT_SUPPORTED (we use MSI).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// There is no CMOS RTC: Linux then skips the `rtc_cmos` device and gets wall time from kvmclock.
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Size of the FADT the crate writes (revision 6.5, 276 bytes).
pub(super) fn len() -> u64 {
    FADT::len() as u64
}

/// Builds the FADT pointing at the DSDT through `X_DSDT`.
pub(super) fn build(pm_desc: PmDesc, dsdt_addr: u64) -> Vec<u8> {
    let port = |offset: u16| {
        let addr = u64::from(pm_desc.io_base) + u64::from(offset);
        GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, addr)
    };
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // Buttons, if ever, are control-method devices: no fixed-feature buttons.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    fadt.reset_reg = port(pm::PM_RESET_REG_OFFSET);
    fadt.reset_value = pm::RESET_VALUE;
    fadt.sleep_control_reg = port(pm::PM_SLEEP_CONTROL_REG_OFFSET);
    fadt.sleep_status_reg = port(pm::PM_SLEEP_STATUS_REG_OFFSET);
    let mut bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}
