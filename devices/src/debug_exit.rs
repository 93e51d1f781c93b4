// SPDX-License-Identifier: Apache-2.0

//! An `isa-debug-exit`-compatible port (QEMU's device, default settings): a guest write of
//! value `v` to the port stops the VM and the VMM exits with status `(v << 1) | 1`, so guest
//! test suites written for QEMU (`-device isa-debug-exit,iobase=0xf4,iosize=0x01`) report
//! their result through the VMM unchanged.
//!
//! One byte at offset 0 (a wider write keeps its low byte, as QEMU's 1-byte port sees it);
//! reads return all ones. The request goes to the VMM's event loop through the
//! [`ExitSignal`], like power-off.

use crate::bus::BusDevice;
use crate::exit::{ExitRequest, ExitSignal};

/// QEMU's default `isa-debug-exit` port.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Ports the register occupies (QEMU's default `iosize`).
pub const DEBUG_EXIT_PORT_LEN: u64 = 1;

/// The process exit status QEMU gives for a guest write of `value`: `(value << 1) | 1`,
/// truncated to 8 bits as every exit status is.
pub fn debug_exit_status(value: u8) -> u8 {
    (value << 1) | 1
}

/// The port; see the [module documentation](self).
pub struct DebugExit {
    signal: ExitSignal,
}

impl DebugExit {
    /// A port that reports writes through `signal`.
    pub fn new(signal: ExitSignal) -> Self {
        DebugExit { signal }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.first()) {
            (0, Some(&v)) => self.signal.request(ExitRequest::DebugExit(v)),
            _ => crate::guest_debug!("debug-exit: ignored write at offset {offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_requests_a_debug_exit_with_the_byte_written() {
        let signal = ExitSignal::new().unwrap();
        let mut port = DebugExit::new(signal.clone());
        let mut d = [0u8; 1];
        port.read(0, &mut d);
        assert_eq!(d, [0xff]);
        assert_eq!(signal.take(), None, "reads do nothing");
        port.write(0, &[0x10]);
        assert_eq!(signal.take(), Some(ExitRequest::DebugExit(0x10)));
        port.write(0, &[0x34, 0x12]);
        assert_eq!(signal.take(), Some(ExitRequest::DebugExit(0x34)));
    }

    #[test]
    fn status_is_qemus() {
        assert_eq!(debug_exit_status(0), 1);
        assert_eq!(debug_exit_status(1), 3);
        assert_eq!(debug_exit_status(0x10), 0x21);
        assert_eq!(debug_exit_status(0x7f), 0xff);
        assert_eq!(
            debug_exit_status(0x80),
            1,
            "the high bit is lost, as under QEMU"
        );
    }
}
