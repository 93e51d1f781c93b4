// SPDX-License-Identifier: Apache-2.0

//! 16550A UART on a port-I/O base (8 registers), wrapping `vm_superio::Serial`.
//!
//! The guest's output goes to a `Box<dyn Write + Send>` (stdout in the VMM, a buffer in tests);
//! the VMM's stdin handler feeds input with [`Serial::enqueue_input`]. The UART's interrupt is
//! an [`InterruptLine`], normally the irqfd of the IOAPIC pin the firmware tables give COM1.

use std::fmt;
use std::io::{self, Write};
use std::sync::Arc;

use log::{debug, warn};
use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;

/// Number of port-I/O registers of the UART (its bus range length).
pub const SERIAL_PORT_LEN: u64 = 8;

/// Adapts an [`InterruptLine`] to vm-superio's [`Trigger`].
struct LineTrigger(Arc<dyn InterruptLine>);

impl Trigger for LineTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

type Uart = vm_superio::Serial<LineTrigger, NoEvents, Box<dyn Write + Send>>;

/// A 16550A UART; see the [module documentation](self).
pub struct Serial {
    uart: Uart,
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serial")
            .field("fifo_capacity", &self.uart.fifo_capacity())
            .finish_non_exhaustive()
    }
}

impl Serial {
    /// Creates a UART that raises `interrupt` and writes the guest's output to `out`.
    pub fn new(interrupt: Arc<dyn InterruptLine>, out: Box<dyn Write + Send>) -> Serial {
        Serial {
            uart: vm_superio::Serial::new(LineTrigger(interrupt), out),
        }
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest, as much as fits in the receive FIFO, and raises the
    /// receive interrupt if the guest enabled it. Returns how many bytes were accepted (0 when
    /// the FIFO is full or the UART is in loopback mode); the caller keeps the rest for later.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        let accepted = bytes.len().min(self.uart.fifo_capacity());
        match self.uart.enqueue_raw_bytes(&bytes[..accepted]) {
            Ok(n) => n,
            Err(UartError::FullFifo) => 0,
            // The bytes are in the FIFO; only the interrupt was lost.
            Err(UartError::Trigger(e)) => {
                warn!("serial: cannot raise the receive interrupt: {e}");
                accepted
            }
            Err(UartError::IOError(e)) => {
                warn!("serial: input error: {e}");
                0
            }
        }
    }

    /// The register offset of a one-byte access, or `None` for anything else.
    fn register(offset: u64, len: usize) -> Option<u8> {
        if len != 1 || offset >= SERIAL_PORT_LEN {
            debug!("serial: ignoring {len}-byte access at offset {offset:#x}");
            return None;
        }
        // Lossless: offset < 8.
        Some(offset as u8)
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::register(offset, data.len()) {
            Some(reg) => data[0] = self.uart.read(reg),
            None => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(reg) = Self::register(offset, data.len()) else {
            return;
        };
        match self.uart.write(reg, data[0]) {
            Ok(()) => {}
            Err(UartError::Trigger(e)) => warn!("serial: cannot raise interrupt: {e}"),
            // The guest's byte is lost (stdout closed, say); the UART keeps running.
            Err(UartError::IOError(e)) => debug!("serial: output error: {e}"),
            Err(UartError::FullFifo) => debug!("serial: loopback FIFO full"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::interrupt::CountingLine;

    // 16550 register offsets and bits used below.
    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const LSR_DATA_READY: u8 = 0x01;
    const MCR_LOOP: u8 = 0x10;
    /// vm-superio's receive FIFO size.
    const FIFO_SIZE: usize = 64;

    /// A `Write` sink the test can read after handing it to the UART.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A sink that always fails, like a closed stdout.
    struct BrokenPipe;

    impl Write for BrokenPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    fn serial() -> (Serial, Arc<CountingLine>, SharedBuf) {
        let line = Arc::new(CountingLine::new());
        let out = SharedBuf::default();
        let serial = Serial::new(line.clone(), Box::new(out.clone()));
        (serial, line, out)
    }

    fn read_byte(serial: &mut Serial, offset: u64) -> u8 {
        let mut data = [0u8];
        serial.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn guest_output_reaches_the_sink() {
        let (mut serial, _, out) = serial();
        for b in b"hi\n" {
            serial.write(DATA, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn output_raises_thre_interrupt_when_enabled() {
        let (mut serial, line, _) = serial();
        serial.write(IER, &[IER_THRE]);
        // Enabling THRE with an empty transmitter raises it at once; reading IIR acknowledges.
        assert_eq!(line.triggers(), 1);
        read_byte(&mut serial, IIR);
        serial.write(DATA, b"x");
        assert_eq!(line.triggers(), 2);
    }

    #[test]
    fn input_is_readable_and_raises_rda_interrupt() {
        let (mut serial, line, _) = serial();
        serial.write(IER, &[IER_RDA]);
        assert_eq!(serial.enqueue_input(b"ok"), 2);
        assert_eq!(line.triggers(), 1);
        assert_ne!(read_byte(&mut serial, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_byte(&mut serial, DATA), b'o');
        assert_eq!(read_byte(&mut serial, DATA), b'k');
        assert_eq!(read_byte(&mut serial, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_respects_fifo_capacity() {
        let (mut serial, _, _) = serial();
        let input = [b'a'; FIFO_SIZE + 10];
        assert_eq!(serial.enqueue_input(&input), FIFO_SIZE);
        assert_eq!(serial.fifo_capacity(), 0);
        assert_eq!(serial.enqueue_input(b"more"), 0);
        read_byte(&mut serial, DATA);
        assert_eq!(serial.enqueue_input(b"more"), 1);
    }

    #[test]
    fn empty_input_is_accepted_trivially() {
        let (mut serial, line, _) = serial();
        assert_eq!(serial.enqueue_input(b""), 0);
        assert_eq!(line.triggers(), 0);
    }

    #[test]
    fn loopback_mode_refuses_host_input() {
        let (mut serial, _, _) = serial();
        serial.write(MCR, &[MCR_LOOP]);
        assert_eq!(serial.enqueue_input(b"x"), 0);
    }

    #[test]
    fn broken_output_does_not_stop_the_uart() {
        let line = Arc::new(CountingLine::new());
        let mut serial = Serial::new(line, Box::new(BrokenPipe));
        serial.write(DATA, b"x");
        serial.write(LCR, &[0x03]);
        assert_eq!(read_byte(&mut serial, LCR), 0x03);
    }

    #[test]
    fn out_of_range_and_wide_accesses_are_ignored() {
        let (mut serial, _, out) = serial();
        serial.write(8, b"x");
        serial.write(u64::MAX, b"x");
        serial.write(DATA, b"xy");
        serial.write(DATA, &[]);
        assert!(out.0.lock().unwrap().is_empty());

        let mut wide = [0xffu8; 2];
        serial.read(DATA, &mut wide);
        assert_eq!(wide, [0, 0]);
        let mut outside = [0xffu8];
        serial.read(9, &mut outside);
        assert_eq!(outside, [0]);
        serial.read(LSR, &mut []);
    }
}
