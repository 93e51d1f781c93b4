// SPDX-License-Identifier: Apache-2.0

//! Minimal i8042 keyboard controller: only the CPU-reset command.
//!
//! Put it on the port-I/O bus at 0x60 with length [`I8042_PORT_LEN`], so it sees the data port
//! (0x60) at offset 0 and the status/command port (0x64) at offset 4. Every read answers 0 (for
//! the status register: output buffer empty, no data); writing [`I8042_CMD_RESET_CPU`] to the
//! command port requests [`ExitRequest::Reset`] (Linux's `reboot=k` path). Everything else is
//! ignored. Linux's i8042 driver, if it probes at all (without a PS/2 device in the DSDT it
//! usually does not), times out on its first command and leaves the controller alone.

use log::debug;

use crate::bus::BusDevice;
use crate::exit::{ExitRequest, ExitSignal};

/// Bus range length when based at the data port 0x60: it spans 0x60-0x64.
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the data port (0x60).
pub const I8042_DATA_OFFSET: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64).
pub const I8042_COMMAND_OFFSET: u64 = 4;
/// Command "pulse the CPU reset line".
pub const I8042_CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 stub; see the [module documentation](self).
#[derive(Debug)]
pub struct I8042 {
    exit: ExitSignal,
}

impl I8042 {
    /// Creates the controller; a reset command goes to `exit`.
    pub fn new(exit: ExitSignal) -> I8042 {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (I8042_COMMAND_OFFSET, [I8042_CMD_RESET_CPU]) => self.exit.request(ExitRequest::Reset),
            _ => debug!("i8042: ignoring write {data:x?} at offset {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i8042() -> (I8042, ExitSignal) {
        let exit = ExitSignal::new().unwrap();
        (I8042::new(exit.clone()), exit)
    }

    #[test]
    fn reset_command_requests_reset() {
        let (mut dev, exit) = i8042();
        dev.write(I8042_COMMAND_OFFSET, &[I8042_CMD_RESET_CPU]);
        assert_eq!(exit.take(), Some(ExitRequest::Reset));
    }

    #[test]
    fn status_reads_zero() {
        let (mut dev, _) = i8042();
        let mut data = [0xffu8];
        dev.read(I8042_COMMAND_OFFSET, &mut data);
        assert_eq!(data, [0]);
        dev.read(I8042_DATA_OFFSET, &mut data);
        assert_eq!(data, [0]);
    }

    #[test]
    fn other_writes_are_ignored() {
        let (mut dev, exit) = i8042();
        dev.write(I8042_DATA_OFFSET, &[I8042_CMD_RESET_CPU]);
        dev.write(I8042_COMMAND_OFFSET, &[0x20]);
        dev.write(I8042_COMMAND_OFFSET, &[I8042_CMD_RESET_CPU, 0]);
        dev.write(I8042_COMMAND_OFFSET, &[]);
        dev.write(u64::MAX, &[I8042_CMD_RESET_CPU]);
        assert_eq!(exit.take(), None);
    }
}
