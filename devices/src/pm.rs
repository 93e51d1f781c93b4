// SPDX-License-Identifier: Apache-2.0

//! ACPI hardware-reduced power management: reset and sleep registers on a port-I/O base.
//!
//! Three one-byte registers, at the offsets below from the device's base port:
//!
//! | Offset | Register | Behaviour |
//! |---|---|---|
//! | [`PM_RESET_REG_OFFSET`] | FADT `RESET_REG` | writing [`PM_RESET_VALUE`] requests a reset |
//! | [`PM_SLEEP_CONTROL_REG_OFFSET`] | FADT `SLEEP_CONTROL_REG` | `SLP_EN` with `SLP_TYP` = [`PM_SLP_TYP_S5`] requests power-off |
//! | [`PM_SLEEP_STATUS_REG_OFFSET`] | FADT `SLEEP_STATUS_REG` | reads 0, writes ignored |
//!
//! The firmware tables must agree with these constants: the FADT's `RESET_REG` and
//! `RESET_VALUE` (= [`PM_RESET_VALUE`]), its sleep control/status registers (System I/O,
//! 8-bit, at base + offset), and the DSDT `_S5` package, whose `SLP_TYP` value must be
//! [`PM_SLP_TYP_S5`]. Linux writes `SLP_TYP << 2 | SLP_EN` ([`PM_SLEEP_S5_VALUE`]) to the sleep
//! control register (ACPICA `acpi_hw_extended_sleep`).

use log::debug;

use crate::bus::BusDevice;
use crate::exit::{ExitRequest, ExitSignal};

/// Offset of the reset register.
pub const PM_RESET_REG_OFFSET: u64 = 0;
/// Offset of the sleep control register.
pub const PM_SLEEP_CONTROL_REG_OFFSET: u64 = 1;
/// Offset of the sleep status register.
pub const PM_SLEEP_STATUS_REG_OFFSET: u64 = 2;
/// Number of ports the device occupies (its bus range length).
pub const PM_REG_LEN: u64 = 3;

/// Value the guest writes to the reset register to reset the machine (FADT `RESET_VALUE`).
pub const PM_RESET_VALUE: u8 = 0x01;
/// `SLP_TYP` for S5 (soft off); the DSDT `_S5` package must carry this value.
pub const PM_SLP_TYP_S5: u8 = 5;
/// Sleep control register: `SLP_TYP` field, bits 4:2 (ACPI 6.5, 4.8.3.7).
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;
/// Sleep control register: `SLP_EN`, bit 5.
const SLP_EN: u8 = 1 << 5;
/// What a guest entering S5 writes to the sleep control register.
pub const PM_SLEEP_S5_VALUE: u8 = PM_SLP_TYP_S5 << SLP_TYP_SHIFT | SLP_EN;

/// The power-management device; see the [module documentation](self).
#[derive(Debug)]
pub struct AcpiPm {
    exit: ExitSignal,
}

impl AcpiPm {
    /// Creates the device; requests go to `exit`.
    pub fn new(exit: ExitSignal) -> AcpiPm {
        AcpiPm { exit }
    }

    fn write_register(&mut self, offset: u64, value: u8) {
        match offset {
            PM_RESET_REG_OFFSET if value == PM_RESET_VALUE => self.exit.request(ExitRequest::Reset),
            PM_RESET_REG_OFFSET => debug!("pm: ignoring reset register value {value:#x}"),
            // Reserved bits (7:6, 1:0) are ignored.
            PM_SLEEP_CONTROL_REG_OFFSET if value & (SLP_TYP_MASK | SLP_EN) == PM_SLEEP_S5_VALUE => {
                self.exit.request(ExitRequest::PowerOff)
            }
            PM_SLEEP_CONTROL_REG_OFFSET => {
                debug!("pm: ignoring sleep control value {value:#x} (only S5 is supported)")
            }
            // Linux clears WAK_STS here before sleeping; there is nothing to clear.
            PM_SLEEP_STATUS_REG_OFFSET => {}
            _ => debug!("pm: ignoring write {value:#x} at offset {offset:#x}"),
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // The reset and sleep control registers are write-only, sleep status is always clear.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Byte registers: a wider access writes each byte to its own register.
        for (i, value) in (0u64..).zip(data) {
            match offset.checked_add(i) {
                Some(offset) => self.write_register(offset, *value),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm() -> (AcpiPm, ExitSignal) {
        let exit = ExitSignal::new().unwrap();
        (AcpiPm::new(exit.clone()), exit)
    }

    #[test]
    fn s5_value_matches_the_acpi_encoding() {
        assert_eq!(PM_SLEEP_S5_VALUE, 0x34);
    }

    #[test]
    fn reset_write_requests_reset() {
        let (mut pm, exit) = pm();
        pm.write(PM_RESET_REG_OFFSET, &[PM_RESET_VALUE]);
        assert_eq!(exit.take(), Some(ExitRequest::Reset));
    }

    #[test]
    fn other_reset_values_are_ignored() {
        let (mut pm, exit) = pm();
        for value in [0x00, 0x02, 0xfe, 0xff] {
            pm.write(PM_RESET_REG_OFFSET, &[value]);
        }
        assert_eq!(exit.take(), None);
    }

    #[test]
    fn s5_sleep_requests_power_off() {
        let (mut pm, exit) = pm();
        pm.write(PM_SLEEP_CONTROL_REG_OFFSET, &[PM_SLEEP_S5_VALUE]);
        assert_eq!(exit.take(), Some(ExitRequest::PowerOff));
    }

    #[test]
    fn s5_sleep_ignores_reserved_bits() {
        let (mut pm, exit) = pm();
        pm.write(PM_SLEEP_CONTROL_REG_OFFSET, &[PM_SLEEP_S5_VALUE | 0xc3]);
        assert_eq!(exit.take(), Some(ExitRequest::PowerOff));
    }

    #[test]
    fn other_sleep_values_are_ignored() {
        let (mut pm, exit) = pm();
        // S5 type without SLP_EN, SLP_EN with S3 type (3), SLP_EN alone.
        for value in [PM_SLP_TYP_S5 << 2, 3 << 2 | SLP_EN, SLP_EN, 0] {
            pm.write(PM_SLEEP_CONTROL_REG_OFFSET, &[value]);
        }
        assert_eq!(exit.take(), None);
    }

    #[test]
    fn sleep_status_reads_zero_and_ignores_writes() {
        let (mut pm, exit) = pm();
        pm.write(PM_SLEEP_STATUS_REG_OFFSET, &[0x80]);
        let mut data = [0xffu8];
        pm.read(PM_SLEEP_STATUS_REG_OFFSET, &mut data);
        assert_eq!(data, [0]);
        assert_eq!(exit.take(), None);
    }

    #[test]
    fn wide_write_hits_each_byte_register() {
        let (mut pm, exit) = pm();
        pm.write(PM_RESET_REG_OFFSET, &[0, PM_SLEEP_S5_VALUE]);
        assert_eq!(exit.take(), Some(ExitRequest::PowerOff));
    }

    #[test]
    fn hostile_accesses_never_panic() {
        let (mut pm, _) = pm();
        pm.write(u64::MAX, &[PM_RESET_VALUE, PM_RESET_VALUE]);
        pm.write(PM_REG_LEN, &[PM_RESET_VALUE]);
        pm.write(0, &[]);
        let mut data = [0xffu8; 8];
        pm.read(u64::MAX, &mut data);
        assert_eq!(data, [0; 8]);
    }
}
