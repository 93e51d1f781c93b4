// SPDX-License-Identifier: Apache-2.0

//! A one-register MMIO power-off device for device-tree guests, which have no ACPI PM block.
//!
//! The device tree describes it as a `syscon` node (its window) plus a `syscon-poweroff`
//! node with `offset = <POWEROFF_REG_OFFSET>` and `value = <POWEROFF_VALUE>`. Linux
//! (drivers/power/reset/syscon-poweroff.c) then powers off with `regmap_update_bits`: a 32-bit
//! read of the register, then (because the read gave something else) a 32-bit write of the
//! value.
//!
//! | Offset | Access | Behaviour |
//! |---|---|---|
//! | [`POWEROFF_REG_OFFSET`] | 32-bit write of [`POWEROFF_VALUE`] | requests [`ExitRequest::PowerOff`] |
//! | anything else | any | reads 0, writes ignored |
//!
//! Reads always return 0, so the regmap read-modify-write never skips its write.

use crate::bus::BusDevice;
use crate::exit::{ExitRequest, ExitSignal};
use crate::guest_debug;

/// Size of the register window (one page).
pub const POWEROFF_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the power-off register.
pub const POWEROFF_REG_OFFSET: u64 = 0;
/// Value whose 32-bit write to the register powers the machine off.
pub const POWEROFF_VALUE: u32 = 1;

/// The power-off register; see the [module documentation](self).
#[derive(Debug)]
pub struct PowerOff {
    exit: ExitSignal,
}

impl PowerOff {
    /// Creates the device; a power-off write goes to `exit`.
    pub fn new(exit: ExitSignal) -> PowerOff {
        PowerOff { exit }
    }
}

impl BusDevice for PowerOff {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, <[u8; 4]>::try_from(data)) {
            (POWEROFF_REG_OFFSET, Ok(v)) if u32::from_le_bytes(v) == POWEROFF_VALUE => {
                self.exit.request(ExitRequest::PowerOff)
            }
            _ => guest_debug!("poweroff: ignoring write {data:x?} at offset {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (PowerOff, ExitSignal) {
        let exit = ExitSignal::new().unwrap();
        (PowerOff::new(exit.clone()), exit)
    }

    #[test]
    fn regmap_update_bits_sequence_powers_off() {
        let (mut dev, exit) = dev();
        // regmap_update_bits(map, 0, 0xffffffff, 1): read, then write because it differs.
        let mut cur = [0xffu8; 4];
        dev.read(POWEROFF_REG_OFFSET, &mut cur);
        assert_ne!(u32::from_le_bytes(cur), POWEROFF_VALUE);
        dev.write(POWEROFF_REG_OFFSET, &POWEROFF_VALUE.to_le_bytes());
        assert_eq!(exit.take(), Some(ExitRequest::PowerOff));
    }

    #[test]
    fn other_values_widths_and_offsets_are_ignored() {
        let (mut dev, exit) = dev();
        dev.write(POWEROFF_REG_OFFSET, &0u32.to_le_bytes());
        dev.write(POWEROFF_REG_OFFSET, &2u32.to_le_bytes());
        dev.write(POWEROFF_REG_OFFSET, &[1]);
        dev.write(POWEROFF_REG_OFFSET, &[1, 0]);
        dev.write(POWEROFF_REG_OFFSET, &1u64.to_le_bytes());
        dev.write(4, &1u32.to_le_bytes());
        dev.write(u64::MAX, &1u32.to_le_bytes());
        dev.write(POWEROFF_REG_OFFSET, &[]);
        assert_eq!(exit.take(), None);
    }

    #[test]
    fn reads_are_zero_everywhere() {
        let (mut dev, _) = dev();
        for (off, len) in [(0, 4), (0, 8), (3, 1), (u64::MAX, 2), (0xffc, 4)] {
            let mut data = vec![0xa5u8; len];
            dev.read(off, &mut data);
            assert!(data.iter().all(|&b| b == 0));
        }
    }
}
